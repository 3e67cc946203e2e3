//! The control file: parsing it, and deciding for each call whether to delay or fail it.
//!
//! Everything here is plain Rust with no FFI, so it is unit-tested directly. The format itself is
//! documented at the top of `lib.rs`.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use cryptoki_sys::{
    CK_MECHANISM_TYPE, CK_RV, CKM_AES_GCM, CKM_AES_KEY_GEN, CKM_EC_KEY_PAIR_GEN, CKM_ECDSA,
    CKM_GENERIC_SECRET_KEY_GEN, CKM_SHA256_HMAC, CKR_DEVICE_ERROR, CKR_DEVICE_MEMORY,
    CKR_DEVICE_REMOVED, CKR_FUNCTION_FAILED, CKR_GENERAL_ERROR, CKR_OK, CKR_SESSION_CLOSED,
    CKR_SESSION_HANDLE_INVALID, CKR_TOKEN_NOT_PRESENT,
};

use crate::FORWARDED_FUNCTIONS;

/// Environment variable naming the control file.
pub(crate) const CONTROL_ENV: &str = "KB_FAULTS_CONTROL";

/// Suffix appended to the control file's path to name the evidence file.
const INJECTED_SUFFIX: &str = ".injected";

/// Functions that `functions = *` leaves alone: they manage the library, not the token.
const LIFECYCLE_FUNCTIONS: [&str; 3] = ["C_Initialize", "C_Finalize", "C_GetInfo"];

/// Return-value names accepted by the `rv` key.
const RV_NAMES: [(&str, CK_RV); 8] = [
    ("CKR_DEVICE_REMOVED", CKR_DEVICE_REMOVED),
    ("CKR_SESSION_HANDLE_INVALID", CKR_SESSION_HANDLE_INVALID),
    ("CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT),
    ("CKR_DEVICE_ERROR", CKR_DEVICE_ERROR),
    ("CKR_GENERAL_ERROR", CKR_GENERAL_ERROR),
    ("CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY),
    ("CKR_SESSION_CLOSED", CKR_SESSION_CLOSED),
    ("CKR_FUNCTION_FAILED", CKR_FUNCTION_FAILED),
];

/// Which PKCS#11 functions a plan applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Functions {
    /// `*`: every forwarded function except the library lifecycle ones.
    AllTokenFunctions,
    /// An explicit list of function names, each one of [`FORWARDED_FUNCTIONS`].
    Named(Vec<&'static str>),
}

impl Functions {
    fn matches(&self, function: &str) -> bool {
        match self {
            Functions::AllTokenFunctions => !LIFECYCLE_FUNCTIONS.contains(&function),
            Functions::Named(names) => names.contains(&function),
        }
    }
}

/// A parsed control file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub(crate) functions: Functions,
    /// The value to fail matching calls with; `None` means latency only.
    pub(crate) rv: Option<CK_RV>,
    /// Fail every Nth matching call; at least 1.
    pub(crate) every: u64,
    /// Stop failing after this many injected failures; `None` means no limit.
    pub(crate) times: Option<u64>,
    /// Delay before every matching call.
    pub(crate) latency: Duration,
    /// Mechanisms `C_GetMechanismInfo` reports as absent (`CKR_MECHANISM_INVALID`), whatever the
    /// real token has: a token without them, for the start-up probe.
    pub(crate) hidden_mechanisms: Vec<CK_MECHANISM_TYPE>,
    /// How `C_EncryptInit` with `CKM_AES_GCM` treats the caller's IV; `None`: as the real token.
    pub(crate) gcm_iv: Option<GcmIv>,
    /// `C_OpenSession` answers `CKR_SESSION_COUNT` while this many sessions are open.
    pub(crate) max_sessions: Option<u64>,
    /// Write the number of matching calls so far to `<control path>.calls` at every one.
    pub(crate) count_calls: bool,
}

/// An emulated vendor habit for AES-GCM IVs (the `gcm_iv` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GcmIv {
    /// Ignore the caller's IV, use one from the real token's RNG and write it back into `pIv`
    /// (AWS CloudHSM's documented behaviour).
    Token,
    /// Refuse a non-zero caller's IV with `CKR_MECHANISM_PARAM_INVALID`; fill a zeroed one as
    /// `Token` does (a strict FIPS-mode token).
    Reject,
    /// As `Token`, but write back another IV than the one used (a broken token).
    Corrupt,
}

impl GcmIv {
    /// Whether this habit refuses the caller's `iv`.
    pub(crate) fn refuses(self, iv: &[u8]) -> bool {
        self == GcmIv::Reject && iv.iter().any(|byte| *byte != 0)
    }

    /// What the caller reads back after the real module encrypted with `used`.
    pub(crate) fn reported(self, used: &[u8]) -> Vec<u8> {
        match self {
            GcmIv::Token | GcmIv::Reject => used.to_vec(),
            // Every byte differs, so the IV reported never equals the IV used.
            GcmIv::Corrupt => used.iter().map(|byte| byte ^ 0x5a).collect(),
        }
    }
}

/// What a control file says about vendor habits, whatever function is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Vendor {
    pub(crate) gcm_iv: Option<GcmIv>,
    pub(crate) max_sessions: Option<u64>,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            functions: Functions::AllTokenFunctions,
            rv: None,
            every: 1,
            times: None,
            latency: Duration::ZERO,
            hidden_mechanisms: Vec::new(),
            gcm_iv: None,
            max_sessions: None,
            count_calls: false,
        }
    }
}

/// Parses the text of a control file. The error says what is wrong and on which line.
pub fn parse_plan(text: &str) -> Result<Plan, String> {
    let mut plan = Plan::default();
    let mut seen_keys: Vec<&str> = Vec::new();
    for (index, raw_line) in text.lines().enumerate() {
        let line_number = index + 1;
        let line = match raw_line.split_once('#') {
            Some((before_comment, _)) => before_comment,
            None => raw_line,
        }
        .trim();
        if line.is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!(
                "line {line_number}: expected `key = value`, got {line:?}"
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        if seen_keys.contains(&key) {
            return Err(format!("line {line_number}: key {key:?} given twice"));
        }
        let bad_value = |expected: &str| {
            format!("line {line_number}: bad value {value:?} for {key:?}; expected {expected}")
        };
        match key {
            "functions" => {
                plan.functions = parse_functions(value).map_err(|problem| {
                    format!("line {line_number}: bad value {value:?} for \"functions\": {problem}")
                })?;
            }
            "rv" => plan.rv = Some(parse_rv(value).ok_or_else(|| bad_value(RV_EXPECTED))?),
            "every" => {
                plan.every = parse_number(value)
                    .filter(|every| *every >= 1)
                    .ok_or_else(|| bad_value("a whole number of at least 1"))?;
            }
            "times" => {
                plan.times = Some(parse_number(value).ok_or_else(|| bad_value("a whole number"))?);
            }
            "latency_ms" => {
                let millis = parse_number(value).ok_or_else(|| bad_value("a whole number"))?;
                plan.latency = Duration::from_millis(millis);
            }
            "gcm_iv" => {
                plan.gcm_iv = Some(match value {
                    "token" => GcmIv::Token,
                    "reject" => GcmIv::Reject,
                    "corrupt" => GcmIv::Corrupt,
                    _ => return Err(bad_value("token, reject or corrupt")),
                });
            }
            "max_sessions" => {
                plan.max_sessions = Some(
                    parse_number(value)
                        .filter(|max| *max >= 1)
                        .ok_or_else(|| bad_value("a whole number of at least 1"))?,
                );
            }
            "count_calls" => {
                plan.count_calls = match value {
                    "yes" => true,
                    "no" => false,
                    _ => return Err(bad_value("yes or no")),
                };
            }
            "hide_mechanisms" => {
                plan.hidden_mechanisms = value
                    .split(',')
                    .map(|name| parse_mechanism(name.trim()))
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad_value(MECHANISM_EXPECTED))?;
            }
            _ => {
                return Err(format!(
                    "line {line_number}: unknown key {key:?} \
                     (known: functions, rv, every, times, latency_ms, hide_mechanisms, gcm_iv, \
                     max_sessions, count_calls)"
                ));
            }
        }
        seen_keys.push(key);
    }
    Ok(plan)
}

const RV_EXPECTED: &str = "a non-zero decimal or 0x-hex number, or one of CKR_DEVICE_REMOVED, \
    CKR_SESSION_HANDLE_INVALID, CKR_TOKEN_NOT_PRESENT, CKR_DEVICE_ERROR, CKR_GENERAL_ERROR, \
    CKR_DEVICE_MEMORY, CKR_SESSION_CLOSED, CKR_FUNCTION_FAILED";

const MECHANISM_NAMES: [(&str, CK_MECHANISM_TYPE); 6] = [
    ("CKM_AES_GCM", CKM_AES_GCM),
    ("CKM_AES_KEY_GEN", CKM_AES_KEY_GEN),
    ("CKM_ECDSA", CKM_ECDSA),
    ("CKM_EC_KEY_PAIR_GEN", CKM_EC_KEY_PAIR_GEN),
    ("CKM_SHA256_HMAC", CKM_SHA256_HMAC),
    ("CKM_GENERIC_SECRET_KEY_GEN", CKM_GENERIC_SECRET_KEY_GEN),
];

const MECHANISM_EXPECTED: &str = "a comma-separated list of decimal or 0x-hex numbers or of \
    CKM_AES_GCM, CKM_AES_KEY_GEN, CKM_ECDSA, CKM_EC_KEY_PAIR_GEN, CKM_SHA256_HMAC, \
    CKM_GENERIC_SECRET_KEY_GEN";

fn parse_mechanism(value: &str) -> Option<CK_MECHANISM_TYPE> {
    match MECHANISM_NAMES.iter().find(|(name, _)| *name == value) {
        Some((_, mechanism)) => Some(*mechanism),
        None => parse_number(value).and_then(|n| CK_MECHANISM_TYPE::try_from(n).ok()),
    }
}

fn parse_functions(value: &str) -> Result<Functions, String> {
    if value == "*" {
        return Ok(Functions::AllTokenFunctions);
    }
    let mut names = Vec::new();
    for name in value.split(',').map(str::trim) {
        if name == "*" {
            return Err("`*` cannot be combined with names".to_owned());
        }
        if name == "C_GetFunctionList" {
            return Err("C_GetFunctionList is never injected".to_owned());
        }
        let Some(known) = FORWARDED_FUNCTIONS.iter().find(|known| **known == name) else {
            return Err(format!("{name:?} is not a PKCS#11 2.40 function name"));
        };
        names.push(*known);
    }
    Ok(Functions::Named(names))
}

/// A return value by name or number. `CKR_OK` is refused: "succeeding" without calling the real
/// function would leave the caller's output arguments unwritten.
fn parse_rv(value: &str) -> Option<CK_RV> {
    let rv = match RV_NAMES.iter().find(|(name, _)| *name == value) {
        Some((_, rv)) => *rv,
        None => match strip_hex_prefix(value) {
            Some(hex) => CK_RV::from_str_radix(hex, 16).ok()?,
            None => value.parse().ok()?,
        },
    };
    (rv != CKR_OK).then_some(rv)
}

fn parse_number(value: &str) -> Option<u64> {
    match strip_hex_prefix(value) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => value.parse().ok(),
    }
}

fn strip_hex_prefix(value: &str) -> Option<&str> {
    value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
}

/// What the control file looked like at one call. Counters reset whenever this changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Control {
    /// `KB_FAULTS_CONTROL` is not set: forward everything.
    Unset,
    /// The variable names a file that does not exist: forward everything.
    Missing(PathBuf),
    /// The file exists but cannot be read as UTF-8 text: forward everything, with a warning.
    Unreadable(PathBuf, String),
    /// The file's whole text.
    Text(PathBuf, String),
}

impl Control {
    /// Reads the control file named by `KB_FAULTS_CONTROL`, if any.
    pub(crate) fn read_from_env() -> Control {
        match std::env::var_os(CONTROL_ENV) {
            None => Control::Unset,
            Some(path) => Control::read(PathBuf::from(path)),
        }
    }

    pub(crate) fn read(path: PathBuf) -> Control {
        match fs::read_to_string(&path) {
            Ok(text) => Control::Text(path, text),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Control::Missing(path),
            Err(error) => Control::Unreadable(path, error.to_string()),
        }
    }

    fn path(&self) -> Option<&Path> {
        match self {
            Control::Unset => None,
            Control::Missing(path) | Control::Unreadable(path, _) | Control::Text(path, _) => {
                Some(path)
            }
        }
    }
}

/// What to do with one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    /// Sleep this long before anything else.
    pub(crate) latency: Duration,
    /// Return this instead of calling the real module.
    pub(crate) fail_with: Option<CK_RV>,
}

impl Decision {
    const FORWARD: Decision = Decision {
        latency: Duration::ZERO,
        fail_with: None,
    };
}

/// The injection state for one control-file content.
#[derive(Debug)]
pub(crate) struct FaultState {
    /// The control file as last seen; the counters below belong to it.
    control: Control,
    /// `control` parsed; `None` when there is nothing (valid) to inject.
    plan: Option<Plan>,
    /// Calls matching `plan.functions` since `control` appeared.
    matching_calls: u64,
    /// Failures injected since `control` appeared.
    injected: u64,
}

impl FaultState {
    pub(crate) const fn new() -> Self {
        FaultState {
            control: Control::Unset,
            plan: None,
            matching_calls: 0,
            injected: 0,
        }
    }

    /// Makes `control` current. If it differs from the previous one, the plan is re-parsed and the
    /// counters reset. Returns a warning when the new control is present but unusable.
    fn observe(&mut self, control: Control) -> Option<String> {
        if control == self.control {
            return None;
        }
        self.matching_calls = 0;
        self.injected = 0;
        let (plan, warning) = match &control {
            Control::Unset | Control::Missing(_) => (None, None),
            Control::Unreadable(path, error) => (
                None,
                Some(format!(
                    "cannot read control file {}: {error}; injecting nothing",
                    path.display()
                )),
            ),
            Control::Text(path, text) => match parse_plan(text) {
                Ok(plan) => (Some(plan), None),
                Err(problem) => (
                    None,
                    Some(format!(
                        "ignoring control file {} ({problem}); injecting nothing",
                        path.display()
                    )),
                ),
            },
        };
        self.control = control;
        self.plan = plan;
        warning
    }

    /// Counts one call to `function` against the current plan and decides its fate.
    fn decide(&mut self, function: &str) -> Decision {
        let Some(plan) = &self.plan else {
            return Decision::FORWARD;
        };
        if !plan.functions.matches(function) {
            return Decision::FORWARD;
        }
        self.matching_calls = self.matching_calls.saturating_add(1);
        let due = self.matching_calls.is_multiple_of(plan.every);
        let allowance_left = plan.times.is_none_or(|times| self.injected < times);
        let fail_with = match plan.rv {
            Some(rv) if due && allowance_left => {
                self.injected = self.injected.saturating_add(1);
                Some(rv)
            }
            _ => None,
        };
        Decision {
            latency: plan.latency,
            fail_with,
        }
    }

    /// One call: catch up with `control`, decide, and record an injected failure in the evidence
    /// file. Warnings go to stderr.
    pub(crate) fn on_call(&mut self, control: Control, function: &str) -> Decision {
        if let Some(warning) = self.observe(control) {
            warn(&warning);
        }
        let decision = self.decide(function);
        if decision.fail_with.is_some() {
            self.write_evidence();
        }
        if self
            .plan
            .as_ref()
            .is_some_and(|plan| plan.count_calls && plan.functions.matches(function))
        {
            self.write_calls();
        }
        decision
    }

    /// The vendor habits of the current plan.
    fn vendor(&self) -> Vendor {
        self.plan.as_ref().map_or(Vendor::default(), |plan| Vendor {
            gcm_iv: plan.gcm_iv,
            max_sessions: plan.max_sessions,
        })
    }

    /// Counts a failure a vendor habit caused (a refused session), with its evidence.
    fn inject_one(&mut self) {
        self.injected = self.injected.saturating_add(1);
        self.write_evidence();
    }

    /// Writes the number of matching calls to `<control path>.calls` (`count_calls`).
    fn write_calls(&self) {
        if let Some(path) = self.control.path() {
            let mut target = path.as_os_str().to_owned();
            target.push(".calls");
            let target = PathBuf::from(target);
            let mut temporary = target.clone().into_os_string();
            temporary.push(format!(".tmp-{}", std::process::id()));
            let written = fs::write(&temporary, self.matching_calls.to_string())
                .and_then(|()| fs::rename(&temporary, &target));
            if let Err(error) = written {
                warn(&format!("cannot write {}: {error}", target.display()));
            }
        }
    }

    /// Writes the injected count to the evidence file.
    fn write_evidence(&self) {
        if let Some(path) = self.control.path()
            && let Err(error) = write_injected_count(path, self.injected)
        {
            warn(&format!(
                "cannot write {}: {error}",
                injected_path(path).display()
            ));
        }
    }
}

/// State shared by every thread and every wrapper.
static STATE: Mutex<FaultState> = Mutex::new(FaultState::new());

/// Reads the control file and decides what to do with a call to `function`.
///
/// The lock is held while reading the (tiny) control file and writing the evidence file, so
/// concurrent calls observe rewrites in order and the evidence file only ever grows within one
/// content; it is never held while sleeping or calling the real module.
pub(crate) fn before_call(function: &str) -> Decision {
    before_call_with_vendor(function).0
}

/// As [`before_call`], with the vendor habits the control file asks for (one read for both).
pub(crate) fn before_call_with_vendor(function: &str) -> (Decision, Vendor) {
    let mut state = STATE.lock().unwrap_or_else(PoisonError::into_inner);
    let control = Control::read_from_env();
    let decision = state.on_call(control, function);
    (decision, state.vendor())
}

/// Records a failure that a vendor habit caused (`max_sessions` refusing a session) like an
/// injected `rv`: one more in the evidence file.
pub(crate) fn record_injected() {
    STATE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .inject_one();
}

/// Appends `passed=<hex> used=<hex or -> returned=<hex>` to `<control path>.gcm`: what
/// `gcm_iv` did to one `C_EncryptInit`. One `write` on an append-mode file, so lines of
/// concurrent calls do not interleave.
pub(crate) fn record_gcm(passed: &[u8], used: Option<&[u8]>, returned: &[u8]) {
    let path = {
        let state = STATE.lock().unwrap_or_else(PoisonError::into_inner);
        match state.control.path() {
            Some(path) => gcm_path(path),
            None => return,
        }
    };
    let line = gcm_line(passed, used, returned);
    let written = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .and_then(|mut file| file.write_all(line.as_bytes()));
    if let Err(error) = written {
        warn(&format!("cannot write {}: {error}", path.display()));
    }
}

/// `<control path>.gcm`.
fn gcm_path(control_path: &Path) -> PathBuf {
    let mut path = control_path.as_os_str().to_owned();
    path.push(".gcm");
    PathBuf::from(path)
}

fn gcm_line(passed: &[u8], used: Option<&[u8]>, returned: &[u8]) -> String {
    format!(
        "passed={} used={} returned={}\n",
        hex(passed),
        used.map_or_else(|| "-".to_owned(), hex),
        hex(returned)
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Whether the current control file hides `mechanism` from `C_GetMechanismInfo`.
pub(crate) fn hides_mechanism(mechanism: CK_MECHANISM_TYPE) -> bool {
    let mut state = STATE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(warning) = state.observe(Control::read_from_env()) {
        warn(&warning);
    }
    state
        .plan
        .as_ref()
        .is_some_and(|plan| plan.hidden_mechanisms.contains(&mechanism))
}

/// `<control path>.injected`.
pub(crate) fn injected_path(control_path: &Path) -> PathBuf {
    let mut path = control_path.as_os_str().to_owned();
    path.push(INJECTED_SUFFIX);
    PathBuf::from(path)
}

/// Writes `count` (decimal, no newline) to the evidence file via a temporary file and a rename,
/// so a reader sees either the old number or the new one.
fn write_injected_count(control_path: &Path, count: u64) -> io::Result<()> {
    let target = injected_path(control_path);
    let mut temporary = target.clone().into_os_string();
    temporary.push(format!(".tmp-{}", std::process::id()));
    fs::write(&temporary, count.to_string())?;
    fs::rename(&temporary, &target)
}

/// Prints one line to stderr. Never panics (unlike `eprintln!`), since it runs inside FFI calls.
pub(crate) fn warn(message: &str) {
    let _ignored = writeln!(io::stderr().lock(), "kb_pkcs11_faults: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(content: &str) -> Control {
        Control::Text(
            PathBuf::from("/nonexistent/faults.conf"),
            content.to_owned(),
        )
    }

    /// Feeds `calls` to a state already switched to `control`; returns the injected rvs.
    fn run(state: &mut FaultState, calls: &[&str]) -> Vec<Option<CK_RV>> {
        calls
            .iter()
            .map(|function| state.decide(function).fail_with)
            .collect()
    }

    fn state_with(content: &str) -> FaultState {
        let mut state = FaultState::new();
        assert_eq!(state.observe(text(content)), None, "content should parse");
        state
    }

    #[test]
    fn parses_every_key_with_comments_and_loose_spacing() {
        let plan = parse_plan(
            "# faults for the retry test\n\
             \n\
             functions=C_Encrypt ,  C_EncryptInit   # the two encrypt calls\n\
             rv = CKR_DEVICE_REMOVED\n\
             \tevery = 3\r\n\
             times= 2\n\
             latency_ms =250\n\
             hide_mechanisms = CKM_AES_GCM, 0x251\n",
        );
        assert_eq!(
            plan,
            Ok(Plan {
                functions: Functions::Named(vec!["C_Encrypt", "C_EncryptInit"]),
                rv: Some(CKR_DEVICE_REMOVED),
                every: 3,
                times: Some(2),
                latency: Duration::from_millis(250),
                hidden_mechanisms: vec![CKM_AES_GCM, CKM_SHA256_HMAC],
                gcm_iv: None,
                max_sessions: None,
                count_calls: false,
            })
        );
        assert!(parse_plan("hide_mechanisms = CKM_NOT_A_THING").is_err());
        assert_eq!(
            parse_plan("count_calls = yes").map(|p| p.count_calls),
            Ok(true)
        );
        assert!(parse_plan("count_calls = 1").is_err());
    }

    #[test]
    fn parses_the_vendor_habits_and_refuses_bad_values() {
        for (value, habit) in [
            ("token", GcmIv::Token),
            ("reject", GcmIv::Reject),
            ("corrupt", GcmIv::Corrupt),
        ] {
            let plan = parse_plan(&format!("gcm_iv = {value}\nmax_sessions = 0x3\n"));
            assert_eq!(plan.as_ref().map(|p| p.gcm_iv), Ok(Some(habit)));
            assert_eq!(plan.map(|p| p.max_sessions), Ok(Some(3)));
        }
        for bad in [
            "gcm_iv = caller",
            "gcm_iv =",
            "max_sessions = 0",
            "max_sessions = -1",
        ] {
            assert!(parse_plan(bad).is_err(), "{bad}");
        }
        let mut state = state_with("gcm_iv = token\nmax_sessions = 2");
        assert_eq!(state.decide("C_EncryptInit"), Decision::FORWARD);
        assert_eq!(
            state.vendor(),
            Vendor {
                gcm_iv: Some(GcmIv::Token),
                max_sessions: Some(2)
            }
        );
        assert_eq!(FaultState::new().vendor(), Vendor::default());
    }

    #[test]
    fn reject_refuses_only_a_non_zero_iv_and_corrupt_reports_another_iv_than_it_used() {
        assert!(GcmIv::Reject.refuses(&[0, 0, 1]));
        assert!(!GcmIv::Reject.refuses(&[0; 12]));
        assert!(!GcmIv::Token.refuses(&[7; 12]));
        let used = [0u8, 0x5a, 0xff, 1];
        assert_eq!(GcmIv::Token.reported(&used), used);
        let reported = GcmIv::Corrupt.reported(&used);
        assert!(reported.iter().zip(used).all(|(r, u)| *r != u));
        assert_eq!(
            gcm_line(&[0, 1], Some(&[0xab, 0xcd]), &[0xab, 0xcd]),
            "passed=0001 used=abcd returned=abcd\n"
        );
        assert_eq!(gcm_line(&[9], None, &[9]), "passed=09 used=- returned=09\n");
    }

    #[test]
    fn empty_and_comment_only_files_mean_defaults_with_no_failure() {
        for content in ["", "\n\n", "# nothing yet\n   # still nothing"] {
            assert_eq!(parse_plan(content), Ok(Plan::default()), "{content:?}");
        }
        let defaults = Plan::default();
        assert_eq!(defaults.functions, Functions::AllTokenFunctions);
        assert_eq!(defaults.rv, None);
        assert_eq!(defaults.every, 1);
        assert_eq!(defaults.times, None);
        assert_eq!(defaults.latency, Duration::ZERO);
    }

    #[test]
    fn rv_accepts_every_listed_name_decimal_and_hex() {
        for (name, rv) in RV_NAMES {
            assert_eq!(
                parse_plan(&format!("rv = {name}")).map(|p| p.rv),
                Ok(Some(rv))
            );
        }
        assert_eq!(
            parse_plan("rv = 50").map(|p| p.rv),
            Ok(Some(CKR_DEVICE_REMOVED))
        );
        assert_eq!(
            parse_plan("rv = 0x32").map(|p| p.rv),
            Ok(Some(CKR_DEVICE_REMOVED))
        );
        assert_eq!(parse_plan("rv = 0XB3").map(|p| p.rv), Ok(Some(0xB3)));
    }

    #[test]
    fn bad_files_are_rejected_with_the_line_number() {
        let cases = [
            ("colour = red", "line 1: unknown key \"colour\""),
            ("rv = CKR_OK", "line 1: bad value \"CKR_OK\" for \"rv\""),
            ("rv = 0", "line 1: bad value \"0\" for \"rv\""),
            ("rv = CKR_NO_SUCH_THING", "bad value"),
            ("rv = 0xZZ", "bad value"),
            ("rv =", "bad value"),
            ("every = 0", "line 1: bad value \"0\" for \"every\""),
            ("every = -1", "bad value"),
            ("times = many", "bad value"),
            ("latency_ms = 1.5", "bad value"),
            ("\n\nfunctions", "line 3: expected `key = value`"),
            (
                "functions = C_Encrpyt",
                "\"C_Encrpyt\" is not a PKCS#11 2.40 function name",
            ),
            (
                "functions = C_Encrypt,",
                "\"\" is not a PKCS#11 2.40 function name",
            ),
            ("functions = *, C_Encrypt", "`*` cannot be combined"),
            (
                "functions = C_GetFunctionList",
                "C_GetFunctionList is never injected",
            ),
            (
                "functions = C_GetInterface",
                "not a PKCS#11 2.40 function name",
            ),
            ("rv = 5\nrv = 6", "line 2: key \"rv\" given twice"),
        ];
        for (content, expected) in cases {
            let result = parse_plan(content);
            assert!(
                matches!(&result, Err(message) if message.contains(expected)),
                "{content:?} gave {result:?}; expected an error containing {expected:?}"
            );
        }
    }

    #[test]
    fn star_matches_token_functions_but_not_lifecycle_ones() {
        let mut state = state_with("rv = CKR_DEVICE_ERROR");
        assert_eq!(
            run(
                &mut state,
                &[
                    "C_Initialize",
                    "C_GetInfo",
                    "C_Finalize",
                    "C_OpenSession",
                    "C_Encrypt"
                ]
            ),
            [
                None,
                None,
                None,
                Some(CKR_DEVICE_ERROR),
                Some(CKR_DEVICE_ERROR)
            ]
        );
        let every_token_function_fails = FORWARDED_FUNCTIONS
            .iter()
            .filter(|name| !LIFECYCLE_FUNCTIONS.contains(name))
            .all(|name| state.decide(name).fail_with == Some(CKR_DEVICE_ERROR));
        assert!(every_token_function_fails);
    }

    #[test]
    fn lifecycle_functions_can_be_named_explicitly() {
        let mut state = state_with("functions = C_Initialize, C_GetInfo\nrv = CKR_GENERAL_ERROR");
        assert_eq!(
            run(
                &mut state,
                &["C_Initialize", "C_GetInfo", "C_Finalize", "C_Login"]
            ),
            [Some(CKR_GENERAL_ERROR), Some(CKR_GENERAL_ERROR), None, None]
        );
    }

    #[test]
    fn every_counts_only_matching_calls_and_times_caps_failures() {
        let mut state = state_with("functions = C_Encrypt\nrv = CKR_DEVICE_REMOVED\nevery = 3");
        let calls = [
            "C_Encrypt",
            "C_Decrypt",
            "C_Encrypt",
            "C_Encrypt",
            "C_Encrypt",
        ];
        // Matching calls 1, 2, 3 (fails), 4; C_Decrypt is not counted.
        assert_eq!(
            run(&mut state, &calls),
            [None, None, None, Some(CKR_DEVICE_REMOVED), None]
        );

        let mut state = state_with("functions = C_Sign\nrv = 0x30\nevery = 2\ntimes = 2");
        let failures: Vec<bool> = (0..10)
            .map(|_| state.decide("C_Sign").fail_with.is_some())
            .collect();
        assert_eq!(
            failures,
            [
                false, true, false, true, false, false, false, false, false, false
            ]
        );
        assert_eq!(state.injected, 2);
        assert_eq!(state.matching_calls, 10);
    }

    #[test]
    fn times_zero_injects_nothing() {
        let mut state = state_with("rv = CKR_DEVICE_ERROR\ntimes = 0");
        assert_eq!(run(&mut state, &["C_Login", "C_Login"]), [None, None]);
    }

    #[test]
    fn latency_applies_to_matching_calls_whether_or_not_they_fail() {
        let mut state =
            state_with("functions = C_Encrypt\nrv = CKR_DEVICE_ERROR\nevery = 2\nlatency_ms = 40");
        let delay = Duration::from_millis(40);
        assert_eq!(
            state.decide("C_Encrypt"),
            Decision {
                latency: delay,
                fail_with: None
            }
        );
        assert_eq!(
            state.decide("C_Encrypt"),
            Decision {
                latency: delay,
                fail_with: Some(CKR_DEVICE_ERROR)
            }
        );
        assert_eq!(state.decide("C_Decrypt"), Decision::FORWARD);

        let mut latency_only = state_with("latency_ms = 5");
        assert_eq!(
            latency_only.decide("C_Login"),
            Decision {
                latency: Duration::from_millis(5),
                fail_with: None
            }
        );
    }

    #[test]
    fn counters_reset_when_the_content_changes_and_not_otherwise() {
        let content = "functions = C_Encrypt\nrv = CKR_DEVICE_ERROR\nevery = 2\ntimes = 1";
        let mut state = state_with(content);
        assert_eq!(
            run(&mut state, &["C_Encrypt", "C_Encrypt"]),
            [None, Some(CKR_DEVICE_ERROR)]
        );

        // Same text seen again: nothing resets, the single allowed failure is used up.
        assert_eq!(state.observe(text(content)), None);
        assert_eq!(run(&mut state, &["C_Encrypt", "C_Encrypt"]), [None, None]);

        // A trailing comment changes the text, so counting restarts at 1.
        assert_eq!(state.observe(text(&format!("{content}\n# again"))), None);
        assert_eq!(state.injected, 0);
        assert_eq!(state.matching_calls, 0);
        assert_eq!(
            run(&mut state, &["C_Encrypt", "C_Encrypt"]),
            [None, Some(CKR_DEVICE_ERROR)]
        );

        // The file disappearing and coming back with the old text is also a change.
        let path = PathBuf::from("/nonexistent/faults.conf");
        assert_eq!(state.observe(Control::Missing(path)), None);
        assert_eq!(run(&mut state, &["C_Encrypt", "C_Encrypt"]), [None, None]);
        assert_eq!(state.observe(text(content)), None);
        assert_eq!(
            run(&mut state, &["C_Encrypt", "C_Encrypt"]),
            [None, Some(CKR_DEVICE_ERROR)]
        );
    }

    #[test]
    fn a_bad_file_injects_nothing_and_warns_once_per_content() {
        let mut state = state_with("rv = CKR_DEVICE_ERROR");
        assert_eq!(run(&mut state, &["C_Login"]), [Some(CKR_DEVICE_ERROR)]);

        // One bad line spoils the whole file, including the valid rv line.
        let bad = "rv = CKR_DEVICE_ERROR\nlatency_ms = 10\nretry = yes";
        let warning = state.observe(text(bad));
        assert!(
            warning
                .as_deref()
                .is_some_and(|w| w.contains("line 3: unknown key \"retry\"")),
            "{warning:?}"
        );
        assert_eq!(state.decide("C_Login"), Decision::FORWARD);
        assert_eq!(state.observe(text(bad)), None, "no second warning");
        assert_eq!(state.decide("C_Login"), Decision::FORWARD);

        let unreadable = Control::Unreadable(PathBuf::from("/x"), "Is a directory".to_owned());
        assert!(state.observe(unreadable).is_some());
        assert_eq!(state.decide("C_Login"), Decision::FORWARD);
    }

    #[test]
    fn unset_or_missing_control_forwards_everything() {
        let mut state = FaultState::new();
        assert_eq!(state.observe(Control::Unset), None);
        assert_eq!(state.decide("C_Encrypt"), Decision::FORWARD);
        assert_eq!(
            state.observe(Control::Missing(PathBuf::from("/nope"))),
            None
        );
        assert_eq!(state.decide("C_Encrypt"), Decision::FORWARD);
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct ScratchDir(PathBuf);

    impl ScratchDir {
        fn new(name: &str) -> io::Result<Self> {
            let path = std::env::temp_dir()
                .join(format!("kb-pkcs11-faults-{name}-{}", std::process::id()));
            let _ignored = fs::remove_dir_all(&path);
            fs::create_dir_all(&path)?;
            Ok(ScratchDir(path))
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ignored = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_the_real_file_and_records_injections_next_to_it() -> io::Result<()> {
        let dir = ScratchDir::new("evidence")?;
        let control_path = dir.0.join("faults.conf");
        let evidence = dir.0.join("faults.conf.injected");
        assert_eq!(injected_path(&control_path), evidence);
        let mut state = FaultState::new();

        // No file yet: forwarding, and no evidence file appears.
        let decision = state.on_call(Control::read(control_path.clone()), "C_Encrypt");
        assert_eq!(decision, Decision::FORWARD);
        assert!(!evidence.exists());

        fs::write(
            &control_path,
            "functions = C_Encrypt\nrv = CKR_DEVICE_REMOVED\ntimes = 2",
        )?;
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            let decision = state.on_call(Control::read(control_path.clone()), "C_Encrypt");
            outcomes.push(decision.fail_with);
            if decision.fail_with.is_some() {
                assert_eq!(fs::read_to_string(&evidence)?, state.injected.to_string());
            }
        }
        assert_eq!(
            outcomes,
            [Some(CKR_DEVICE_REMOVED), Some(CKR_DEVICE_REMOVED), None]
        );
        assert_eq!(fs::read_to_string(&evidence)?, "2");

        // Rewrite: counting restarts and the evidence file follows the new content.
        fs::write(
            &control_path,
            "functions = C_Encrypt\nrv = CKR_DEVICE_ERROR",
        )?;
        let decision = state.on_call(Control::read(control_path.clone()), "C_Encrypt");
        assert_eq!(decision.fail_with, Some(CKR_DEVICE_ERROR));
        assert_eq!(fs::read_to_string(&evidence)?, "1");

        // No temporary files are left behind.
        let mut names: Vec<String> = fs::read_dir(&dir.0)?
            .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<io::Result<_>>()?;
        names.sort();
        assert_eq!(names, ["faults.conf", "faults.conf.injected"]);
        Ok(())
    }
}
