//! No log line ever contains a password, whatever the mechanism, the outcome or the log level.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use base64::Engine;
use support::Capture;
use support::client::TlsClient;
use support::dovecot::Dovecot;
use support::proxy::{TestProxy, backend, config_text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_the_log() {
    let capture = Capture::install();
    let dir = support::scratch_dir("imapgate-secrets-");
    let pki = support::pki::Pki::generate(&dir);
    let dovecot = Dovecot::start("secrets", &pki, &[]);
    let rest = format!("{}\n[route]\ndefault = \"mbox\"\n", backend("mbox", dovecot.imap_port));
    let proxy = TestProxy::start(&config_text(&pki, &rest)).await;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);

    let wrong = "Wr0ng-Passw0rd-xyz";
    let (mut c, _) = TlsClient::greeted(proxy.addr, &pki.ca).await;
    c.command("a", &format!("LOGIN bob@example.com {wrong}")).await.unwrap();
    c.command("b", &format!("AUTHENTICATE PLAIN {}", b64(&format!("\0bob@example.com\0{wrong}")))).await.unwrap();
    c.send(format!("c LOGIN {{15}}\r\nbob@example.com {{{}+}}\r\n{wrong}\r\n", wrong.len()).as_bytes()).await.unwrap();
    c.until_tagged("c").await.unwrap();
    let ok = c.command("d", "LOGIN bob@example.com bob-pw").await.unwrap();
    assert!(ok.tagged.starts_with("d OK"), "{ok:?}");
    c.command("e", "LOGOUT").await.unwrap();
    let (mut c, _) = TlsClient::greeted(proxy.addr, &pki.ca).await;
    c.send(b"f AUTHENTICATE LOGIN\r\n").await.unwrap();
    c.line().await.unwrap();
    c.send(format!("{}\r\n", b64("carol@example.org")).as_bytes()).await.unwrap();
    c.line().await.unwrap();
    c.send(format!("{}\r\n", b64("sp ace\"quo\\te{5}")).as_bytes()).await.unwrap();
    assert!(c.until_tagged("f").await.unwrap().tagged.starts_with("f OK"));
    proxy.stop().await;

    let log = capture.text();
    assert!(log.contains("bob@example.com"), "the log should name the user");
    assert!(log.contains("login failed") && log.contains("\"login\""), "{log}");
    for secret in [wrong, "bob-pw", "sp ace", "quo\\\\te", &b64(wrong), &b64(&format!("\0bob@example.com\0{wrong}"))] {
        assert!(!log.contains(secret), "secret {secret:?} found in the log:\n{log}");
    }
}
