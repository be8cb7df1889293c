//! IMAP and the organisation's web server on one port, with real parts: Debian's nginx (its own
//! certificate, a PROXY v2 listener) behind an imapgate shared listener, and a real Dovecot.
//! - curl through imapgate gets nginx's page and sees nginx's certificate; nginx logs the client's address
//!   from the PROXY header;
//! - clients offering ALPN `imap` (rustls, Python's imaplib, openssl s_client) and curl `imaps://` (the
//!   IMAP name, no ALPN) log in to Dovecot and read the mailbox;
//! - a ClientHello sent byte by byte is routed; a plain-HTTP request, an oversized ClientHello and one
//!   that stalls halfway are closed within the deadline;
//! - a banned address gets neither service.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::client::{self, TlsClient};
use support::nginx::Nginx;
use support::proxy::{TestProxy, backend, config_text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The web site's own certificate (another issuer, another name than imapgate's).
fn web_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["web.test".to_owned()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "web.test");
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join("web.pem"), dir.join("web.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

struct Setup {
    proxy: TestProxy,
    nginx: Nginx,
    shared: SocketAddr,
    ca: PathBuf,
}

async fn setup() -> Setup {
    let env = support::env("shared-port", &[]);
    // A message for bob, so that his mailbox exists (a first delivery makes it).
    env.dovecot.deliver("bob@example.com", "1.shared", b"Subject: over 443\r\n\r\nhello\r\n");
    let dir = support::scratch_dir("imapgate-shared-port-");
    let (cert, key) = web_certificate(&dir);
    let nginx = Nginx::start_web(&cert, &key);
    let shared_port = support::free_port();
    let rest = format!(
        "{}\n[route]\ndefault = \"mbox\"\n[[server.shared_listen]]\nlisten = \"127.0.0.1:{shared_port}\"\n\
         web = \"{}\"\nimap_names = [\"localhost\"]\nsend_proxy = \"v2\"\n\
         [defence]\ntarpit_ms = [20]\nconnection_rate_per_minute = 100000\nconnection_burst = 1000\n\
         auth_in_flight = 20\nfailures = 1\n",
        backend("mbox", env.dovecot.imap_port),
        nginx.addr
    );
    // A short handshake deadline bounds the ClientHello too.
    let text = config_text(&env.pki, &rest).replace("handshake_timeout_secs = 5\n", "handshake_timeout_secs = 3\n");
    let proxy = TestProxy::start(&text).await;
    let shared = format!("127.0.0.1:{shared_port}").parse().unwrap();
    Setup { proxy, nginx, shared, ca: env.pki.ca.clone() }
}

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl").args(["-sS", "--max-time", "10"]).args(args).output().expect("curl (Debian package 'curl')")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_and_imap_share_the_port() {
    let s = setup().await;
    let port = s.shared.port().to_string();
    let resolve = format!("web.test:{port}:127.0.0.1");
    let url = format!("https://web.test:{port}/");

    // The web site through imapgate, from 127.0.0.9: nginx's page, nginx's certificate, the client's address.
    let out = curl(&["-k", "--interface", "127.0.0.9", "--resolve", &resolve, &url]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from nginx\n", "{out:?}");
    let subject = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername web.test </dev/null 2>/dev/null | openssl x509 -noout -subject"
        ))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&subject.stdout).contains("web.test"), "{subject:?}");
    let logged = support::wait_until(Duration::from_secs(5), || {
        let log = s.nginx.access_log();
        log.lines().any(|l| l.starts_with("127.0.0.9 127.0.0.1 \"GET / HTTP/1.1\" 200")).then_some(log)
    });
    assert!(logged.is_some(), "nginx did not log the client's address: {}", s.nginx.access_log());

    // IMAP on the same port: ALPN imap (and no IMAP name needed), then curl imaps:// by name without ALPN.
    let config = client::tls_config(&s.ca, &[b"imap"]);
    let mut c = TlsClient::connect_with(s.shared, config).await.unwrap();
    assert!(c.line().await.unwrap().starts_with("* OK"));
    let ok = c.command("a", "LOGIN bob@example.com bob-pw").await.unwrap();
    assert!(ok.tagged.starts_with("a OK"), "{ok:?}");
    let selected = c.command("b", "SELECT INBOX").await.unwrap();
    assert!(selected.tagged.starts_with("b OK") && selected.lines.iter().any(|l| l.contains("EXISTS")), "{selected:?}");
    let out = curl(&[
        "--cacert",
        s.ca.to_str().unwrap(),
        "--user",
        "bob@example.com:bob-pw",
        &format!("imaps://localhost:{port}/"),
    ]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("INBOX"), "curl imaps: {out:?}");

    // Python's imaplib with ALPN imap: logs in and reads the mailbox.
    let script = format!(
        "import imaplib, ssl\nctx = ssl.create_default_context(cafile={ca:?})\nctx.set_alpn_protocols(['imap'])\n\
         m = imaplib.IMAP4_SSL('127.0.0.1', {port}, ssl_context=ctx, timeout=10)\n\
         print(m.login('bob@example.com', 'bob-pw')[0])\nprint(m.select('INBOX')[0])\nm.logout()\n",
        ca = s.ca.display().to_string()
    );
    let out = Command::new("python3").arg("-c").arg(&script).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "OK\nOK\n", "imaplib: {out:?}");
    // openssl s_client with ALPN imap (server name web.test: the ALPN decides).
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "(sleep 1; printf 'a LOGIN bob@example.com bob-pw\\r\\n'; sleep 1; printf 'b SELECT INBOX\\r\\n'; sleep 1; printf 'z LOGOUT\\r\\n'; sleep 1) | \
             timeout 10 openssl s_client -quiet -connect 127.0.0.1:{port} -servername web.test -alpn imap -CAfile {} 2>/dev/null",
            s.ca.display()
        ))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("a OK") && said.contains("b OK"), "openssl s_client -alpn imap: {said}");

    let text = support::admin_get(s.proxy.admin, "/metrics").await.1;
    assert!(support::sample(&text, "imapgate_shared_listen_hellos_total{route=\"web\"}") >= 2.0, "{text}");
    assert!(support::sample(&text, "imapgate_shared_listen_hellos_total{route=\"imap\"}") >= 2.0, "{text}");
    let target = s.nginx.addr.to_string();
    let relayed = format!("imapgate_passthrough_connections_total{{result=\"relayed\",target=\"{target}\"}}");
    assert!(support::sample(&text, &relayed) >= 1.0, "{text}");
    s.proxy.stop().await;
}

/// Connects and writes `bytes` (in pieces of `step` with a pause between); returns how long until the
/// proxy closed the connection, and what it sent.
async fn closed_after(addr: SocketAddr, bytes: &[u8], step: usize) -> (Duration, Vec<u8>) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    for piece in bytes.chunks(step.max(1)) {
        if tcp.write_all(piece).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut got)).await;
    (started.elapsed(), got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_starts_are_closed_within_the_deadline() {
    let s = setup().await;
    // Plain HTTP on the TLS port: closed at once, nothing forwarded.
    let (took, got) = closed_after(s.shared, b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n", 64).await;
    assert!(took < Duration::from_secs(1) && got.is_empty(), "{took:?} {got:?}");
    // Half a ClientHello, then silence: closed at the handshake deadline (3 s here).
    let (took, _) = closed_after(s.shared, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01], 64).await;
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(6), "{took:?}");
    // A record header promising more than a ClientHello may take, and that much: closed.
    let mut big = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0xff, 0xff];
    big.resize(40 * 1024, 0x41);
    let (took, _) = closed_after(s.shared, &big, 4096).await;
    assert!(took < Duration::from_secs(4), "{took:?}");
    // A real ClientHello split byte by byte (a forwarder between rustls and the port): routed, logged in.
    let forwarder = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let via = forwarder.local_addr().unwrap();
    let target = s.shared;
    tokio::spawn(async move {
        let (mut inbound, _) = forwarder.accept().await.unwrap();
        let mut outbound = tokio::net::TcpStream::connect(target).await.unwrap();
        outbound.set_nodelay(true).unwrap();
        let mut first = vec![0u8; 4096];
        let n = inbound.read(&mut first).await.unwrap();
        for byte in &first[..n] {
            outbound.write_all(&[*byte]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
    });
    let mut c = TlsClient::connect_with(via, client::tls_config(&s.ca, &[b"imap"])).await.unwrap();
    assert!(c.line().await.unwrap().starts_with("* OK"));
    let text = support::admin_get(s.proxy.admin, "/metrics").await.1;
    for route in ["not_tls", "timeout"] {
        let series = format!("imapgate_shared_listen_hellos_total{{route=\"{route}\"}}");
        assert!(support::sample(&text, &series) >= 1.0, "{series}\n{text}");
    }
    let refused = support::sample(&text, "imapgate_shared_listen_hellos_total{route=\"oversized\"}")
        + support::sample(&text, "imapgate_shared_listen_hellos_total{route=\"malformed\"}");
    assert!(refused >= 1.0, "{text}");
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_address_gets_neither_service() {
    let s = setup().await;
    let source: std::net::IpAddr = "127.0.0.66".parse().unwrap();
    // Two wrong passwords over IMAP on the shared port: over a budget of 1, banned.
    for guess in ["guess-1", "guess-2"] {
        let mut c =
            TlsClient::connect_from(Some(source), s.shared, client::tls_config(&s.ca, &[b"imap"])).await.unwrap();
        assert!(c.line().await.unwrap().starts_with("* OK"));
        let tagged = c.command("l", &format!("LOGIN bob@example.com {guess}")).await.unwrap().tagged;
        assert!(tagged.starts_with("l NO"), "{tagged}");
    }
    assert!(s.proxy.defence.is_banned(source));
    let imap = TlsClient::connect_from(Some(source), s.shared, client::tls_config(&s.ca, &[b"imap"])).await;
    assert!(imap.is_err(), "IMAP for a banned address");
    let port = s.shared.port().to_string();
    let out = curl(&[
        "-k",
        "--interface",
        "127.0.0.66",
        "--resolve",
        &format!("web.test:{port}:127.0.0.1"),
        &format!("https://web.test:{port}/"),
    ]);
    assert!(!out.status.success() && out.stdout.is_empty(), "the web for a banned address: {out:?}");
    assert!(!s.nginx.access_log().contains("127.0.0.66"), "{}", s.nginx.access_log());
    s.proxy.stop().await;
}
