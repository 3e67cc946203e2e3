//! `hsm` owns the PKCS#11 token and is the only user of `cryptoki`: module loading, login, a
//! bounded pool of sessions served by worker threads off the async executor (`worker`; shrunk
//! to the token's session limit if it has one), object templates, cached handles, the
//! operations keybroker needs (random, AES-GCM seal/unseal storing the IV the token used,
//! whoever chose it), the self-test that refuses a token whose seals would not open, and `probe`
//! (what a token offers). It knows nothing of HTTP or SQL.
//!
//! One file per concern: `context` (the module, the slot, login), `pool` (the shared state,
//! connecting, queuing a call), `worker` (the threads that serve the queue), `session` (a
//! session's life, the officer's session), `objects` (labels, templates, keys on the token),
//! `operations` (seal, open, sign, HMAC, random, the self-test), `error` and `probe`. This
//! file keeps the [`Hsm`] handle, [`HsmConfig`] and the paths the rest of keybroker uses.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::Duration;

use secrecy::SecretString;

mod context;
mod error;
mod objects;
mod operations;
mod pool;
mod probe;
mod session;
mod worker;

pub use context::init_token;
pub use error::HsmError;
pub use objects::{AUDIT_KEY_LABEL, InitReport, ObjectInfo, SIGNING_KEY_LABEL, signing_key_label};
pub use operations::TokenSession;
use pool::Inner;
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

impl Hsm {
    /// The label of the token this pool is logged in to.
    pub fn token_label(&self) -> &str {
        &self.inner.token_label
    }
}
