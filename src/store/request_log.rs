//! The request log: one row per HTTP request, inserted in batches and purged by age. It knows
//! nothing of HTTP; `api` fills the rows.

use std::net::IpAddr;

use uuid::Uuid;

use super::keys::ts;
use super::{Store, StoreError};

/// How many rows one purge statement deletes at most, so that a large backlog is removed in
/// short transactions instead of one long lock-holding one.
const PURGE_CHUNK: i64 = 10_000;

/// One request, as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLogRow {
    /// When the request arrived, unix microseconds.
    pub at_us: i64,
    /// The `x-request-id` returned to the caller.
    pub request_id: String,
    /// The authenticated client, if the request got that far.
    pub client_id: Option<Uuid>,
    /// The caller's address (after trusted-proxy resolution).
    pub source_ip: IpAddr,
    /// The `User-Agent` header, at most 512 characters.
    pub user_agent: Option<String>,
    /// The `Host` header or HTTP/2 authority.
    pub host: Option<String>,
    /// The HTTP method.
    pub method: String,
    /// The route template, e.g. `/v1/keys/{id}`, or `(unmatched)`.
    pub path: String,
    /// The response status.
    pub status: i16,
    /// The stable error code of a refused or failed request.
    pub error_code: Option<String>,
    /// Time to the response head, in microseconds.
    pub latency_us: i64,
}

impl Store {
    /// Inserts a batch of request-log rows in one statement.
    ///
    /// # Errors
    /// Any database failure; then none of the rows is inserted.
    pub async fn insert_request_log(&self, rows: &[RequestLogRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let at: Vec<i64> = rows.iter().map(|r| r.at_us).collect();
        let request_ids: Vec<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
        let clients: Vec<Option<Uuid>> = rows.iter().map(|r| r.client_id).collect();
        let sources: Vec<String> = rows.iter().map(|r| r.source_ip.to_string()).collect();
        let agents: Vec<Option<&str>> = rows.iter().map(|r| r.user_agent.as_deref()).collect();
        let hosts: Vec<Option<&str>> = rows.iter().map(|r| r.host.as_deref()).collect();
        let methods: Vec<&str> = rows.iter().map(|r| r.method.as_str()).collect();
        let paths: Vec<&str> = rows.iter().map(|r| r.path.as_str()).collect();
        let statuses: Vec<i16> = rows.iter().map(|r| r.status).collect();
        let codes: Vec<Option<&str>> = rows.iter().map(|r| r.error_code.as_deref()).collect();
        let latencies: Vec<i64> = rows.iter().map(|r| r.latency_us).collect();
        // Microseconds are added to the epoch as an interval: exact, where a float of seconds
        // would round.
        sqlx::query(
            "INSERT INTO request_log (at, request_id, client_id, source_ip, user_agent, host,
                                      method, path, status, error_code, latency_us)
             SELECT timestamptz 'epoch' + a * interval '1 microsecond', r, c, s::inet, u, h,
                    m, p, st, e, l
             FROM unnest($1::bigint[], $2::text[], $3::uuid[], $4::text[], $5::text[],
                         $6::text[], $7::text[], $8::text[], $9::smallint[], $10::text[],
                         $11::bigint[])
                  AS t(a, r, c, s, u, h, m, p, st, e, l)",
        )
        .bind(&at)
        .bind(&request_ids)
        .bind(&clients)
        .bind(&sources)
        .bind(&agents)
        .bind(&hosts)
        .bind(&methods)
        .bind(&paths)
        .bind(&statuses)
        .bind(&codes)
        .bind(&latencies)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes the request-log rows older than `before` (unix seconds), in chunks; returns how
    /// many. Several brokers may run it at once: each chunk skips rows another one has locked.
    ///
    /// # Errors
    /// Any database failure (chunks already deleted stay deleted).
    pub async fn purge_request_log(&self, before: i64) -> Result<u64, StoreError> {
        let mut purged = 0;
        loop {
            let deleted = sqlx::query(
                "DELETE FROM request_log WHERE id IN (
                     SELECT id FROM request_log WHERE at < to_timestamp($1)
                     LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(ts(before))
            .bind(PURGE_CHUNK)
            .execute(&self.pool)
            .await?
            .rows_affected();
            purged += deleted;
            if deleted < PURGE_CHUNK as u64 {
                return Ok(purged);
            }
        }
    }
}
