//! Other TLS stacks against the proxy's client leg, with a real Dovecot behind it: OpenSSL's `s_client`
//! (key updates with `k` and `K` between IMAP commands, every TLS 1.3 suite, TLS 1.2), GnuTLS's
//! `gnutls-cli` (`^rekey^`, `^rekey1^`), Python's `ssl` (TLS 1.3 and 1.2), and a FETCH of 200 large
//! messages whose bytes are the same through the proxy, with key updates asked for in the middle, as
//! straight from Dovecot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, Write as _};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::proxy::{TestProxy, in_front_of};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USER: &str = "alice@example.org";
const HASHER: (&str, &str) = ("hasher@example.org", "hash-pw");

fn env() -> &'static support::Env {
    let env = support::env("tls-interop", &[(HASHER.0.to_owned(), HASHER.1.to_owned())]);
    // Creates the mailbox with the owner Dovecot runs as.
    env.dovecot.deliver(USER, "interop-seed", b"Subject: seed\r\n\r\nseed\r\n");
    env
}

async fn proxy() -> TestProxy {
    let env = env();
    in_front_of(&env.pki, env.dovecot.imap_port, "").await
}

/// A command-line TLS client with its output collected, driven line by line.
struct Tool {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Tool {
    fn start(program: &str, args: &[String]) -> Tool {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e} (scripts/test.sh installs it)"));
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                    output.lock().unwrap().push_str(&format!("{line}\n"));
                }
            });
        }
        Tool { child, output }
    }

    fn line(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits until the output holds `needle` `times` times.
    fn expect(&self, needle: &str, times: usize) {
        let seen = support::wait_until(Duration::from_secs(10), || {
            (self.output.lock().unwrap().matches(needle).count() >= times).then_some(())
        });
        assert!(seen.is_some(), "no {needle:?} (x{times}) in:\n{}", self.output.lock().unwrap());
    }

    fn text(&self) -> String {
        self.output.lock().unwrap().clone()
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn login_line() -> String {
    format!("a LOGIN {USER} \"{}\"", support::dovecot::password(USER))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_with_key_updates_on_every_suite_and_tls12() {
    let proxy = proxy().await;
    let ca = env().pki.ca.display().to_string();
    let connect = format!("127.0.0.1:{}", proxy.addr.port());
    let base = [
        "-connect",
        &connect,
        "-servername",
        "localhost",
        "-CAfile",
        &ca,
        "-verify_return_error",
        "-alpn",
        "imap",
        "-crlf",
    ];
    for suite in ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "tls1.2"] {
        let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        if suite == "tls1.2" {
            args.push("-tls1_2".into());
        } else {
            args.extend(["-tls1_3".into(), "-ciphersuites".into(), suite.into()]);
        }
        let mut tool = Tool::start("openssl", &[vec!["s_client".to_string()], args].concat());
        tool.expect("* OK", 1);
        tool.line(&login_line());
        tool.expect("a OK", 1);
        if suite != "tls1.2" {
            // k: a key update; K: one that asks the proxy for its own.
            tool.line("k");
            tool.expect("KEYUPDATE", 1);
            tool.line("b NOOP");
            tool.expect("b OK", 1);
            tool.line("K");
            tool.expect("KEYUPDATE", 2);
            tool.line("c SELECT INBOX");
            tool.expect("c OK", 1);
            tool.line("k");
            tool.expect("KEYUPDATE", 3);
        }
        tool.line("d NOOP");
        tool.expect("d OK", 1);
        tool.line("e LOGOUT");
        tool.expect("e OK", 1);
        let text = tool.text();
        let expected = if suite == "tls1.2" { "TLSv1.2" } else { suite };
        assert!(text.contains(expected), "{suite}: {text}");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gnutls_cli_rekeys_between_commands() {
    let proxy = proxy().await;
    for priority in ["NORMAL:-VERS-ALL:+VERS-TLS1.3", "NORMAL:-VERS-ALL:+VERS-TLS1.2"] {
        let args: Vec<String> = [
            "--port",
            &proxy.addr.port().to_string(),
            "--x509cafile",
            &env().pki.ca.display().to_string(),
            "--sni-hostname",
            "localhost",
            "--verify-hostname",
            "localhost",
            "--alpn",
            "imap",
            "--priority",
            priority,
            "--inline-commands",
            "127.0.0.1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut tool = Tool::start("gnutls-cli", &args);
        tool.expect("* OK", 1);
        // gnutls-cli sends a line as typed: IMAP's CRLF is written here (its --crlf hides inline commands).
        tool.line(&format!("{}\r", login_line()));
        tool.expect("a OK", 1);
        if priority.contains("1.3") {
            tool.line("^rekey1^");
            tool.expect("Rekey was completed", 1);
            tool.line("b NOOP\r");
            tool.expect("b OK", 1);
            tool.line("^rekey^");
            tool.expect("Rekey was completed", 2);
            tool.line("c NOOP\r");
            tool.expect("c OK", 1);
        }
        tool.line("d LOGOUT\r");
        tool.expect("d OK", 1);
    }
    proxy.stop().await;
}

const PYTHON_CLIENT: &str = r#"
import socket, ssl, sys
port, ca, user, password, version = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["imap"])
v = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
ctx.minimum_version = v
ctx.maximum_version = v
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(port)), timeout=10), server_hostname="localhost")
f = s.makefile("rb")
def until(tag):
    while True:
        line = f.readline()
        if not line:
            raise SystemExit("closed")
        if line.startswith(tag.encode() + b" "):
            return line.decode()
print(f.readline().decode().strip())
s.sendall(('a LOGIN %s "%s"\r\n' % (user, password)).encode())
print(until("a").strip())
s.sendall(b"b SELECT INBOX\r\n")
print(until("b").strip())
s.sendall(b"c LOGOUT\r\n")
print(until("c").strip())
print(s.version(), s.selected_alpn_protocol())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_ssl_on_tls13_and_tls12() {
    let proxy = proxy().await;
    for version in ["1.3", "1.2"] {
        let output = Command::new("python3")
            .args(["-c", PYTHON_CLIENT, &proxy.addr.port().to_string(), &env().pki.ca.display().to_string()])
            .args([USER, support::dovecot::password(USER), version])
            .output()
            .expect("python3");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{version}: {text}{}", String::from_utf8_lossy(&output.stderr));
        assert!(text.contains("a OK") && text.contains("b OK") && text.contains("c OK"), "{text}");
        assert!(text.contains(&format!("TLSv{version} imap")), "{text}");
    }
    proxy.stop().await;
}

/// Logs in over `stream`, FETCHes every message and returns the SHA-256 of the response before its tagged
/// line; with `rekey`, asks for a key update after every 512 KiB read.
async fn fetch_digest(
    mut stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    rekey: bool,
) -> (Vec<u8>, usize, usize) {
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut read_until =
        async |stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>, seen: &mut Vec<u8>, tag: &[u8]| {
            loop {
                if let Some(at) = seen.windows(tag.len()).position(|w| w == tag) {
                    return at;
                }
                let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await.unwrap().unwrap();
                assert!(n > 0, "closed");
                seen.extend_from_slice(&buf[..n]);
            }
        };
    read_until(&mut stream, &mut seen, b"\r\n").await;
    seen.clear();
    stream.write_all(format!("a LOGIN {} {}\r\nb SELECT INBOX\r\n", HASHER.0, HASHER.1).as_bytes()).await.unwrap();
    read_until(&mut stream, &mut seen, b"\r\nb OK").await;
    seen.clear();
    stream.write_all(b"f FETCH 1:* BODY.PEEK[]\r\n").await.unwrap();
    let (mut updates, mut next) = (0, 512 * 1024);
    let end = loop {
        let from = seen.len().saturating_sub(buf.len() + 6);
        if let Some(at) = seen[from..].windows(6).position(|w| w == b"\r\nf OK") {
            break from + at;
        }
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed mid-FETCH");
        seen.extend_from_slice(&buf[..n]);
        if rekey && seen.len() >= next {
            stream.get_mut().1.refresh_traffic_keys().unwrap();
            // The request goes out with our next record.
            stream.write_all(b"").await.unwrap();
            stream.flush().await.unwrap();
            updates += 1;
            next += 512 * 1024;
        }
    };
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &seen[..end]).as_ref().to_vec();
    (digest, end, updates)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_of_200_large_messages_with_key_updates_is_byte_for_byte_dovecot_s() {
    let env = env();
    for i in 0..200u32 {
        let body: String =
            (0..2000).map(|line| format!("message {i} line {line} {}\r\n", "x".repeat(i as usize % 40))).collect();
        env.dovecot.deliver(HASHER.0, &format!("m{i:03}"), format!("Subject: {i}\r\n\r\n{body}").as_bytes());
    }
    let proxy = proxy().await;
    let config = support::client::tls_config(&env.pki.ca, &[b"imap"]);
    let connector = tokio_rustls::TlsConnector::from(config);
    let connect = async |port: u16| {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap()
    };
    let (direct, direct_len, _) = fetch_digest(connect(env.dovecot.imaps_port).await, false).await;
    let (through, through_len, updates) = fetch_digest(connect(proxy.addr.port()).await, true).await;
    assert!(direct_len > 200 * 60_000, "200 large messages: {direct_len} bytes");
    assert!(updates >= 20, "key updates in the middle: {updates}");
    assert_eq!(through_len, direct_len);
    assert!(through == direct, "the FETCH through the proxy differs from Dovecot's");
    proxy.stop().await;
}
