//! `cli` owns the `keybroker` command line: its clap definitions, one file per command group
//! (`serve`, `hsm`, `client`, `audit`, `bench`, `dev_cert`), the log set-up, and the shell
//! completions and man pages made from the same definitions. It reaches the token, Postgres and
//! HTTP only through the library's layers (`broker`, `auth`, `server`): no cryptoki, no sqlx.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

use crate::auth::Authenticator;
use crate::broker::{Broker, Limits};
use crate::config::{AuthArgs, DatabaseArgs, ServeArgs, TokenArgs};
use crate::hsm::Hsm;
use crate::store::Store;

pub mod audit;
pub mod bench;
pub mod client;
pub mod dev_cert;
pub mod hsm;
mod logging;
pub mod serve;

pub use logging::init_logging;

// No doc comment on `Cli`, `Command` or the subcommand enums: clap would show it as help text.
// The doc comments on variants and fields are the help texts; keep them as they are.
#[derive(Debug, Parser)]
#[command(name = "keybroker", version, about = "HSM-backed key broker")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTPS API.
    Serve {
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        serve: ServeArgs,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Security-officer commands on the token.
    Hsm {
        #[command(subcommand)]
        command: hsm::HsmCommand,
    },
    /// Security-officer commands on clients.
    Client {
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(subcommand)]
        command: client::ClientCommand,
    },
    /// The audit trail.
    Audit {
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Make (once) a development CA and server certificate in a folder.
    DevCert {
        /// Folder for ca.pem, server.pem and server-key.pem.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Measure the token's raw seal rate through the HSM layer (no HTTP).
    Bench {
        #[command(flatten)]
        token: TokenArgs,
        /// How long each measurement runs, in seconds.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Concurrent callers of the HSM layer; 0 runs every seal inside one blocking call.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
    /// Print a shell completion script, e.g. `keybroker completions bash >
    /// /etc/bash_completion.d/keybroker`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page, or write one page per command into a folder.
    Man {
        /// Write keybroker.1 and a page for every subcommand (keybroker-hsm-init.1, ...) here.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// What a command fails with: any layer's error, printed by `main` as its chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs one command to its end.
///
/// # Errors
/// Whatever the command failed with; `main` prints it and exits with status 1.
pub async fn run(command: Command) -> Result<(), BoxError> {
    match command {
        Command::Serve {
            token,
            db,
            serve,
            auth,
        } => serve::serve_api(token, db, serve, auth).await,
        Command::Hsm { command } => hsm::run_hsm(command).await,
        Command::Client { token, db, command } => client::run_client(token, db, command).await,
        Command::Audit { token, db, command } => audit::run_audit(token, db, command).await,
        Command::DevCert { dir } => dev_cert::run_dev_cert(&dir),
        Command::Bench {
            token,
            seconds,
            concurrency,
        } => bench::bench_token(token, seconds, concurrency).await,
        Command::Completions { shell } => {
            print_completions(shell);
            Ok(())
        }
        Command::Man { dir } => Ok(write_man(dir.as_deref())?),
    }
}

/// A broker on the token and database the flags name (migrated, not initialised).
async fn broker(token: &TokenArgs, db: &DatabaseArgs, limits: Limits) -> Result<Broker, BoxError> {
    let hsm = Hsm::connect(token.hsm_config()?).await?;
    let store = Store::connect_lazy(&db.database_url, db.db_max_connections)?;
    store.migrate().await?;
    Ok(Broker::new(hsm, store, limits))
}

/// The authenticator the officer commands use (`hsm init`, `client …`): the default token
/// settings, with `public_url` as the issuer.
async fn authenticator(broker: &Broker, public_url: &str) -> Result<Authenticator, BoxError> {
    let config = AuthArgs {
        public_url: Some(public_url.to_owned()),
        token_audience: "keybroker".to_owned(),
        token_ttl_secs: 300,
        token_leeway_secs: 30,
        trusted_proxies: Vec::new(),
        refusal_audit_secs: 60,
        auth_cache_max_age_ms: 1000,
        console_idle_secs: 900,
        console_absolute_secs: 28_800,
    }
    .auth_config(std::net::SocketAddr::from(([127, 0, 0, 1], 8443)));
    Ok(broker.authenticator(config).await?)
}

/// `keybroker completions SHELL`: the completion script clap makes from the CLI definitions.
fn print_completions(shell: clap_complete::Shell) {
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "keybroker",
        &mut std::io::stdout(),
    );
}

/// `keybroker man [--dir DIR]`: the man page from the CLI definitions, or every page into DIR.
fn write_man(dir: Option<&std::path::Path>) -> std::io::Result<()> {
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(Cli::command(), dir)
        }
        None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()),
    }
}
