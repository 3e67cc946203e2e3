//! Background maintenance, safe with several brokers on one database: every piece of work is
//! claimed in Postgres (`FOR UPDATE SKIP LOCKED`, or a single conditional statement), so two
//! brokers never do the same item twice. Time is a parameter.

use uuid::Uuid;

use super::{Broker, BrokerError, ManagedKey};

/// How many due rotations one tick claims at most.
const ROTATION_BATCH: i64 = 100;

/// What one maintenance pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// Keys rotated by schedule.
    pub rotated: Vec<Uuid>,
    /// Keys marked expired.
    pub expired: u64,
    /// Keys destroyed after their pending window.
    pub destroyed_keys: Vec<Uuid>,
    /// Secrets destroyed after their pending window.
    pub destroyed_secrets: Vec<Uuid>,
    /// Revoked-token and used-assertion rows purged.
    pub purged_token_rows: u64,
}

impl Broker {
    /// One pass: scheduled rotations, expiry, destruction after the pending window, purge of
    /// expired revocation rows, usage flush.
    ///
    /// # Errors
    /// An outage (work already done stays done; the next pass continues).
    pub async fn run_maintenance(&self, now: i64) -> Result<MaintenanceReport, BrokerError> {
        // Everything this pass records is the scheduler's doing.
        crate::audit::scope(
            crate::audit::Context::system("scheduler"),
            self.maintenance_pass(now),
        )
        .await
    }

    async fn maintenance_pass(&self, now: i64) -> Result<MaintenanceReport, BrokerError> {
        let mut report = MaintenanceReport::default();
        loop {
            let due = self.store.claim_due_rotations(now, ROTATION_BATCH).await?;
            let claimed = due.len();
            for row in due {
                match self.add_version(row.client_id, &row, true, now).await {
                    Ok(ManagedKey { id, .. }) => report.rotated.push(id),
                    // The key changed state or was rotated by hand meanwhile: nothing to do.
                    Err(BrokerError::KeyState(_) | BrokerError::Busy) => {}
                    Err(e) => return Err(e),
                }
            }
            if claimed < ROTATION_BATCH as usize {
                break;
            }
        }
        let meta = crate::audit::meta();
        report.expired = self.store.expire_keys(now, &meta).await?;
        report.destroyed_keys = self.store.destroy_due_keys(now, &meta).await?;
        report.destroyed_secrets = self.store.destroy_due_secrets(now, &meta).await?;
        report.purged_token_rows = self.store.purge_expired_token_rows(now).await?;
        self.flush_usage().await?;
        Ok(report)
    }

    /// Purges the request-log rows older than `retention_days` days before `now`; returns how
    /// many. The maintenance loop runs it after [`Broker::run_maintenance`], with the configured
    /// retention.
    ///
    /// # Errors
    /// An outage.
    pub async fn purge_request_log(
        &self,
        now: i64,
        retention_days: u32,
    ) -> Result<u64, BrokerError> {
        let before = now.saturating_sub(i64::from(retention_days) * 86_400);
        Ok(self.store.purge_request_log(before).await?)
    }

    /// Live keys of every client due for rotation or expiring within `days` days of `now`.
    ///
    /// # Errors
    /// An outage.
    pub async fn keys_due(
        &self,
        days: u32,
        now: i64,
    ) -> Result<Vec<(Uuid, ManagedKey)>, BrokerError> {
        self.store
            .keys_due(now, now + i64::from(days) * 86_400)
            .await?
            .into_iter()
            .map(|row| {
                let owner = row.client_id;
                super::keys::managed(row, now).map(|key| (owner, key))
            })
            .collect()
    }
}
