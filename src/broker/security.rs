//! Security policy: the settings (rate limits, source blocks, the automatic response's
//! thresholds and the failed-authentication throttle, their defaults and validation), the
//! automatic response that disables a client whose requests keep being refused, the blocks of
//! source addresses, and the officer's reads of the audit trail. Everything goes through
//! `store` and `audit`; nothing here knows HTTP or touches the token directly (audit
//! verification asks `audit`, which asks the token).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Broker, BrokerError};
use crate::audit;
use crate::store::{AuditFilter, AuditRow, ClientWriteError, NewAuditEvent, Store, StoreError};

/// Rate limits and the automatic response to misbehaving clients. Kept in Postgres, changed
/// through the admin API, picked up by every broker within seconds.
///
/// The defaults are sized for a KMS in front of one HSM partition, not for a toy: one broker
/// node serves several thousand authenticated requests a second, so a single client may use a
/// good share (2000/s sustained, bursts of 4000) without starving the others, and a single
/// address (possibly a NAT of many clients) up to 5000/s. A source refused 1000 times within a
/// minute is blocked for 15 minutes. 20 refusals made to one authenticated client (denied
/// unwraps, address mismatches) within 5 minutes disable it. Failed authentications are
/// throttled per source and client id (5 free, then a doubling delay up to 5 minutes) and per
/// source (50 free), never counted against the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySettings {
    /// Sustained requests per second from one source address.
    #[schema(minimum = 0.001, maximum = 1000000)]
    pub per_ip_per_second: f64,
    /// Burst allowance of one source address.
    #[schema(minimum = 1, maximum = 10000000)]
    pub per_ip_burst: u32,
    /// Sustained requests per second of one client.
    #[schema(minimum = 0.001, maximum = 1000000)]
    pub per_client_per_second: f64,
    /// Burst allowance of one client.
    #[schema(minimum = 1, maximum = 10000000)]
    pub per_client_burst: u32,
    /// Refused (rate-limited) requests within `violation_window_secs` that block the source.
    #[schema(minimum = 1)]
    pub block_after_violations: u32,
    /// The window counting violations.
    #[schema(minimum = 1)]
    pub violation_window_secs: u64,
    /// How long a blocked source stays blocked.
    #[schema(minimum = 1, maximum = 604800)]
    pub block_secs: u64,
    /// Refusals of one client within `anomaly_window_secs` that disable it (0 = never).
    pub anomaly_refusals: u32,
    /// The window counting refusals.
    #[schema(minimum = 1)]
    pub anomaly_window_secs: u64,
    /// Failed authentications at the token endpoint from one source for one client id before
    /// further attempts from there for that id are delayed (429 with `Retry-After`; the delay
    /// doubles with each further failure, from 1 s up to `auth_delay_max_secs`).
    #[schema(minimum = 1)]
    pub auth_failures_per_client: u32,
    /// The same, counted over every client id tried from one source.
    #[schema(minimum = 1)]
    pub auth_failures_per_source: u32,
    /// The longest such delay.
    #[schema(minimum = 1, maximum = 86400)]
    pub auth_delay_max_secs: u64,
    /// The widest IPv4 network a lockdown may block (a prefix length).
    #[schema(maximum = 32)]
    pub block_min_prefix_v4: u8,
    /// The widest IPv6 network a lockdown may block.
    #[schema(maximum = 128)]
    pub block_min_prefix_v6: u8,
}

/// The slowest rate a limit may have, per second: one request per 1000 s.
pub const MIN_RATE: f64 = 0.001;
/// The fastest rate a limit may have, per second.
pub const MAX_RATE: f64 = 1_000_000.0;
/// The largest burst. With [`MIN_RATE`] it keeps the limiter's horizon (burst / rate, 10^10 s)
/// within its nanosecond clock (u64, about 1.8 * 10^19 ns); a tinier rate or a larger burst
/// would overflow it.
pub const MAX_BURST: u32 = 10_000_000;

impl Default for SecuritySettings {
    fn default() -> Self {
        Self {
            per_ip_per_second: 5000.0,
            per_ip_burst: 10_000,
            per_client_per_second: 2000.0,
            per_client_burst: 4000,
            block_after_violations: 1000,
            violation_window_secs: 60,
            block_secs: 900,
            anomaly_refusals: 20,
            anomaly_window_secs: 300,
            auth_failures_per_client: 5,
            auth_failures_per_source: 50,
            auth_delay_max_secs: 300,
            block_min_prefix_v4: 16,
            block_min_prefix_v6: 48,
        }
    }
}

impl SecuritySettings {
    /// Checks the values make sense.
    ///
    /// # Errors
    /// A message saying which does not.
    pub fn validate(&self) -> Result<(), String> {
        let rate_ok = |r: f64| (MIN_RATE..=MAX_RATE).contains(&r);
        if !rate_ok(self.per_ip_per_second) || !rate_ok(self.per_client_per_second) {
            return Err("rates must be 0.001 to 1000000 per second".into());
        }
        let burst_ok = |b: u32| (1..=MAX_BURST).contains(&b);
        if !burst_ok(self.per_ip_burst) || !burst_ok(self.per_client_burst) {
            return Err("bursts must be 1 to 10000000".into());
        }
        if self.block_after_violations == 0 || self.violation_window_secs == 0 {
            return Err(
                "block_after_violations and violation_window_secs must be at least 1".into(),
            );
        }
        if self.block_secs == 0 || self.block_secs > 7 * 86_400 {
            return Err("block_secs must be 1 to 604800".into());
        }
        if self.anomaly_window_secs == 0 {
            return Err("anomaly_window_secs must be at least 1".into());
        }
        if self.auth_failures_per_client == 0 || self.auth_failures_per_source == 0 {
            return Err(
                "auth_failures_per_client and auth_failures_per_source must be at least 1".into(),
            );
        }
        if self.auth_delay_max_secs == 0 || self.auth_delay_max_secs > 86_400 {
            return Err("auth_delay_max_secs must be 1 to 86400".into());
        }
        if self.block_min_prefix_v4 > 32 || self.block_min_prefix_v6 > 128 {
            return Err(
                "block_min_prefix_v4 is at most 32 and block_min_prefix_v6 at most 128".into(),
            );
        }
        Ok(())
    }

    /// The settings in Postgres, or the defaults.
    ///
    /// # Errors
    /// An outage.
    pub async fn load(store: &Store) -> Result<Self, StoreError> {
        Ok(match store.security_settings().await? {
            Some(json) => serde_json::from_str(&json).unwrap_or_default(),
            None => Self::default(),
        })
    }
}

/// After a refusal made to an authenticated `client` was recorded (a denied unwrap, an address
/// mismatch with valid credentials): if its refusals within the window reach the threshold,
/// disable it (a critical audit event says why), unless it is the last active admin. An officer
/// re-enables it. Failed authentications never lead here: they are throttled instead.
///
/// # Errors
/// An outage.
pub(crate) async fn respond_to_refusal(store: &Store, client: Uuid) -> Result<(), StoreError> {
    let settings = SecuritySettings::load(store).await?;
    if settings.anomaly_refusals == 0 {
        return Ok(());
    }
    let window_us = i64::try_from(settings.anomaly_window_secs)
        .unwrap_or(i64::MAX / 2)
        .saturating_mul(1_000_000);
    let refusals = store
        .security_refusals(client, audit::now_us() - window_us)
        .await?;
    if refusals < i64::from(settings.anomaly_refusals) {
        return Ok(());
    }
    match store
        .auto_disable_client(
            client,
            refusals,
            settings.anomaly_window_secs,
            &audit::meta(),
        )
        .await
    {
        Ok(true) => {
            tracing::warn!(target: "keybroker::security", %client, refusals, "client disabled automatically");
        }
        Ok(false) => {}
        Err(ClientWriteError::LastAdmin) => {
            tracing::warn!(target: "keybroker::security", %client, refusals,
                "not disabled automatically: it is the last active admin client");
        }
        Err(ClientWriteError::Store(e)) => return Err(e),
        Err(ClientWriteError::NotFound | ClientWriteError::IpAlreadyRegistered) => {}
    }
    Ok(())
}

impl Broker {
    /// The security settings in force (Postgres, or the defaults).
    ///
    /// # Errors
    /// An outage.
    pub async fn security_settings(&self) -> Result<SecuritySettings, BrokerError> {
        Ok(SecuritySettings::load(&self.store).await?)
    }

    /// Replaces the security settings (audited); every broker applies them within its next
    /// limiter refresh.
    ///
    /// # Errors
    /// [`BrokerError::InvalidSpec`] for values that make no sense, or an outage.
    pub async fn set_security_settings(
        &self,
        settings: &SecuritySettings,
    ) -> Result<(), BrokerError> {
        settings.validate().map_err(BrokerError::InvalidSpec)?;
        let json = serde_json::to_string(settings)
            .map_err(|_| BrokerError::InvalidSpec("settings".into()))?;
        Ok(self
            .store
            .put_security_settings(&json, &audit::meta())
            .await?)
    }

    /// The networks blocked at `now` (unix seconds): lockdown blocks and repeated violators.
    ///
    /// # Errors
    /// An outage.
    pub async fn blocked_sources(&self, now: i64) -> Result<Vec<String>, BrokerError> {
        Ok(self.store.blocked_sources(now).await?)
    }

    /// Lifts the address blocks of `client`'s lockdowns (audited); returns how many.
    ///
    /// # Errors
    /// An outage.
    pub async fn unblock_client_sources(&self, client: Uuid) -> Result<u64, BrokerError> {
        Ok(self
            .store
            .unblock_client_sources(client, &audit::meta())
            .await?)
    }

    /// Records a security event (a source rate-limited or blocked) off the request path: the
    /// request is answered without waiting, and a failed write is logged.
    pub fn record_security_event(&self, event: NewAuditEvent) {
        let meta = audit::meta();
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.audit(&meta, &[event]).await {
                tracing::warn!(target: "keybroker::audit", error = %e, "rate-limit event not audited");
            }
        });
    }

    /// Audit events matching `filter`, oldest first, at most `limit`.
    ///
    /// # Errors
    /// An outage.
    pub async fn audit_events(
        &self,
        filter: &AuditFilter,
        limit: i64,
    ) -> Result<Vec<AuditRow>, BrokerError> {
        Ok(self.store.audit_events(filter, limit).await?)
    }

    /// Verifies the audit trail's hash chain and its signed checkpoints.
    ///
    /// # Errors
    /// An outage of the database or the token.
    pub async fn verify_audit(&self) -> Result<audit::Verification, BrokerError> {
        audit::verify(&self.store, &self.hsm)
            .await
            .map_err(|e| match e {
                audit::VerifyError::Store(e) => BrokerError::from(e),
                audit::VerifyError::Hsm(e) => BrokerError::from(e),
            })
    }
}
