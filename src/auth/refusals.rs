//! Refusals: the hand-over of a refused authenticated client to the automatic response (which
//! is security policy, `broker::security`), and the coalesced audit of refusals made before
//! anyone was authenticated.
//! It reads and writes Postgres only through `store` and `audit`; it never touches the token.

use std::net::IpAddr;
use std::time::Duration;

use uuid::Uuid;

use super::Authenticator;
use crate::audit;
use crate::store::Store;

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
    /// The automatic response ([`crate::broker::security::respond_to_refusal`]) for a refused
    /// client of a request; a failure is logged, not answered (the request is refused either
    /// way).
    pub(super) async fn respond_to_refusal(&self, client: Uuid) {
        if let Err(e) = crate::broker::security::respond_to_refusal(&self.store, client).await {
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
