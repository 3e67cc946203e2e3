//! `keybroker audit …`: the officer's view of the audit trail (verifying its MAC chain). It
//! reads through `audit` and changes nothing.

use clap::Subcommand;

use super::BoxError;
use crate::broker::Limits;
use crate::config::{DatabaseArgs, TokenArgs};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Walk the MAC chain and report the first broken link (exit status 1 if any).
    Verify,
}

/// Runs `keybroker audit …`.
pub(super) async fn run_audit(
    token: TokenArgs,
    db: DatabaseArgs,
    command: AuditCommand,
) -> Result<(), BoxError> {
    match command {
        AuditCommand::Verify => {
            let broker = super::broker(&token, &db, Limits { max_batch: 1 }).await?;
            let verdict = broker.verify_audit().await?;
            match verdict.first_broken {
                None => {
                    println!("audit chain intact: {} rows verified", verdict.rows);
                    Ok(())
                }
                Some((seq, why)) => {
                    println!("audit chain BROKEN at row {seq}: {why}");
                    Err(format!("audit chain broken at row {seq}").into())
                }
            }
        }
    }
}
