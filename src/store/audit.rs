//! The audit trail's storage: appending events to the MAC chain inside the caller's
//! transaction, and reading them back. The MAC itself comes from an [`AuditSigner`] (the token),
//! which this module calls but does not know.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use uuid::Uuid;

use super::{Store, StoreError};
use crate::crypto::{AuditFields, audit_mac_input};
use crate::hsm::HsmError;

/// Computes an audit row's MAC (HMAC-SHA256 with the token's audit key).
pub trait AuditSigner: Send + Sync {
    /// The MAC of `message`.
    fn sign(
        &self,
        message: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<[u8; 32], HsmError>> + Send + '_>>;
}

/// Who, from where, when: what every event of one operation shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditMeta {
    /// A client id, `officer` (CLI), `scheduler` or `anonymous`.
    pub actor: String,
    /// The caller's address.
    pub source_ip: Option<String>,
    /// The HTTP request id.
    pub request_id: Option<String>,
    /// Microseconds since the epoch.
    pub at_us: i64,
}

/// One event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditEvent {
    /// `info`, `warning`, `error` or `critical`.
    pub severity: &'static str,
    /// The event name, e.g. `key.rotated`.
    pub event: &'static str,
    /// What it was done to (an id or name).
    pub subject: Option<String>,
    /// The client concerned.
    pub client_id: Option<Uuid>,
    /// The key concerned.
    pub key_id: Option<Uuid>,
    /// Structured details: ids, versions, states, a hash of a context — never key material,
    /// secrets, PINs or tokens.
    pub details: serde_json::Value,
}

impl NewAuditEvent {
    /// An `info` event with empty details.
    pub fn info(event: &'static str) -> Self {
        Self {
            severity: "info",
            event,
            subject: None,
            client_id: None,
            key_id: None,
            details: serde_json::Value::Object(serde_json::Map::new()),
        }
    }

    /// The same event at another severity.
    pub fn severity(mut self, severity: &'static str) -> Self {
        self.severity = severity;
        self
    }

    /// With a subject.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Concerning a client.
    pub fn client(mut self, id: Uuid) -> Self {
        self.client_id = Some(id);
        self
    }

    /// Concerning a key.
    pub fn key(mut self, id: Uuid) -> Self {
        self.key_id = Some(id);
        self
    }

    /// With details.
    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

/// A stored audit event.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditRow {
    /// Position in the chain.
    pub seq: i64,
    /// Microseconds since the epoch.
    pub at_us: i64,
    /// Severity.
    pub severity: String,
    /// Event name.
    pub event: String,
    /// Who.
    pub actor: String,
    /// What it was done to.
    pub subject: Option<String>,
    /// The client concerned.
    pub client_id: Option<Uuid>,
    /// The key concerned.
    pub key_id: Option<Uuid>,
    /// Where from.
    pub source_ip: Option<String>,
    /// The HTTP request.
    pub request_id: Option<String>,
    /// Canonical JSON.
    pub details: String,
    /// The previous row's MAC.
    pub prev_mac: Vec<u8>,
    /// This row's MAC.
    pub mac: Vec<u8>,
}

impl AuditRow {
    /// The bytes its MAC covers.
    pub fn mac_input(&self) -> Vec<u8> {
        let client = self.client_id.map(|c| c.to_string());
        let key = self.key_id.map(|k| k.to_string());
        audit_mac_input(&AuditFields {
            seq: self.seq,
            at_us: self.at_us,
            severity: &self.severity,
            event: &self.event,
            actor: &self.actor,
            subject: self.subject.as_deref(),
            client_id: client.as_deref(),
            key_id: key.as_deref(),
            source_ip: self.source_ip.as_deref(),
            request_id: self.request_id.as_deref(),
            details: &self.details,
            prev_mac: &self.prev_mac,
        })
    }
}

/// Filters of an audit query.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// From this time (µs), inclusive.
    pub from_us: Option<i64>,
    /// Until this time (µs), exclusive.
    pub to_us: Option<i64>,
    /// Concerning this client.
    pub client_id: Option<Uuid>,
    /// Concerning this key.
    pub key_id: Option<Uuid>,
    /// This event name.
    pub event: Option<String>,
    /// This severity.
    pub severity: Option<String>,
    /// After this position (pagination).
    pub after_seq: Option<i64>,
}

const AUDIT_COLUMNS: &str = "seq, at_us, severity, event, actor, subject, client_id, key_id,
    source_ip, request_id, details, prev_mac, mac";

/// Appends `events` to the chain inside the caller's transaction: the head row is locked, so
/// appends from every broker queue up behind each other and the chain never forks.
pub(super) async fn append(
    conn: &mut sqlx::PgConnection,
    signer: &dyn AuditSigner,
    meta: &AuditMeta,
    events: &[NewAuditEvent],
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let (mut seq, mut prev): (i64, Vec<u8>) =
        sqlx::query_as("SELECT seq, mac FROM audit_chain_head FOR UPDATE")
            .fetch_one(&mut *conn)
            .await?;
    for event in events {
        seq += 1;
        let mut row = AuditRow {
            seq,
            at_us: meta.at_us,
            severity: event.severity.to_owned(),
            event: event.event.to_owned(),
            actor: meta.actor.clone(),
            subject: event.subject.clone(),
            client_id: event.client_id,
            key_id: event.key_id,
            source_ip: meta.source_ip.clone(),
            request_id: meta.request_id.clone(),
            // serde_json's maps are sorted by key: this text is canonical.
            details: event.details.to_string(),
            prev_mac: prev,
            mac: Vec::new(),
        };
        row.mac = signer
            .sign(row.mac_input())
            .await
            .map_err(StoreError::AuditSign)?
            .to_vec();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO audit_events ({AUDIT_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        )))
        .bind(row.seq)
        .bind(row.at_us)
        .bind(&row.severity)
        .bind(&row.event)
        .bind(&row.actor)
        .bind(&row.subject)
        .bind(row.client_id)
        .bind(row.key_id)
        .bind(&row.source_ip)
        .bind(&row.request_id)
        .bind(&row.details)
        .bind(&row.prev_mac)
        .bind(&row.mac)
        .execute(&mut *conn)
        .await?;
        prev = row.mac;
    }
    sqlx::query("UPDATE audit_chain_head SET seq = $1, mac = $2")
        .bind(seq)
        .bind(&prev)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

impl Store {
    /// Installs the MAC signer every audited write uses (idempotent: the first one stays).
    pub fn set_audit_signer(&self, signer: Arc<dyn AuditSigner>) {
        let _ = self.audit_signer.set(signer);
    }

    pub(super) fn signer(&self) -> Result<&dyn AuditSigner, StoreError> {
        self.audit_signer
            .get()
            .map(|s| s.as_ref())
            .ok_or(StoreError::NoAuditSigner)
    }

    /// Appends events that record no change of their own (a token issued, a read, a refusal).
    ///
    /// # Errors
    /// Any database or signing failure.
    pub async fn audit(
        &self,
        meta: &AuditMeta,
        events: &[NewAuditEvent],
    ) -> Result<(), StoreError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        append(&mut tx, signer, meta, events).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Events matching `filter`, oldest first, at most `limit`.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn audit_events(
        &self,
        filter: &AuditFilter,
        limit: i64,
    ) -> Result<Vec<AuditRow>, StoreError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events
             WHERE ($1::bigint IS NULL OR at_us >= $1) AND ($2::bigint IS NULL OR at_us < $2)
               AND ($3::uuid IS NULL OR client_id = $3) AND ($4::uuid IS NULL OR key_id = $4)
               AND ($5::text IS NULL OR event = $5) AND ($6::text IS NULL OR severity = $6)
               AND ($7::bigint IS NULL OR seq > $7)
             ORDER BY seq LIMIT $8"
        )))
        .bind(filter.from_us)
        .bind(filter.to_us)
        .bind(filter.client_id)
        .bind(filter.key_id)
        .bind(&filter.event)
        .bind(&filter.severity)
        .bind(filter.after_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The chain in storage order (by `seq`), a page at a time, for verification.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn audit_chain(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditRow>, StoreError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2"
        )))
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The chain's head: the last position and MAC.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn audit_head(&self) -> Result<(i64, Vec<u8>), StoreError> {
        Ok(sqlx::query_as("SELECT seq, mac FROM audit_chain_head")
            .fetch_one(&self.pool)
            .await?)
    }
}
