//! The client leg's TLS stream attacked as an attacker would, with a real Dovecot behind the proxy: records
//! built by hand after a real handshake (`support::raw_tls`), each malformed in one way. rustls decides
//! every one of them; these tests hold the stream to what rustls answers: one fatal alert, that session
//! alone closed, never a panic, and the end counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::proxy::{TestProxy, in_front_of};
use support::raw_tls::{ALERT, APPLICATION_DATA, CHANGE_CIPHER_SPEC, HANDSHAKE, RawTls};

const USER: &str = "alice@example.org";

// Alert descriptions (RFC 8446 6).
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const DECODE_ERROR: u8 = 50;
const ILLEGAL_PARAMETER: u8 = 47;

/// Takes what the flood test appends, so that no other test sees its mailbox grow.
const FLOODER: (&str, &str) = ("flooder@example.org", "flood-pw");

fn env() -> &'static support::Env {
    support::env("tls-attacks", &[(FLOODER.0.to_owned(), FLOODER.1.to_owned())])
}

async fn proxy() -> TestProxy {
    let env = env();
    in_front_of(&env.pki, env.dovecot.imap_port, "").await
}

/// A raw client that has read the greeting and logged in (`login`), on a thread of its own.
async fn raw(proxy: &TestProxy, login: bool) -> RawTls {
    let (addr, ca) = (proxy.addr, env().pki.ca.clone());
    tokio::task::spawn_blocking(move || {
        let mut tls = RawTls::connect(addr, &ca);
        tls.read_until("\r\n");
        if login {
            let password = support::dovecot::password(USER);
            tls.send(format!("a LOGIN {USER} \"{password}\"\r\n").as_bytes());
            assert!(tls.read_until("a OK").contains("a OK"));
        }
        tls
    })
    .await
    .unwrap()
}

/// Sends what `attack` builds and returns the alert the proxy closed with.
async fn alert_after(proxy: &TestProxy, login: bool, attack: fn(&mut RawTls) -> Vec<u8>) -> Option<u8> {
    let mut tls = raw(proxy, login).await;
    tokio::task::spawn_blocking(move || {
        let bytes = attack(&mut tls);
        tls.send_raw(&bytes);
        tls.closing_alert()
    })
    .await
    .unwrap()
}

fn ends(exposition: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with("imapgate_session_ends_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// Each case: what it sends, whether it logs in first, the alert rustls answers with.
/// An application-data record header declaring `len` bytes, followed by that many zero bytes.
fn declared_record(len: usize) -> Vec<u8> {
    let mut record = vec![APPLICATION_DATA, 3, 3];
    record.extend_from_slice(&(len as u16).to_be_bytes());
    record.extend(std::iter::repeat_n(0u8, len));
    record
}

/// `None`: rustls closes without an alert (it raises the error while opening the record and queues none).
type Case = (&'static str, bool, fn(&mut RawTls) -> Vec<u8>, Option<u8>);

const CASES: &[Case] = &[
    (
        "bad tag",
        false,
        |t| {
            let mut r = t.seal(APPLICATION_DATA, b"a NOOP\r\n");
            let last = r.len() - 1;
            r[last] ^= 0x80;
            r
        },
        Some(BAD_RECORD_MAC),
    ),
    // RFC 8446 5.2 allows 2^14 + 256 bytes of ciphertext; rustls reads records up to TLS 1.2's 2^14 + 2048
    // and finds this one does not open.
    ("ciphertext of 2^14+257", false, |_| declared_record(16 * 1024 + 257), Some(BAD_RECORD_MAC)),
    ("ciphertext over 2^14+2048", false, |_| declared_record(16 * 1024 + 2049), Some(DECODE_ERROR)),
    (
        "plaintext over 2^14 inside a valid record",
        false,
        |t| {
            let r = t.seal_at(t.tx.seq, APPLICATION_DATA, &vec![b'x'; 16 * 1024 + 1], 0);
            t.tx.seq += 1;
            r
        },
        Some(RECORD_OVERFLOW),
    ),
    (
        "all-zero inner plaintext",
        false,
        |t| {
            // No content type at all: padding only.
            let r = t.seal_at(t.tx.seq, 0, b"", 40);
            t.tx.seq += 1;
            r
        },
        None,
    ),
    (
        "change_cipher_spec after the handshake",
        true,
        |_| vec![CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 1],
        Some(UNEXPECTED_MESSAGE),
    ),
    ("plaintext alert after the handshake", true, |_| vec![ALERT, 3, 3, 0, 2, 1, 0], Some(BAD_RECORD_MAC)),
    ("unknown alert level", false, |t| t.seal(ALERT, &[7, 90]), Some(ILLEGAL_PARAMETER)),
    ("empty alert", false, |t| t.seal(ALERT, &[]), Some(DECODE_ERROR)),
    (
        "warning alert flood",
        true,
        |t| {
            let mut bytes = Vec::new();
            for _ in 0..10 {
                bytes.extend(t.seal(ALERT, &[1, 90]));
            }
            bytes
        },
        None,
    ),
    (
        "handshake message over 64 KiB",
        false,
        |t| {
            // A NewSessionTicket-typed message declaring 70,000 bytes, sent in full over five records.
            let len: u32 = 70_000;
            let mut message = vec![4, (len >> 16) as u8, (len >> 8) as u8, len as u8];
            message.extend(std::iter::repeat_n(0u8, len as usize));
            let mut bytes = Vec::new();
            for chunk in message.chunks(16 * 1024) {
                bytes.extend(t.seal(HANDSHAKE, chunk));
            }
            bytes
        },
        None,
    ),
    (
        "replayed sequence number",
        true,
        |t| {
            let seq = t.tx.seq - 1;
            t.seal_at(seq, APPLICATION_DATA, b"b NOOP\r\n", 0)
        },
        Some(BAD_RECORD_MAC),
    ),
    (
        "skipped sequence number",
        true,
        |t| {
            let seq = t.tx.seq + 1;
            t.seal_at(seq, APPLICATION_DATA, b"b NOOP\r\n", 0)
        },
        Some(BAD_RECORD_MAC),
    ),
    (
        "key update with an unknown request value",
        true,
        |t| t.seal(HANDSHAKE, &[24, 0, 0, 1, 7]),
        Some(ILLEGAL_PARAMETER),
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_close_only_their_session_with_rustls_alert() {
    let proxy = proxy().await;
    // A bystander session stays up through all of it.
    let mut bystander = raw(&proxy, true).await;
    let mut failures = Vec::new();
    for (i, (name, login, attack, expected)) in CASES.iter().enumerate() {
        let before = ends(&support::admin_get(proxy.admin, "/metrics").await.1);
        let alert = alert_after(&proxy, *login, *attack).await;
        if alert != *expected {
            failures.push(format!("{name}: alert {alert:?}, expected {expected:?}"));
        }
        let mut counted = false;
        for _ in 0..50 {
            if ends(&support::admin_get(proxy.admin, "/metrics").await.1) > before {
                counted = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !counted {
            failures.push(format!("{name} (case {i}): the session end was not counted"));
        }
    }
    tokio::task::spawn_blocking(move || {
        bystander.send(b"z NOOP\r\n");
        assert!(bystander.read_until("z OK").contains("z OK"), "the bystander's session is untouched");
    })
    .await
    .unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
    proxy.stop().await;
}

/// A buffered rustls client over a blocking socket, driven by hand: it can stop reading while it writes.
struct Manual {
    conn: rustls::ClientConnection,
    tcp: std::net::TcpStream,
}

impl Manual {
    fn connect(addr: std::net::SocketAddr) -> Manual {
        let config = support::client::tls_config(&env().pki.ca, &[b"imap"]);
        let conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap();
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Manual { conn, tcp }
    }

    fn flush(&mut self) {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.tcp).unwrap();
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        std::io::Write::write_all(&mut self.conn.writer(), bytes).unwrap();
        self.flush();
    }

    fn read_until(&mut self, until: &str) -> String {
        let mut text = String::new();
        for _ in 0..1000 {
            self.flush();
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut self.conn.reader(), &mut buf) {
                if n == 0 {
                    break;
                }
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            if text.contains(until) {
                return text;
            }
            assert!(self.conn.read_tls(&mut self.tcp).unwrap() > 0, "closed while waiting for {until:?}: {text}");
            self.conn.process_new_packets().unwrap();
        }
        panic!("no {until:?} in {text}");
    }
}

/// Issue 24's first finding: a logged-in client that never reads and asks for a key update before every
/// byte of an APPEND literal. The own record layer sealed one reply per read into unsent output (4.4 MB in
/// 28 s, freed only on close). With rustls one reply waits for our next record: the proxy's memory stays
/// flat, and once the client also makes the proxy write (a FETCH it never reads) the write deadline ends
/// the session. The proxy runs as its own process (the binary cargo built for these tests) so that its
/// resident memory is its own.
#[test]
fn key_update_flood_from_a_client_that_never_reads_costs_no_memory_and_meets_the_write_deadline() {
    let env = env();
    let dir = support::scratch_dir("imapgate-flood-");
    let gate = support::gate::Gate::start_with_env(
        &dir,
        &env.pki,
        &env.dovecot,
        "flood",
        "",
        &[("IMAPGATE_SERVER__WRITE_TIMEOUT_SECS", "3")],
    );
    // Creates the mailbox with the owner Dovecot runs as.
    env.dovecot.deliver(FLOODER.0, "seed", b"Subject: seed\r\n\r\nseed\r\n");
    let mut client = Manual::connect(gate.addr);
    client.read_until("\r\n");
    client.send(format!("a LOGIN {} {}\r\n", FLOODER.0, FLOODER.1).as_bytes());
    client.read_until("a OK");
    const LITERAL: usize = 1_000_000;
    const REQUESTS: usize = 60_000;
    client.send(format!("b APPEND INBOX {{{LITERAL}+}}\r\n").as_bytes());
    let before = gate.rss_kib();
    for i in 0..REQUESTS {
        client.conn.refresh_traffic_keys().unwrap();
        std::io::Write::write_all(&mut client.conn.writer(), b"x").unwrap();
        client.flush();
        if i % 1000 == 0 {
            // The proxy keeps up (and reads): nothing piles up unread on its side of the socket.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Everything sent has been read by the proxy once the rest of the literal reaches Dovecot.
    let rest = vec![b'y'; LITERAL - REQUESTS];
    for chunk in rest.chunks(16 * 1024) {
        std::io::Write::write_all(&mut client.conn.writer(), chunk).unwrap();
        client.flush();
    }
    client.send(b"\r\n");
    let appended = client.read_until("b ");
    assert!(
        appended.contains("b OK"),
        "{appended}\n{}",
        env.dovecot.log().lines().rev().take(8).collect::<Vec<_>>().join("\n")
    );
    let after = gate.rss_kib();
    assert!(after < before + 1024, "proxy RSS grew from {before} to {after} KiB");
    // Now make the proxy write (FETCHes of the 1 MB message) and never read: the write deadline ends it.
    client.send(b"s SELECT INBOX\r\n");
    client.read_until("s OK");
    for i in 0..40 {
        client.send(format!("f{i} FETCH 1:* BODY.PEEK[]\r\n").as_bytes());
    }
    let series = "imapgate_session_ends_total{reason=\"client_write_timeout\",stage=\"relay\"}";
    let ended = support::wait_until(Duration::from_secs(30), || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        (rt.block_on(support::metric(gate.admin, series)) >= 1.0).then_some(())
    });
    if ended.is_none() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let text = rt.block_on(support::admin_get(gate.admin, "/metrics")).1;
        let ends: Vec<&str> = text.lines().filter(|l| l.starts_with("imapgate_session_ends_total")).collect();
        let ss = std::process::Command::new("ss")
            .arg("-tnpi")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let log = std::fs::read_to_string(&gate.log).unwrap();
        panic!("the session did not end by the write deadline: {ends:?}\n{ss}\n{log}");
    }
    assert!(gate.rss_kib() < before + 8 * 1024, "what was owed is bounded: {} KiB", gate.rss_kib());
}
