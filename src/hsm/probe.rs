//! `keybroker hsm probe`: asks a token, before anyone trusts it with keys, for everything
//! keybroker depends on (library and token, the mechanisms it uses with their flags and key
//! sizes, who chooses the AES-GCM IV, how many sessions it grants) and gives a verdict. It
//! creates one session-object AES key for the IV test and destroys it; it never touches
//! keybroker's own objects, so it runs on a token before or after `hsm init`.

use std::fmt;
use std::path::PathBuf;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::{Limit, Slot};

use super::context::{Module, Need, REQUIRED_MECHANISMS, login_user};
use super::error::classify;
use super::{HsmConfig, HsmError};
use crate::crypto::{GCM_IV_LEN, GCM_TAG_LEN};

/// What the probe found.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// The PKCS#11 module's path.
    pub module: PathBuf,
    /// `C_GetInfo`: description, version, manufacturer, Cryptoki version.
    pub library: String,
    /// `C_GetTokenInfo` of the configured token, and its slot.
    pub token: String,
    /// Each mechanism keybroker uses.
    pub mechanisms: Vec<MechanismReport>,
    /// `C_GenerateRandom`: `None` when it works, else what it answered.
    pub random_failure: Option<String>,
    /// Who chooses the GCM IV.
    pub gcm_iv: GcmIv,
    /// Session limits, reported and tried.
    pub sessions: SessionReport,
}

/// One mechanism as the token describes it.
#[derive(Debug, Clone)]
pub struct MechanismReport {
    /// E.g. `CKM_AES_GCM`.
    pub name: &'static str,
    /// What keybroker needs it for, e.g. `encrypt, decrypt`.
    pub needs: &'static str,
    /// The flags the token reports, or `None` when it lacks the mechanism.
    pub flags: Option<Vec<&'static str>>,
    /// `ulMinKeySize-ulMaxKeySize` with its unit.
    pub key_sizes: String,
    /// Whether it is present with the flags keybroker needs.
    pub usable: bool,
}

/// What a seal/open round trip on a temporary key showed about GCM IVs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GcmIv {
    /// The token uses the caller's IV (SoftHSM2, Kryoptic): keybroker draws it from the RNG.
    Kept,
    /// The token ignores the caller's IV, makes its own and writes it back (AWS CloudHSM).
    Replaced,
    /// The token refuses a caller's IV and makes its own from a zeroed buffer (FIPS mode).
    Rejected,
    /// Keybroker cannot use the token: why.
    Broken(String),
}

impl fmt::Display for GcmIv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kept => f.write_str(
                "kept: the token uses the caller's IV (keybroker draws it from the token's RNG)",
            ),
            Self::Replaced => f.write_str(
                "replaced: the token makes its own IV and returns it (keybroker stores what it returns)",
            ),
            Self::Rejected => f.write_str(
                "rejected: the token refuses a caller's IV and makes its own (keybroker passes a zeroed buffer and stores what it returns)",
            ),
            Self::Broken(why) => write!(f, "UNUSABLE: {why}"),
        }
    }
}

/// Session limits.
#[derive(Debug, Clone)]
pub struct SessionReport {
    /// `ulMaxSessionCount` and `ulMaxRwSessionCount`, as text.
    pub reported: String,
    /// How many sessions the probe asked for (the configured pool size, at least 1).
    pub wanted: usize,
    /// How many it got.
    pub opened: usize,
    /// Why it got no more, if it got fewer.
    pub refused: Option<String>,
}

impl ProbeReport {
    /// Why keybroker cannot use the token; empty when it can.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(why) = &self.random_failure {
            problems.push(format!("C_GenerateRandom fails ({why})"));
        }
        for mechanism in self.mechanisms.iter().filter(|m| !m.usable) {
            problems.push(format!("{} lacks {}", mechanism.name, mechanism.needs));
        }
        if let GcmIv::Broken(why) = &self.gcm_iv {
            problems.push(format!("AES-GCM: {why}"));
        }
        if self.sessions.opened == 0 {
            problems.push("no session could be opened".to_owned());
        }
        problems
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "module      {}", self.module.display())?;
        writeln!(f, "library     {}", self.library)?;
        writeln!(f, "token       {}", self.token)?;
        writeln!(f, "mechanisms")?;
        for m in &self.mechanisms {
            let flags = match &m.flags {
                Some(flags) => flags.join(", "),
                None => "absent".to_owned(),
            };
            writeln!(
                f,
                "  {:<21} {:<32} {:<18} {}",
                m.name,
                flags,
                m.key_sizes,
                if m.usable {
                    "ok".to_owned()
                } else {
                    format!("MISSING: needs {}", m.needs)
                }
            )?;
        }
        match &self.random_failure {
            None => writeln!(f, "  {:<21} ok", "C_GenerateRandom")?,
            Some(why) => writeln!(f, "  {:<21} FAILS: {why}", "C_GenerateRandom")?,
        }
        writeln!(f, "gcm iv      {}", self.gcm_iv)?;
        let s = &self.sessions;
        write!(
            f,
            "sessions    reported {}; opened {} of {}",
            s.reported, s.opened, s.wanted
        )?;
        match &s.refused {
            Some(why) if s.opened > 0 => {
                writeln!(f, " ({why}: the pool will work with {} sessions)", s.opened)?
            }
            Some(why) => writeln!(f, " ({why})")?,
            None => writeln!(f)?,
        }
        let problems = self.problems();
        if problems.is_empty() {
            writeln!(f, "verdict     usable")
        } else {
            writeln!(f, "verdict     NOT usable: {}", problems.join("; "))
        }
    }
}

/// Probes the configured token (see the module doc).
///
/// # Errors
/// [`HsmError::Module`], [`HsmError::TokenNotFound`], [`HsmError::PinRefused`], or a failure
/// to open the first session; everything after that is reported, not returned.
pub async fn probe(config: HsmConfig) -> Result<ProbeReport, HsmError> {
    tokio::task::spawn_blocking(move || probe_blocking(&config))
        .await
        .map_err(|_| HsmError::Worker)?
}

fn probe_blocking(config: &HsmConfig) -> Result<ProbeReport, HsmError> {
    let module = Module::shared(&config.module)?;
    let _shared = module.enter();
    let ctx = &module.ctx;
    let library = match ctx.get_library_info() {
        Ok(info) => format!(
            "{} {} by {} (Cryptoki {})",
            info.library_description().trim_end(),
            info.library_version(),
            info.manufacturer_id().trim_end(),
            info.cryptoki_version()
        ),
        Err(e) => format!("C_GetInfo failed: {}", short(&e)),
    };
    let (slot, info) = find_token(&module, &config.token_label)?;
    let token = format!(
        "{:?} in slot {}: {} by {}, serial {}, hardware {}, firmware {}",
        info.label().trim_end(),
        slot.id(),
        info.model().trim_end(),
        info.manufacturer_id().trim_end(),
        info.serial_number().trim_end(),
        info.hardware_version(),
        info.firmware_version()
    );
    let reported = format!(
        "max {} (read-write {})",
        limit(info.max_session_count()),
        limit(info.max_rw_session_count())
    );

    let session = ctx.open_ro_session(slot).map_err(classify)?;
    login_user(&session, &config.pin)?;

    let mechanisms = REQUIRED_MECHANISMS
        .iter()
        .map(|(mechanism, name, need)| describe_mechanism(&module, slot, *mechanism, name, *need))
        .collect();
    let mut random = [0u8; GCM_IV_LEN];
    let random_failure = session
        .generate_random_slice(&mut random)
        .err()
        .map(|e| short(&e));
    let gcm_iv = gcm_iv_behaviour(&session);
    let sessions = try_sessions(&module, slot, config.pool_size.max(1), reported);
    Ok(ProbeReport {
        module: config.module.clone(),
        library,
        token,
        mechanisms,
        random_failure,
        gcm_iv,
        sessions,
    })
}

fn find_token(module: &Module, label: &str) -> Result<(Slot, cryptoki::slot::TokenInfo), HsmError> {
    let ctx = &module.ctx;
    for slot in ctx.get_slots_with_token().map_err(HsmError::Unavailable)? {
        let Ok(info) = ctx.get_token_info(slot) else {
            continue;
        };
        if info.token_initialized() && info.label().trim_end() == label {
            return Ok((slot, info));
        }
    }
    Err(HsmError::TokenNotFound(label.to_owned()))
}

fn limit(limit: Limit) -> String {
    match limit {
        Limit::Max(n) => n.to_string(),
        Limit::Infinite => "unlimited".to_owned(),
        Limit::Unavailable => "not reported".to_owned(),
    }
}

fn describe_mechanism(
    module: &Module,
    slot: Slot,
    mechanism: MechanismType,
    label: &'static str,
    need: Need,
) -> MechanismReport {
    let name = label.split_whitespace().next().unwrap_or(label);
    let needs = match need {
        Need::EncryptDecrypt => "encrypt, decrypt",
        Need::Sign => "sign",
        Need::Any => "generate",
    };
    let Ok(info) = module.ctx.get_mechanism_info(slot, mechanism) else {
        return MechanismReport {
            name,
            needs,
            flags: None,
            key_sizes: "-".to_owned(),
            usable: false,
        };
    };
    let all = [
        ("encrypt", info.encrypt()),
        ("decrypt", info.decrypt()),
        ("sign", info.sign()),
        ("verify", info.verify()),
        ("generate", info.generate()),
        ("generate_key_pair", info.generate_key_pair()),
        ("wrap", info.wrap()),
        ("unwrap", info.unwrap()),
        ("derive", info.derive()),
        ("hw", info.hardware()),
    ];
    let flags: Vec<&'static str> = all
        .iter()
        .filter(|(_, set)| *set)
        .map(|(flag, _)| *flag)
        .collect();
    // PKCS#11 gives AES and HMAC key sizes in bytes and EC sizes in bits.
    let unit = if mechanism == MechanismType::ECDSA || mechanism == MechanismType::ECC_KEY_PAIR_GEN
    {
        "bits"
    } else {
        "bytes"
    };
    let usable = need.met_by(&info);
    MechanismReport {
        name,
        needs,
        flags: Some(flags),
        key_sizes: format!(
            "keys {}-{} {unit}",
            info.min_key_size(),
            info.max_key_size()
        ),
        usable,
    }
}

/// The outcome of sealing with one IV and opening with the IV the token returned.
struct RoundTrip {
    returned: [u8; GCM_IV_LEN],
    opens: bool,
}

const PROBE_AAD: &[u8] = b"keybroker hsm probe";
const PROBE_PLAINTEXT: [u8; 32] = [0x6b; 32];

fn round_trip(
    session: &Session,
    key: ObjectHandle,
    iv_in: [u8; GCM_IV_LEN],
) -> Result<RoundTrip, CkError> {
    let mut iv = iv_in;
    let sealed = {
        let params = GcmParams::new(&mut iv, PROBE_AAD, (GCM_TAG_LEN as u64 * 8).into())?;
        session.encrypt(&Mechanism::AesGcm(params), key, &PROBE_PLAINTEXT)?
    };
    let returned = iv;
    let mut iv_out = returned;
    let params = GcmParams::new(&mut iv_out, PROBE_AAD, (GCM_TAG_LEN as u64 * 8).into())?;
    let opens = session
        .decrypt(&Mechanism::AesGcm(params), key, &sealed)
        .is_ok_and(|plain| plain == PROBE_PLAINTEXT);
    Ok(RoundTrip { returned, opens })
}

/// Seals under a temporary session-object key with a caller's random IV, then (if the token
/// did not keep it) with a zeroed buffer, and opens each with the IV the token returned.
fn gcm_iv_behaviour(session: &Session) -> GcmIv {
    let key = match session.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(b"keybroker-probe".to_vec()),
        ],
    ) {
        Ok(key) => key,
        Err(e) => {
            return GcmIv::Broken(format!("cannot make a temporary AES key: {}", short(&e)));
        }
    };
    let behaviour = classify_iv_behaviour(session, key);
    if let Err(e) = session.destroy_object(key) {
        tracing::warn!(target: "keybroker::hsm", error = %e, "could not destroy the probe's session key; it goes with the session");
    }
    behaviour
}

fn classify_iv_behaviour(session: &Session, key: ObjectHandle) -> GcmIv {
    const ZERO: [u8; GCM_IV_LEN] = [0; GCM_IV_LEN];
    let mut ours = [0u8; GCM_IV_LEN];
    if session.generate_random_slice(&mut ours).is_err() || ours == ZERO {
        ours = *b"keybroker-iv";
    }
    let zero_trip = |what: &str| -> Result<(), String> {
        match round_trip(session, key, ZERO) {
            Ok(trip) if trip.returned == ZERO => Err(format!(
                "it {what} but keeps a zeroed one: every seal would use the same IV"
            )),
            Ok(trip) if !trip.opens => Err(
                "what it sealed does not open with the IV it returned (from a zeroed buffer)"
                    .to_owned(),
            ),
            Ok(_) => Ok(()),
            Err(e) => Err(format!(
                "it {what} and refuses a zeroed one too ({})",
                short(&e)
            )),
        }
    };
    match round_trip(session, key, ours) {
        Err(CkError::Pkcs11(RvError::MechanismParamInvalid, _)) => zero_trip("refuses a caller's IV")
            .map_or_else(GcmIv::Broken, |()| GcmIv::Rejected),
        Err(e) => GcmIv::Broken(format!("a seal and open failed: {}", short(&e))),
        Ok(trip) if !trip.opens => GcmIv::Broken(
            "what it sealed does not open with the IV it returned: the IV reported is not the one used"
                .to_owned(),
        ),
        Ok(trip) if trip.returned == ours => GcmIv::Kept,
        Ok(_) => zero_trip("replaces a caller's IV")
            .map_or_else(GcmIv::Broken, |()| GcmIv::Replaced),
    }
}

/// Opens up to `wanted` sessions (the probe's own counts as one), then closes them.
fn try_sessions(module: &Module, slot: Slot, wanted: usize, reported: String) -> SessionReport {
    let mut extra = Vec::new();
    let mut refused = None;
    while extra.len() + 1 < wanted {
        match module.ctx.open_ro_session(slot) {
            Ok(session) => extra.push(session),
            Err(e) => {
                refused = Some(format!("the token answered {}", short(&e)));
                break;
            }
        }
    }
    let opened = extra.len() + 1;
    drop(extra);
    SessionReport {
        reported,
        wanted,
        opened,
        refused,
    }
}

/// A PKCS#11 failure as `CKR_NAME in C_Function`, short enough for one line of the report.
fn short(err: &CkError) -> String {
    match err {
        CkError::Pkcs11(rv, function) => {
            format!("{} in C_{function:?}", ckr_name(&format!("{rv:?}")))
        }
        other => other.to_string(),
    }
}

/// `SessionCount` (cryptoki's variant name) → `CKR_SESSION_COUNT`.
fn ckr_name(variant: &str) -> String {
    let mut name = String::from("CKR");
    for c in variant.chars() {
        if c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    use super::ckr_name;

    #[test]
    fn cryptoki_variant_names_become_ckr_names() {
        assert_eq!(ckr_name("SessionCount"), "CKR_SESSION_COUNT");
        assert_eq!(
            ckr_name("MechanismParamInvalid"),
            "CKR_MECHANISM_PARAM_INVALID"
        );
    }
}
