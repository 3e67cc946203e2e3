//! `keybroker client …`: the security officer's commands on clients (register, list, show,
//! disable, enable, delete, lock down, unblock). They go through `auth` and `broker`; the
//! rules they apply (the last-admin guard, block sizes) live there, not here.

use clap::Subcommand;
use std::path::PathBuf;

use super::{BoxError, authenticator, broker};
use crate::auth::{BlockRequest, Client, ClientSpec};
use crate::broker::Limits;
use crate::config::{DatabaseArgs, TokenArgs};
use crate::store::AdminGuard;

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Register a client; its secret is printed once.
    Register {
        /// Display name.
        #[arg(long)]
        name: String,
        /// An allowed source address (repeatable).
        #[arg(long = "ip")]
        ips: Vec<String>,
        /// An allowed source network (repeatable).
        #[arg(long = "cidr")]
        cidrs: Vec<String>,
        /// `strict`: only from the addresses given; `none`: from anywhere.
        #[arg(long, value_parser = ["strict", "none"])]
        ip_mode: String,
        /// Space-separated scopes, e.g. "datakey unwrap keys:*".
        #[arg(long)]
        scopes: String,
        /// A P-256 public key (SPKI PEM file) for private_key_jwt.
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// List clients.
    List,
    /// Show one client.
    Show {
        /// Client id.
        id: uuid::Uuid,
    },
    /// Disable a client: its live tokens stop working at once.
    Disable {
        /// Client id.
        id: uuid::Uuid,
        /// Allow disabling the last active client with the admin scope (the API then has no
        /// administrator until an officer registers or enables one here).
        #[arg(long)]
        allow_no_admin: bool,
    },
    /// Enable a client again.
    Enable {
        /// Client id.
        id: uuid::Uuid,
    },
    /// Delete a client.
    Delete {
        /// Client id.
        id: uuid::Uuid,
        /// Allow deleting the last active client with the admin scope.
        #[arg(long)]
        allow_no_admin: bool,
    },
    /// Lock a client down at once: disabled, its live tokens refused, a critical audit event.
    /// With --block, also block its registered addresses (or the --cidr parts of them) for a
    /// while; `client unblock` lifts that sooner.
    Lockdown {
        /// Client id.
        id: uuid::Uuid,
        /// Why, for the audit trail.
        #[arg(long, default_value = "lockdown by the officer")]
        reason: String,
        /// Also block the client's registered addresses.
        #[arg(long)]
        block: bool,
        /// Block only this network, within the client's own (repeatable; implies --block).
        #[arg(long = "cidr")]
        cidrs: Vec<String>,
        /// How long the block lasts, in seconds.
        #[arg(long, default_value_t = crate::auth::DEFAULT_BLOCK_SECS)]
        block_secs: u64,
        /// Allow locking down the last active client with the admin scope.
        #[arg(long)]
        allow_no_admin: bool,
    },
    /// Lift the address blocks of a client's lockdowns (the client stays disabled until
    /// enabled).
    Unblock {
        /// Client id.
        id: uuid::Uuid,
    },
}

/// `--allow-no-admin` as the store's guard.
fn admin_guard(allow_no_admin: bool) -> AdminGuard {
    if allow_no_admin {
        AdminGuard::AllowNone
    } else {
        AdminGuard::KeepOne
    }
}

/// Runs `keybroker client …`.
pub(super) async fn run_client(
    token: TokenArgs,
    db: DatabaseArgs,
    command: ClientCommand,
) -> Result<(), BoxError> {
    let broker = broker(&token, &db, Limits { max_batch: 1 }).await?;
    let auth = authenticator(&broker, "https://127.0.0.1:8443").await?;
    match command {
        ClientCommand::Register {
            name,
            ips,
            cidrs,
            ip_mode,
            scopes,
            public_key,
        } => {
            let public_key = public_key.map(std::fs::read_to_string).transpose()?;
            let addresses: Vec<String> = ips.into_iter().chain(cidrs).collect();
            let spec = ClientSpec::new(name, &ip_mode, &addresses, &scopes, public_key)?;
            let (client, secret) = auth.register(spec).await?;
            print_client(&client);
            println!("client_secret: {} (shown once)", secret.expose());
        }
        ClientCommand::List => {
            let mut after = None;
            loop {
                let page = auth.clients(after, 200).await?;
                for client in &page {
                    println!(
                        "{}  {:<8}  {:<6}  {}",
                        client.id,
                        client.state(),
                        client.ip_policy.mode(),
                        client.name
                    );
                }
                match page.last() {
                    Some(last) if page.len() == 200 => after = Some(last.id),
                    _ => break,
                }
            }
        }
        ClientCommand::Show { id } => print_client(&auth.client(id).await?),
        ClientCommand::Disable { id, allow_no_admin } => print_client(
            &auth
                .set_active(id, false, admin_guard(allow_no_admin))
                .await?,
        ),
        ClientCommand::Enable { id } => {
            print_client(&auth.set_active(id, true, AdminGuard::KeepOne).await?);
        }
        ClientCommand::Delete { id, allow_no_admin } => {
            auth.delete(id, admin_guard(allow_no_admin)).await?;
            println!("deleted {id}");
        }
        ClientCommand::Lockdown {
            id,
            reason,
            block,
            cidrs,
            block_secs,
            allow_no_admin,
        } => {
            let settings = broker.security_settings().await?;
            let request = (block || !cidrs.is_empty()).then(|| BlockRequest {
                cidrs: (!cidrs.is_empty()).then_some(cidrs.as_slice()),
                secs: block_secs,
                min_prefix_v4: settings.block_min_prefix_v4,
                min_prefix_v6: settings.block_min_prefix_v6,
            });
            let (client, block) = auth
                .lock_down(id, &reason, request, admin_guard(allow_no_admin))
                .await?;
            print_client(&client);
            match block {
                Some(block) => println!(
                    "blocked:    {} (until unix time {}; every broker within seconds)",
                    block.cidrs.join(" "),
                    block.until
                ),
                None => println!("blocked:    nothing (use --block to block its addresses)"),
            }
        }
        ClientCommand::Unblock { id } => {
            auth.client(id).await?;
            let lifted = broker.unblock_client_sources(id).await?;
            println!("lifted {lifted} block(s) of {id}; every broker within seconds");
        }
    }
    Ok(())
}

fn print_client(client: &Client) {
    println!("client_id:  {}", client.id);
    println!("name:       {}", client.name);
    println!("state:      {}", client.state());
    println!(
        "ip policy:  {} {}",
        client.ip_policy.mode(),
        client.ip_policy.cidrs().join(" ")
    );
    println!("scopes:     {}", client.scopes);
    println!(
        "public key: {}",
        if client.public_key_pem.is_some() {
            "yes"
        } else {
            "no"
        }
    );
}
