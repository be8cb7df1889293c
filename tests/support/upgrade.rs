//! Clients around an upgrade of a running imapgate (the binary, `support::gate`): IDLE sessions that note
//! when their `* BYE` came and reconnect, a client connecting in a loop, Dovecot's logins per second.
//! Shared by tests/upgrade.rs and the upgrade demonstration (examples/upgrade.rs).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::client::TlsClient;

/// A process that must not outlive the caller (an upgrade's successor is nobody's child here).
pub struct Pid(pub u32);

impl Drop for Pid {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").arg("-KILL").arg(self.0.to_string()).status();
    }
}

/// Connects, checks the greeting and logs in.
pub async fn login(addr: SocketAddr, ca: &Path, user: &str, password: &str) -> TlsClient {
    let mut client = TlsClient::connect(addr, ca).await.unwrap();
    let greeting = client.line().await.unwrap();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let reply = client.command("l", &format!("LOGIN \"{user}\" \"{password}\"")).await.unwrap();
    assert!(reply.tagged.starts_with("l OK"), "{reply:?}");
    client
}

/// The next line, waiting as long as it takes (the client's read timeout only bounds one read).
pub async fn next_line(client: &mut TlsClient) -> std::io::Result<String> {
    loop {
        match client.line().await {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            other => return other,
        }
    }
}

/// `n` sessions of `user` in IDLE, `at_once` logging in at a time; returns once all idle. Each task ends
/// when its session got `* BYE` (asking it to reconnect) and closed, after logging in again at `addr`,
/// and returns when the BYE came.
pub async fn idlers(
    addr: SocketAddr,
    ca: &Path,
    user: &'static str,
    password: &'static str,
    n: usize,
    at_once: usize,
) -> Vec<JoinHandle<Instant>> {
    let idling = Arc::new(AtomicUsize::new(0));
    let permits = Arc::new(tokio::sync::Semaphore::new(at_once));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (idling, permits, ca) = (Arc::clone(&idling), Arc::clone(&permits), ca.to_owned());
        tasks.push(tokio::spawn(async move {
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
    let deadline = Instant::now() + Duration::from_secs(300);
    while idling.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "only {} sessions idling", idling.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tasks
}

/// A client connecting every 20 ms until `stop`: connections greeted, and what went wrong with the others.
pub fn connect_loop(addr: SocketAddr, ca: PathBuf, stop: Arc<AtomicBool>) -> JoinHandle<(usize, Vec<String>)> {
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
}

/// Dovecot's successful logins per second of its log's clock (`HH:MM:SS`).
pub fn logins_per_second(log: &str) -> BTreeMap<String, usize> {
    let mut per_second = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("imap-login: Info: Login: user=<")) {
        if let Some(clock) = line.split_whitespace().nth(2) {
            *per_second.entry(clock.to_owned()).or_insert(0) += 1;
        }
    }
    per_second
}

/// The successor's PID from the old process's JSON log (`event=handed_over`), waiting up to `within`.
pub fn successor_from_log(log: &Path, within: Duration) -> Option<u32> {
    super::wait_until(within, || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.lines().find(|l| l.contains("\"handed_over\"")).and_then(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["fields"]["successor"].as_u64().or_else(|| v["successor"].as_u64()).map(|p| p as u32)
        })
    })
}
