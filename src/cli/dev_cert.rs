//! `keybroker dev-cert`: a development CA and server certificate in a folder. Files only: no
//! token, no Postgres.

use std::path::Path;

use super::BoxError;
use crate::tls;

/// Makes (once) the development certificates in `dir` and prints where they are.
pub(super) fn run_dev_cert(dir: &Path) -> Result<(), BoxError> {
    let cert = tls::ensure_dev_certificate(dir)?;
    println!("CA (trust this):  {}", cert.ca.display());
    println!("server cert:      {}", cert.cert.display());
    println!("server key:       {}", cert.key.display());
    Ok(())
}
