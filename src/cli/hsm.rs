//! `keybroker hsm …`: the security officer's commands on the token (initialise it, probe it,
//! show its objects, rotate, rewrap, retire and destroy master keys, rotate the signing key).
//! They go through `broker`, `auth` and `hsm`; nothing here holds a PKCS#11 handle.

use clap::Subcommand;
use std::path::PathBuf;

use super::{BoxError, authenticator, broker};
use crate::auth::{Client, ClientSecret};
use crate::broker::{Broker, Limits, RewrapStart};
use crate::config::{AuthArgs, DatabaseArgs, TokenArgs, read_secret};
use crate::crypto::MasterKeyVersion;
use crate::hsm;

#[derive(Debug, Subcommand)]
pub enum HsmCommand {
    /// Initialise a token in a free slot (SoftHSM2 and other software tokens). PINs come from
    /// KEYBROKER_SO_PIN and KEYBROKER_PIN (or their _FILE forms), never from flags.
    InitToken {
        #[command(flatten)]
        token: TokenArgs,
    },
    /// Create master key v1, the signing key pair and the audit key where missing, check the
    /// existing ones, and record the master keys in Postgres. Idempotent.
    Init {
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
        /// Where to write the bootstrap admin's credentials as JSON (mode 0600), when this run
        /// creates them; they are printed either way, once.
        #[arg(long)]
        admin_credentials_out: Option<PathBuf>,
        /// The broker's public base URL, for the `token_url` in those credentials.
        #[arg(
            long,
            env = "KEYBROKER_PUBLIC_URL",
            default_value = "https://127.0.0.1:8443"
        )]
        public_url: String,
    },
    /// Ask the token for everything keybroker depends on, without touching keybroker's
    /// objects or Postgres: library and token, the mechanisms with their flags and key sizes,
    /// whether the token keeps or replaces a caller's AES-GCM IV (a seal/open round trip on a
    /// temporary session key, destroyed afterwards), how many sessions it grants (up to the
    /// pool size), and a verdict. Exits non-zero when the token is not usable.
    Probe {
        #[command(flatten)]
        token: TokenArgs,
    },
    /// List keybroker's objects on the token (flags only, never a value) and the master-key
    /// versions recorded in Postgres, and run the self-test.
    Status {
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Create master key v(N+1) and make it active for new seals (or finish a rotation that
    /// stopped half-way). Older versions stay decrypt-only.
    RotateMaster {
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Move every stored blob to the active master key, with a progress bar (joins the job
    /// running on any broker; interrupting it loses nothing: run it again).
    Rewrap {
        /// Blobs per batch (one transaction and one token call each).
        #[arg(long, default_value_t = crate::broker::REWRAP_BATCH)]
        batch_size: i64,
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Retire a decrypt-only master-key version that no stored blob references.
    RetireMaster {
        /// The version, e.g. 1.
        #[arg(long)]
        version: u32,
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Remove a retired master-key version from the token, for good. Refused while any stored
    /// blob references it; asks to type its label unless --yes.
    DestroyMaster {
        /// The version, e.g. 1.
        #[arg(long)]
        version: u32,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Create token-signing key v(N+1) and sign with it; the previous key stays in the JWKS
    /// until every token it signed has expired.
    RotateSigning {
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        auth: AuthArgs,
    },
}

/// Runs `keybroker hsm …`.
pub(super) async fn run_hsm(command: HsmCommand) -> Result<(), BoxError> {
    let limits = Limits { max_batch: 1 };
    match command {
        HsmCommand::InitToken { token } => {
            let so_pin = read_secret("KEYBROKER_SO_PIN")?;
            let user_pin = read_secret("KEYBROKER_PIN")?;
            hsm::init_token(
                token.pkcs11_module.clone(),
                token.token_label.clone(),
                so_pin,
                user_pin,
            )
            .await?;
            println!("initialised token {:?}", token.token_label);
        }
        HsmCommand::Init {
            token,
            db,
            admin_credentials_out,
            public_url,
        } => {
            let broker = broker(&token, &db, limits).await?;
            let report = broker.initialise().await?;
            if report.created.is_empty() {
                println!(
                    "token {:?} already initialised; nothing created",
                    token.token_label
                );
            }
            for label in &report.created {
                println!("created {label}");
            }
            print_self_test(&broker).await?;
            print_master_keys(&broker).await?;
            let auth = authenticator(&broker, &public_url).await?;
            if let Some((client, secret)) = auth.bootstrap_admin().await? {
                print_bootstrap(
                    &client,
                    &secret,
                    &public_url,
                    admin_credentials_out.as_deref(),
                )?;
            }
        }
        HsmCommand::Probe { token } => {
            let report = hsm::probe(token.hsm_config()?).await?;
            print!("{report}");
            let problems = report.problems();
            if !problems.is_empty() {
                return Err(format!(
                    "token {:?} is not usable by keybroker: {}",
                    token.token_label,
                    problems.join("; ")
                )
                .into());
            }
        }
        HsmCommand::Status { token, db } => {
            let broker = broker(&token, &db, limits).await?;
            print_status(&broker).await?;
        }
        HsmCommand::RotateMaster { token, db } => {
            let broker = broker(&token, &db, limits).await?;
            let version = broker.rotate_master_key().await?;
            println!(
                "master key v{version} is active; run `keybroker hsm rewrap` to move stored blobs to it"
            );
            print_master_keys(&broker).await?;
        }
        HsmCommand::Rewrap {
            batch_size,
            token,
            db,
        } => {
            let broker = broker(&token, &db, limits).await?;
            let (job, start) = broker.start_rewrap("officer").await?;
            if job.state == crate::broker::RewrapJobState::Running {
                let verb = if start == RewrapStart::Joined {
                    "joined"
                } else {
                    "started"
                };
                println!(
                    "{verb} rewrap job {}: {} blobs to move",
                    job.id, job.remaining
                );
                let total = job.rewrapped + job.remaining;
                broker
                    .run_rewrap(batch_size, |step| {
                        print_progress(step.rewrapped, total.max(step.rewrapped));
                    })
                    .await?;
                println!();
            } else {
                println!(
                    "nothing to move: every stored blob is under the active version (rewrap job {} is done)",
                    job.id
                );
            }
            print_master_keys(&broker).await?;
        }
        HsmCommand::RetireMaster { version, token, db } => {
            let version = MasterKeyVersion::new(version).ok_or("versions start at 1")?;
            let broker = broker(&token, &db, limits).await?;
            broker.retire_master_key(version).await?;
            println!("master key v{version} retired");
            print_master_keys(&broker).await?;
        }
        HsmCommand::DestroyMaster {
            version,
            yes,
            token,
            db,
        } => {
            let version = MasterKeyVersion::new(version).ok_or("versions start at 1")?;
            let label = version.token_label();
            if !yes {
                confirm(
                    &format!(
                        "This removes {label} from the token for good: blobs that clients still hold \
                     under it can never be opened again. Type {label} to go on: "
                    ),
                    &label,
                )?;
            }
            let broker = broker(&token, &db, limits).await?;
            broker.destroy_master_key(version).await?;
            println!("master key v{version} destroyed");
            print_master_keys(&broker).await?;
        }
        HsmCommand::RotateSigning { token, db, auth } => {
            let broker = broker(&token, &db, limits).await?;
            let config = auth.auth_config(std::net::SocketAddr::from(([127, 0, 0, 1], 8443)));
            let authenticator = broker.authenticator(config).await?;
            let version = authenticator
                .rotate_signing_key(crate::auth::unix_now())
                .await?;
            println!(
                "token-signing key {} signs from now on; brokers pick it up within one \
                 maintenance pass, and the previous key stays in the JWKS until its tokens expire",
                crate::hsm::signing_key_label(version)
            );
        }
    }
    Ok(())
}

/// Shows the bootstrap admin's credentials once, and writes them to `out` (mode 0600) if asked.
fn print_bootstrap(
    client: &Client,
    secret: &ClientSecret,
    public_url: &str,
    out: Option<&std::path::Path>,
) -> Result<(), BoxError> {
    let token_url = format!("{}/v1/oauth/token", public_url.trim_end_matches('/'));
    println!();
    println!("bootstrap admin client (shown once; keep the secret somewhere safe):");
    println!("  client_id:     {}", client.id);
    println!("  client_secret: {}", secret.expose());
    println!("  token_url:     {token_url}");
    if let Some(path) = out {
        let json = serde_json::json!({
            "client_id": client.id,
            "client_secret": secret.expose(),
            "token_url": token_url,
        });
        // A file left by an earlier database holds credentials that no longer exist.
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path)?;
        std::io::Write::write_all(&mut file, format!("{json:#}\n").as_bytes())?;
        println!("  written to:    {}", path.display());
    }
    Ok(())
}

/// Runs the self-test and prints its verdict; a failure is the command's error.
async fn print_self_test(broker: &Broker) -> Result<(), BoxError> {
    let tested = broker.self_test().await?;
    if tested.is_empty() {
        println!("self-test: no master key in use yet; nothing to test");
        return Ok(());
    }
    let versions: Vec<String> = tested.iter().map(|v| format!("v{v}")).collect();
    println!(
        "self-test passed: CKM_AES_GCM seal and open under master key {}",
        versions.join(", ")
    );
    Ok(())
}

async fn print_status(broker: &Broker) -> Result<(), BoxError> {
    let objects = broker.token_objects().await?;
    let flag = |v: Option<bool>| match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    };
    println!(
        "{:<22} {:<12} {:<15} {:<9} {:<11} {:<17} {:<5} {:<7} {:<8} {:<8} ID",
        "LABEL",
        "CLASS",
        "KEY TYPE",
        "SENSITIVE",
        "EXTRACTABLE",
        "NEVER-EXTRACTABLE",
        "WRAP",
        "UNWRAP",
        "ENCRYPT",
        "DECRYPT"
    );
    for o in objects {
        println!(
            "{:<22} {:<12} {:<15} {:<9} {:<11} {:<17} {:<5} {:<7} {:<8} {:<8} {}",
            o.label,
            o.class,
            o.key_type,
            flag(o.sensitive),
            flag(o.extractable),
            flag(o.never_extractable),
            flag(o.wrap),
            flag(o.unwrap),
            flag(o.encrypt),
            flag(o.decrypt),
            o.id
        );
    }
    println!();
    print_master_keys(broker).await?;
    println!();
    print_self_test(broker).await
}

async fn print_master_keys(broker: &Broker) -> Result<(), BoxError> {
    println!(
        "{:<8} {:<13} {:<12} {:<12} {:<9} CREATED",
        "MK", "STATE", "SEALS", "BLOBS", "ON TOKEN"
    );
    for view in broker.master_key_overview().await? {
        let on_token = if view.on_token { "yes" } else { "no" };
        match &view.recorded {
            Some(row) => println!(
                "{:<8} {:<13} {:<12} {:<12} {:<9} {}",
                format!("v{}", view.version),
                row.state,
                row.seals,
                row.stored_blobs,
                on_token,
                row.created_at
            ),
            // Created on the token but never recorded (a rotation whose database was restored
            // from a backup, or by hand): `hsm init` adopts it as decrypt-only.
            None => println!(
                "{:<8} {:<13} {:<12} {:<12} {:<9} -",
                format!("v{}", view.version),
                "unrecorded",
                "-",
                "-",
                on_token
            ),
        }
    }
    Ok(())
}

/// A one-line progress bar on stderr, redrawn in place.
fn print_progress(done: i64, total: i64) {
    const WIDTH: i64 = 40;
    let filled = if total > 0 {
        done * WIDTH / total
    } else {
        WIDTH
    };
    let bar: String = (0..WIDTH)
        .map(|i| if i < filled { '#' } else { '.' })
        .collect();
    eprint!("\r[{bar}] {done}/{total} blobs rewrapped");
}

/// Asks on the terminal for `expected` to be typed; anything else (or no terminal) stops.
fn confirm(prompt: &str, expected: &str) -> Result<(), BoxError> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Err("refusing without confirmation: no terminal to ask on (use --yes)".into());
    }
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() != expected {
        return Err("not confirmed; nothing was destroyed".into());
    }
    Ok(())
}
