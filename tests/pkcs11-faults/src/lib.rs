//! A fault-injecting PKCS#11 module, for tests only.
//!
//! `libkb_pkcs11_faults.so` is a PKCS#11 2.40 module that forwards every call to a real module
//! (SoftHSM2 or Kryoptic in our tests) and, when a control file says so, delays calls and/or fails them with a
//! chosen `CK_RV` instead of calling the real module. Point keybroker (or `pkcs11-tool --module`)
//! at it in place of the real module.
//!
//! It exports one symbol, `C_GetFunctionList`. It deliberately does not export `C_GetInterface`, so
//! `cryptoki` 0.12 falls back to `C_GetFunctionList` and sees a 2.40 function list.
//!
//! # Environment
//!
//! * `KB_FAULTS_MODULE` (required): path of the real PKCS#11 module, e.g.
//!   `/usr/lib/softhsm/libsofthsm2.so`. It is loaded on the first `C_GetFunctionList` and never
//!   unloaded; later changes to the variable are ignored in that process. If it is unset or cannot
//!   be loaded, `C_GetFunctionList` prints one line to stderr and returns `CKR_GENERAL_ERROR`.
//! * `KB_FAULTS_CONTROL` (optional): path of the control file. Unset, or no file at that path: the
//!   module is a pure forwarder.
//!
//! # Control file
//!
//! Re-read on every PKCS#11 call, so a rewrite takes effect from the next call. UTF-8 lines of
//! `key = value` (spaces optional); `#` starts a comment; blank lines are ignored. Example:
//!
//! ```text
//! # fail the second and fourth C_Encrypt, each after 50 ms
//! functions = C_Encrypt
//! rv = CKR_DEVICE_REMOVED
//! every = 2
//! times = 2
//! latency_ms = 50
//! ```
//!
//! | key          | meaning                                                        | default   |
//! |--------------|----------------------------------------------------------------|-----------|
//! | `functions`  | comma-separated PKCS#11 function names, or `*`                 | `*`       |
//! | `rv`         | value to fail matching calls with (see below)                  | no failure (latency only) |
//! | `every`      | fail every Nth matching call (1 = every call); at least 1      | `1`       |
//! | `times`      | at most this many failures for this file content               | unlimited |
//! | `latency_ms` | sleep this long before every matching call, failing or not     | `0`       |
//! | `hide_mechanisms` | mechanisms `C_GetMechanismInfo` answers `CKR_MECHANISM_INVALID` for (names such as `CKM_AES_GCM`, or numbers) | none |
//! | `gcm_iv`     | `token`, `reject` or `corrupt`: how `C_EncryptInit` with `CKM_AES_GCM` treats the caller's IV (below) | the real token's way |
//! | `max_sessions` | `C_OpenSession` answers `CKR_SESSION_COUNT` while this many sessions are open (at least 1) | no limit |
//! | `count_calls` | `yes`: write the number of matching calls so far to `<control path>.calls` at each one (decimal, no newline, through a rename) | `no` |
//!
//! * `functions = *` means every function except the library lifecycle ones: `C_Initialize`,
//!   `C_Finalize` and `C_GetInfo`. Those three can be named explicitly. `C_GetFunctionList` is never
//!   injected and naming it is an error. Names must be PKCS#11 2.40 functions (`C_GetInterface` and
//!   the other 3.x functions do not exist in this module).
//! * `rv` is one of `CKR_DEVICE_REMOVED`, `CKR_SESSION_HANDLE_INVALID`, `CKR_TOKEN_NOT_PRESENT`,
//!   `CKR_DEVICE_ERROR`, `CKR_GENERAL_ERROR`, `CKR_DEVICE_MEMORY`, `CKR_SESSION_CLOSED`,
//!   `CKR_FUNCTION_FAILED`, or a decimal or `0x` hex number. `0` (`CKR_OK`) is refused, because
//!   "succeeding" without the real call would leave output arguments unwritten.
//! * `every`, `times` and `latency_ms` are whole numbers (decimal or `0x` hex).
//! * "Matching call" means a call to one of the selected functions. Counting starts at 1 with the
//!   first matching call after the current file content appeared: with `every = 3`, matching calls
//!   3, 6, 9, ... fail (until `times` failures have been injected).
//! * `gcm_iv` emulates production HSMs, on `C_EncryptInit` with well-formed `CK_GCM_PARAMS`
//!   (malformed ones get `CKR_MECHANISM_PARAM_INVALID`); decryption is never touched:
//!   - `token` (AWS CloudHSM's documented behaviour): the caller's IV is ignored; an IV from the
//!     real token's `C_GenerateRandom` is written into the caller's `pIv` buffer and used;
//!   - `reject` (a strict FIPS-mode HSM): a non-zero caller's IV gets `CKR_MECHANISM_PARAM_INVALID`
//!     without reaching the real module; a zeroed buffer is filled as with `token`;
//!   - `corrupt` (a broken token): as `token`, but after the real `C_EncryptInit` the caller's
//!     buffer is overwritten with another IV, so the IV read back is not the one used.
//!
//!   Each such call appends `passed=<hex> used=<hex or -> returned=<hex>` to `<control path>.gcm`
//!   (the IV the caller passed, the one the real module got, or `-` for a refusal, and what the
//!   caller reads back).
//! * `max_sessions` counts the sessions opened through this module in this process (all slots),
//!   whatever the control file said when they were opened; `C_CloseSession`,
//!   `C_CloseAllSessions` and `C_Finalize` release them. A refused `C_OpenSession` counts as an
//!   injected failure in the evidence file. `C_GetTokenInfo` then reports N as
//!   `ulMaxSessionCount` (and as `ulMaxRwSessionCount` when that was larger or unlimited).
//! * Whenever the file's text changes in any way (a comment counts; so does the file disappearing
//!   or the control path changing), all counters reset.
//! * An unknown key, a repeated key, a bad value or an unreadable file makes the whole file inert
//!   (nothing is injected, not even latency) and prints one warning line to stderr when that
//!   content is first seen.
//! * Write the file atomically (temporary file + rename) if calls may be in flight: a reader that
//!   catches it half-written sees different, possibly inert, content.
//!
//! # Evidence file
//!
//! Each time a failure is injected, the number of failures injected so far for the current
//! content is written to `<control path>.injected` (decimal digits, no newline), through a
//! temporary file and a rename, so readers never see a partial number. The file is only written
//! when a failure is injected: it is neither created nor reset when the content changes, so a test
//! that reuses a control path should delete it when it rewrites the control file.
//!
//! # Scope of the counters
//!
//! The counters live in the process that loaded the module, shared by all its threads and all its
//! sessions. `dlopen` of the same path returns the same instance, so every `Pkcs11` context in one
//! test binary shares one state: tests that run in parallel in one process must not use the shim
//! with different control files or expectations at the same time. Separate processes (e.g. a
//! spawned keybroker) each count on their own, and each overwrites the same evidence file.
//!
//! # Things to know when writing tests
//!
//! * `cryptoki`'s single-part `encrypt`, `decrypt`, `sign`, `digest` and `wrap_key` call the
//!   PKCS#11 function twice: once with a null output to learn the length, then for real. With
//!   `functions = C_Encrypt`, one `Session::encrypt` is two matching calls (and one
//!   `C_EncryptInit`); `every = 2` therefore fails the second, real call of every encrypt.
//! * An injected failure never reaches the real module. A real token ends an active operation
//!   when e.g. `C_Encrypt` fails; here the real module never saw the failure, so after a failure
//!   injected into `C_Encrypt` (or `C_Decrypt`, `C_Sign`, ...) its encrypt operation is still
//!   active on that session, and the next `C_EncryptInit` on it returns `CKR_OPERATION_ACTIVE`
//!   unless the session is closed first. Keybroker closes sessions after "unavailable" errors
//!   (`CKR_DEVICE_REMOVED`, `CKR_SESSION_HANDLE_INVALID`, ...) but not after `CKR_GENERAL_ERROR`
//!   or `CKR_FUNCTION_FAILED`; to fail an operation with those, target its `*Init` function.
//!
//! # Implementation notes
//!
//! Every entry of the 2.40 function list but seven is a generated wrapper (`C_GetMechanismInfo`,
//! `C_EncryptInit`, the session functions, `C_GetTokenInfo` and `C_Finalize` are written by hand
//! for the keys above, starting the same way): it consults the control file (a
//! mutex-guarded state, never held while sleeping or calling the real module), sleeps, then either
//! returns the injected `CK_RV` or calls the real module's entry with the same arguments
//! (`CKR_FUNCTION_NOT_SUPPORTED` if the real module has none). Nothing panics across the FFI
//! boundary.

/// Public only for the fuzz target (tests/fuzz), which feeds [`control::parse_plan`].
pub mod control;

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::ptr;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use cryptoki_sys::*;
use libloading::Library;

/// Environment variable naming the real PKCS#11 module.
const MODULE_ENV: &str = "KB_FAULTS_MODULE";

/// The real module, loaded once per process and never unloaded.
struct RealModule {
    /// Keeps the real module loaded. It lives in a `static`, which is never dropped.
    _library: Library,
    /// A copy of the real module's function list (PKCS#11 function lists are constant once
    /// returned; `cryptoki` copies them the same way).
    functions: CK_FUNCTION_LIST,
}

static REAL_MODULE: OnceLock<RealModule> = OnceLock::new();

/// Returns the real module, loading it on first use. A failed load is not cached: the next
/// `C_GetFunctionList` tries again.
fn real_module() -> Result<&'static RealModule, String> {
    if let Some(module) = REAL_MODULE.get() {
        return Ok(module);
    }
    let loaded = load_real_module()?;
    // If another thread won a race to load it, keep theirs; dropping ours only releases one
    // reference to the same already-loaded library.
    Ok(REAL_MODULE.get_or_init(|| loaded))
}

fn load_real_module() -> Result<RealModule, String> {
    let Some(path) = std::env::var_os(MODULE_ENV) else {
        return Err(format!(
            "{MODULE_ENV} is not set; it must name the real PKCS#11 module"
        ));
    };
    let shown = path.to_string_lossy().into_owned();
    // SAFETY: loading a shared library runs its initialisers. KB_FAULTS_MODULE names a PKCS#11
    // module, and loading one is this shim's whole purpose.
    let library = unsafe { Library::new(&path) }
        .map_err(|error| format!("cannot load {MODULE_ENV}={shown}: {error}"))?;
    // SAFETY: PKCS#11 defines C_GetFunctionList with exactly this signature (CK_C_GetFunctionList).
    let real_get_function_list = unsafe {
        library
            .get::<unsafe extern "C" fn(CK_FUNCTION_LIST_PTR_PTR) -> CK_RV>(b"C_GetFunctionList\0")
    }
    .map_err(|error| format!("{shown} has no C_GetFunctionList: {error}"))?;
    let ours: unsafe extern "C" fn(CK_FUNCTION_LIST_PTR_PTR) -> CK_RV = C_GetFunctionList;
    if ptr::fn_addr_eq(*real_get_function_list, ours) {
        return Err(format!("{MODULE_ENV}={shown} is this fault shim itself"));
    }
    let mut list: *mut CK_FUNCTION_LIST = ptr::null_mut();
    // SAFETY: a valid out-pointer, as the PKCS#11 contract for C_GetFunctionList requires.
    let rv = unsafe { real_get_function_list(&mut list) };
    if rv != CKR_OK || list.is_null() {
        return Err(format!(
            "C_GetFunctionList of {shown} failed (rv = {rv:#x})"
        ));
    }
    // SAFETY: the module returned CKR_OK and a non-null pointer to its function list, which stays
    // valid while the module is loaded; we copy it by value.
    let functions = unsafe { *list };
    Ok(RealModule {
        _library: library,
        functions,
    })
}

/// The one exported symbol: hands out this module's function list, loading the real module first.
///
/// # Safety
///
/// `function_list` must be null or valid for writing one pointer, as PKCS#11 requires. The list
/// written there is read-only.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(function_list: CK_FUNCTION_LIST_PTR_PTR) -> CK_RV {
    if function_list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    if let Err(reason) = real_module() {
        control::warn(&reason);
        return CKR_GENERAL_ERROR;
    }
    // SAFETY: checked non-null above; the caller guarantees it is valid for one pointer write.
    unsafe { *function_list = (&raw const FUNCTION_LIST).cast_mut() };
    CKR_OK
}

/// Generates, for each `Name(arg: Type, ...);`, a wrapper `Name` that applies the control file and
/// then forwards to the real module; plus [`FORWARDED_FUNCTIONS`] and the [`FUNCTION_LIST`] that
/// points at the wrappers. A signature that does not match `CK_FUNCTION_LIST` fails to compile.
macro_rules! forward_functions {
    (
        written_by_hand: [$( $own:ident ),*];
        $( $name:ident ( $( $arg:ident : $type:ty ),* $(,)? ); )*
    ) => {
        /// Every function in the 2.40 function list except `C_GetFunctionList`.
        pub(crate) const FORWARDED_FUNCTIONS: &[&str] =
            &[$( stringify!($own), )* $( stringify!($name) ),*];

        $(
            #[allow(non_snake_case, clippy::too_many_arguments)]
            unsafe extern "C" fn $name($( $arg: $type ),*) -> CK_RV {
                let decision = control::before_call(stringify!($name));
                if !decision.latency.is_zero() {
                    std::thread::sleep(decision.latency);
                }
                if let Some(rv) = decision.fail_with {
                    return rv;
                }
                let Some(real) = REAL_MODULE.get() else {
                    return CKR_GENERAL_ERROR;
                };
                let Some(real_function) = real.functions.$name else {
                    return CKR_FUNCTION_NOT_SUPPORTED;
                };
                // SAFETY: the caller upholds the PKCS#11 contract for this function; its arguments
                // go unchanged to the real module's implementation of the same function, whose
                // type comes from the same CK_FUNCTION_LIST field.
                unsafe { real_function($( $arg ),*) }
            }
        )*

        /// This module's function list: version 2.40, every entry one of our wrappers.
        static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
            version: CK_VERSION { major: 2, minor: 40 },
            C_GetFunctionList: Some(C_GetFunctionList),
            $( $own: Some($own), )*
            $( $name: Some($name), )*
        };
    };
}

// Signatures copied from cryptoki-sys 0.5.0's bindings (the `CK_C_*` function pointer types), in
// CK_FUNCTION_LIST order.
forward_functions! {
    written_by_hand: [
        C_GetMechanismInfo,
        C_Finalize,
        C_GetTokenInfo,
        C_OpenSession,
        C_CloseSession,
        C_CloseAllSessions,
        C_EncryptInit
    ];
    C_Initialize(arg1: *mut c_void);
    C_GetInfo(arg1: *mut CK_INFO);
    C_GetSlotList(arg1: CK_BBOOL, arg2: *mut CK_SLOT_ID, arg3: *mut CK_ULONG);
    C_GetSlotInfo(arg1: CK_SLOT_ID, arg2: *mut CK_SLOT_INFO);
    C_GetMechanismList(arg1: CK_SLOT_ID, arg2: *mut CK_MECHANISM_TYPE, arg3: *mut CK_ULONG);
    C_InitToken(arg1: CK_SLOT_ID, arg2: *mut CK_UTF8CHAR, arg3: CK_ULONG, arg4: *mut CK_UTF8CHAR);
    C_InitPIN(arg1: CK_SESSION_HANDLE, arg2: *mut CK_UTF8CHAR, arg3: CK_ULONG);
    C_SetPIN(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_UTF8CHAR,
        arg3: CK_ULONG,
        arg4: *mut CK_UTF8CHAR,
        arg5: CK_ULONG,
    );
    C_GetSessionInfo(arg1: CK_SESSION_HANDLE, arg2: *mut CK_SESSION_INFO);
    C_GetOperationState(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: *mut CK_ULONG);
    C_SetOperationState(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_BYTE,
        arg3: CK_ULONG,
        arg4: CK_OBJECT_HANDLE,
        arg5: CK_OBJECT_HANDLE,
    );
    C_Login(arg1: CK_SESSION_HANDLE, arg2: CK_USER_TYPE, arg3: *mut CK_UTF8CHAR, arg4: CK_ULONG);
    C_Logout(arg1: CK_SESSION_HANDLE);
    C_CreateObject(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_ATTRIBUTE,
        arg3: CK_ULONG,
        arg4: *mut CK_OBJECT_HANDLE,
    );
    C_CopyObject(
        arg1: CK_SESSION_HANDLE,
        arg2: CK_OBJECT_HANDLE,
        arg3: *mut CK_ATTRIBUTE,
        arg4: CK_ULONG,
        arg5: *mut CK_OBJECT_HANDLE,
    );
    C_DestroyObject(arg1: CK_SESSION_HANDLE, arg2: CK_OBJECT_HANDLE);
    C_GetObjectSize(arg1: CK_SESSION_HANDLE, arg2: CK_OBJECT_HANDLE, arg3: *mut CK_ULONG);
    C_GetAttributeValue(
        arg1: CK_SESSION_HANDLE,
        arg2: CK_OBJECT_HANDLE,
        arg3: *mut CK_ATTRIBUTE,
        arg4: CK_ULONG,
    );
    C_SetAttributeValue(
        arg1: CK_SESSION_HANDLE,
        arg2: CK_OBJECT_HANDLE,
        arg3: *mut CK_ATTRIBUTE,
        arg4: CK_ULONG,
    );
    C_FindObjectsInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_ATTRIBUTE, arg3: CK_ULONG);
    C_FindObjects(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_OBJECT_HANDLE,
        arg3: CK_ULONG,
        arg4: *mut CK_ULONG,
    );
    C_FindObjectsFinal(arg1: CK_SESSION_HANDLE);
    C_Encrypt(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_BYTE,
        arg3: CK_ULONG,
        arg4: *mut CK_BYTE,
        arg5: *mut CK_ULONG,
    );
    C_EncryptUpdate(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_BYTE,
        arg3: CK_ULONG,
        arg4: *mut CK_BYTE,
        arg5: *mut CK_ULONG,
    );
    C_EncryptFinal(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: *mut CK_ULONG);
    C_DecryptInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
    C_Decrypt(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_BYTE,
        arg3: CK_ULONG,
        arg4: *mut CK_BYTE,
        arg5: *mut CK_ULONG,
    );
    C_DecryptUpdate(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_BYTE,
        arg3: CK_ULONG,
        arg4: *mut CK_BYTE,
        arg5: *mut CK_ULONG,
    );
    C_DecryptFinal(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: *mut CK_ULONG);
    C_DigestInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM);
    C_Digest(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_BYTE,
        arg3: CK_ULONG,
        arg4: *mut CK_BYTE,
        arg5: *mut CK_ULONG,
    );
    C_DigestUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
    C_DigestKey(arg1: CK_SESSION_HANDLE, arg2: CK_OBJECT_HANDLE);
    C_DigestFinal(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: *mut CK_ULONG);
    C_SignInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
    C_Sign(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_BYTE,
        arg3: CK_ULONG,
        arg4: *mut CK_BYTE,
        arg5: *mut CK_ULONG,
    );
    C_SignUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
    C_SignFinal(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: *mut CK_ULONG);
    C_SignRecoverInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
    C_SignRecover(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_BYTE,
        arg3: CK_ULONG,
        arg4: *mut CK_BYTE,
        arg5: *mut CK_ULONG,
    );
    C_VerifyInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
    C_Verify(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_BYTE,
        arg3: CK_ULONG,
        arg4: *mut CK_BYTE,
        arg5: CK_ULONG,
    );
    C_VerifyUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
    C_VerifyFinal(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
    C_VerifyRecoverInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
    C_VerifyRecover(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_BYTE,
        arg3: CK_ULONG,
        arg4: *mut CK_BYTE,
        arg5: *mut CK_ULONG,
    );
    C_DigestEncryptUpdate(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_BYTE,
        arg3: CK_ULONG,
        arg4: *mut CK_BYTE,
        arg5: *mut CK_ULONG,
    );
    C_DecryptDigestUpdate(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_BYTE,
        arg3: CK_ULONG,
        arg4: *mut CK_BYTE,
        arg5: *mut CK_ULONG,
    );
    C_SignEncryptUpdate(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_BYTE,
        arg3: CK_ULONG,
        arg4: *mut CK_BYTE,
        arg5: *mut CK_ULONG,
    );
    C_DecryptVerifyUpdate(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_BYTE,
        arg3: CK_ULONG,
        arg4: *mut CK_BYTE,
        arg5: *mut CK_ULONG,
    );
    C_GenerateKey(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_MECHANISM,
        arg3: *mut CK_ATTRIBUTE,
        arg4: CK_ULONG,
        arg5: *mut CK_OBJECT_HANDLE,
    );
    C_GenerateKeyPair(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_MECHANISM,
        arg3: *mut CK_ATTRIBUTE,
        arg4: CK_ULONG,
        arg5: *mut CK_ATTRIBUTE,
        arg6: CK_ULONG,
        arg7: *mut CK_OBJECT_HANDLE,
        arg8: *mut CK_OBJECT_HANDLE,
    );
    C_WrapKey(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_MECHANISM,
        arg3: CK_OBJECT_HANDLE,
        arg4: CK_OBJECT_HANDLE,
        arg5: *mut CK_BYTE,
        arg6: *mut CK_ULONG,
    );
    C_UnwrapKey(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_MECHANISM,
        arg3: CK_OBJECT_HANDLE,
        arg4: *mut CK_BYTE,
        arg5: CK_ULONG,
        arg6: *mut CK_ATTRIBUTE,
        arg7: CK_ULONG,
        arg8: *mut CK_OBJECT_HANDLE,
    );
    C_DeriveKey(
        arg1: CK_SESSION_HANDLE,
        arg2: *mut CK_MECHANISM,
        arg3: CK_OBJECT_HANDLE,
        arg4: *mut CK_ATTRIBUTE,
        arg5: CK_ULONG,
        arg6: *mut CK_OBJECT_HANDLE,
    );
    C_SeedRandom(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
    C_GenerateRandom(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
    C_GetFunctionStatus(arg1: CK_SESSION_HANDLE);
    C_CancelFunction(arg1: CK_SESSION_HANDLE);
    C_WaitForSlotEvent(arg1: CK_FLAGS, arg2: *mut CK_SLOT_ID, arg3: *mut c_void);
}

/// `C_GetMechanismInfo`, by hand: as every wrapper, plus `hide_mechanisms`, which makes the
/// token look as if it lacked a mechanism.
#[allow(non_snake_case)]
unsafe extern "C" fn C_GetMechanismInfo(
    slot: CK_SLOT_ID,
    mechanism: CK_MECHANISM_TYPE,
    info: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    let decision = control::before_call("C_GetMechanismInfo");
    if !decision.latency.is_zero() {
        std::thread::sleep(decision.latency);
    }
    if let Some(rv) = decision.fail_with {
        return rv;
    }
    if control::hides_mechanism(mechanism) {
        return CKR_MECHANISM_INVALID;
    }
    let Some(real) = REAL_MODULE.get() else {
        return CKR_GENERAL_ERROR;
    };
    let Some(real_function) = real.functions.C_GetMechanismInfo else {
        return CKR_FUNCTION_NOT_SUPPORTED;
    };
    // SAFETY: the caller upholds the PKCS#11 contract for C_GetMechanismInfo; the arguments go
    // unchanged to the real module's C_GetMechanismInfo.
    unsafe { real_function(slot, mechanism, info) }
}

/// The sessions opened through this module and not closed yet, with their slots: what
/// `max_sessions` counts. Kept whatever the control file says, so the count is right when it
/// changes.
static SESSIONS: Mutex<BTreeMap<CK_SESSION_HANDLE, CK_SLOT_ID>> = Mutex::new(BTreeMap::new());

fn sessions() -> MutexGuard<'static, BTreeMap<CK_SESSION_HANDLE, CK_SLOT_ID>> {
    SESSIONS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The control file's decision and vendor habits for `function`, its latency slept. `Err` holds
/// the value to return instead of calling the real module.
fn enter(function: &str) -> Result<(&'static RealModule, control::Vendor), CK_RV> {
    let (decision, vendor) = control::before_call_with_vendor(function);
    if !decision.latency.is_zero() {
        std::thread::sleep(decision.latency);
    }
    if let Some(rv) = decision.fail_with {
        return Err(rv);
    }
    REAL_MODULE
        .get()
        .map(|real| (real, vendor))
        .ok_or(CKR_GENERAL_ERROR)
}

/// `C_Finalize`, by hand: as every wrapper; a successful one forgets every session.
#[allow(non_snake_case)]
unsafe extern "C" fn C_Finalize(reserved: *mut c_void) -> CK_RV {
    let real = match enter("C_Finalize") {
        Ok((real, _)) => real,
        Err(rv) => return rv,
    };
    let Some(real_function) = real.functions.C_Finalize else {
        return CKR_FUNCTION_NOT_SUPPORTED;
    };
    // SAFETY: the caller upholds the PKCS#11 contract for C_Finalize; the argument goes unchanged
    // to the real module's C_Finalize.
    let rv = unsafe { real_function(reserved) };
    if rv == CKR_OK {
        sessions().clear();
    }
    rv
}

/// `C_GetTokenInfo`, by hand: with `max_sessions = N`, the token reports N as its session limit.
#[allow(non_snake_case)]
unsafe extern "C" fn C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) -> CK_RV {
    let (real, vendor) = match enter("C_GetTokenInfo") {
        Ok(entered) => entered,
        Err(rv) => return rv,
    };
    let Some(real_function) = real.functions.C_GetTokenInfo else {
        return CKR_FUNCTION_NOT_SUPPORTED;
    };
    // SAFETY: the caller upholds the PKCS#11 contract for C_GetTokenInfo; the arguments go
    // unchanged to the real module's C_GetTokenInfo.
    let rv = unsafe { real_function(slot, info) };
    if rv == CKR_OK
        && let Some(max) = vendor.max_sessions
        // SAFETY: the real call succeeded, so `info` is a valid CK_TOKEN_INFO it just wrote.
        && let Some(info) = unsafe { info.as_mut() }
    {
        let max = CK_ULONG::try_from(max).unwrap_or(CK_ULONG::MAX);
        info.ulMaxSessionCount = max;
        // 0 is CK_EFFECTIVELY_INFINITE and !0 CK_UNAVAILABLE_INFORMATION: both exceed N.
        if info.ulMaxRwSessionCount == 0 || info.ulMaxRwSessionCount > max {
            info.ulMaxRwSessionCount = max;
        }
    }
    rv
}

/// `C_OpenSession`, by hand: counts the sessions it opens, and with `max_sessions = N` answers
/// `CKR_SESSION_COUNT` (counted as an injected failure) while N are open.
#[allow(non_snake_case)]
unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    application: *mut c_void,
    notify: CK_NOTIFY,
    session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    let (real, vendor) = match enter("C_OpenSession") {
        Ok(entered) => entered,
        Err(rv) => return rv,
    };
    let Some(real_function) = real.functions.C_OpenSession else {
        return CKR_FUNCTION_NOT_SUPPORTED;
    };
    // Held across the real call, so two threads cannot both take the last place.
    let mut open = sessions();
    if let Some(max) = vendor.max_sessions
        && open.len() as u64 >= max
    {
        control::record_injected();
        return CKR_SESSION_COUNT;
    }
    // SAFETY: the caller upholds the PKCS#11 contract for C_OpenSession; the arguments go
    // unchanged to the real module's C_OpenSession.
    let rv = unsafe { real_function(slot, flags, application, notify, session) };
    if rv == CKR_OK && !session.is_null() {
        // SAFETY: the real call succeeded and wrote the new handle through this non-null pointer.
        open.insert(unsafe { *session }, slot);
    }
    rv
}

/// `C_CloseSession`, by hand: the session no longer counts once it is closed (or was gone).
#[allow(non_snake_case)]
unsafe extern "C" fn C_CloseSession(session: CK_SESSION_HANDLE) -> CK_RV {
    let real = match enter("C_CloseSession") {
        Ok((real, _)) => real,
        Err(rv) => return rv,
    };
    let Some(real_function) = real.functions.C_CloseSession else {
        return CKR_FUNCTION_NOT_SUPPORTED;
    };
    // SAFETY: the caller upholds the PKCS#11 contract for C_CloseSession; the argument goes
    // unchanged to the real module's C_CloseSession.
    let rv = unsafe { real_function(session) };
    if matches!(rv, CKR_OK | CKR_SESSION_HANDLE_INVALID | CKR_SESSION_CLOSED) {
        sessions().remove(&session);
    }
    rv
}

/// `C_CloseAllSessions`, by hand: the slot's sessions no longer count.
#[allow(non_snake_case)]
unsafe extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
    let real = match enter("C_CloseAllSessions") {
        Ok((real, _)) => real,
        Err(rv) => return rv,
    };
    let Some(real_function) = real.functions.C_CloseAllSessions else {
        return CKR_FUNCTION_NOT_SUPPORTED;
    };
    // SAFETY: the caller upholds the PKCS#11 contract for C_CloseAllSessions; the argument goes
    // unchanged to the real module's C_CloseAllSessions.
    let rv = unsafe { real_function(slot) };
    if rv == CKR_OK {
        sessions().retain(|_, session_slot| *session_slot != slot);
    }
    rv
}

/// `C_EncryptInit`, by hand: with `gcm_iv`, an AES-GCM encryption gets the IV a production HSM
/// would choose (see the module doc), recorded in `<control>.gcm`.
#[allow(non_snake_case)]
unsafe extern "C" fn C_EncryptInit(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    let (real, vendor) = match enter("C_EncryptInit") {
        Ok(entered) => entered,
        Err(rv) => return rv,
    };
    let Some(real_function) = real.functions.C_EncryptInit else {
        return CKR_FUNCTION_NOT_SUPPORTED;
    };
    // SAFETY: the caller upholds the PKCS#11 contract for C_EncryptInit; the arguments go
    // unchanged to the real module's C_EncryptInit.
    let forward = || unsafe { real_function(session, mechanism, key) };
    let Some(habit) = vendor.gcm_iv else {
        return forward();
    };
    // SAFETY: null-checked; PKCS#11 requires a valid CK_MECHANISM for the call's duration. Read
    // by value (unaligned-safe), not borrowed.
    if mechanism.is_null() || unsafe { ptr::read_unaligned(mechanism) }.mechanism != CKM_AES_GCM {
        return forward();
    }
    // SAFETY: as above.
    let mechanism_value = unsafe { ptr::read_unaligned(mechanism) };
    if mechanism_value.pParameter.is_null()
        || usize::try_from(mechanism_value.ulParameterLen).ok() != Some(size_of::<CK_GCM_PARAMS>())
    {
        return CKR_MECHANISM_PARAM_INVALID;
    }
    // SAFETY: non-null and of CK_GCM_PARAMS's size: the caller's GCM parameters, read by value.
    let params = unsafe { ptr::read_unaligned(mechanism_value.pParameter.cast::<CK_GCM_PARAMS>()) };
    let Ok(iv_len) = usize::try_from(params.ulIvLen) else {
        return CKR_MECHANISM_PARAM_INVALID;
    };
    if params.pIv.is_null() || iv_len == 0 {
        return CKR_MECHANISM_PARAM_INVALID;
    }
    // SAFETY: pIv is non-null and, per CK_GCM_PARAMS, holds ulIvLen bytes the caller owns;
    // copied out, no reference kept.
    let passed = unsafe { std::slice::from_raw_parts(params.pIv, iv_len) }.to_vec();
    if habit.refuses(&passed) {
        control::record_gcm(&passed, None, &passed);
        return CKR_MECHANISM_PARAM_INVALID;
    }
    let Some(generate_random) = real.functions.C_GenerateRandom else {
        return CKR_FUNCTION_NOT_SUPPORTED;
    };
    // The token's own IV, from the real token's RNG, straight into the caller's buffer (which
    // PKCS#11 lets a token write the IV it used into).
    // SAFETY: pIv holds ulIvLen writable bytes (above); the session is the caller's.
    let rv = unsafe { generate_random(session, params.pIv, params.ulIvLen) };
    if rv != CKR_OK {
        return rv;
    }
    // SAFETY: as for `passed`.
    let used = unsafe { std::slice::from_raw_parts(params.pIv, iv_len) }.to_vec();
    let rv = forward();
    let mut returned = used.clone();
    if rv == CKR_OK {
        // SoftHSM2 and Kryoptic copy the IV during C_EncryptInit, so what is written now changes
        // only what the caller reads back, not what the token encrypts with.
        returned = habit.reported(&used);
        // SAFETY: `returned` has iv_len bytes; pIv holds iv_len writable bytes; no overlap.
        unsafe { ptr::copy_nonoverlapping(returned.as_ptr(), params.pIv, iv_len) };
    }
    control::record_gcm(&passed, Some(&used), &returned);
    rv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_every_function_of_the_2_40_list_but_c_get_function_list() {
        assert_eq!(FORWARDED_FUNCTIONS.len(), 67);
        assert!(!FORWARDED_FUNCTIONS.contains(&"C_GetFunctionList"));
        let mut unique = FORWARDED_FUNCTIONS.to_vec();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), FORWARDED_FUNCTIONS.len());
        assert_eq!(
            (FUNCTION_LIST.version.major, FUNCTION_LIST.version.minor),
            (2, 40)
        );
    }

    #[test]
    fn c_get_function_list_rejects_a_null_out_pointer() {
        // SAFETY: a null pointer is explicitly allowed (and rejected) by C_GetFunctionList.
        let rv = unsafe { C_GetFunctionList(ptr::null_mut()) };
        assert_eq!(rv, CKR_ARGUMENTS_BAD);
    }
}
