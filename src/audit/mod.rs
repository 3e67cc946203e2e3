//! `audit` owns the audit trail's semantics: who/where/when of the current operation (a
//! task-local set per HTTP request, or `officer`/`scheduler` outside one), the token-backed MAC
//! signer, and verification of the chain. It records what others decide; it decides no policy.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::hsm::{Hsm, HsmError};
use crate::store::{AuditMeta, AuditSigner, Store, StoreError};

mod refusals;

pub use refusals::RefusalTally;

/// Rows verified per token call.
const VERIFY_PAGE: i64 = 500;

/// MACs audit rows with the token's audit key.
pub struct TokenAuditSigner(pub Hsm);

impl AuditSigner for TokenAuditSigner {
    fn sign(
        &self,
        message: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<[u8; 32], HsmError>> + Send + '_>> {
        Box::pin(async move { self.0.run(move |t| t.hmac(&message)).await })
    }
}

/// Installs the token signer on `store` (all clones of it share it).
pub fn install(store: &Store, hsm: &Hsm) {
    store.set_audit_signer(Arc::new(TokenAuditSigner(hsm.clone())));
}

/// The who and where of the operation the current task performs.
#[derive(Debug)]
pub struct Context {
    request_id: Option<String>,
    source_ip: Option<String>,
    actor: OnceLock<String>,
    default_actor: &'static str,
}

impl Context {
    /// An HTTP request; the actor is `anonymous` until [`set_actor`] names the client.
    pub fn request(request_id: Option<String>, source_ip: Option<String>) -> Self {
        Self {
            request_id,
            source_ip,
            actor: OnceLock::new(),
            default_actor: "anonymous",
        }
    }

    /// Work with no request: `scheduler` for the background worker.
    pub fn system(actor: &'static str) -> Self {
        Self {
            request_id: None,
            source_ip: None,
            actor: OnceLock::new(),
            default_actor: actor,
        }
    }
}

tokio::task_local! {
    static CONTEXT: Arc<Context>;
}

/// Runs `work` with `context` as the audit context of everything it records.
pub async fn scope<F: Future>(context: Context, work: F) -> F::Output {
    CONTEXT.scope(Arc::new(context), work).await
}

/// Names the authenticated client as the actor of the current request.
pub fn set_actor(client: Uuid) {
    let _ = CONTEXT.try_with(|c| c.actor.set(client.to_string()));
}

/// Microseconds since the epoch.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The who/where/when of an event recorded now by the current task. Outside any scope (the
/// officer's CLI) the actor is `officer`.
pub fn meta() -> AuditMeta {
    let at_us = now_us();
    CONTEXT
        .try_with(|c| AuditMeta {
            actor: c
                .actor
                .get()
                .cloned()
                .unwrap_or_else(|| c.default_actor.to_owned()),
            source_ip: c.source_ip.clone(),
            request_id: c.request_id.clone(),
            at_us,
        })
        .unwrap_or_else(|_| AuditMeta {
            actor: "officer".to_owned(),
            source_ip: None,
            request_id: None,
            at_us,
        })
}

/// The outcome of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Rows checked.
    pub rows: u64,
    /// The first broken link, if any: its position and what is wrong.
    pub first_broken: Option<(i64, &'static str)>,
}

/// Why verification could not run.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Postgres failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The token failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
}

/// Walks the whole chain in order: positions must follow 1, 2, 3…, each row must carry the
/// previous row's MAC, each MAC must be the token's HMAC of its row, and the head must point at
/// the last row. Any edit, deletion, insertion or reordering breaks one of these.
///
/// # Errors
/// An outage.
pub async fn verify(store: &Store, hsm: &Hsm) -> Result<Verification, VerifyError> {
    let mut expected_seq = 1;
    let mut prev_mac = vec![0u8; 32];
    let mut rows = 0;
    loop {
        let page = store.audit_chain(expected_seq - 1, VERIFY_PAGE).await?;
        if page.is_empty() {
            break;
        }
        let inputs: Vec<Vec<u8>> = page.iter().map(|r| r.mac_input()).collect();
        let macs = hsm
            .run(move |t| {
                inputs
                    .iter()
                    .map(|i| t.hmac(i))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        for (row, mac) in page.iter().zip(macs) {
            rows += 1;
            let broken = if row.seq != expected_seq {
                Some("a row is missing or out of place")
            } else if row.prev_mac != prev_mac {
                Some("the previous-row MAC does not match")
            } else if row.mac != mac {
                Some("the row's MAC does not match its content")
            } else {
                None
            };
            if let Some(why) = broken {
                return Ok(Verification {
                    rows,
                    first_broken: Some((expected_seq, why)),
                });
            }
            expected_seq += 1;
            prev_mac = row.mac.clone();
        }
    }
    let (head_seq, head_mac) = store.audit_head().await?;
    let first_broken = (head_seq != expected_seq - 1 || head_mac != prev_mac)
        .then_some((expected_seq, "rows at the end of the chain are missing"));
    Ok(Verification { rows, first_broken })
}
