//! A session's life: opening a pooled session and logging it in, counting it against the
//! token's session cap (lowered when the token answers `CKR_SESSION_COUNT`), dropping every
//! session and handle after a fault, and the officer's own read-write session ([`Hsm::admin`]),
//! for which a worker gives up its session at the cap. It runs no operation itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use crate::crypto::MasterKeyVersion;

use super::error::classify;
use super::pool::Inner;
use super::{Hsm, HsmError, lock};

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
pub(super) struct SessionCount(Arc<AtomicUsize>);

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

pub(super) struct PooledSession {
    pub(super) session: Session,
    pub(super) generation: u64,
    /// Per-session copies of master keys (CKA_TOKEN=false): they stay on the token, sensitive and
    /// non-extractable, but SoftHSM serves them from memory, about 4× faster than token objects.
    pub(super) mk_copies: HashMap<MasterKeyVersion, ObjectHandle>,
    /// Declared after `session`, so the count drops once the session is closed.
    _count: SessionCount,
}

impl Hsm {
    /// Runs `op` on a fresh read-write session (key creation, status). Officer commands only:
    /// it is not pooled.
    pub(super) async fn admin<T, F>(&self, op: F) -> Result<T, HsmError>
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
    pub(super) fn session_budget(&self) -> bool {
        self.open_sessions.load(Ordering::Acquire) + self.officers.load(Ordering::Acquire)
            < self.session_cap.load(Ordering::Acquire)
    }

    /// Takes up one officer's request for a session, if there is one.
    pub(super) fn take_release_request(&self) -> bool {
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
    pub(super) fn lower_session_cap(&self) {
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
    pub(super) fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.queue.wake_all();
        lock(&self.mk_handles).clear();
        lock(&self.key_handles).clear();
        *lock(&self.slot) = None;
    }

    pub(super) fn open_session(&self) -> Result<PooledSession, HsmError> {
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
