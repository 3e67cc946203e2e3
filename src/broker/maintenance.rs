//! Background maintenance, safe with several brokers on one database: every piece of work is
//! claimed in Postgres (`FOR UPDATE SKIP LOCKED`, or a single conditional statement), so two
//! brokers never do the same item twice. Time is a parameter.

use uuid::Uuid;

use super::{Broker, BrokerError, ManagedKey, MasterKeyState};

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
    /// A master-key rotation this pass finished (one that stopped half-way) or did by policy.
    pub master_key_rotated: Option<crate::crypto::MasterKeyVersion>,
    /// Stored blobs this pass moved to the active master key.
    pub rewrapped: i64,
}

/// How long one pass works on a running rewrap job before it returns (the next pass goes on).
const REWRAP_TIME_PER_PASS: std::time::Duration = std::time::Duration::from_secs(5);

impl Broker {
    /// One pass: a master-key rotation left half-way is finished, the master key is rotated if
    /// the policy says so, a running rewrap job advances, then scheduled key rotations, expiry,
    /// destruction after the pending window, purge of expired revocation rows, usage flush; last,
    /// whatever happened, a refresh of the custody gauges (token and database).
    ///
    /// # Errors
    /// An outage (work already done stays done; the next pass continues).
    pub async fn run_maintenance(&self, now: i64) -> Result<MaintenanceReport, BrokerError> {
        // Everything this pass records is the scheduler's doing.
        let report = crate::audit::scope(
            crate::audit::Context::system("scheduler"),
            self.maintenance_pass(now),
        )
        .await;
        // The pass talks to the token anyway: it is where the custody gauges learn which
        // versions the token holds (a scrape never asks). Done or failed, the gauges are read.
        self.refresh_custody_snapshot().await;
        report
    }

    async fn maintenance_pass(&self, now: i64) -> Result<MaintenanceReport, BrokerError> {
        let mut report = MaintenanceReport {
            master_key_rotated: self.finish_interrupted_rotation().await?,
            ..MaintenanceReport::default()
        };
        if self.rotate_master_key_if_due(now).await?.is_some() {
            report.master_key_rotated = self
                .store
                .master_key_in_state(MasterKeyState::Active)
                .await?;
        }
        self.destroyed_master_keys().await?;
        let started = std::time::Instant::now();
        while started.elapsed() < REWRAP_TIME_PER_PASS {
            match self.rewrap_step(super::REWRAP_BATCH).await? {
                Some(step) => {
                    report.rewrapped = step.rewrapped;
                    if step.remaining == 0 || step.failed > 0 {
                        break;
                    }
                }
                None => break,
            }
        }
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
