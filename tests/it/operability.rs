//! What operators wire the broker into: JSON logs for log shippers, shell completions and man
//! pages generated from the CLI's own definitions.

use std::process::Command;

use serde_json::{Value, json};

use crate::child::ChildServer;
use crate::common::scratch_dir;
use crate::token::PrivateToken;

fn keybroker(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_each_requests_id_client_route_status_and_latency() {
    let token = PrivateToken::copy();
    let server = ChildServer::start_with_env(
        token.env(),
        scratch_dir("json-log").join("server.log"),
        &[
            ("KEYBROKER_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,keybroker=debug,sqlx=warn"),
        ],
    )
    .await;
    let (client, base) = server.endpoint();
    let served = client
        .post(format!("{base}/v1/datakey"))
        .bearer_auth(&server.token)
        .json(&json!({"context": {"tenant": "acme"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    let served_id = served.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let refused = client
        .post(format!("{base}/v1/datakey"))
        .bearer_auth("not-a-token")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let refused_id = refused.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let admin_id = server.admin_id.clone();
    let bearer = server.token.clone();
    let log = server.stop().await;

    // Every line is one JSON object with a timestamp, a level and a target.
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 3, "{log}");
    for line in &lines {
        for field in ["timestamp", "level", "target"] {
            assert!(line[field].is_string(), "no {field}: {line}");
        }
    }
    assert!(!log.contains(&bearer), "the access token reached the log");

    let access = |id: &str| {
        lines
            .iter()
            .find(|l| l["target"] == "keybroker::access" && l["request_id"] == id)
            .unwrap_or_else(|| panic!("no access line for request {id} in:\n{log}"))
            .clone()
    };
    let line = access(&served_id);
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["message"], "request");
    assert_eq!(line["client_id"], admin_id.as_str());
    assert_eq!(line["method"], "POST");
    assert_eq!(line["route"], "/v1/datakey");
    assert_eq!(line["status"], 200);
    assert!(line["latency_ms"].as_f64().unwrap() > 0.0, "{line}");
    assert!(line.get("error_code").is_none(), "{line}");

    let line = access(&refused_id);
    assert_eq!(line["status"], 401);
    assert_eq!(line["error_code"], "invalid_token");
    assert!(line.get("client_id").is_none(), "{line}");

    // Lines written while a request runs carry its span: the refusal's own debug line says
    // which request it was about.
    let refusal = lines
        .iter()
        .find(|l| {
            l["target"] == "keybroker::auth" && l["span"]["request_id"] == refused_id.as_str()
        })
        .unwrap_or_else(|| panic!("no refusal line in the span of {refused_id}:\n{log}"));
    assert_eq!(refusal["span"]["route"], "/v1/datakey", "{refusal}");
    assert_eq!(refusal["span"]["method"], "POST", "{refusal}");
}

#[test]
fn an_unknown_log_format_is_refused_before_anything_starts() {
    let output = Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .args(["dev-cert", "--dir", "/nonexistent/never-made"])
        .env("KEYBROKER_LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("KEYBROKER_LOG_FORMAT must be `text` or `json`"),
        "{stderr}"
    );
}

#[test]
fn completions_for_bash_zsh_and_fish_know_every_command() {
    for (shell, marker) in [
        ("bash", "_keybroker()"),
        ("zsh", "#compdef keybroker"),
        ("fish", "complete -c keybroker"),
    ] {
        let output = keybroker(&["completions", shell]);
        assert!(output.status.success(), "{output:?}");
        let script = String::from_utf8(output.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: {script}");
        for command in ["serve", "rotate-master", "lockdown", "completions"] {
            assert!(script.contains(command), "{shell} lacks {command}");
        }
    }
    let output = keybroker(&["completions", "tcsh"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn man_pages_come_from_the_cli_definitions() {
    let output = keybroker(&["man"]);
    assert!(output.status.success(), "{output:?}");
    let page = String::from_utf8(output.stdout).unwrap();
    assert!(
        page.starts_with(".ie") || page.contains(".TH keybroker 1"),
        "{page}"
    );
    assert!(
        page.contains("HSM\\-backed key broker") || page.contains("HSM-backed key broker"),
        "{page}"
    );
    assert!(
        page.contains("serve") && page.contains("completions"),
        "{page}"
    );

    let dir = scratch_dir("man");
    let output = keybroker(&["man", "--dir", dir.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    for page in [
        "keybroker.1",
        "keybroker-serve.1",
        "keybroker-hsm-rotate-master.1",
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}: {text}");
    }
    let rotate = std::fs::read_to_string(dir.join("keybroker-hsm-rotate-master.1")).unwrap();
    assert!(rotate.contains("active for new seals"), "{rotate}");
}
