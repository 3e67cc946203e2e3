//! The fault module's control file (`tests/pkcs11-faults`, `control::parse_plan`), which the
//! module re-reads as UTF-8 text on every PKCS#11 call.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(plan) = kb_pkcs11_faults::control::parse_plan(text)
    {
        // A plan that parsed is one the module can act on: its Debug form (what its warnings
        // print) is total.
        let _ = format!("{plan:?}");
    }
});
