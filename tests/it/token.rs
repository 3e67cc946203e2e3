//! The token the suite runs on: SoftHSM2 or Kryoptic (`KB_TEST_TOKEN`, set by `scripts/test.sh`,
//! which runs the suite once on each), and private copies of its storage for tests that break or
//! change their token.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{env, scratch_dir};

/// The PKCS#11 implementation under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    SoftHsm,
    Kryoptic,
}

pub fn kind() -> Kind {
    match env("KB_TEST_TOKEN").as_str() {
        "softhsm" => Kind::SoftHsm,
        "kryoptic" => Kind::Kryoptic,
        other => panic!("KB_TEST_TOKEN={other}: expected softhsm or kryoptic"),
    }
}

/// Token storage of a test's own, with the configuration that points the module at it.
pub struct PrivateToken {
    kind: Kind,
    config: PathBuf,
    storage: PathBuf,
}

impl PrivateToken {
    /// A copy of the shared test token (keys, PINs and all), so breaking it cannot disturb
    /// other tests.
    pub fn copy() -> Self {
        let token = Self::at(&scratch_dir("token"));
        let shared = PathBuf::from(env("KB_TEST_TOKEN_DIR"));
        let source = match token.kind {
            Kind::SoftHsm => shared.join("tokens"),
            Kind::Kryoptic => shared.join("token.sqlite"),
        };
        let status = Command::new("cp")
            .arg("-a")
            .arg(&source)
            .arg(&token.storage)
            .status()
            .unwrap();
        assert!(status.success());
        token
    }

    /// Empty storage in a folder named `name`: no token initialised yet.
    pub fn empty(name: &str) -> Self {
        let token = Self::at(&scratch_dir(name));
        if token.kind == Kind::SoftHsm {
            std::fs::create_dir_all(&token.storage).unwrap();
        }
        token
    }

    fn at(dir: &Path) -> Self {
        let kind = kind();
        let (config, storage, text);
        match kind {
            Kind::SoftHsm => {
                config = dir.join("softhsm2.conf");
                storage = dir.join("tokens");
                text = format!(
                    "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                    storage.display()
                );
            }
            Kind::Kryoptic => {
                config = dir.join("kryoptic.conf");
                storage = dir.join("token.sqlite");
                text = format!(
                    "[[slots]]\nslot = 7\ndbtype = \"sqlite\"\ndbargs = \"{}\"\n",
                    storage.display()
                );
            }
        }
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(&config, text).unwrap();
        Self {
            kind,
            config,
            storage,
        }
    }

    /// The environment variable (name, value) that makes the module use this storage.
    pub fn env(&self) -> (&'static str, String) {
        let name = match self.kind {
            Kind::SoftHsm => "SOFTHSM2_CONF",
            Kind::Kryoptic => "KRYOPTIC_CONF",
        };
        (name, self.config.display().to_string())
    }

    /// Where the token keeps its objects: SoftHSM2's token folder, Kryoptic's SQLite file.
    pub fn storage(&self) -> &Path {
        &self.storage
    }
}

/// The shared test token's configuration variable, as the suite's environment has it.
pub fn shared_env() -> (&'static str, String) {
    match kind() {
        Kind::SoftHsm => ("SOFTHSM2_CONF", env("SOFTHSM2_CONF")),
        Kind::Kryoptic => ("KRYOPTIC_CONF", env("KRYOPTIC_CONF")),
    }
}
