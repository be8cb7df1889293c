//! Failed-login storm: many simulated client prefixes (distinct 127.0.0.0/8 source addresses) hammer a few
//! accounts with wrong passwords through imapgate (the release binary, default defence settings) while
//! legitimate users log in from other addresses. Prints how many attempts reached Dovecot, the defence's
//! tables and imapgate's memory, and legitimate login latency against an idle run.
//! Run through `scripts/storm.sh`. Loopback only; every loop is bounded in count and time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::client::{TlsClient, tls_config};
use support::dovecot::Dovecot;
use support::gate::Gate;
use support::pki::Pki;

struct Options {
    prefixes: u32,
    seconds: u64,
    targets: u32,
    legit: u32,
}

fn options() -> Options {
    let mut o = Options { prefixes: 500, seconds: 20, targets: 10, legit: 4 };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value: Option<u32> = pair.get(1).and_then(|v| v.parse().ok());
        match (pair[0].as_str(), value) {
            ("--prefixes", Some(v)) => o.prefixes = v.clamp(1, 60_000),
            ("--seconds", Some(v)) => o.seconds = u64::from(v).clamp(1, 600),
            ("--targets", Some(v)) => o.targets = v.max(1),
            ("--legit", Some(v)) => o.legit = v.max(1),
            _ => {
                eprintln!("usage: storm [--prefixes N] [--seconds S] [--targets N] [--legit N]");
                std::process::exit(64);
            }
        }
    }
    o
}

#[derive(Default)]
struct Counters {
    attempts: AtomicU64,
    auth_failed: AtomicU64,
    unavailable: AtomicU64,
    refused_connections: AtomicU64,
    other: AtomicU64,
}

fn attacker_ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 10 + (i / 62_500) as u8, ((i / 250) % 250) as u8, (i % 250 + 1) as u8))
}

async fn attacker(
    i: u32,
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    targets: u32,
    deadline: Instant,
    counters: Arc<Counters>,
) {
    let ip = attacker_ip(i);
    let mut n = 0u64;
    while Instant::now() < deadline {
        let Ok(Ok(mut c)) =
            tokio::time::timeout(Duration::from_secs(10), TlsClient::connect_from(Some(ip), addr, Arc::clone(&config)))
                .await
        else {
            counters.refused_connections.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        if c.line().await.is_err() {
            counters.refused_connections.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        while Instant::now() < deadline {
            n += 1;
            let user = format!("victim{}@example.org", (u64::from(i) + n) % u64::from(targets));
            counters.attempts.fetch_add(1, Ordering::Relaxed);
            let reply =
                tokio::time::timeout(Duration::from_secs(40), c.command("x", &format!("LOGIN {user} guess-{i}-{n}")))
                    .await;
            match reply {
                Ok(Ok(r)) if r.tagged.contains("[AUTHENTICATIONFAILED]") => &counters.auth_failed,
                Ok(Ok(r)) if r.tagged.contains("[UNAVAILABLE]") => &counters.unavailable,
                _ => {
                    counters.other.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Legitimate logins (connect, LOGIN, LOGOUT) until `deadline`; latencies in ms. Each login comes from
/// another address in 127.0.1.0/24, as users behind many addresses would.
async fn legit(id: u32, addr: SocketAddr, config: Arc<rustls::ClientConfig>, deadline: Instant) -> Vec<f64> {
    let mut samples = Vec::new();
    let mut n = 0u32;
    while Instant::now() < deadline {
        n += 1;
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 1 + (id % 4) as u8, (n % 250 + 1) as u8));
        let started = Instant::now();
        let login = async {
            let mut c = TlsClient::connect_from(Some(ip), addr, Arc::clone(&config)).await?;
            c.line().await?;
            let reply = c.command("l", &format!("LOGIN legit{id}@example.org legit-pw")).await?;
            if !reply.tagged.starts_with("l OK") {
                return Err(std::io::Error::other(reply.tagged));
            }
            c.command("q", "LOGOUT").await?;
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(30), login).await {
            Ok(Ok(())) => samples.push(started.elapsed().as_secs_f64() * 1000.0),
            other => eprintln!("  legit login failed: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    samples
}

async fn legit_round(users: u32, addr: SocketAddr, config: &Arc<rustls::ClientConfig>, seconds: u64) -> Vec<f64> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..users).map(|id| tokio::spawn(legit(id, addr, Arc::clone(config), deadline))).collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by(f64::total_cmp);
    all
}

fn pct(samples: &[f64], p: usize) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples[(samples.len() * p / 100).min(samples.len() - 1)]
}

fn main() {
    let o = options();
    let dir = support::scratch_dir("imapgate-storm-");
    let pki = Pki::generate(&dir);
    let mut users: Vec<(String, String)> =
        (0..o.targets).map(|i| (format!("victim{i}@example.org"), format!("right-{i}-pw"))).collect();
    users.extend((0..o.legit).map(|i| (format!("legit{i}@example.org"), "legit-pw".to_owned())));
    let dovecot = Dovecot::start("storm", &pki, &users);
    // Production defence defaults, except that the legitimate users' 127.0.1.0/24 addresses make many
    // connections each: nothing is trusted.
    let gate = Gate::start(&dir, &pki, &dovecot, "storm", "");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let config = tls_config(&pki.ca, &[b"imap"]);
        eprintln!("idle run: {} legitimate users for 10 s ...", o.legit);
        let idle = legit_round(o.legit, gate.addr, &config, 10).await;
        let rss_before = gate.rss_kib();

        eprintln!("storm: {} prefixes against {} accounts for {} s ...", o.prefixes, o.targets, o.seconds);
        let counters = Arc::new(Counters::default());
        let deadline = Instant::now() + Duration::from_secs(o.seconds);
        let attackers: Vec<_> = (0..o.prefixes)
            .map(|i| {
                tokio::spawn(attacker(i, gate.addr, Arc::clone(&config), o.targets, deadline, Arc::clone(&counters)))
            })
            .collect();
        let peak_rss = AtomicU64::new(gate.rss_kib());
        let legit_during = tokio::spawn({
            let (config, addr, seconds, legit) = (Arc::clone(&config), gate.addr, o.seconds, o.legit);
            async move { legit_round(legit, addr, &config, seconds).await }
        });
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            peak_rss.fetch_max(gate.rss_kib(), Ordering::Relaxed);
        }
        let during = legit_during.await.unwrap();
        for a in attackers {
            a.await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_after = gate.rss_kib();
        let failed_lines: Vec<String> =
            dovecot.log().lines().filter(|l| l.contains("auth failed")).map(str::to_owned).collect();
        let backend_failures = failed_lines.len();
        let most = |field: &str| -> usize {
            let mut counts = std::collections::HashMap::<String, usize>::new();
            for line in &failed_lines {
                if let Some(value) = line.split(field).nth(1).and_then(|v| v.split([',', '>']).next()) {
                    *counts.entry(value.to_owned()).or_default() += 1;
                }
            }
            counts.into_values().max().unwrap_or(0)
        };
        let (per_account, per_prefix) = (most("user=<"), most("rip="));
        let log = gate.terminate();
        let stats = log.lines().rev().find(|l| l.contains("\"defence_stats\"")).unwrap_or("(no stats line)").to_owned();
        let bans = log.lines().filter(|l| l.contains("\"event\":\"banned\"")).count();

        let c = &counters;
        let attempts = c.attempts.load(Ordering::Relaxed);
        println!();
        println!(
            "imapgate failed-login storm ({} prefixes, {} accounts, {} s, default defence)",
            o.prefixes, o.targets, o.seconds
        );
        println!("attempts fired                 {attempts}");
        println!("  answered AUTHENTICATIONFAILED {}", c.auth_failed.load(Ordering::Relaxed));
        println!("  refused locally (UNAVAILABLE) {}", c.unavailable.load(Ordering::Relaxed));
        println!(
            "  connections refused before TLS or dropped {}",
            c.refused_connections.load(Ordering::Relaxed) + c.other.load(Ordering::Relaxed)
        );
        println!(
            "attempts reaching the backend  {backend_failures} ({:.1}% of attempts)",
            100.0 * backend_failures as f64 / attempts.max(1) as f64
        );
        println!(
            "most per account               {per_account} (target <= account_block_after = 50 {})",
            if per_account <= 50 { "met" } else { "MISSED" }
        );
        println!(
            "most per prefix                {per_prefix} (target <= failures + 1 = 6 {})",
            if per_prefix <= 6 { "met" } else { "MISSED" }
        );
        println!("bans issued                    {bans}");
        println!("defence tables at the end      {stats}");
        println!(
            "imapgate RSS                   {rss_before} KiB before, {} KiB peak, {rss_after} KiB after",
            peak_rss.load(Ordering::Relaxed)
        );
        let (p50_idle, p99_idle) = (pct(&idle, 50), pct(&idle, 99));
        let (p50_storm, p99_storm) = (pct(&during, 50), pct(&during, 99));
        println!("legitimate login latency (ms)  idle p50 {p50_idle:.1} p99 {p99_idle:.1} ({} logins)", idle.len());
        println!(
            "                               storm p50 {p50_storm:.1} p99 {p99_storm:.1} ({} logins)",
            during.len()
        );
        println!(
            "p99 storm/idle                 {:.2}x  target <=1.20x {}",
            p99_storm / p99_idle,
            if p99_storm <= 1.2 * p99_idle { "met" } else { "MISSED" }
        );
    });
}
