//! The audit log through a real Dovecot: one JSON object per line, field by field, reopened on SIGHUP,
//! and never a password.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::client::TlsClient;
use support::dovecot::Dovecot;
use support::pki::Pki;
use support::proxy::{TestProxy, backend, config_text};

fn events(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_success_failure_ban_and_end_without_secrets() {
    let dir = support::scratch_dir("imapgate-audit-");
    let pki = Pki::generate(&dir);
    let dovecot = Dovecot::start("audit", &pki, &[]);
    let audit = dir.join("audit.log");
    let rest = format!(
        "{}\n[route]\ndefault = \"mbox\"\n[audit]\npath = \"{}\"\n[defence]\nfailures = 2\ntarpit_ms = [10]\nban_secs = 1\n",
        backend("mbox", dovecot.imap_port),
        audit.display()
    );
    let proxy = TestProxy::start(&config_text(&pki, &rest)).await;
    let proxy_addr = proxy.addr;
    let wrong = "Secret-Wrong-Pw-913";
    let source = Some("127.0.0.41".parse().unwrap());
    let config = support::client::tls_config(&pki.ca, &[b"imap"]);

    let mut c = TlsClient::connect_from(source, proxy.addr, config.clone()).await.unwrap();
    let client_port = c.local_port();
    c.line().await.unwrap();
    let ok = c.command("a1", "LOGIN bob@example.com bob-pw").await.unwrap();
    assert!(ok.tagged.starts_with("a1 OK"));
    c.command("a2", "NOOP").await.unwrap();
    c.command("a3", "LOGOUT").await.unwrap();
    drop(c);

    let mut c = TlsClient::connect_from(source, proxy.addr, config.clone()).await.unwrap();
    c.line().await.unwrap();
    for i in 0..3 {
        c.command(&format!("b{i}"), &format!("LOGIN bob@example.com {wrong}{i}")).await.unwrap();
    }
    let refused = c.command("b9", "LOGIN bob@example.com bob-pw").await.unwrap();
    assert!(refused.tagged.contains("[UNAVAILABLE]"), "{refused:?}");
    drop(c);
    // The ban lifts within a second or two (the sweep runs every second).
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // logrotate: move the file away, SIGHUP, and the next events go to a new file.
    std::fs::rename(&audit, dir.join("audit.log.1")).unwrap();
    let pid = std::process::id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = TlsClient::connect_from(source, proxy.addr, config).await.unwrap();
    c.line().await.unwrap();
    c.command("c1", "LOGOUT").await.unwrap();
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.stop().await;

    let old = events(&dir.join("audit.log.1"));
    let new = events(&audit);
    let of = |name: &str| old.iter().filter(|e| e["event"] == name).cloned().collect::<Vec<_>>();

    let success = &of("auth_success")[0];
    assert_eq!(success["user"], "bob@example.com");
    assert_eq!(success["client_ip"], "127.0.0.41");
    assert_eq!(success["client_port"], client_port);
    assert_eq!(success["mechanism"], "LOGIN-command");
    assert_eq!(success["backend"], "mbox");
    assert_eq!(success["result"], "success");
    assert_eq!(success["tls_version"], "TLSv1.3");
    assert_eq!(success["sni"], "localhost");
    // The test client offers AES-256-GCM first; the proxy's order (AES-128-GCM first) decides.
    assert_eq!(success["tls_cipher"], "TLS13_AES_128_GCM_SHA256");
    assert!(success["session"].as_str().unwrap().len() >= 16);
    assert!(success["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(success["listener"], proxy_addr.to_string());

    let failures = of("auth_failure");
    assert_eq!(failures.len(), 3);
    assert_eq!(failures[0]["reason"], "client/auth_failed");
    assert_eq!(failures[0]["result"], "bad_credentials");
    let banned = &of("banned")[0];
    assert_eq!(banned["prefix"], "127.0.0.41/32");
    assert_eq!(banned["user"], "bob@example.com");
    assert_eq!(banned["ban_secs"], 1);
    assert_eq!(of("rate_limited")[0]["reason"], "banned");
    assert_eq!(of("unbanned")[0]["prefix"], "127.0.0.41/32");
    let ends = of("session_end");
    assert_eq!(ends.len(), 2);
    assert_eq!(ends[0]["user"], "bob@example.com");
    assert_eq!(ends[0]["commands"], 2);
    assert!(ends[0]["bytes_to_client"].as_u64().unwrap() > 0);
    assert!(ends[0]["duration_ms"].is_u64());
    assert_eq!(of("session_start").len(), 2);

    assert_eq!(new.iter().map(|e| e["event"].as_str().unwrap()).collect::<Vec<_>>(), ["session_start", "session_end"]);

    let everything = format!(
        "{}{}",
        std::fs::read_to_string(dir.join("audit.log.1")).unwrap(),
        std::fs::read_to_string(&audit).unwrap()
    );
    for secret in ["bob-pw", wrong] {
        assert!(!everything.contains(secret), "{secret} in the audit log");
    }
}

/// A FIFO nobody reads, already full: every write to it blocks.
fn stalled_fifo(dir: &std::path::Path) -> (std::path::PathBuf, std::fs::File, std::fs::File) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    const O_NONBLOCK: i32 = 0o4000;
    let path = dir.join("audit.fifo");
    assert!(std::process::Command::new("mkfifo").arg(&path).status().unwrap().success());
    let reader = std::fs::OpenOptions::new().read(true).custom_flags(O_NONBLOCK).open(&path).unwrap();
    let mut writer = std::fs::OpenOptions::new().write(true).custom_flags(O_NONBLOCK).open(&path).unwrap();
    let chunk = [b'x'; 4096];
    for _ in 0..10_000 {
        if writer.write(&chunk).is_err() {
            break;
        }
    }
    (path, reader, writer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_audit_writer_never_stalls_a_session() {
    let dir = support::scratch_dir("imapgate-audit-stall-");
    let pki = Pki::generate(&dir);
    let dovecot = Dovecot::start("audit-stall", &pki, &[]);
    let (fifo, _reader, _writer) = stalled_fifo(&dir);
    let rest = format!(
        "{}\n[route]\ndefault = \"mbox\"\n[audit]\npath = \"{}\"\nqueue_lines = 4\n",
        backend("mbox", dovecot.imap_port),
        fifo.display()
    );
    let proxy = TestProxy::start(&config_text(&pki, &rest)).await;
    let sessions = async {
        for i in 0..5 {
            let (mut c, _) = TlsClient::greeted(proxy.addr, &pki.ca).await;
            let ok = c.command(&format!("a{i}"), "LOGIN bob@example.com bob-pw").await.unwrap();
            assert!(ok.tagged.starts_with(&format!("a{i} OK")), "{ok:?}");
            c.command("z", "LOGOUT").await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(20), sessions).await.expect("sessions stalled behind the audit log");
    let (_, metrics) = support::admin_get(proxy.admin, "/metrics").await;
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("imapgate_audit_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(dropped >= 1.0, "nothing counted as dropped:\n{metrics}");
    tokio::time::timeout(Duration::from_secs(10), proxy.stop()).await.expect("shutdown stalled behind the audit log");
}
