//! The README's Rust client example: envelope encryption with a data-key cache, and a data key
//! by hand. Credentials from `KEYBROKER_URL`, `KEYBROKER_CLIENT_ID`, `KEYBROKER_CLIENT_SECRET`
//! and `KEYBROKER_CA_FILE`.

use std::collections::BTreeMap;
use std::time::Duration;

use keybroker_client::{Client, DataKeyCache, Error};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    let client = Client::builder(
        env("KEYBROKER_URL"),
        env("KEYBROKER_CLIENT_ID"),
        env("KEYBROKER_CLIENT_SECRET"),
    )
    .ca_file(env("KEYBROKER_CA_FILE"))
    .timeout(Duration::from_secs(10))
    .max_retries(4)
    // One data key per context for up to 1000 messages or 5 minutes.
    .cache(DataKeyCache::new().max_messages(1000))
    .build()?;

    let context = BTreeMap::from([("tenant".to_owned(), "acme".to_owned())]);
    let mut envelopes = Vec::new();
    for invoice in ["invoice 1", "invoice 2", "invoice 3"] {
        envelopes.push(client.encrypt(invoice.as_bytes(), &context).await?);
    }
    for envelope in &envelopes {
        let plaintext = client.decrypt(envelope, &context).await?;
        println!("{}", String::from_utf8_lossy(&plaintext));
    }
    let stats = client.stats();
    println!(
        "{} messages: {} datakey call, {} unwrap call",
        envelopes.len(),
        stats.datakey_calls,
        stats.unwrap_calls
    );

    // Another context cannot open them: the broker refuses the key.
    let other = BTreeMap::from([("tenant".to_owned(), "evil".to_owned())]);
    match client.decrypt(&envelopes[0], &other).await {
        Err(e) => println!("other tenant: {e}"),
        Ok(_) => println!("other tenant: opened?!"),
    }

    // The calls underneath, for your own formats.
    let key = client.datakey(&context, true).await?;
    let again = client.unwrap(&key.wrapped, &context).await?;
    assert_eq!(key.plaintext.as_ref(), Some(&again));
    println!("data key {:?}", key);
    Ok(())
}
