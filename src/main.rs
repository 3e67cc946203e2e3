//! The `keybroker` command: `serve`, the officer's `hsm …` commands, `dev-cert`, `bench`, and
//! its own shell completions and man pages. The commands live in the library (`keybroker::cli`);
//! this file only sets up the process around them.

use std::process::ExitCode;

use clap::Parser;

use keybroker::api::error_chain;
use keybroker::cli::{self, Cli};
use keybroker::tls;

/// The broker allocates a little for every request (JSON, headers, the request-log row) from
/// many threads at once; mimalloc's per-thread heaps make that markedly cheaper than glibc's
/// malloc (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    if let Err(e) = cli::init_logging() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    tls::install_crypto_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
