//! The mailbox problems made visible, through a real Dovecot: a phone retrying an old password, an account
//! appending until Dovecot's quota plugin answers `OVERQUOTA`, a client fetching `1:* BODY.PEEK[]` again
//! and again, `SELECT` latency by mailbox size and the slowest mailboxes, client families. Exact counter
//! values, audit events (rate-limited) and the admin API's attention lists after each.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;
use support::client::{self, TlsClient};
use support::proxy::{TestProxy, backend, config_text, with_admin_tokens};

const READER: &str = "ro-signals-0123456789abcdef0123456789";

struct Proxy {
    proxy: TestProxy,
    audit: std::path::PathBuf,
}

fn env() -> &'static support::Env {
    static ONCE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let env = support::env("signals", &[]);
    ONCE.get_or_init(|| {
        for i in 0..3 {
            let message = format!("Subject: m{i}\r\n\r\n{}\r\n", "body line\r\n".repeat(50 + i));
            env.dovecot.deliver("fetcher@example.org", &format!("{i}.sig"), message.as_bytes());
        }
        env.dovecot.deliver("quota@example.org", "0.sig", b"Subject: first\r\n\r\nsmall\r\n");
    });
    env
}

async fn proxy() -> Proxy {
    let env = env();
    let dir = support::scratch_dir("imapgate-signals-");
    let audit = dir.join("audit.log");
    let rest = format!(
        "{}\n[route]\ndefault = \"mbox\"\n[audit]\npath = \"{}\"\n",
        backend("mbox", env.dovecot.imap_port),
        audit.display()
    );
    let text = with_admin_tokens(&config_text(&env.pki, &rest), &dir, &format!("screen read {READER}\n"));
    Proxy { proxy: TestProxy::start(&text).await, audit }
}

async fn connect(p: &TestProxy, source: Option<IpAddr>, app: (&str, &str)) -> TlsClient {
    let config = client::tls_config(&env().pki.ca, &[b"imap"]);
    let mut c = TlsClient::connect_from(source, p.addr, config).await.unwrap();
    c.line().await.unwrap();
    let id = c.command("i", &format!("ID (\"name\" \"{}\" \"version\" \"{}\")", app.0, app.1)).await.unwrap();
    assert!(id.tagged.starts_with("i OK"));
    c
}

async fn login(c: &mut TlsClient, user: &str, password: &str) {
    let ok = c.command("l", &format!("LOGIN {user} {password}")).await.unwrap();
    assert!(ok.tagged.starts_with("l OK"), "{ok:?}");
}

async fn metric(p: &TestProxy, series: &str) -> f64 {
    support::metric(p.admin, series).await
}

async fn attention(p: &TestProxy) -> Value {
    let (status, text) = support::admin_request(p.admin, "GET", "/api/v1/attention", Some(READER), None).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn events(path: &std::path::Path, event: &str) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == event)
        .collect()
}

fn wait_events(path: &std::path::Path, event: &str, n: usize) -> Vec<Value> {
    support::wait_until(Duration::from_secs(5), || Some(events(path, event)).filter(|e| e.len() >= n))
        .unwrap_or_else(|| panic!("fewer than {n} {event}: {}", std::fs::read_to_string(path).unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_retrying_an_old_password() {
    let p = proxy().await;
    let phone: IpAddr = "127.0.0.71".parse().unwrap();
    let mut c = connect(&p.proxy, Some(phone), ("iPhone Mail", "17.1")).await;
    for i in 0..5 {
        let no = c.command(&format!("o{i}"), "LOGIN alice@example.org the-old-password").await.unwrap();
        assert!(no.tagged.contains("NO [AUTHENTICATIONFAILED]"), "{no:?}");
    }
    let stale = wait_events(&p.audit, "stale_password", 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(events(&p.audit, "stale_password").len(), 1, "rate-limited: one event for the account");
    let e = &stale[0];
    assert_eq!((e["user"].as_str(), e["client_ip"].as_str()), (Some("alice@example.org"), Some("127.0.0.71")));
    assert_eq!((e["client_app"].as_str(), e["count"].as_u64()), (Some("iPhone Mail 17.1"), Some(2)));
    assert!(e["first_seen"].is_string() && e["last_seen"].is_string());
    let listed = attention(&p.proxy).await;
    let entry = &listed["stale_passwords"][0];
    assert_eq!((entry["user"].as_str(), entry["count"].as_u64()), (Some("alice@example.org"), Some(5)), "{listed}");
    assert!(entry["summary"].as_str().unwrap().contains("iPhone Mail"), "{entry}");
    // The phone is one failure for the defence, the rest refused as repeats.
    assert_eq!(
        metric(&p.proxy, "imapgate_auth_attempts_total{mechanism=\"LOGIN-command\",result=\"repeated_failure\"}").await,
        4.0
    );
    p.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appending_until_over_quota() {
    let p = proxy().await;
    let mut c = connect(&p.proxy, None, ("Thunderbird", "128.4.1")).await;
    login(&mut c, "quota@example.org", "quota-pw").await;
    let message = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(16 * 1024));
    let (mut ok, mut refused) = (0, 0);
    for i in 0..10 {
        let tag = format!("a{i}");
        c.send(format!("{tag} APPEND INBOX {{{}+}}\r\n{message}\r\n", message.len()).as_bytes()).await.unwrap();
        let reply = c.until_tagged(&tag).await.unwrap();
        if reply.tagged.contains("NO [OVERQUOTA]") {
            refused += 1;
            if refused == 2 {
                break;
            }
        } else {
            assert!(reply.tagged.starts_with(&format!("{tag} OK")), "{reply:?}");
            ok += 1;
        }
    }
    assert_eq!(refused, 2, "Dovecot's quota refused the appends over 48K");
    assert!(ok >= 1);
    let series = |status: &str, code: &str| {
        format!("imapgate_command_responses_total{{code=\"{code}\",command=\"APPEND\",status=\"{status}\"}}")
    };
    assert_eq!(metric(&p.proxy, &series("NO", "OVERQUOTA")).await, 2.0);
    assert_eq!(metric(&p.proxy, &series("OK", "APPENDUID")).await, f64::from(ok));
    let event = &wait_events(&p.audit, "over_quota", 1)[0];
    assert_eq!((event["user"].as_str(), event["reason"].as_str()), (Some("quota@example.org"), Some("APPEND")));
    assert_eq!(event["client_app"], "Thunderbird 128.4.1");
    assert_eq!(events(&p.audit, "over_quota").len(), 1, "rate-limited");
    let listed = attention(&p.proxy).await;
    assert_eq!(
        (listed["over_quota"][0]["user"].as_str(), listed["over_quota"][0]["count"].as_u64()),
        (Some("quota@example.org"), Some(2))
    );
    c.command("z", "LOGOUT").await.unwrap();
    p.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_re_downloading_a_whole_mailbox() {
    let p = proxy().await;
    let mut c = connect(&p.proxy, None, ("Microsoft Outlook", "16.0")).await;
    login(&mut c, "fetcher@example.org", "fetch-pw").await;
    let select = c.command("s", "SELECT INBOX").await.unwrap();
    assert!(select.lines.iter().any(|l| l == "* 3 EXISTS"), "{select:?}");
    let mut bytes = 0u64;
    for i in 0..4 {
        let fetch = c.command(&format!("f{i}"), "FETCH 1:* BODY.PEEK[]").await.unwrap();
        assert_eq!(fetch.literals.len(), 3);
        if i < 3 {
            bytes += fetch.literals.iter().map(|l| l.len() as u64).sum::<u64>();
        }
        // A partial or header fetch is no resync.
        c.command(&format!("h{i}"), "FETCH 1:* (FLAGS BODY.PEEK[HEADER])").await.unwrap();
    }
    assert_eq!(metric(&p.proxy, "imapgate_resync_suspected_total").await, 1.0, "the third counts, once");
    let event = &wait_events(&p.audit, "resync_suspected", 1)[0];
    assert_eq!((event["user"].as_str(), event["mailbox"].as_str()), (Some("fetcher@example.org"), Some("INBOX")));
    assert_eq!((event["count"].as_u64(), event["bytes"].as_u64()), (Some(3), Some(bytes)), "{event}");
    assert_eq!(event["client_app"], "Microsoft Outlook 16.0");
    assert_eq!(event["window_secs"], 3600);
    let listed = attention(&p.proxy).await;
    let resync = &listed["resyncs"][0];
    assert_eq!(
        (resync["mailbox"].as_str(), resync["fetches"].as_u64(), resync["exists"].as_u64()),
        (Some("INBOX"), Some(4), Some(3))
    );
    // The SELECT is timed by its size class and listed among the slowest.
    assert_eq!(metric(&p.proxy, "imapgate_select_duration_seconds_count{size=\"lt_1k\"}").await, 1.0);
    let slow = listed["slow_mailboxes"].as_array().unwrap();
    assert!(
        slow.iter().any(|m| m["user"] == "fetcher@example.org" && m["mailbox"] == "INBOX" && m["exists"] == 3),
        "{listed}"
    );
    // Client families, from ID: never a user name in a label.
    assert_eq!(metric(&p.proxy, "imapgate_clients_total{client=\"outlook\"}").await, 1.0);
    let text = support::admin_get(p.proxy.admin, "/metrics").await.1;
    assert!(!text.contains("fetcher@example.org") && !text.contains("INBOX"), "no names in metrics");
    c.command("z", "LOGOUT").await.unwrap();
    p.proxy.stop().await;
}
