//! The pool behind an [`Hsm`]: its shared state ([`Inner`]), connecting to the token (first
//! session, required mechanisms, the workers), and [`Hsm::run`], which queues a call for the
//! pool's worker threads (`worker`) and waits for its answer until the deadline.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cryptoki::object::ObjectHandle;
use cryptoki::slot::Slot;
use secrecy::SecretString;
use tokio::sync::oneshot;

use crate::crypto::MasterKeyVersion;

use super::context::{Module, missing_mechanisms};
use super::operations::{Control, IvSource};
use super::{Hsm, HsmConfig, HsmError, TokenSession, lock, worker};

pub(super) struct Inner {
    pub(super) module: Arc<Module>,
    pub(super) token_label: String,
    pub(super) pin: SecretString,
    /// The slot holding our token; re-resolved after a fault (a re-inserted token may move).
    pub(super) slot: Mutex<Option<Slot>>,
    /// The calls waiting for a worker (see [`worker`]).
    pub(super) queue: worker::Queue,
    /// Held while a worker opens a session, so that the check against the cap holds.
    pub(super) opening: Mutex<()>,
    /// Officer commands holding (or waiting for) a session of their own at the token's
    /// session limit: the workers keep that many places under the cap free for them.
    pub(super) officers: AtomicUsize,
    /// Officer commands that asked a worker to close its session for them, not yet taken up.
    pub(super) release_requests: AtomicUsize,
    /// Bumped on every fault: sessions opened before it are discarded instead of reused.
    pub(super) generation: AtomicU64,
    /// Token-object handles of master keys, looked up once and dropped on a fault.
    pub(super) mk_handles: Mutex<HashMap<MasterKeyVersion, ObjectHandle>>,
    /// Token-object handles of the signing private key and the audit/pepper key, by label.
    pub(super) key_handles: Mutex<HashMap<String, ObjectHandle>>,
    /// Who chooses the AES-GCM IV of a seal, as the token has shown it (see [`IvSource`]).
    pub(super) iv_source: AtomicU8,
    /// The master-key versions this process seals or opens under: the start-up self-test's,
    /// and every version sealed under since. Re-verified after a module re-initialisation.
    pub(super) in_use: Mutex<BTreeSet<MasterKeyVersion>>,
    /// The versions whose seal/open round trip passed since the module's last (re-)initialisation.
    pub(super) verified: RwLock<BTreeSet<MasterKeyVersion>>,
    /// Per master-key version, a value the self-test sealed and opened: when the token refuses
    /// to open a blob, opening this tells a bad blob (it opens) from a sick token (it does not).
    pub(super) controls: RwLock<HashMap<MasterKeyVersion, Arc<Control>>>,
    /// The module epoch in which every version in `in_use` passed (`u64::MAX`: none yet).
    pub(super) verified_epoch: AtomicU64,
    /// Sessions of this pool that are open (idle or lent out), counted by
    /// [`SessionCount`](super::session::SessionCount).
    pub(super) open_sessions: Arc<AtomicUsize>,
    /// The most sessions the token lets us open: the configured pool size until the token
    /// answers `CKR_SESSION_COUNT`, then the number that were open at that moment.
    pub(super) session_cap: AtomicUsize,
    /// The configured number of sessions.
    pub(super) pool_size: usize,
    /// How long a caller waits, for a session or for the token.
    pub(super) op_timeout: Duration,
}

impl Hsm {
    /// Loads the module, finds the token and logs in once, so that a wrong PIN or a missing token
    /// fails at start-up rather than at the first request.
    ///
    /// # Errors
    /// [`HsmError::Module`], [`HsmError::TokenNotFound`], [`HsmError::PinRefused`], or any
    /// other failure of the first session.
    pub async fn connect(config: HsmConfig) -> Result<Self, HsmError> {
        let pool_size = config.pool_size.max(1);
        let op_timeout = config.op_timeout;
        let (inner, first) = tokio::task::spawn_blocking(move || {
            let inner = Inner {
                module: Module::shared(&config.module)?,
                token_label: config.token_label,
                pin: config.pin,
                slot: Mutex::new(None),
                queue: worker::Queue::new(),
                opening: Mutex::new(()),
                officers: AtomicUsize::new(0),
                release_requests: AtomicUsize::new(0),
                generation: AtomicU64::new(0),
                mk_handles: Mutex::new(HashMap::new()),
                key_handles: Mutex::new(HashMap::new()),
                iv_source: AtomicU8::new(IvSource::Caller as u8),
                in_use: Mutex::new(BTreeSet::new()),
                verified: RwLock::new(BTreeSet::new()),
                controls: RwLock::new(HashMap::new()),
                verified_epoch: AtomicU64::new(u64::MAX),
                open_sessions: Arc::new(AtomicUsize::new(0)),
                session_cap: AtomicUsize::new(pool_size),
                pool_size,
                op_timeout,
            };
            // A token being written by another process (SoftHSM2 keeps one file per object)
            // can fail a read for a moment: a few tries before calling it unreachable.
            let mut attempt = 0;
            let first = loop {
                let opened = {
                    let _shared = inner.module.enter();
                    inner.open_session()
                };
                match opened {
                    Ok(session) => break session,
                    // Not for a refused PIN: trying it again could lock the token.
                    Err(e) if !matches!(e, HsmError::PinRefused) && attempt < 4 => {
                        attempt += 1;
                        *lock(&inner.slot) = None;
                        std::thread::sleep(Duration::from_millis(100 * attempt));
                        // SoftHSM2 that once read our token half-rewritten by another process
                        // keeps what it read until re-initialised: the token gone, or its user
                        // PIN "not initialised" (CKR_USER_PIN_NOT_INITIALIZED at login).
                        tracing::debug!(target: "keybroker::hsm", error = %e, attempt,
                            "the token's first session failed; re-initialising the module and trying again");
                        inner.module.reinitialize();
                    }
                    Err(e) => return Err(e),
                }
            };
            // Refuse a token that cannot do the job, naming what is missing, rather than fail
            // request by request later.
            let missing = {
                let _shared = inner.module.enter();
                let slot = inner.slot()?;
                let mut random = [0u8; 1];
                let random_ok = first.session.generate_random_slice(&mut random).is_ok();
                missing_mechanisms(&inner.module.ctx, slot, random_ok)
            };
            if !missing.is_empty() {
                return Err(HsmError::MissingMechanisms(missing));
            }
            Ok((inner, first))
        })
        .await
        .map_err(|_| HsmError::Worker)??;
        let inner = Arc::new(inner);
        let shutdown = Arc::new(worker::Shutdown(inner.clone()));
        // The first session goes to the first worker; the others open theirs when work comes.
        worker::spawn(&inner, pool_size, Some(first))?;
        Ok(Self {
            inner,
            _shutdown: shutdown,
            op_timeout,
        })
    }

    /// Runs `op` on a pooled, logged-in session: queued for the pool's worker threads, which
    /// run every call queued at the time in one pass on their session (see the `worker`
    /// module). When the session or token fails, the pool is dropped, a fresh session is opened
    /// (logging in again if needed) and `op` runs once more; `op` must therefore be safe to
    /// repeat, which every token operation here is.
    ///
    /// # Errors
    /// What `op` returned, [`HsmError::Unavailable`] when the retry failed too, or
    /// [`HsmError::Timeout`] when no worker took the call, or the token did not answer, in time.
    pub async fn run<T, F>(&self, op: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: Fn(&mut TokenSession<'_>) -> Result<T, HsmError> + Send + 'static,
    {
        let deadline = tokio::time::Instant::now() + self.op_timeout;
        let (reply, answer) = oneshot::channel();
        self.inner.queue.push(Box::new(worker::Call {
            op,
            reply: Some(reply),
            deadline: deadline.into_std(),
        }))?;
        // A worker skips a call whose caller has gone (its receiver dropped here on timeout):
        // a hung token keeps its worker, never more sessions, and no backlog of dead calls.
        match tokio::time::timeout_at(deadline, answer).await {
            Err(_) => Err(HsmError::Timeout(self.op_timeout)),
            Ok(Err(_)) => Err(HsmError::Worker),
            Ok(Ok(result)) => result,
        }
    }
}
