//! Metrics after scripted sessions through a real Dovecot, scraped from the admin server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::admin_get as get;

use std::time::Duration;

use base64::Engine;
use support::client::TlsClient;
use support::proxy::{TestProxy, backend, config_text};

fn env() -> &'static support::Env {
    support::env("monitoring", &[])
}

async fn proxy() -> TestProxy {
    support::proxy::in_front_of(&env().pki, env().dovecot.imap_port, "").await
}

/// The value of one sample line, e.g. `imapgate_commands_total{command="SELECT",status="OK"}`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_auth_and_sessions_are_counted_exactly() {
    let env = env();
    let body = "Subject: tricky\r\n\r\na line\r\nz9 OK this is message data, not a response\r\n";
    env.dovecot.deliver("fetcher@example.org", "1.tricky", body.as_bytes());
    let proxy = proxy().await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    assert!(c.command("a0", "LOGIN fetcher@example.org nope").await.unwrap().tagged.starts_with("a0 NO"));
    let ir = base64::engine::general_purpose::STANDARD.encode("\0fetcher@example.org\0fetch-pw");
    assert!(c.command("a1", &format!("AUTHENTICATE PLAIN {ir}")).await.unwrap().tagged.starts_with("a1 OK"));
    assert!(c.command("a2", "SELECT INBOX").await.unwrap().tagged.starts_with("a2 OK"));
    assert!(c.command("a3", "UID FETCH 1:* (FLAGS)").await.unwrap().tagged.starts_with("a3 OK"));
    let fetch = c.command("a4", "UID FETCH 1 (BODY.PEEK[])").await.unwrap();
    assert!(fetch.tagged.starts_with("a4 OK"), "{fetch:?}");
    c.send(b"a5 IDLE\r\n").await.unwrap();
    assert!(c.line().await.unwrap().starts_with('+'));
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.send(b"DONE\r\n").await.unwrap();
    assert!(c.until_tagged("a5").await.unwrap().tagged.starts_with("a5 OK"));
    assert!(c.command("a6", "XYZZY").await.unwrap().tagged.starts_with("a6 BAD"));
    c.command("a7", "LOGOUT").await.unwrap();
    let _ = c.rest().await;
    drop(c);
    // The session's end is recorded when the relay finishes.
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = get(proxy.admin, "/metrics").await.1;
        if sample(&metrics, "imapgate_session_duration_seconds_count") == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expect = |series: &str, value: f64| {
        assert_eq!(sample(&metrics, series), Some(value), "{series}\n{metrics}");
    };
    expect(r#"imapgate_commands_total{command="SELECT",status="OK"}"#, 1.0);
    expect(r#"imapgate_commands_total{command="UID FETCH",status="OK"}"#, 2.0);
    expect(r#"imapgate_commands_total{command="IDLE",status="OK"}"#, 1.0);
    expect(r#"imapgate_commands_total{command="other",status="BAD"}"#, 1.0);
    expect(r#"imapgate_commands_total{command="LOGOUT",status="OK"}"#, 1.0);
    expect(r#"imapgate_command_duration_seconds_count{command="UID FETCH"}"#, 2.0);
    expect("imapgate_idle_duration_seconds_count", 1.0);
    assert!(sample(&metrics, "imapgate_idle_duration_seconds_sum").unwrap() >= 0.3);
    expect(r#"imapgate_auth_attempts_total{mechanism="LOGIN-command",result="bad_credentials"}"#, 1.0);
    expect(r#"imapgate_auth_attempts_total{mechanism="PLAIN",result="success"}"#, 1.0);
    expect("imapgate_connections_accepted_total", 1.0);
    expect(r#"imapgate_tls_sessions_total{sni="yes",version="TLSv1.3"}"#, 1.0);
    expect(r#"imapgate_tls_handshakes_total{kind="full",leg="client"}"#, 1.0);
    expect(r#"imapgate_tls_handshakes_total{kind="resumed",leg="client"}"#, 0.0);
    // Backend handshakes: the logins' connections, the pool's and the health checks' (how many of
    // those resume depends on which Dovecot process took the ticket's connection).
    assert!(
        sample(&metrics, r#"imapgate_tls_handshakes_total{kind="full",leg="backend"}"#).unwrap()
            + sample(&metrics, r#"imapgate_tls_handshakes_total{kind="resumed",leg="backend"}"#).unwrap()
            >= 2.0,
        "{metrics}"
    );
    expect(r#"imapgate_backend_sessions_active{backend="mbox"}"#, 0.0);
    expect(r#"imapgate_backend_up{backend="mbox"}"#, 1.0);
    expect(r#"imapgate_backend_login_duration_seconds_count{backend="mbox"}"#, 2.0);
    expect("imapgate_session_duration_seconds_count", 1.0);
    expect("imapgate_observer_desync_total", 0.0);
    assert!(
        sample(&metrics, r#"imapgate_relayed_bytes_total{direction="backend_to_client"}"#).unwrap() > body.len() as f64
    );
    assert_eq!(get(proxy.admin, "/healthz").await.0, 200);
    assert_eq!(get(proxy.admin, "/readyz").await.0, 200);
    assert_eq!(get(proxy.admin, "/nope").await.0, 404);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_tls_failures_are_counted() {
    let env = env();
    let rest = format!(
        "{}\n[route]\ndefault = \"mbox\"\n[defence]\ndeny = [\"127.0.0.31/32\"]\n",
        backend("mbox", env.dovecot.imap_port)
    );
    let proxy = TestProxy::start(&config_text(&env.pki, &rest)).await;
    let config = support::client::tls_config(&env.pki.ca, &[b"imap"]);
    assert!(TlsClient::connect_from(Some("127.0.0.31".parse().unwrap()), proxy.addr, config).await.is_err());
    let h2 = support::client::tls_config(&env.pki.ca, &[b"h2"]);
    assert!(TlsClient::connect_with(proxy.addr, h2).await.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let metrics = get(proxy.admin, "/metrics").await.1;
    assert_eq!(sample(&metrics, r#"imapgate_connections_refused_total{reason="deny_list"}"#), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, r#"imapgate_tls_handshake_failures_total{reason="alpn"}"#), Some(1.0), "{metrics}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_when_no_backend_is_reachable() {
    let env = env();
    let rest = format!("{}\n[route]\ndefault = \"down\"\n", backend("down", support::free_port()));
    let proxy = TestProxy::start(&config_text(&env.pki, &rest)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(proxy.admin, "/readyz").await.0, 503);
    assert_eq!(get(proxy.admin, "/healthz").await.0, 200);
    proxy.stop().await;
}
