//! An upgrade in place of the imapgate binary (a separate process, SIGUSR2) in front of a real Dovecot,
//! with a thousand IDLE sessions open, a client connecting in a loop and a large FETCH under way:
//! - no connection is refused or left without a greeting across the hand-over;
//! - every old session ends with `* BYE` (when quiet, never inside a response) spread over
//!   `drain_spread_secs`, none in the first second; its client reconnects to the successor;
//! - Dovecot's logins per second during the window stay under 2.5 times the window's mean (a burst of
//!   every reconnect at once is far above);
//! - every FETCH of the large message arrives whole;
//! - the old process exits after its sessions, and the successor serves on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::client::TlsClient;
use support::dovecot::Dovecot;
use support::gate::{BINARY, Gate};
use support::pki::Pki;

const IDLERS: usize = 1000;
const SPREAD_SECS: u64 = 20;
const BIG: usize = 8 * 1024 * 1024;

/// A process the test must not leave behind (the successor is not the test's child).
struct Pid(u32);

impl Drop for Pid {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").arg("-KILL").arg(self.0.to_string()).status();
    }
}

async fn login(addr: std::net::SocketAddr, ca: &std::path::Path, user: &str, password: &str) -> TlsClient {
    let mut client = TlsClient::connect(addr, ca).await.unwrap();
    let greeting = client.line().await.unwrap();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let reply = client.command("l", &format!("LOGIN \"{user}\" \"{password}\"")).await.unwrap();
    assert!(reply.tagged.starts_with("l OK"), "{reply:?}");
    client
}

/// The next line, waiting as long as it takes (the client's read timeout only bounds one read).
async fn next_line(client: &mut TlsClient) -> std::io::Result<String> {
    loop {
        match client.line().await {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            other => return other,
        }
    }
}

/// Dovecot's successful logins per second of its log's clock (`HH:MM:SS`).
fn logins_per_second(log: &str) -> BTreeMap<String, usize> {
    let mut per_second = BTreeMap::new();
    for line in
        log.lines().filter(|l| l.contains("imap-login: Info: Login: user=<") || l.contains("imap-login: Login: user=<"))
    {
        if let Some(clock) = line.split_whitespace().nth(2) {
            *per_second.entry(clock.to_owned()).or_insert(0) += 1;
        }
    }
    per_second
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_refuses_nobody_and_spreads_the_reconnects() {
    let dir = support::scratch_dir("imapgate-upgrade-");
    let pki = Pki::generate(&dir);
    let dovecot = Dovecot::start_for_crowds("upgrade", &pki);
    let big = format!(
        "Subject: big\r\n\r\n{}",
        "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/\r\n".repeat(BIG / 66)
    );
    dovecot.deliver("fetcher@example.org", "big.eml", big.as_bytes());
    let extra = format!(
        "{}connections_per_prefix = 5000\nconnections_per_prefix_max = 10000\n",
        support::proxy::DEFAULT_TEST_DEFENCE
    );
    let spread = SPREAD_SECS.to_string();
    let old = Gate::start_with_env(
        &dir,
        &pki,
        &dovecot,
        "old",
        &extra,
        &[(BINARY, env!("CARGO_BIN_EXE_imapgate")), ("IMAPGATE_SERVER__DRAIN_SPREAD_SECS", &spread)],
    );
    let (addr, ca) = (old.addr, pki.ca.clone());
    let (user, password) = ("alice@example.org", support::dovecot::password("alice@example.org"));

    // A thousand IDLE sessions; each records when its BYE came, reconnects and logs in again.
    let idling = Arc::new(AtomicUsize::new(0));
    let permits = Arc::new(tokio::sync::Semaphore::new(50));
    let mut idlers = Vec::new();
    for _ in 0..IDLERS {
        let (idling, permits, ca) = (Arc::clone(&idling), Arc::clone(&permits), ca.clone());
        idlers.push(tokio::spawn(async move {
            let permit = permits.acquire_owned().await.unwrap();
            let mut client = login(addr, &ca, user, password).await;
            client.command("s", "SELECT INBOX").await.unwrap();
            client.send(b"i IDLE\r\n").await.unwrap();
            assert!(next_line(&mut client).await.unwrap().starts_with("+ "));
            drop(permit);
            idling.fetch_add(1, Ordering::SeqCst);
            let line = loop {
                let line = next_line(&mut client).await.expect("a BYE before the connection closed");
                if line.starts_with("* BYE") {
                    break line;
                }
            };
            let at = Instant::now();
            assert!(line.contains("reconnect"), "{line}");
            assert!(client.rest().await.is_empty(), "bytes after the BYE");
            let mut again = login(addr, &ca, user, password).await;
            let _ = again.command("z", "LOGOUT").await;
            at
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while idling.load(Ordering::SeqCst) < IDLERS {
        assert!(Instant::now() < deadline, "only {} sessions idling", idling.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A client connecting in a loop: every connection must be greeted.
    let stop = Arc::new(AtomicBool::new(false));
    let looping = {
        let (stop, ca) = (Arc::clone(&stop), ca.clone());
        tokio::spawn(async move {
            let (mut greeted, mut failed) = (0usize, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match TlsClient::connect(addr, &ca).await {
                    Ok(mut client) => match client.line().await {
                        Ok(line) if line.starts_with("* OK") => {
                            greeted += 1;
                            let _ = client.command("z", "LOGOUT").await;
                        }
                        other => failed.push(format!("greeting: {other:?}")),
                    },
                    Err(e) => failed.push(format!("connect: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (greeted, failed)
        })
    };

    // A FETCH of the large message again and again, across the hand-over, until its BYE.
    let fetching = {
        let ca = ca.clone();
        tokio::spawn(async move {
            let mut client =
                login(addr, &ca, "fetcher@example.org", support::dovecot::password("fetcher@example.org")).await;
            client.command("s", "EXAMINE INBOX").await.unwrap();
            let mut whole = 0usize;
            for n in 0.. {
                let tag = format!("f{n}");
                client.send(format!("{tag} UID FETCH 1:* BODY.PEEK[]\r\n").as_bytes()).await.unwrap();
                match client.until_tagged(&tag).await {
                    Ok(reply) => {
                        assert!(reply.tagged.starts_with(&format!("{tag} OK")), "{}", reply.tagged);
                        let longest = reply.literals.iter().map(Vec::len).max().unwrap_or(0);
                        assert!(longest >= BIG, "a FETCH arrived cut: {longest} bytes");
                        whole += 1;
                        if reply.lines.iter().any(|l| l.starts_with("* BYE")) {
                            return whole;
                        }
                    }
                    Err(e) => {
                        // Only between commands: the BYE came after the last tagged OK.
                        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
                        return whole;
                    }
                }
            }
            whole
        })
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    // Dovecot's log from here on is the window's.
    let before = dovecot.log().len();
    let signalled = Instant::now();
    let _ = std::process::Command::new("kill").arg("-USR2").arg(old.pid().to_string()).status();
    let successor = support::wait_until(Duration::from_secs(30), || {
        let log = std::fs::read_to_string(&old.log).unwrap_or_default();
        log.lines().find(|l| l.contains("\"handed_over\"")).and_then(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["fields"]["successor"].as_u64().or_else(|| v["successor"].as_u64())
        })
    })
    .unwrap_or_else(|| panic!("no hand-over:\n{}", std::fs::read_to_string(&old.log).unwrap_or_default()));
    let _successor = Pid(successor as u32);

    let mut byes = Vec::new();
    for idler in idlers {
        byes.push(idler.await.unwrap().duration_since(signalled));
    }
    byes.sort();
    let whole = fetching.await.unwrap();
    assert!(whole >= 2, "the FETCH loop ran {whole} times");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let (greeted, failed) = looping.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {:?}",
        failed.len(),
        greeted + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(greeted > 50, "{greeted}");

    let (first, last) = (byes[0], byes[byes.len() - 1]);
    assert!(first >= Duration::from_secs(1), "a BYE {first:?} after the upgrade signal");
    assert!(last <= Duration::from_secs(SPREAD_SECS + 5), "the last BYE {last:?} after the upgrade signal");
    // Spread, not bunched: each quarter of the window has a fair share.
    for quarter in 0..4u32 {
        let from = Duration::from_secs(1) + Duration::from_secs(SPREAD_SECS - 1) * quarter / 4;
        let to = Duration::from_secs(1) + Duration::from_secs(SPREAD_SECS - 1) * (quarter + 1) / 4;
        let n = byes.iter().filter(|b| **b >= from && **b < to + Duration::from_secs(2)).count();
        assert!(n >= IDLERS / 8, "{n} BYEs in quarter {quarter} ({from:?}..{to:?})");
    }

    // Dovecot's login rate over the window: the reconnects (and the loop's none: it does not log in).
    let per_second = logins_per_second(&dovecot.log()[before..]);
    let busiest = per_second.values().copied().max().unwrap_or(0);
    let mean = IDLERS as f64 / (SPREAD_SECS - 1) as f64;
    eprintln!(
        "upgrade: {IDLERS} sessions, BYEs from {first:?} to {last:?} after SIGUSR2; loop: {greeted} greeted, {} failed; \
         {whole} whole FETCHes; Dovecot logins per second: busiest {busiest}, window mean {mean:.0}",
        failed.len()
    );
    assert!((busiest as f64) < 2.5 * mean + 10.0, "{busiest} logins in one second (mean {mean:.0}/s): {per_second:?}");

    // The old process leaves once its sessions are gone; the successor serves.
    let mut old = old;
    let exited = support::wait_until(Duration::from_secs(15), || old.try_wait());
    assert!(exited.is_some(), "the old process did not exit");
    let mut client = login(addr, &ca, user, password).await;
    assert!(client.command("z", "LOGOUT").await.unwrap().tagged.starts_with("z OK"));
}
