//! Refusals: the automatic response that disables a client whose authenticated requests keep
//! being refused, and the coalesced audit of refusals made before anyone was authenticated.
//! It reads and writes Postgres only through `store` and `audit`; it never touches the token.

use std::net::IpAddr;
use std::time::Duration;

use uuid::Uuid;

use super::{Authenticator, SecuritySettings};
use crate::audit;
use crate::store::{ClientWriteError, Store, StoreError};

/// After a refusal made to an authenticated `client` was recorded (a denied unwrap, an address
/// mismatch with valid credentials): if its refusals within the window reach the threshold,
/// disable it (a critical audit event says why), unless it is the last active admin. An officer
/// re-enables it. Failed authentications never lead here: they are throttled instead.
///
/// # Errors
/// An outage.
pub async fn respond_to_refusal(store: &Store, client: Uuid) -> Result<(), StoreError> {
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

/// Writes the coalesced refusals whose window has closed, a few times a window, until the
/// tally's [`Authenticator`] is gone.
pub(super) async fn write_coalesced_refusals(
    tally: std::sync::Weak<audit::RefusalTally>,
    store: Store,
) {
    let tick = tally.upgrade().map_or(Duration::from_secs(1), |t| {
        (t.window() / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    });
    loop {
        tokio::time::sleep(tick).await;
        let Some(tally) = tally.upgrade() else {
            return;
        };
        tally.flush(&store, audit::now_us() / 1000, false).await;
    }
}

impl Authenticator {
    /// [`respond_to_refusal`] for a refused client of a request; a failure is logged, not
    /// answered (the request is refused either way).
    pub(super) async fn respond_to_refusal(&self, client: Uuid) {
        if let Err(e) = respond_to_refusal(&self.store, client).await {
            tracing::warn!(target: "keybroker::security", error = %e, "automatic response failed");
        }
    }

    /// Writes every refusal still counted in memory (at shutdown, after the last request).
    pub async fn flush_refusals(&self) {
        self.refusals
            .flush(&self.store, audit::now_us() / 1000, true)
            .await;
    }

    pub(super) fn refused(&self, source: IpAddr, reason: &'static str, client: Option<Uuid>) {
        self.refusals
            .count(source, reason, client, audit::now_us() / 1000);
    }
}
