//! The officer's console, for what a browser cannot easily show: the security headers of every
//! page, the session cookie and what Postgres keeps of it, the CSRF check (and that a refused
//! form changes nothing), idle and absolute expiry, who may sign in, and that a failed sign-in
//! counts exactly like a failed token request.

use std::sync::Arc;

use base64::Engine;
use reqwest::header::HeaderMap;
use sha2::{Digest, Sha256};

use crate::common::{self, TestServer, count};
use keybroker::auth::IpPolicy;

/// Every page an officer can open, with its navigation link text (when it has one).
const PAGES: [(&str, Option<&str>); 9] = [
    ("/console/", Some("Overview")),
    ("/console/clients", Some("Clients")),
    ("/console/keys", Some("Keys")),
    ("/console/master-keys", Some("Master keys")),
    ("/console/audit", Some("Audit")),
    ("/console/settings", Some("Settings")),
    ("/console/usage", Some("Usage")),
    ("/console/audit/verify", None),
    ("/console/master-keys/rewrap", None),
];

/// An HTTPS client that trusts the dev CA and does not follow redirects (the tests read them).
fn browser() -> reqwest::Client {
    keybroker::tls::install_crypto_provider();
    let ca_pem = std::fs::read(common::dev_certificate().ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

async fn answer(response: reqwest::Response) -> Answer {
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text().await.unwrap(),
    }
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The CSRF token of the page's forms.
    fn csrf(&self) -> String {
        let marker = "name=\"csrf_token\" value=\"";
        let start = self.body.find(marker).expect("a form with a CSRF token") + marker.len();
        let end = self.body[start..].find('"').unwrap();
        self.body[start..start + end].to_owned()
    }
}

async fn sign_in(server: &TestServer, http: &reqwest::Client, id: &str, secret: &str) -> Answer {
    let response = http
        .post(format!("{}/console/sign-in", server.base))
        .form(&[("client_id", id), ("client_secret", secret)])
        .send()
        .await
        .unwrap();
    answer(response).await
}

/// Signs in as `id` and returns the session cookie's value.
async fn session(server: &TestServer, http: &reqwest::Client, id: &str, secret: &str) -> String {
    let signed_in = sign_in(server, http, id, secret).await;
    assert_eq!(signed_in.status, 303, "{}", signed_in.body);
    assert_eq!(signed_in.header("location"), "/console/");
    cookie_value(signed_in.header("set-cookie"))
}

fn cookie_value(set_cookie: &str) -> String {
    let (pair, _) = set_cookie.split_once(';').unwrap();
    let (name, value) = pair.split_once('=').unwrap();
    assert_eq!(name, "kb_console");
    value.to_owned()
}

async fn get(server: &TestServer, http: &reqwest::Client, path: &str, cookie: &str) -> Answer {
    let mut request = http.get(format!("{}{path}", server.base));
    if !cookie.is_empty() {
        request = request.header("cookie", format!("kb_console={cookie}"));
    }
    answer(request.send().await.unwrap()).await
}

async fn post(
    server: &TestServer,
    http: &reqwest::Client,
    path: &str,
    cookie: &str,
    form: &[(&str, &str)],
) -> Answer {
    let response = http
        .post(format!("{}{path}", server.base))
        .header("cookie", format!("kb_console={cookie}"))
        .form(form)
        .send()
        .await
        .unwrap();
    answer(response).await
}

fn assert_console_headers(answer: &Answer, what: &str) {
    let csp = answer.header("content-security-policy");
    assert!(csp.contains("default-src 'self'"), "{what}: CSP {csp:?}");
    assert!(
        csp.contains("frame-ancestors 'none'"),
        "{what}: CSP {csp:?}"
    );
    assert!(!csp.contains("unsafe-inline"), "{what}: CSP {csp:?}");
    assert_eq!(answer.header("x-frame-options"), "DENY", "{what}");
    assert_eq!(answer.header("referrer-policy"), "no-referrer", "{what}");
}

/// No inline script or style: every script has a `src`, and no element carries `style`.
fn assert_no_inline_code(body: &str, what: &str) {
    assert!(!body.contains("<style"), "{what}: a <style> element");
    assert!(!body.contains(" style="), "{what}: a style attribute");
    assert!(!body.contains("<script>"), "{what}: an inline script");
    assert!(!body.contains("javascript:"), "{what}: a javascript: URL");
    for attribute in [" onclick=", " onload=", " onsubmit=", " hx-on"] {
        assert!(!body.contains(attribute), "{what}: {attribute}");
    }
}

async fn client_state(server: &TestServer, id: &str) -> String {
    let (status, body) = server.get(&format!("/v1/admin/clients/{id}")).await;
    assert_eq!(status, 200, "{body}");
    body["state"].as_str().unwrap().to_owned()
}

async fn pool(server: &TestServer) -> sqlx::PgPool {
    sqlx::PgPool::connect(&server.database_url).await.unwrap()
}

#[tokio::test]
async fn every_console_page_and_asset_carries_the_security_headers() {
    let server = TestServer::start().await;
    let http = browser();

    // Signed out: the sign-in page, and every other page sends the officer there.
    let sign_in_page = get(&server, &http, "/console/sign-in", "").await;
    assert_eq!(sign_in_page.status, 200);
    assert_console_headers(&sign_in_page, "sign-in");
    assert_eq!(sign_in_page.header("cache-control"), "no-store");
    assert!(sign_in_page.body.contains("name=\"client_id\""));
    assert!(sign_in_page.body.contains("name=\"client_secret\""));
    for (path, _) in PAGES {
        let refused = get(&server, &http, path, "").await;
        assert_eq!(refused.status, 303, "{path}");
        assert_eq!(refused.header("location"), "/console/sign-in", "{path}");
        assert_console_headers(&refused, path);
    }

    let cookie = session(&server, &http, &server.main.id, &server.main.secret).await;
    for (path, link) in PAGES {
        let page = get(&server, &http, path, &cookie).await;
        assert_eq!(page.status, 200, "{path}: {}", page.body);
        assert_console_headers(&page, path);
        assert_eq!(page.header("cache-control"), "no-store", "{path}");
        assert!(
            page.header("content-type").starts_with("text/html"),
            "{path}"
        );
        assert_no_inline_code(&page.body, path);
        if let Some(link) = link {
            // The navigation bar links every page by its text, and marks this one.
            for (other, text) in PAGES.iter().filter_map(|(p, l)| l.map(|l| (p, l))) {
                assert!(
                    page.body.contains(&format!("href=\"{other}\"")) && page.body.contains(text),
                    "{path}: no link to {other}"
                );
            }
            assert!(
                page.body
                    .contains(&format!("href=\"{path}\" aria-current=\"page\">{link}</a>")),
                "{path}"
            );
            // htmx may not inject its indicator style (CSP), and loads from our origin.
            assert!(
                page.body
                    .contains("&quot;includeIndicatorStyles&quot;:false")
            );
            assert!(
                page.body
                    .contains("<script src=\"/console/assets/htmx.min.js?v=")
            );
        }
    }
    let missing = get(&server, &http, "/console/no-such-page", &cookie).await;
    assert_eq!(missing.status, 404);
    assert_console_headers(&missing, "404");

    // The assets: our own origin, cacheable for a long time, the same headers.
    let overview = get(&server, &http, "/console/", &cookie).await;
    for asset in ["htmx.min.js", "console.css"] {
        let marker = format!("/console/assets/{asset}?v=");
        let start = overview.body.find(&marker).unwrap();
        let end = start + overview.body[start..].find('"').unwrap();
        let url = &overview.body[start..end];
        let file = get(&server, &http, url, "").await;
        assert_eq!(file.status, 200, "{url}");
        assert!(
            file.header("cache-control").contains("max-age=31536000"),
            "{url}: {}",
            file.header("cache-control")
        );
        assert_console_headers(&file, url);
    }
    let htmx = get(&server, &http, "/console/assets/htmx.min.js", "").await;
    assert!(htmx.body.starts_with("/*! htmx 2."), "the licence header");
    assert!(htmx.body.contains("Zero-Clause BSD"));
    server.stop().await;
}

#[tokio::test]
async fn the_session_cookie_is_strict_and_postgres_keeps_only_its_hash() {
    let server = TestServer::start().await;
    let http = browser();
    let signed_in = sign_in(&server, &http, &server.main.id, &server.main.secret).await;
    assert_eq!(signed_in.status, 303, "{}", signed_in.body);
    let set_cookie = signed_in.header("set-cookie").to_owned();
    let attributes: Vec<&str> = set_cookie.split(';').map(str::trim).skip(1).collect();
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/console"] {
        assert!(attributes.contains(&attribute), "{set_cookie}");
    }
    let id = cookie_value(&set_cookie);
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&id)
        .unwrap();
    assert_eq!(bytes.len(), 32, "32 random bytes, base64url");

    let db = pool(&server).await;
    let rows: Vec<(Vec<u8>, uuid::Uuid, String)> =
        sqlx::query_as("SELECT id_sha256, client_id, csrf_token FROM console_sessions")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, Sha256::digest(id.as_bytes()).to_vec());
    assert_eq!(rows[0].1.to_string(), server.main.id);
    assert_ne!(rows[0].2, id);
    let dump: (String,) = sqlx::query_as("SELECT string_agg(t::text, ' ') FROM console_sessions t")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(!dump.0.contains(&id), "the session id itself is not stored");

    // Signed in, the officer's pages are there; a made-up cookie is not a session.
    assert_eq!(get(&server, &http, "/console/", &id).await.status, 200);
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([7u8; 32]);
    assert_eq!(get(&server, &http, "/console/", &forged).await.status, 303);
    db.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_form_without_this_sessions_csrf_token_is_refused_and_changes_nothing() {
    let server = TestServer::start().await;
    let http = browser();
    let victim = server.register("victim", IpPolicy::Any, "datakey").await;
    let mine = session(&server, &http, &server.main.id, &server.main.secret).await;
    let other = session(&server, &http, &server.main.id, &server.main.secret).await;
    let my_csrf = get(&server, &http, "/console/clients", &mine).await.csrf();
    let other_csrf = get(&server, &http, "/console/clients", &other).await.csrf();
    assert_ne!(my_csrf, other_csrf, "each session has its own token");

    let db = pool(&server).await;
    let audit_rows = || count(&db, "SELECT count(*) FROM audit_events");
    let before = audit_rows().await;
    let master_keys = count(&db, "SELECT count(*) FROM master_keys").await;
    let disable = format!("/console/clients/{}/disable", victim.id);
    let register_form = [
        ("name", "smuggled"),
        ("ip_mode", "none"),
        ("scopes", "admin"),
    ];
    for (what, csrf) in [
        ("missing", None),
        ("another session's", Some(other_csrf.as_str())),
        ("empty", Some("")),
    ] {
        let mut form = Vec::new();
        if let Some(csrf) = csrf {
            form.push(("csrf_token", csrf));
        }
        let refused = post(&server, &http, &disable, &mine, &form).await;
        assert_eq!(refused.status, 403, "{what}: {}", refused.body);
        assert!(refused.body.contains("csrf_refused"), "{what}");
        assert_console_headers(&refused, what);
        form.extend(register_form);
        let refused = post(&server, &http, "/console/clients", &mine, &form).await;
        assert_eq!(refused.status, 403, "{what}");
        let refused = post(&server, &http, "/console/master-keys/rotate", &mine, &form).await;
        assert_eq!(refused.status, 403, "{what}");
        let refused = post(&server, &http, "/console/sign-out", &mine, &form).await;
        assert_eq!(refused.status, 403, "{what}");
    }
    // Nothing changed: the client is active, nobody was registered, no master key rotated, no
    // audit event written, and the session was not signed out.
    assert_eq!(client_state(&server, &victim.id).await, "active");
    assert_eq!(
        count(&db, "SELECT count(*) FROM clients WHERE name = 'smuggled'").await,
        0
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM master_keys").await,
        master_keys
    );
    assert_eq!(audit_rows().await, before);
    assert_eq!(count(&db, "SELECT count(*) FROM console_sessions").await, 2);

    // With its own token the same form works, through the API's use case: audited with the
    // officer's client as the actor.
    let done = post(&server, &http, &disable, &mine, &[("csrf_token", &my_csrf)]).await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(client_state(&server, &victim.id).await, "disabled");
    let (actor,): (String,) = sqlx::query_as(
        "SELECT actor FROM audit_events WHERE event = 'client.disabled' ORDER BY seq DESC LIMIT 1",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(actor, server.main.id);
    // The last admin stays protected by the API's own rule, here too.
    let last_admin = format!("/console/clients/{}/disable", server.main.id);
    let refused = post(
        &server,
        &http,
        &last_admin,
        &mine,
        &[("csrf_token", &my_csrf)],
    )
    .await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(refused.body.contains("last_admin"));
    db.close().await;
    server.stop().await;
}

#[tokio::test]
async fn sessions_end_when_idle_after_their_lifetime_and_at_sign_out() {
    let server = TestServer::start().await;
    let http = browser();
    let db = pool(&server).await;

    // Idle: the database's clock says the last request was 15 minutes and a second ago.
    let idle = session(&server, &http, &server.main.id, &server.main.secret).await;
    assert_eq!(get(&server, &http, "/console/", &idle).await.status, 200);
    sqlx::query("UPDATE console_sessions SET last_seen_at = now() - interval '899 seconds'")
        .execute(&db)
        .await
        .unwrap();
    // Just inside the idle timeout it still works, and the request resets the idle clock.
    assert_eq!(get(&server, &http, "/console/", &idle).await.status, 200);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM console_sessions WHERE last_seen_at > now() - interval '60 seconds'"
        )
        .await,
        1
    );
    sqlx::query("UPDATE console_sessions SET last_seen_at = now() - interval '901 seconds'")
        .execute(&db)
        .await
        .unwrap();
    let expired = get(&server, &http, "/console/", &idle).await;
    assert_eq!(expired.status, 303);
    assert_eq!(expired.header("location"), "/console/sign-in");
    assert_eq!(count(&db, "SELECT count(*) FROM console_sessions").await, 0);

    // Absolute: used a moment ago, but begun 8 hours and a second ago.
    let old = session(&server, &http, &server.main.id, &server.main.secret).await;
    sqlx::query("UPDATE console_sessions SET created_at = now() - interval '28801 seconds'")
        .execute(&db)
        .await
        .unwrap();
    assert_eq!(get(&server, &http, "/console/", &old).await.status, 303);
    assert_eq!(count(&db, "SELECT count(*) FROM console_sessions").await, 0);

    // Sign-out deletes the row: the cookie is worth nothing on any broker afterwards.
    let live = session(&server, &http, &server.main.id, &server.main.secret).await;
    let csrf = get(&server, &http, "/console/", &live).await.csrf();
    let out = post(
        &server,
        &http,
        "/console/sign-out",
        &live,
        &[("csrf_token", &csrf)],
    )
    .await;
    assert_eq!(out.status, 303);
    assert_eq!(out.header("location"), "/console/sign-in");
    assert!(out.header("set-cookie").contains("Max-Age=0"));
    assert_eq!(count(&db, "SELECT count(*) FROM console_sessions").await, 0);
    assert_eq!(get(&server, &http, "/console/", &live).await.status, 303);

    // A client disabled after signing in loses its session, even once enabled again.
    let officer = server
        .register("second-officer", IpPolicy::Any, "admin")
        .await;
    let theirs = session(&server, &http, &officer.id, &officer.secret).await;
    assert_eq!(get(&server, &http, "/console/", &theirs).await.status, 200);
    let (status, body) = server
        .post(
            &format!("/v1/admin/clients/{}/disable", officer.id),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .post(
            &format!("/v1/admin/clients/{}/enable", officer.id),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(get(&server, &http, "/console/", &theirs).await.status, 303);
    db.close().await;
    server.stop().await;
}

#[tokio::test]
async fn only_an_active_admin_client_from_an_allowed_address_signs_in() {
    let server = TestServer::start().await;
    let http = browser();
    let db = pool(&server).await;

    let worker = server
        .register("worker", IpPolicy::Any, "datakey keys:*")
        .await;
    let refused = sign_in(&server, &http, &worker.id, &worker.secret).await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.body.contains("admin scope"));
    assert!(refused.header("set-cookie").is_empty());

    let elsewhere = server
        .register(
            "remote-officer",
            IpPolicy::Strict(vec!["127.0.0.1/32".parse().unwrap()]),
            "admin",
        )
        .await;
    let spec = keybroker::auth::ClientSpec::new(
        "remote-officer".to_owned(),
        "strict",
        &["192.0.2.7/32".to_owned()],
        "admin",
        None,
    )
    .unwrap();
    server
        .auth
        .update(
            elsewhere.id.parse().unwrap(),
            spec,
            keybroker::store::AdminGuard::KeepOne,
        )
        .await
        .unwrap();
    let refused = sign_in(&server, &http, &elsewhere.id, &elsewhere.secret).await;
    assert_eq!(refused.status, 401, "{}", refused.body);

    let retired = server
        .register("retired-officer", IpPolicy::Any, "admin")
        .await;
    let (status, _) = server
        .post(
            &format!("/v1/admin/clients/{}/disable", retired.id),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 200);
    let refused = sign_in(&server, &http, &retired.id, &retired.secret).await;
    assert_eq!(refused.status, 401, "{}", refused.body);

    let missing = http
        .post(format!("{}/console/sign-in", server.base))
        .form(&[("client_id", server.main.id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 400);

    assert_eq!(count(&db, "SELECT count(*) FROM console_sessions").await, 0);
    db.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_failed_sign_in_counts_like_a_failed_token_request() {
    let server = TestServer::start().await;
    let http = browser();
    let db = pool(&server).await;
    let failed = "SELECT count(*) FROM audit_events WHERE event = 'auth.failed'";
    let before = count(&db, failed).await;
    let token_request = |secret: &str| {
        server
            .client
            .post(format!("{}/v1/oauth/token", server.base))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", server.main.id.as_str()),
                ("client_secret", secret),
            ])
            .send()
    };

    // Three failed sign-ins and two failed token requests for the same client id, from here.
    for attempt in 1..=3 {
        let refused = sign_in(&server, &http, &server.main.id, "not-the-secret").await;
        assert_eq!(refused.status, 401, "attempt {attempt}: {}", refused.body);
        assert_console_headers(&refused, "failed sign-in");
    }
    for _ in 0..2 {
        assert_eq!(token_request("not-the-secret").await.unwrap().status(), 401);
    }
    // All five audited alike, against the client they named.
    assert_eq!(count(&db, failed).await, before + 5);
    let (client,): (Option<uuid::Uuid>,) = sqlx::query_as(
        "SELECT client_id FROM audit_events WHERE event = 'auth.failed' ORDER BY seq DESC LIMIT 1",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(client.map(|c| c.to_string()), Some(server.main.id.clone()));
    // One counter: the default throttle lets 5 failures through per client id and source, and
    // the next one, whichever path it came by, starts the delay.
    let here = std::net::IpAddr::from([127, 0, 0, 1]);
    let id: uuid::Uuid = server.main.id.parse().unwrap();
    assert_eq!(server.limiter.auth_failed(here, Some(id)), Some(1));

    // A persistent guesser (counted here directly, so the delay outlasts any slow machine):
    // both the token endpoint and the console refuse even the right secret until it ends.
    for _ in 0..10 {
        server.limiter.auth_failed(here, Some(id));
    }
    let response = token_request(&server.main.secret).await.unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert!(response.headers().get("retry-after").is_some());
    let throttled = sign_in(&server, &http, &server.main.id, &server.main.secret).await;
    assert_eq!(throttled.status, 429, "{}", throttled.body);
    assert!(!throttled.header("retry-after").is_empty());
    assert_console_headers(&throttled, "throttled sign-in");
    assert_eq!(count(&db, "SELECT count(*) FROM console_sessions").await, 0);
    db.close().await;
    server.stop().await;
}
