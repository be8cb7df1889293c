//! Peers that stall, and shutdown: a client that never reads, one that keeps itself busy before login, a
//! drain with sessions that will not end by themselves, a backend that dies mid-session. Every case ends
//! within its deadline, with a BYE where one fits, and is counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::client::TlsClient;
use support::proxy::{TestProxy, backend, config_text};
use tokio::io::AsyncWriteExt;

/// A 2 MB message, so that a few pipelined FETCHes outgrow every socket buffer on the way.
fn big_message() -> Vec<u8> {
    let mut msg = b"From: a@example.net\r\nSubject: big\r\n\r\n".to_vec();
    while msg.len() < 2 * 1024 * 1024 {
        msg.extend_from_slice(b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz....\r\n");
    }
    msg
}

const USERS: &[&str] =
    &["stall1@example.org", "stall2@example.org", "killed1@example.org", "killed2@example.org", "idle1@example.org"];

fn env() -> &'static support::Env {
    static DELIVERED: std::sync::Once = std::sync::Once::new();
    let users: Vec<(String, String)> = USERS.iter().map(|u| (u.to_string(), "stall-pw".to_string())).collect();
    let env = support::env("stalls", &users);
    DELIVERED.call_once(|| {
        let msg = big_message();
        for user in USERS {
            env.dovecot.deliver(user, "1.big", &msg);
        }
    });
    env
}

async fn proxy(server_overrides: &str) -> TestProxy {
    let env = env();
    let rest = format!("{}\n[route]\ndefault = \"mbox\"\n", backend("mbox", env.dovecot.imap_port));
    let text = config_text(&env.pki, &rest)
        .replace("shutdown_grace_secs = 1\n", &format!("shutdown_grace_secs = 1\n{server_overrides}\n"));
    TestProxy::start(&text).await
}

async fn metric(proxy: &TestProxy, series: &str) -> f64 {
    support::metric(proxy.admin, series).await
}

async fn metric_reaches(proxy: &TestProxy, series: &str, at_least: f64, within: Duration) -> f64 {
    support::sample(&support::scrape_until(proxy.admin, series, at_least, within).await, series)
}

/// Walks the responses in `stream` from `pos` as a client does: a BYE may follow a complete response, but
/// never sit inside a literal the stream ended in.
fn no_bye_inside_a_literal(stream: &[u8], mut pos: usize) {
    loop {
        if pos > stream.len() {
            let tail = String::from_utf8_lossy(&stream[stream.len().saturating_sub(200)..]).into_owned();
            assert!(!tail.contains("* BYE"), "a BYE inside the literal: ...{tail}");
            return;
        }
        let Some(lf) = stream[pos..].iter().position(|&b| b == b'\n') else { return };
        let line = String::from_utf8_lossy(&stream[pos..pos + lf]).trim_end().to_owned();
        pos += lf + 1;
        if let Some(n) = support::client::literal_length(&line) {
            pos += n;
        }
    }
}

/// Logs in as `user`, selects INBOX and pipelines FETCHes of the big message without reading any reply.
async fn flood_without_reading(proxy: &TestProxy, user: &str) -> TlsClient {
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env().pki.ca).await;
    assert!(c.command("a1", &format!("LOGIN {user} stall-pw")).await.unwrap().tagged.starts_with("a1 OK"));
    assert!(c.command("a2", "SELECT INBOX").await.unwrap().tagged.starts_with("a2 OK"));
    let mut fetches = Vec::new();
    for i in 0..40 {
        fetches.extend_from_slice(format!("f{i} FETCH 1 BODY.PEEK[]\r\n").as_bytes());
    }
    c.send(&fetches).await.unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_after_the_write_timeout() {
    let proxy = proxy("write_timeout_secs = 2").await;
    let _client = flood_without_reading(&proxy, "stall1@example.org").await;
    let sample = "imapgate_session_ends_total{reason=\"client_write_timeout\",stage=\"relay\"}";
    let ended = metric_reaches(&proxy, sample, 1.0, Duration::from_secs(15)).await;
    let (_, body) = support::admin_get(proxy.admin, "/metrics").await;
    let ends: Vec<_> =
        body.lines().filter(|l| l.starts_with("imapgate_session_ends_total") && !l.ends_with(" 0")).collect();
    assert_eq!(ended, 1.0, "the stalled session was not closed: {ends:?}");
    assert_eq!(metric(&proxy, "imapgate_connections_active").await, 0.0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_stall_finishes_within_grace_plus_one_second() {
    // The default write timeout (60 s) is far away: only the drain's own deadlines can end this.
    let proxy = proxy("").await;
    let mut client = flood_without_reading(&proxy, "stall2@example.org").await;
    // Let the backend's replies fill every buffer up to the client.
    let sample = "imapgate_relayed_bytes_total{direction=\"backend_to_client\"}";
    assert!(metric_reaches(&proxy, sample, 1_000_000.0, Duration::from_secs(10)).await >= 1_000_000.0);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), proxy.stop()).await.expect("the drain never finished");
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2_000 + 300), "drain took {took:?} with a 1 s grace");
    // The shutdown came while a FETCH literal was on its way: no BYE inside it.
    let rest = client.rest().await.into_bytes();
    no_bye_inside_a_literal(&rest, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noop_every_second_does_not_keep_a_connection_before_login() {
    let proxy = proxy("preauth_total_timeout_secs = 3").await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env().pki.ca).await;
    let started = Instant::now();
    let mut said = Vec::new();
    for i in 0..20 {
        if c.send(format!("n{i} NOOP\r\n").as_bytes()).await.is_err() {
            break;
        }
        match c.line().await {
            Ok(line) if line.starts_with("* BYE") => {
                said.push(line);
                break;
            }
            Ok(line) => said.push(line),
            Err(_) => break,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(said.last().map(String::as_str), Some("* BYE Login time limit reached."), "{said:?}");
    assert!(started.elapsed() < Duration::from_secs(6), "{:?}", started.elapsed());
    let sample = "imapgate_session_ends_total{reason=\"time_limit\",stage=\"preauth\"}";
    assert_eq!(metric_reaches(&proxy, sample, 1.0, Duration::from_secs(5)).await, 1.0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_before_login_is_closed_too() {
    let proxy = proxy("write_timeout_secs = 2").await;
    let c = TlsClient::connect(proxy.addr, &env().pki.ca).await.unwrap();
    let mut stream = c.into_inner();
    // CAPABILITY answers are ten times the command: the proxy's writes fill up while the client only writes.
    let writer = tokio::spawn(async move {
        let chunk = b"c CAPABILITY\r\n".repeat(1000);
        for _ in 0..2000 {
            if stream.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let sample = "imapgate_session_ends_total{reason=\"write_timeout\",stage=\"preauth\"}";
    assert_eq!(metric_reaches(&proxy, sample, 1.0, Duration::from_secs(15)).await, 1.0);
    writer.abort();
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_with_an_idle_session_says_bye_and_is_not_ready_meanwhile() {
    let proxy = proxy("").await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env().pki.ca).await;
    assert!(c.command("i1", "LOGIN idle1@example.org stall-pw").await.unwrap().tagged.starts_with("i1 OK"));
    let select = c.command("i2", "SELECT INBOX").await.unwrap();
    assert!(select.tagged.starts_with("i2 OK"), "{select:?}");
    c.send(b"i3 IDLE\r\n").await.unwrap();
    assert!(c.line().await.unwrap().starts_with("+ "));
    assert_eq!(support::admin_get(proxy.admin, "/readyz").await.0, 200);
    let admin = proxy.admin;
    let started = Instant::now();
    let stopping = tokio::spawn(proxy.stop());
    // While the relayed session drains, the admin server answers: not ready, metrics still there.
    let mut during = None;
    for _ in 0..40 {
        if stopping.is_finished() {
            break;
        }
        let (ready, _) = support::admin_get(admin, "/readyz").await;
        let (metrics, body) = support::admin_get(admin, "/metrics").await;
        if ready == 503 {
            during = Some((metrics, body.contains("imapgate_connections_active 1")));
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(during, Some((200, true)), "readyz during the drain");
    // Dovecot's IDLE keepalive ("* OK Still here") is aligned on a hash of user and address, so the first one
    // can come at any moment, also while the proxy drains; it is relayed like any response, and the BYE follows.
    let mut line = c.line().await.unwrap();
    for _ in 0..3 {
        if line != "* OK Still here" {
            break;
        }
        line = c.line().await.unwrap();
    }
    assert_eq!(line, "* BYE Server shutting down.");
    tokio::time::timeout(Duration::from_secs(5), stopping).await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_millis(2_300), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_dies_between_responses_is_reported_with_bye() {
    let env = env();
    let proxy = proxy("").await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    assert!(c.command("k1", "LOGIN killed1@example.org stall-pw").await.unwrap().tagged.starts_with("k1 OK"));
    assert!(c.command("k2", "SELECT INBOX").await.unwrap().tagged.starts_with("k2 OK"));
    assert_eq!(env.dovecot.kill_sessions_of("killed1@example.org"), 1);
    assert_eq!(c.line().await.unwrap(), "* BYE Backend connection closed.");
    assert!(c.line().await.is_err(), "the connection stays open");
    let sample = "imapgate_session_ends_total{reason=\"backend_closed\",stage=\"relay\"}";
    assert_eq!(metric_reaches(&proxy, sample, 1.0, Duration::from_secs(5)).await, 1.0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_dies_mid_fetch_closes_without_a_bye_inside_the_message() {
    let env = env();
    let proxy = proxy("").await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    assert!(c.command("m1", "LOGIN killed2@example.org stall-pw").await.unwrap().tagged.starts_with("m1 OK"));
    assert!(c.command("m2", "SELECT INBOX").await.unwrap().tagged.starts_with("m2 OK"));
    // Far more than every buffer on the way holds, so that the kill lands while data is still coming.
    let fetches: Vec<u8> = (0..20).flat_map(|i| format!("m3{i} FETCH 1 BODY.PEEK[]\r\n").into_bytes()).collect();
    c.send(&fetches).await.unwrap();
    // The literal has begun when its announcement has arrived; the client reads nothing more until the kill.
    let first = c.line().await.unwrap();
    assert!(first.starts_with("* 1 FETCH (BODY[] {"), "{first}");
    let length = support::client::literal_length(&first).unwrap();
    assert_eq!(env.dovecot.kill_sessions_of("killed2@example.org"), 1);
    let rest = c.rest().await.into_bytes();
    assert!(rest.len() < 20 * length, "every FETCH arrived before the kill");
    no_bye_inside_a_literal(&rest, length);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_login_waiting_for_a_silent_backend() {
    // A broken backend: it accepts and never says a word (the login timeout is 10 s in the tests).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let (accepted_tx, accepted) = tokio::sync::oneshot::channel();
    let held = tokio::spawn(async move {
        let (tcp, _) = silent.accept().await.unwrap();
        let _ = accepted_tx.send(());
        std::future::pending::<()>().await;
        drop(tcp);
    });
    let env = env();
    let rest = format!("{}\n[route]\ndefault = \"mbox\"\n", backend("mbox", port));
    let proxy = TestProxy::start(&config_text(&env.pki, &rest)).await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    c.send(b"w1 LOGIN alice@example.org alice-pw\r\n").await.unwrap();
    // The login is under way once the backend has the connection.
    tokio::time::timeout(Duration::from_secs(5), accepted).await.unwrap().unwrap();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), proxy.stop()).await.expect("shutdown waited for the backend login");
    assert_eq!(c.line().await.unwrap(), "* BYE Server shutting down.");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    held.abort();
}
