//! The command line of the interoperability test (the Python library has the same one):
//!
//! ```text
//! cargo run -p keybroker-client --example envelope -- encrypt [--context k=v ...] < plaintext > envelope
//! cargo run -p keybroker-client --example envelope -- decrypt [--context k=v ...] < envelope > plaintext
//! ```
//!
//! Raw bytes on stdin and stdout; the broker and credentials from `KEYBROKER_URL`,
//! `KEYBROKER_CLIENT_ID`, `KEYBROKER_CLIENT_SECRET` and `KEYBROKER_CA_FILE` (optional).

use std::process::ExitCode;

use keybroker_client::{Client, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

const USAGE: &str = "usage: envelope encrypt|decrypt [--context k=v ...] < input > output";

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("envelope: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let command = args.next().ok_or(USAGE)?;
    let mut context = Context::new();
    while let Some(arg) = args.next() {
        if arg != "--context" {
            return Err(format!("unexpected argument {arg:?}\n{USAGE}"));
        }
        let pair = args.next().ok_or("--context needs k=v")?;
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("--context {pair:?} is not k=v"))?;
        context.insert(k.to_owned(), v.to_owned());
    }
    let env = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
    let mut builder = Client::builder(
        env("KEYBROKER_URL")?,
        env("KEYBROKER_CLIENT_ID")?,
        env("KEYBROKER_CLIENT_SECRET")?,
    );
    if let Ok(ca) = std::env::var("KEYBROKER_CA_FILE")
        && !ca.is_empty()
    {
        builder = builder.ca_file(ca);
    }
    let client = builder.build().map_err(|e| e.to_string())?;

    // Either side may be a plaintext: both buffers are wiped when dropped.
    let mut input = Zeroizing::new(Vec::new());
    tokio::io::stdin()
        .read_to_end(&mut input)
        .await
        .map_err(|e| format!("reading stdin: {e}"))?;
    let output = match command.as_str() {
        "encrypt" => client.encrypt(&input, &context).await.map(Zeroizing::new),
        "decrypt" => client.decrypt(&input, &context).await,
        other => return Err(format!("unknown command {other:?}\n{USAGE}")),
    }
    .map_err(|e| e.to_string())?;
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(&output)
        .await
        .map_err(|e| format!("writing stdout: {e}"))?;
    stdout
        .flush()
        .await
        .map_err(|e| format!("writing stdout: {e}"))
}
