//! The admin API against real Dovecot sessions: tokens and roles (no token file, no token, a wrong token,
//! a read-only token trying a mutation), the sessions list with its filters and pages, a kick during a
//! large FETCH (the message arrives whole, then `* BYE`), kicking by user, bans listed and lifted, the
//! backends, a reload, the overview, and an `admin_action` audit event for every mutation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;
use support::client::{self, TlsClient};
use support::proxy::{TestProxy, backend, config_text, with_admin_tokens};

const OPERATOR: &str = "op-0123456789abcdef0123456789abcdef";
const READER: &str = "ro-fedcba9876543210fedcba9876543210";
const BIG: usize = 8 * 1024 * 1024;

/// The big message as delivered: bare LFs every 100 bytes.
fn big_message() -> Vec<u8> {
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    big.extend((0..BIG).map(|i| if i % 100 == 99 { b'\n' } else { b'a' + (i % 26) as u8 }));
    big
}

/// As IMAP serves it: every bare LF a CRLF.
fn big_message_as_served() -> Vec<u8> {
    let mut out = Vec::new();
    for (i, &b) in big_message_cache().iter().enumerate() {
        if b == b'\n' && (i == 0 || big_message_cache()[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

fn big_message_cache() -> &'static [u8] {
    static BIG_MESSAGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BIG_MESSAGE.get_or_init(big_message)
}

fn env() -> &'static support::Env {
    static ONCE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let env = support::env("admin", &[]);
    ONCE.get_or_init(|| {
        env.dovecot.deliver("alice@example.org", "1.admin", b"Subject: hello\r\n\r\nHello.\r\n");
        env.dovecot.deliver("bob@example.com", "1.admin", b"Subject: hello\r\n\r\nHello.\r\n");
        env.dovecot.deliver("big@example.org", "1.big", big_message_cache());
    });
    env
}

struct Admin {
    proxy: TestProxy,
    audit: std::path::PathBuf,
    config: std::path::PathBuf,
}

/// A proxy with the API on (an operator and a read-only token), auditing to a file, from a config file so
/// that the API's reload has something to reload.
async fn admin(defence: &str) -> Admin {
    let env = env();
    let dir = support::scratch_dir("imapgate-admin-");
    let audit = dir.join("audit.log");
    let rest = format!(
        "{}\n[route]\ndefault = \"mbox\"\n[audit]\npath = \"{}\"\n{defence}",
        backend("mbox", env.dovecot.imap_port),
        audit.display()
    );
    let tokens = format!("# name role token\nalice-ops operator {OPERATOR}\ngrafana read {READER}\n");
    let text = with_admin_tokens(&config_text(&env.pki, &rest), &dir, &tokens);
    let config = dir.join("proxy.toml");
    std::fs::write(&config, text).unwrap();
    Admin { proxy: TestProxy::start_from_file(&config).await, audit, config }
}

async fn call(proxy: &TestProxy, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let (status, text) = support::admin_request(proxy.admin, method, path, token, body).await;
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
    (status, value)
}

async fn login(proxy: &TestProxy, user: &str, source: Option<IpAddr>) -> TlsClient {
    let config = client::tls_config(&env().pki.ca, &[b"imap"]);
    let mut c = TlsClient::connect_from(source, proxy.addr, config).await.unwrap();
    c.line().await.unwrap();
    let id = c.command("i", "ID (\"name\" \"Thunderbird\" \"version\" \"128.4.1\")").await.unwrap();
    assert!(id.tagged.starts_with("i OK"), "{id:?}");
    let password = support::dovecot::password(user);
    let ok = c
        .command("l", &format!("LOGIN {user} \"{}\"", password.replace('\\', "\\\\").replace('"', "\\\"")))
        .await
        .unwrap();
    assert!(ok.tagged.starts_with("l OK"), "{ok:?}");
    c
}

/// Polls `check` every 20 ms for up to 5 s.
async fn until<T, F, Fut>(mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..250 {
        if let Some(value) = check().await {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not met within 5 s");
}

fn audit_events(path: &std::path::Path, event: &str) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == event)
        .collect()
}

/// Waits (bounded) for an audit event matching `check`.
fn wait_audit(path: &std::path::Path, event: &str, check: impl Fn(&Value) -> bool) -> Value {
    support::wait_until(Duration::from_secs(5), || audit_events(path, event).into_iter().find(|v| check(v)))
        .unwrap_or_else(|| panic!("no {event} event in {}", std::fs::read_to_string(path).unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_file_only_metrics_and_probes_are_served() {
    let env = env();
    let rest = format!("{}\n[route]\ndefault = \"mbox\"\n", backend("mbox", env.dovecot.imap_port));
    let proxy = TestProxy::start(&config_text(&env.pki, &rest)).await;
    for path in ["/api/v1/sessions", "/", "/api/v1/bans"] {
        let (status, _) = support::admin_request(proxy.admin, "GET", path, Some(OPERATOR), None).await;
        assert_eq!(status, 404, "{path}");
    }
    assert_eq!(support::admin_get(proxy.admin, "/healthz").await.0, 200);
    assert_eq!(support::admin_get(proxy.admin, "/metrics").await.0, 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles() {
    let a = admin("").await;
    let p = &a.proxy;
    assert_eq!(call(p, "GET", "/api/v1/sessions", None, None).await.0, 401);
    let (status, body) = call(p, "GET", "/api/v1/sessions", Some("wrong-token-0123456789abcdef0123456789"), None).await;
    assert_eq!((status, body["error"].is_string()), (401, true), "{body}");
    let (status, me) = call(p, "GET", "/api/v1/whoami", Some(READER), None).await;
    assert_eq!((status, me["name"].as_str(), me["role"].as_str()), (200, Some("grafana"), Some("read")));
    for (method, path, body) in [
        ("POST", "/api/v1/sessions/kick", Some(r#"{"user": "alice@example.org"}"#)),
        ("DELETE", "/api/v1/bans/127.0.0.1", None),
        ("POST", "/api/v1/reload", None),
    ] {
        let (status, body) = call(p, method, path, Some(READER), body).await;
        assert_eq!(status, 403, "{method} {path}: {body}");
    }
    let (status, body) = call(p, "POST", "/api/v1/sessions/kick", Some(OPERATOR), Some("not json")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(call(p, "GET", "/api/v1/nothing", Some(READER), None).await.0, 404);
    assert_eq!(call(p, "GET", "/api/v1/sessions?limit=5000", Some(READER), None).await.0, 400);
    // Tokens never reach the audit log; their names do.
    a.proxy.stop().await;
    let audit = std::fs::read_to_string(&a.audit).unwrap_or_default();
    assert!(!audit.contains(OPERATOR) && !audit.contains(READER));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_listed_filtered_and_paged() {
    let a = admin("").await;
    let p = &a.proxy;
    let mut alice = login(p, "alice@example.org", None).await;
    assert!(alice.command("s", "SELECT INBOX").await.unwrap().tagged.starts_with("s OK"));
    let _bob = login(p, "bob@example.com", Some("127.0.0.2".parse().unwrap())).await;
    let _alice2 = login(p, "alice@example.org", Some("127.0.0.3".parse().unwrap())).await;
    let (status, all) = call(p, "GET", "/api/v1/sessions", Some(READER), None).await;
    assert_eq!((status, all["total"].as_u64()), (200, Some(3)), "{all}");
    let first = &all["sessions"][0];
    assert_eq!(first["user"], "alice@example.org");
    assert_eq!((first["client_ip"].as_str(), first["backend"].as_str()), (Some("127.0.0.1"), Some("mbox")));
    assert_eq!(
        (first["client_name"].as_str(), first["client_version"].as_str()),
        (Some("Thunderbird"), Some("128.4.1"))
    );
    assert_eq!(first["tls_version"], "TLSv1.3");
    assert_eq!(first["last_command"], "SELECT", "{first}");
    assert!(first["bytes_to_client"].as_u64().unwrap() > 0 && first["commands"].as_u64() == Some(1), "{first}");
    assert_eq!(first["idle"], false);
    // IDLE shows.
    alice.send(b"d IDLE\r\n").await.unwrap();
    assert!(alice.line().await.unwrap().starts_with('+'));
    let id = first["id"].as_str().unwrap().to_owned();
    let list = until(|| async {
        let (_, list) = call(p, "GET", "/api/v1/sessions?user=ALICE%40example.org", Some(READER), None).await;
        let idle = list["sessions"].as_array()?.iter().any(|s| s["id"] == id.as_str() && s["idle"] == true);
        idle.then_some(list)
    })
    .await;
    assert_eq!(list["total"], 2, "{list}");
    let this = list["sessions"].as_array().unwrap().iter().find(|s| s["id"] == id.as_str()).unwrap();
    assert_eq!(this["last_command"], "IDLE", "{this}");
    let (_, by_client) = call(p, "GET", "/api/v1/sessions?client=127.0.0.2", Some(READER), None).await;
    assert_eq!(
        (by_client["total"].as_u64(), by_client["sessions"][0]["user"].as_str()),
        (Some(1), Some("bob@example.com"))
    );
    assert_eq!(call(p, "GET", "/api/v1/sessions?backend=other", Some(READER), None).await.1["total"], 0);
    // Pages: oldest first, stable.
    let (_, page1) = call(p, "GET", "/api/v1/sessions?limit=2", Some(READER), None).await;
    let (_, page2) = call(p, "GET", "/api/v1/sessions?limit=2&offset=2", Some(READER), None).await;
    assert_eq!((page1["sessions"].as_array().unwrap().len(), page2["sessions"].as_array().unwrap().len()), (2, 1));
    assert_eq!(page1["sessions"][0]["id"], all["sessions"][0]["id"]);
    assert_eq!(page2["sessions"][0]["id"], all["sessions"][2]["id"]);
    // The backend view counts the sessions.
    let (_, backends) = call(p, "GET", "/api/v1/backends", Some(READER), None).await;
    let mbox = &backends["backends"][0];
    assert_eq!(
        (mbox["name"].as_str(), mbox["sessions"].as_u64(), mbox["circuit"].as_str()),
        (Some("mbox"), Some(3), Some("closed"))
    );
    let (_, overview) = call(p, "GET", "/api/v1/overview", Some(READER), None).await;
    assert_eq!(overview["sessions"], 3, "{overview}");
    assert!(overview["series"].is_array() && overview["commands"].is_array());
    a.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_during_a_large_fetch_lets_the_message_arrive_whole_then_bye() {
    let a = admin("").await;
    let p = &a.proxy;
    let mut c = login(p, "big@example.org", None).await;
    assert!(c.command("s", "SELECT INBOX").await.unwrap().tagged.starts_with("s OK"));
    c.send(b"f FETCH 1 BODY.PEEK[]\r\n").await.unwrap();
    let first = c.line().await.unwrap();
    let length = client::literal_length(&first).unwrap_or_else(|| panic!("{first}"));
    assert!(length > BIG, "{first}");
    // The client is not reading: the relay is stuck inside the literal when the kick comes.
    let (status, kicked) =
        call(p, "POST", "/api/v1/sessions/kick", Some(OPERATOR), Some(r#"{"user": "big@example.org"}"#)).await;
    assert_eq!((status, kicked["kicked"].as_u64()), (200, Some(1)), "{kicked}");
    let rest = tokio::time::timeout(Duration::from_secs(30), c.rest_bytes()).await.unwrap();
    assert!(rest.len() > length, "the literal arrived whole: {} of {length}", rest.len());
    let literal = &rest[..length];
    assert_eq!(literal, big_message_as_served().as_slice(), "the message is intact");
    let after = String::from_utf8_lossy(&rest[length..]).into_owned();
    assert!(after.starts_with(")\r\n"), "{after}");
    assert!(after.ends_with("* BYE Disconnected by an administrator.\r\n"), "{after}");
    let event = wait_audit(&a.audit, "admin_action", |v| v["action"] == "kick");
    assert_eq!((event["admin"].as_str(), event["target"].as_str()), (Some("alice-ops"), Some("user:big@example.org")));
    assert_eq!(event["result"], "success");
    let end = wait_audit(&a.audit, "session_end", |v| v["user"] == "big@example.org");
    assert_eq!(end["result"], "kicked", "{end}");
    a.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_by_session_and_by_user() {
    let a = admin("").await;
    let p = &a.proxy;
    let mut one = login(p, "bob@example.com", None).await;
    let mut two = login(p, "bob@example.com", None).await;
    let (_, list) = call(p, "GET", "/api/v1/sessions?user=bob%40example.com", Some(READER), None).await;
    let id = list["sessions"][0]["id"].as_str().unwrap().to_owned();
    let body = format!(r#"{{"session": "{id}"}}"#);
    assert_eq!(call(p, "POST", "/api/v1/sessions/kick", Some(OPERATOR), Some(&body)).await.1["kicked"], 1);
    assert_eq!(one.line().await.unwrap(), "* BYE Disconnected by an administrator.");
    assert!(two.command("n", "NOOP").await.unwrap().tagged.starts_with("n OK"), "the other session goes on");
    until(|| async {
        let (_, left) = call(p, "GET", "/api/v1/sessions?user=bob%40example.com", Some(READER), None).await;
        (left["total"] == 1).then_some(())
    })
    .await;
    let (_, none) = call(p, "POST", "/api/v1/sessions/kick", Some(OPERATOR), Some(r#"{"session": "nope"}"#)).await;
    assert_eq!(none["kicked"], 0);
    assert_eq!(
        call(p, "POST", "/api/v1/sessions/kick", Some(OPERATOR), Some(r#"{"user": "bob@example.com"}"#)).await.1["kicked"],
        1
    );
    assert_eq!(two.line().await.unwrap(), "* BYE Disconnected by an administrator.");
    wait_audit(&a.audit, "admin_action", |v| v["target"] == "session:nope" && v["result"] == "not_found");
    a.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bans_are_listed_and_lifted() {
    let a = admin("[defence]\nfailures = 2\ntarpit_ms = [10]\nban_secs = 600\n").await;
    let p = &a.proxy;
    let attacker: IpAddr = "127.0.0.50".parse().unwrap();
    let config = client::tls_config(&env().pki.ca, &[b"imap"]);
    let mut c = TlsClient::connect_from(Some(attacker), p.addr, config.clone()).await.unwrap();
    c.line().await.unwrap();
    for i in 0..3 {
        c.command(&format!("x{i}"), &format!("LOGIN alice@example.org wrong-{i}")).await.unwrap();
    }
    assert!(p.defence.is_banned(attacker));
    let (status, bans) = call(p, "GET", "/api/v1/bans", Some(READER), None).await;
    assert_eq!((status, bans["total"].as_u64()), (200, Some(1)), "{bans}");
    assert_eq!(bans["bans"][0]["prefix"], "127.0.0.50/32");
    assert!(bans["bans"][0]["remaining_secs"].as_u64().unwrap() > 500);
    let (_, standing) = call(p, "GET", "/api/v1/standing?ip=127.0.0.50", Some(READER), None).await;
    assert_eq!(
        (standing["prefix"].as_str(), standing["budget"].as_f64()),
        (Some("127.0.0.50/32"), Some(2.0)),
        "{standing}"
    );
    assert!(
        standing["failures"].as_f64().unwrap() > 2.0 && standing["banned_secs"].as_u64().unwrap() > 500,
        "{standing}"
    );
    assert_eq!(call(p, "DELETE", "/api/v1/bans/127.0.0.50%2F32", Some(READER), None).await.0, 403);
    let (status, lifted) = call(p, "DELETE", "/api/v1/bans/127.0.0.50%2F32", Some(OPERATOR), None).await;
    assert_eq!((status, lifted["unbanned"].as_str()), (200, Some("127.0.0.50/32")), "{lifted}");
    assert!(!p.defence.is_banned(attacker));
    // Let back in: the address connects and its owner logs in.
    let mut back = TlsClient::connect_from(Some(attacker), p.addr, config).await.unwrap();
    back.line().await.unwrap();
    assert!(back.command("l", "LOGIN alice@example.org alice-pw").await.unwrap().tagged.starts_with("l OK"));
    assert_eq!(call(p, "DELETE", "/api/v1/bans/127.0.0.50", Some(OPERATOR), None).await.0, 404);
    // Forgiven, and the owner's login gives the prefix standing.
    let (_, standing) = call(p, "GET", "/api/v1/standing?ip=127.0.0.50", Some(READER), None).await;
    assert!(standing["failures"].as_f64().unwrap() < 0.1 && standing["banned_secs"].is_null(), "{standing}");
    assert!(standing["successes"].as_f64().unwrap() > 0.9, "{standing}");
    assert_eq!(call(p, "GET", "/api/v1/standing", Some(READER), None).await.0, 400);
    assert_eq!(call(p, "DELETE", "/api/v1/bans/not-an-address", Some(OPERATOR), None).await.0, 400);
    let event = wait_audit(&a.audit, "admin_action", |v| v["action"] == "unban" && v["result"] == "success");
    assert_eq!((event["admin"].as_str(), event["target"].as_str()), (Some("alice-ops"), Some("127.0.0.50/32")));
    wait_audit(&a.audit, "unbanned", |v| v["prefix"] == "127.0.0.50/32");
    a.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_through_the_api() {
    let a = admin("").await;
    let p = &a.proxy;
    let (status, body) = call(p, "POST", "/api/v1/reload", Some(OPERATOR), None).await;
    assert_eq!((status, body["result"].as_str()), (200, Some("success")), "{body}");
    // A broken file fails the reload and keeps the old configuration (and tokens).
    let good = std::fs::read_to_string(&a.config).unwrap();
    std::fs::write(&a.config, good.replace("[route]", "[route]\nnonsense = 1")).unwrap();
    let (status, body) = call(p, "POST", "/api/v1/reload", Some(OPERATOR), None).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("nonsense"), "{body}");
    assert_eq!(call(p, "GET", "/api/v1/whoami", Some(OPERATOR), None).await.0, 200);
    std::fs::write(&a.config, good).unwrap();
    wait_audit(&a.audit, "admin_action", |v| v["action"] == "reload" && v["result"] == "failure");
    wait_audit(&a.audit, "admin_action", |v| v["action"] == "reload" && v["result"] == "success");
    a.proxy.stop().await;
}
