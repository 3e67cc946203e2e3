//! The PKCS#11 context: loading and (re-)initialising the process-wide module, finding our
//! token's slot, logging in, the mechanisms keybroker requires of a token, and initialising a
//! development token. Pools, sessions' lives, objects and operations live elsewhere in `hsm`;
//! like every file of `hsm`, it knows nothing of HTTP or SQL.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::MechanismType;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;

use super::error::classify;
use super::{HsmError, Inner, lock};

/// How many times the slots are scanned for our token before it counts as gone, and the pause
/// between scans.
const SLOT_SCAN_ROUNDS: usize = 3;
const SLOT_SCAN_PAUSE: Duration = Duration::from_millis(50);

/// How often, at most, a token that stays unreachable makes us re-initialise the module.
const REINIT_INTERVAL: Duration = Duration::from_secs(1);

/// The process-wide PKCS#11 module. PKCS#11 allows one `C_Initialize` per process, so every
/// [`Hsm`](super::Hsm) in the process shares it (tests build several).
pub(super) struct Module {
    pub(super) ctx: Pkcs11,
    path: PathBuf,
    /// Token calls hold it shared; re-initialising holds it exclusively, because `C_Finalize`
    /// while another thread is inside the module is undefined behaviour, and so do officer
    /// operations, which SoftHSM2 does not keep apart from other sessions' calls.
    lifecycle: RwLock<()>,
    last_reinit: Mutex<Option<Instant>>,
    /// Bumped by every re-initialisation: what was verified before (the self-test) is not
    /// known to hold after it.
    pub(super) epoch: AtomicU64,
}

impl Module {
    pub(super) fn shared(path: &Path) -> Result<Arc<Self>, HsmError> {
        static MODULE: OnceLock<Mutex<Option<Arc<Module>>>> = OnceLock::new();
        let cell = MODULE.get_or_init(|| Mutex::new(None));
        let mut current = lock(cell);
        if let Some(module) = current.as_ref()
            && module.path == path
        {
            return Ok(module.clone());
        }
        let module_err = |source| HsmError::Module {
            path: path.to_path_buf(),
            source,
        };
        let ctx = Pkcs11::new(path).map_err(module_err)?;
        Self::initialize(&ctx).map_err(module_err)?;
        let module = Arc::new(Self {
            ctx,
            path: path.to_path_buf(),
            lifecycle: RwLock::new(()),
            last_reinit: Mutex::new(None),
            epoch: AtomicU64::new(0),
        });
        *current = Some(module.clone());
        Ok(module)
    }

    fn initialize(ctx: &Pkcs11) -> Result<(), CkError> {
        // Without OS locking two threads crashed SoftHSM (PLATFORM.md).
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Exclusive access, for an officer operation (see [`Hsm::admin`](super::Hsm::admin)).
    pub(super) fn enter_alone(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.lifecycle
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Shared access for one token call.
    pub(super) fn enter(&self) -> RwLockReadGuard<'_, ()> {
        self.lifecycle
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `C_Finalize` then `C_Initialize`, once per [`REINIT_INTERVAL`] at most. Some modules
    /// (SoftHSM2 among them) never see a token again after it went away until they are
    /// re-initialised; real HSM vendors recommend the same after a failover. Every session of
    /// the process dies with it; callers reopen theirs on the next call.
    pub(super) fn reinitialize(&self) {
        let _exclusive = self
            .lifecycle
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut last = lock(&self.last_reinit);
        if last.is_some_and(|at| at.elapsed() < REINIT_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        self.epoch.fetch_add(1, Ordering::AcqRel);
        tracing::warn!(target: "keybroker::hsm", "token unreachable; re-initialising the PKCS#11 module");
        if let Err(e) = self.ctx.clone().finalize() {
            tracing::debug!(target: "keybroker::hsm", error = %e, "C_Finalize failed");
        }
        if let Err(e) = Self::initialize(&self.ctx) {
            tracing::warn!(target: "keybroker::hsm", error = %e, "C_Initialize failed");
        }
    }
}

/// Initialises the token in the first slot that has an uninitialised one (SoftHSM2 always keeps
/// one free), then sets the user PIN. For development and CI tokens; a production HSM is
/// initialised with its vendor's tools.
///
/// # Errors
/// [`HsmError::TokenNotFound`] when no free slot exists; any token failure.
pub async fn init_token(
    module: PathBuf,
    label: String,
    so_pin: SecretString,
    user_pin: SecretString,
) -> Result<(), HsmError> {
    tokio::task::spawn_blocking(move || {
        let module = Module::shared(&module)?;
        let _shared = module.enter();
        let ctx = &module.ctx;
        let slots = ctx.get_slots_with_token().map_err(classify)?;
        for slot in &slots {
            let info = ctx.get_token_info(*slot).map_err(classify)?;
            if info.token_initialized() && info.label().trim_end() == label {
                return Err(HsmError::AlreadyExists(label));
            }
        }
        let mut free = None;
        for slot in slots {
            if !ctx
                .get_token_info(slot)
                .map_err(classify)?
                .token_initialized()
            {
                free = Some(slot);
                break;
            }
        }
        let slot = free.ok_or_else(|| HsmError::TokenNotFound("(a free slot)".to_owned()))?;
        ctx.init_token(slot, &so_pin, &label).map_err(classify)?;
        let session = ctx.open_rw_session(slot).map_err(classify)?;
        session
            .login(UserType::So, Some(&so_pin))
            .map_err(classify)?;
        session.init_pin(&user_pin).map_err(classify)?;
        session.logout().map_err(classify)?;
        Ok(())
    })
    .await
    .map_err(|_| HsmError::Worker)?
}

/// The mechanisms keybroker uses, with the operation each must support.
pub(super) const REQUIRED_MECHANISMS: [(MechanismType, &str, Need); 5] = [
    (
        MechanismType::AES_GCM,
        "CKM_AES_GCM (encrypt and decrypt)",
        Need::EncryptDecrypt,
    ),
    (MechanismType::ECDSA, "CKM_ECDSA (sign)", Need::Sign),
    (
        MechanismType::SHA256_HMAC,
        "CKM_SHA256_HMAC (sign)",
        Need::Sign,
    ),
    (MechanismType::AES_KEY_GEN, "CKM_AES_KEY_GEN", Need::Any),
    (
        MechanismType::ECC_KEY_PAIR_GEN,
        "CKM_EC_KEY_PAIR_GEN",
        Need::Any,
    ),
];

#[derive(Debug, Clone, Copy)]
pub(super) enum Need {
    EncryptDecrypt,
    Sign,
    Any,
}

impl Need {
    /// Whether a mechanism with these flags does what keybroker needs it for.
    pub(super) fn met_by(self, info: &cryptoki::mechanism::MechanismInfo) -> bool {
        match self {
            Need::EncryptDecrypt => info.encrypt() && info.decrypt(),
            Need::Sign => info.sign(),
            Need::Any => true,
        }
    }
}

/// The required mechanisms the token in `slot` lacks (or lacks the needed flags of), and
/// C_GenerateRandom if `random_ok` is false.
pub(super) fn missing_mechanisms(ctx: &Pkcs11, slot: Slot, random_ok: bool) -> Vec<&'static str> {
    // C_GetMechanismInfo per mechanism (CKR_MECHANISM_INVALID when absent) rather than the
    // whole list, whose vendor-specific entries cryptoki logs as errors.
    let mut missing = Vec::new();
    if !random_ok {
        missing.push("C_GenerateRandom");
    }
    for (mechanism, name, need) in REQUIRED_MECHANISMS {
        let usable = ctx
            .get_mechanism_info(slot, mechanism)
            .is_ok_and(|info| need.met_by(&info));
        if !usable {
            missing.push(name);
        }
    }
    missing
}

/// Logs the user in on `session`.
pub(super) fn login_user(session: &Session, pin: &SecretString) -> Result<(), HsmError> {
    match session.login(UserType::User, Some(pin)) {
        // Login is per application: once one session logged in, the others are too. This
        // says nothing about the PIN, which the first login already checked.
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(classify(e)),
    }
}

impl Inner {
    pub(super) fn login(&self, session: &Session) -> Result<(), HsmError> {
        login_user(session, &self.pin)
    }

    pub(super) fn slot(&self) -> Result<Slot, HsmError> {
        let mut cached = lock(&self.slot);
        if let Some(slot) = *cached {
            return Ok(slot);
        }
        // A failure to list slots means we cannot reach our token (SoftHSM2 answers
        // CKR_GENERAL_ERROR once its storage went away). A slot whose token cannot be read is
        // skipped: it may be another token half-way through initialisation by another process,
        // and our token may be in the next slot; if ours is not found, that failure is the answer.
        let ctx = &self.module.ctx;
        let mut unreadable = None;
        for round in 0..SLOT_SCAN_ROUNDS {
            if round > 0 {
                // SoftHSM2 shows a token whose files another process is rewriting as unreadable
                // or absent for a moment: look again before calling it gone.
                std::thread::sleep(SLOT_SCAN_PAUSE);
            }
            unreadable = None;
            for slot in ctx.get_slots_with_token().map_err(HsmError::Unavailable)? {
                let info = match ctx.get_token_info(slot) {
                    Ok(info) => info,
                    Err(e) => {
                        tracing::debug!(target: "keybroker::hsm", slot = slot.id(), error = %e, "cannot read a slot's token");
                        unreadable = Some(e);
                        continue;
                    }
                };
                if info.token_initialized() && info.label().trim_end() == self.token_label {
                    *cached = Some(slot);
                    return Ok(slot);
                }
            }
        }
        Err(match unreadable {
            Some(e) => HsmError::Unavailable(e),
            None => HsmError::TokenNotFound(self.token_label.clone()),
        })
    }
}
