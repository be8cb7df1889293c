//! The STARTTLS listener (port 143) through a real Dovecot: logins in clear are refused and never reach
//! the backend nor count as failures; commands pipelined behind STARTTLS are discarded (CVE-2011-0411's
//! class); openssl's `s_client -starttls imap` and Python's `imaplib` log in and fetch; a client that never
//! finishes the handshake is dropped by the handshake timeout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use support::client::{self, ImapClient, TlsClient};
use support::proxy::{TestProxy, backend, config_text};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const USER: &str = "st-user@example.org";
const PASSWORD: &str = "st-pw";

fn env() -> &'static support::Env {
    static EXTRA: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    support::env("starttls", EXTRA.get_or_init(|| vec![(USER.into(), PASSWORD.into())]))
}

async fn proxy(server: &str) -> TestProxy {
    let env = env();
    let rest = format!("{}\n[route]\ndefault = \"mbox\"\n", backend("mbox", env.dovecot.imap_port));
    let text = config_text(&env.pki, &rest).replacen(
        "[server]\n",
        &format!("[server]\nstarttls_listen = [\"127.0.0.1:0\"]\n{server}\n"),
        1,
    );
    TestProxy::start(&text).await
}

async fn plain(addr: SocketAddr) -> (ImapClient<TcpStream>, String) {
    let mut c = ImapClient::new(TcpStream::connect(addr).await.unwrap());
    let greeting = c.line().await.unwrap();
    (c, greeting)
}

/// STARTTLS answered: the TLS handshake over the same connection.
async fn upgrade(c: ImapClient<TcpStream>) -> TlsClient {
    let config = client::tls_config(&env().pki.ca, &[b"imap"]);
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), c.into_inner())
        .await
        .expect("TLS after STARTTLS");
    TlsClient::new(tls)
}

fn dovecot_lines_for(user: &str) -> usize {
    env().dovecot.log().lines().filter(|l| l.contains(&format!("user=<{user}>"))).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_in_clear_are_refused_never_reach_dovecot_and_never_count() {
    let proxy = proxy("").await;
    let addr = proxy.starttls.unwrap();
    let (mut c, greeting) = plain(addr).await;
    assert!(greeting.starts_with("* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED]"), "{greeting}");
    assert!(!greeting.contains("AUTH="), "{greeting}");
    let caps = c.command("a", "CAPABILITY").await.unwrap();
    assert_eq!(caps.lines[0], "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED");
    // Ten logins in clear, with each mechanism: refused, not forwarded, not counted by the defence.
    for i in 0..10 {
        let login = c.command(&format!("l{i}"), &format!("LOGIN {USER} {PASSWORD}")).await.unwrap();
        assert!(login.tagged.starts_with(&format!("l{i} NO [PRIVACYREQUIRED]")), "{login:?}");
    }
    let plain_ir = c.command("p", "AUTHENTICATE PLAIN AHN0LXVzZXJAZXhhbXBsZS5vcmcAc3QtcHc=").await.unwrap();
    assert!(plain_ir.tagged.starts_with("p NO [PRIVACYREQUIRED]"), "{plain_ir:?}");
    let plain_cont = c.command("q", "AUTHENTICATE PLAIN").await.unwrap();
    assert!(plain_cont.tagged.starts_with("q NO [PRIVACYREQUIRED]") && plain_cont.lines.len() == 1, "{plain_cont:?}");
    assert!(!proxy.defence.is_banned("127.0.0.1".parse().unwrap()));
    let text = support::admin_get(proxy.admin, "/metrics").await.1;
    assert!(!text.lines().any(|l| l.starts_with("imapgate_auth_attempts_total{") && !l.ends_with(" 0")), "{text}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(dovecot_lines_for(USER), 0, "nothing reached Dovecot");

    // Then STARTTLS, and the session goes on as on 993, without a second greeting.
    assert_eq!(c.command("s", "STARTTLS").await.unwrap().tagged, "s OK Begin TLS negotiation now.");
    let mut tls = upgrade(c).await;
    let caps = tls.command("c", "CAPABILITY").await.unwrap();
    assert!(caps.lines[0].contains("AUTH=PLAIN") && !caps.lines[0].contains("STARTTLS"), "{caps:?}");
    assert!(tls.command("l", &format!("LOGIN {USER} {PASSWORD}")).await.unwrap().tagged.starts_with("l OK"));
    assert!(tls.command("n", "NOOP").await.unwrap().tagged.starts_with("n OK"));
    assert!(env().dovecot.wait_for_log_line(&["Login: ", &format!("user=<{USER}>")]).is_some());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pipelined_behind_starttls_are_discarded() {
    let proxy = proxy("").await;
    let (mut c, _) = plain(proxy.starttls.unwrap()).await;
    c.send(b"a STARTTLS\r\nb CAPABILITY\r\nx LOGIN st-user@example.org st-pw\r\n").await.unwrap();
    assert_eq!(c.line().await.unwrap(), "a OK Begin TLS negotiation now.");
    let mut tls = upgrade(c).await;
    // Nothing arrives for b or x inside TLS...
    let early = tokio::time::timeout(Duration::from_millis(500), tls.line()).await;
    assert!(early.is_err(), "answered a pipelined command inside TLS: {early:?}");
    // ...and the first command sent over TLS is the first one answered.
    let caps = tls.command("c", "CAPABILITY").await.unwrap();
    assert_eq!(caps.tagged, "c OK Capability completed.");
    assert_eq!(caps.lines.len(), 2, "{caps:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_and_python_log_in_and_fetch_over_starttls() {
    let env = env();
    let message = b"From: a@example.org\r\nSubject: over starttls\r\n\r\nmarker-0411\r\n";
    env.dovecot.deliver("fetcher@example.org", "1.starttls", message);
    let proxy = proxy("").await;
    let port = proxy.starttls.unwrap().port();

    let mut openssl = Command::new("openssl")
        .args(["s_client", "-starttls", "imap", "-crlf", "-quiet", "-ign_eof", "-verify_return_error"])
        .args(["-connect", &format!("127.0.0.1:{port}"), "-servername", "localhost", "-CAfile"])
        .arg(&env.pki.ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl (scripts/test.sh installs it)");
    openssl
        .stdin
        .take()
        .unwrap()
        .write_all(b"a LOGIN fetcher@example.org fetch-pw\nb SELECT INBOX\nc FETCH 1 BODY[]\nd LOGOUT\n")
        .unwrap();
    let out = tokio::task::spawn_blocking(move || openssl.wait_with_output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("a OK") && stdout.contains("marker-0411") && stdout.contains("c OK"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let script = format!(
        "import imaplib, ssl\n\
         ctx = ssl.create_default_context(cafile={ca:?})\n\
         m = imaplib.IMAP4('127.0.0.1', {port})\n\
         assert 'STARTTLS' in m.capabilities and 'AUTH=PLAIN' not in m.capabilities, m.capabilities\n\
         m.starttls(ssl_context=ctx)\n\
         assert 'AUTH=PLAIN' in m.capabilities, m.capabilities\n\
         m.login('fetcher@example.org', 'fetch-pw')\n\
         m.select('INBOX')\n\
         typ, data = m.fetch('1', '(RFC822)')\n\
         assert typ == 'OK' and b'marker-0411' in data[0][1], data\n\
         m.logout()\n\
         print('python ok')\n",
        ca = env.pki.ca.display().to_string()
    );
    let out = Command::new("python3").arg("-c").arg(&script).output().expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("python ok"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_the_handshake_is_dropped_by_the_handshake_timeout() {
    let proxy = proxy("").await;
    let text = support::admin_get(proxy.admin, "/metrics").await.1;
    let before = support::sample(&text, "imapgate_tls_handshake_failures_total{reason=\"timeout\"}");
    // The test configuration's handshake timeout is 5 s.
    let (mut c, _) = plain(proxy.starttls.unwrap()).await;
    assert_eq!(c.command("s", "STARTTLS").await.unwrap().tagged, "s OK Begin TLS negotiation now.");
    let mut tcp = c.into_inner();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await.expect("closed in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(4500) && waited < Duration::from_secs(7), "{waited:?}");
    let series = "imapgate_tls_handshake_failures_total{reason=\"timeout\"}";
    let text = support::scrape_until(proxy.admin, series, before + 1.0, Duration::from_secs(3)).await;
    assert!(support::sample(&text, series) >= before + 1.0, "{text}");
    proxy.stop().await;
}
