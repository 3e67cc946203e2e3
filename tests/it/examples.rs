//! The README's client example runs as written against a real server.

use crate::common::{TestServer, dev_certificate};

#[tokio::test]
async fn the_python_client_example_runs() {
    let server = TestServer::start().await;
    let base = server.base.clone();
    let ca = dev_certificate().ca;
    let credentials = crate::common::scratch_dir("client").join("credentials.json");
    std::fs::write(
        &credentials,
        serde_json::json!({"client_id": server.main.id, "client_secret": server.main.secret})
            .to_string(),
    )
    .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/client.py");
    // Blocking is fine off the runtime: the server keeps serving on its own tasks.
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .env("KEYBROKER_URL", base)
            .env("KEYBROKER_CA", ca)
            .env("KEYBROKER_CREDENTIALS", credentials)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.contains("unwrap:   same key back"), "{stdout}");
    assert!(
        stdout.contains("refused:  /v1/unwrap: 422 context_mismatch"),
        "{stdout}"
    );
    assert!(
        stdout.contains("rewrap:   now under master key v"),
        "{stdout}"
    );
    server.stop().await;
}
