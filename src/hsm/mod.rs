//! `hsm` owns the PKCS#11 token and is the only user of `cryptoki`: module loading, login, a
//! bounded pool of sessions served by worker threads off the async executor (`worker`; shrunk
//! to the token's session limit if it has one), object templates, cached handles, the
//! operations keybroker needs (random, AES-GCM seal/unseal storing the IV the token used,
//! whoever chose it), the self-test that refuses a token whose seals would not open, and `probe`
//! (what a token offers). It knows nothing of HTTP or SQL.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use secrecy::SecretString;
use tokio::sync::oneshot;

use crate::crypto::MasterKeyVersion;

mod context;
mod error;
mod objects;
mod operations;
mod probe;
mod worker;

pub use context::init_token;
use context::{Module, Need, REQUIRED_MECHANISMS, login_user, missing_mechanisms};
pub use error::HsmError;
use error::classify;
pub use objects::{AUDIT_KEY_LABEL, InitReport, ObjectInfo, SIGNING_KEY_LABEL, signing_key_label};
pub use operations::TokenSession;
use operations::{Control, IvSource};
pub use probe::{GcmIv, MechanismReport, ProbeReport, SessionReport, probe};

/// How to reach the token.
#[derive(Clone)]
pub struct HsmConfig {
    /// Path of the vendor's PKCS#11 module.
    pub module: PathBuf,
    /// Label of the token keybroker uses.
    pub token_label: String,
    /// The user PIN.
    pub pin: SecretString,
    /// How many sessions may run operations at once.
    pub pool_size: usize,
    /// How long a caller waits for a session and the token's answer before giving up.
    pub op_timeout: Duration,
}

impl fmt::Debug for HsmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmConfig")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"[REDACTED]")
            .field("pool_size", &self.pool_size)
            .field("op_timeout", &self.op_timeout)
            .finish()
    }
}

/// Locks a mutex, recovering the data if a thread panicked while holding it: every structure we
/// guard stays consistent between statements, so a poisoned lock holds nothing half-done.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Shared access to an `RwLock`, recovering from poisoning as [`lock`] does.
fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Exclusive access to an `RwLock`, recovering from poisoning as [`lock`] does.
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A logged-in pool of sessions on one token, each served by its own worker thread. Cheap to
/// clone; the workers end when the last clone is dropped.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Inner>,
    _shutdown: Arc<worker::Shutdown>,
    op_timeout: Duration,
}

impl fmt::Debug for Hsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hsm")
            .field("token_label", &self.inner.token_label)
            .finish_non_exhaustive()
    }
}

struct Inner {
    module: Arc<Module>,
    token_label: String,
    pin: SecretString,
    /// The slot holding our token; re-resolved after a fault (a re-inserted token may move).
    slot: Mutex<Option<Slot>>,
    /// The calls waiting for a worker (see [`worker`]).
    queue: worker::Queue,
    /// Held while a worker opens a session, so that the check against the cap holds.
    opening: Mutex<()>,
    /// Officer commands holding (or waiting for) a session of their own at the token's
    /// session limit: the workers keep that many places under the cap free for them.
    officers: AtomicUsize,
    /// Officer commands that asked a worker to close its session for them, not yet taken up.
    release_requests: AtomicUsize,
    /// Bumped on every fault: sessions opened before it are discarded instead of reused.
    generation: AtomicU64,
    /// Token-object handles of master keys, looked up once and dropped on a fault.
    mk_handles: Mutex<HashMap<MasterKeyVersion, ObjectHandle>>,
    /// Token-object handles of the signing private key and the audit/pepper key, by label.
    key_handles: Mutex<HashMap<String, ObjectHandle>>,
    /// Who chooses the AES-GCM IV of a seal, as the token has shown it (see [`IvSource`]).
    iv_source: AtomicU8,
    /// The master-key versions this process seals or opens under: the start-up self-test's,
    /// and every version sealed under since. Re-verified after a module re-initialisation.
    in_use: Mutex<BTreeSet<MasterKeyVersion>>,
    /// The versions whose seal/open round trip passed since the module's last (re-)initialisation.
    verified: RwLock<BTreeSet<MasterKeyVersion>>,
    /// Per master-key version, a value the self-test sealed and opened: when the token refuses
    /// to open a blob, opening this tells a bad blob (it opens) from a sick token (it does not).
    controls: RwLock<HashMap<MasterKeyVersion, Arc<Control>>>,
    /// The module epoch in which every version in `in_use` passed (`u64::MAX`: none yet).
    verified_epoch: AtomicU64,
    /// Sessions of this pool that are open (idle or lent out), counted by [`SessionCount`].
    open_sessions: Arc<AtomicUsize>,
    /// The most sessions the token lets us open: the configured pool size until the token
    /// answers `CKR_SESSION_COUNT`, then the number that were open at that moment.
    session_cap: AtomicUsize,
    /// The configured number of sessions.
    pool_size: usize,
    /// How long a caller waits, for a session or for the token.
    op_timeout: Duration,
}

/// A place under the token's session cap kept for one officer command while it runs.
struct OfficerPlace(Arc<Inner>);

impl Drop for OfficerPlace {
    fn drop(&mut self) {
        // A request no worker took up (a session came free otherwise) is withdrawn, so that no
        // worker closes its session for nobody later.
        let _ = self
            .0
            .release_requests
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.0.officers.fetch_sub(1, Ordering::AcqRel);
        self.0.queue.wake_all();
    }
}

/// Counts an open pooled session for as long as it lives.
struct SessionCount(Arc<AtomicUsize>);

impl SessionCount {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::AcqRel);
        Self(open.clone())
    }
}

impl Drop for SessionCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct PooledSession {
    session: Session,
    generation: u64,
    /// Per-session copies of master keys (CKA_TOKEN=false): they stay on the token, sensitive and
    /// non-extractable, but SoftHSM serves them from memory, about 4× faster than token objects.
    mk_copies: HashMap<MasterKeyVersion, ObjectHandle>,
    /// Declared after `session`, so the count drops once the session is closed.
    _count: SessionCount,
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

    /// The label of the token this pool is logged in to.
    pub fn token_label(&self) -> &str {
        &self.inner.token_label
    }

    /// Runs `op` on a fresh read-write session (key creation, status). Officer commands only:
    /// it is not pooled.
    async fn admin<T, F>(&self, op: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: FnOnce(&Session) -> Result<T, HsmError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let opened = {
                let _shared = inner.module.enter();
                inner
                    .slot()
                    .map(|slot| (slot, inner.module.ctx.open_rw_session(slot)))
            };
            let (_officer, session) = match opened? {
                (slot, Err(refused @ CkError::Pkcs11(RvError::SessionCount, _))) => {
                    // At the token's session limit: a worker gives up its session for this one.
                    let officer = inner.officer_place(refused)?;
                    (Some(officer), inner.officer_session(slot)?)
                }
                (_, other) => (None, other.map_err(classify)?),
            };
            // Alone in the module: SoftHSM2 answered CKR_GENERAL_ERROR to a C_GenerateKeyPair
            // made while other sessions worked on the token (2 signing-key rotations in 80,
            // beside master-key rotations and the data path they set off; found by
            // schemathesis). Officer operations are rare and short; token calls wait for them.
            let _alone = inner.module.enter_alone();
            inner.login(&session)?;
            let result = op(&session);
            drop(session);
            result
        })
        .await
        .map_err(|_| HsmError::Worker)?
    }
}

impl Inner {
    /// Whether a worker without a session may open one: the pool is under the token's session
    /// cap, with the places officer commands need kept free.
    fn session_budget(&self) -> bool {
        self.open_sessions.load(Ordering::Acquire) + self.officers.load(Ordering::Acquire)
            < self.session_cap.load(Ordering::Acquire)
    }

    /// Takes up one officer's request for a session, if there is one.
    fn take_release_request(&self) -> bool {
        self.release_requests
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    /// The token refused an officer command a session: keep a place under the cap for it and
    /// ask a worker to close its session. Fails with the refusal when none of the sessions are
    /// ours to give.
    fn officer_place(self: &Arc<Self>, refused: CkError) -> Result<OfficerPlace, HsmError> {
        if self.open_sessions.load(Ordering::Acquire) == 0 {
            return Err(classify(refused));
        }
        // The token said how many sessions it allows: the ones we hold.
        self.lower_session_cap();
        self.officers.fetch_add(1, Ordering::AcqRel);
        self.release_requests.fetch_add(1, Ordering::AcqRel);
        self.queue.wake_all();
        Ok(OfficerPlace(self.clone()))
    }

    /// Opens the officer's read-write session once a worker has closed one, until the call's
    /// deadline.
    fn officer_session(&self, slot: Slot) -> Result<Session, HsmError> {
        let deadline = Instant::now() + self.op_timeout;
        loop {
            std::thread::sleep(Duration::from_millis(5));
            let opened = {
                let _shared = self.module.enter();
                self.module.ctx.open_rw_session(slot)
            };
            match opened {
                Ok(session) => return Ok(session),
                Err(CkError::Pkcs11(RvError::SessionCount, _)) if Instant::now() < deadline => {}
                Err(CkError::Pkcs11(RvError::SessionCount, _)) => {
                    return Err(HsmError::Timeout(self.op_timeout));
                }
                Err(e) => return Err(classify(e)),
            }
        }
    }

    /// The token refused one more session (`CKR_SESSION_COUNT`) while some of ours are open:
    /// from now on the pool works with the sessions it has. Logged once per reduction.
    fn lower_session_cap(&self) {
        let open = self.open_sessions.load(Ordering::Acquire).max(1);
        let before = self.session_cap.fetch_min(open, Ordering::AcqRel);
        if open < before {
            tracing::warn!(
                target: "keybroker::hsm",
                token = %self.token_label,
                sessions = open,
                configured = self.pool_size,
                "the token allows no more sessions (CKR_SESSION_COUNT); the pool works with the {open} it has"
            );
        }
    }

    /// Forgets every session, handle and the slot after a fault; the next call starts afresh.
    /// Idle workers are woken to close their sessions now (they may hold copies of a destroyed
    /// master key).
    fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.queue.wake_all();
        lock(&self.mk_handles).clear();
        lock(&self.key_handles).clear();
        *lock(&self.slot) = None;
    }

    fn open_session(&self) -> Result<PooledSession, HsmError> {
        let generation = self.generation.load(Ordering::Acquire);
        let slot = self.slot()?;
        let session = self.module.ctx.open_ro_session(slot).map_err(classify)?;
        let count = SessionCount::new(&self.open_sessions);
        self.login(&session)?;
        Ok(PooledSession {
            session,
            generation,
            mk_copies: HashMap::new(),
            _count: count,
        })
    }
}
