//! Fleet benchmark, shipped defence defaults throughout: two imapgate instances behind a real HAProxy
//! (`send-proxy-v2`) sharing a real Redis, against one instance alone, in one run on one machine, in front
//! of one real Dovecot. Prints logins/s at 50 concurrent clients (one address each, as real users), the
//! LOGIN round trip with and without Redis (what the shared state adds to a login), and the time a ban
//! made on one instance takes to reach the other, p50/p99 over 100 bans (100 attackers at once, each
//! from its own address, six wrong passwords on one connection, waiting out the shipped tarpit).
//! Run with `scripts/fleet.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::client::{self, TlsClient};
use support::dovecot::Dovecot;
use support::haproxy::Haproxy;
use support::pki::Pki;
use support::proxy::{TestProxy, backend, config_text};
use support::redis::Redis;

const CLIENTS: usize = 50;
const LOGINS: u64 = 1000;
const SEQUENTIAL: usize = 300;
const BANS: usize = 100;

/// An instance with the shipped `[defence]` (an empty section: every default).
async fn instance(pki: &Pki, dovecot: &Dovecot, extra: &str, behind_haproxy: bool) -> TestProxy {
    let rest = format!("{}\n[route]\ndefault = \"mbox\"\n[defence]\n{extra}\n", backend("mbox", dovecot.imap_port));
    let mut text = config_text(pki, &rest);
    if behind_haproxy {
        text = text.replacen(
            "[server]\n",
            "[server]\nproxy_protocol = \"required\"\nproxy_protocol_from = [\"127.0.0.1/32\"]\n",
            1,
        );
    }
    TestProxy::start(&text).await
}

/// A distinct loopback source address per client: 127.10.x.y.
fn source(block: u8, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, block, (i / 250) as u8, (i % 250 + 2) as u8))
}

/// Connect, LOGIN, LOGOUT: the LOGIN round trip in ms, or None when it failed.
async fn one_login(addr: SocketAddr, from: IpAddr, config: &Arc<rustls::ClientConfig>) -> Option<f64> {
    let mut c = TlsClient::connect_from(Some(from), addr, Arc::clone(config)).await.ok()?;
    c.line().await.ok()?;
    let started = Instant::now();
    let reply = c.command("l", "LOGIN alice@example.org alice-pw").await.ok()?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let _ = c.command("o", "LOGOUT").await;
    reply.tagged.starts_with("l OK").then_some(ms)
}

/// `LOGINS` logins by `CLIENTS` concurrent clients: (logins/s, failed).
async fn throughput(addr: SocketAddr, block: u8, config: &Arc<rustls::ClientConfig>) -> (f64, u64) {
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let (next, failed, config) = (Arc::clone(&next), Arc::clone(&failed), Arc::clone(config));
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < LOGINS {
                if one_login(addr, source(block, i), &config).await.is_none() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    (LOGINS as f64 / started.elapsed().as_secs_f64(), failed.load(Ordering::Relaxed))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// LOGIN round trips one at a time: (p50, p99) in ms.
async fn latency(addr: SocketAddr, block: u8, config: &Arc<rustls::ClientConfig>) -> (f64, f64) {
    let mut samples = Vec::with_capacity(SEQUENTIAL);
    for i in 0..SEQUENTIAL {
        if let Some(ms) = one_login(addr, source(block, i % 20), config).await {
            samples.push(ms);
        }
    }
    samples.sort_by(f64::total_cmp);
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = support::scratch_dir("imapgate-fleet-bench-");
    let pki = Pki::generate(&dir);
    let dovecot = Dovecot::start("fleet-bench", &pki, &[]);
    let redis = Redis::start();
    let config = client::tls_config(&pki.ca, &[b"imap"]);
    let state = format!("[state]\nredis = \"{}\"\n", redis.url());
    println!("fleet benchmark: shipped [defence] defaults, {CLIENTS} clients (one address each), one Dovecot, one run");

    // Logins/s and LOGIN latency: one instance alone, one with Redis, two behind HAProxy sharing Redis.
    let alone = instance(&pki, &dovecot, "", false).await;
    let (alone_rate, alone_failed) = throughput(alone.addr, 10, &config).await;
    let (alone_p50, alone_p99) = latency(alone.addr, 11, &config).await;
    alone.stop().await;

    let with_redis = instance(&pki, &dovecot, &state, false).await;
    let (redis_rate, redis_failed) = throughput(with_redis.addr, 12, &config).await;
    let loaded = support::admin_get(with_redis.admin, "/metrics").await.1;
    let (redis_p50, redis_p99) = latency(with_redis.addr, 13, &config).await;
    let sequential = support::admin_get(with_redis.admin, "/metrics").await.1;
    with_redis.stop().await;
    let (view_loaded_ms, view_sequential_ms) =
        (histogram_mean_ms("", &loaded), histogram_mean_ms(&loaded, &sequential));

    let a = instance(&pki, &dovecot, &state, true).await;
    let b = instance(&pki, &dovecot, &state, true).await;
    let haproxy = Haproxy::start(&[a.addr, b.addr]);
    let (fleet_rate, fleet_failed) = throughput(haproxy.addr, 14, &config).await;
    let (fleet_p50, fleet_p99) = latency(haproxy.addr, 15, &config).await;
    drop(haproxy);

    println!();
    println!("| {CLIENTS} clients, {LOGINS} logins | logins/s | failed | LOGIN p50 | LOGIN p99 |");
    println!("|---|---|---|---|---|");
    println!("| one instance alone | {alone_rate:.0} | {alone_failed} | {alone_p50:.2} ms | {alone_p99:.2} ms |");
    println!("| one instance + Redis | {redis_rate:.0} | {redis_failed} | {redis_p50:.2} ms | {redis_p99:.2} ms |");
    println!(
        "| HAProxy + two instances + Redis | {fleet_rate:.0} ({:.2}x alone) | {fleet_failed} | {fleet_p50:.2} ms | {fleet_p99:.2} ms |",
        fleet_rate / alone_rate
    );
    println!(
        "Redis inside a login: LOGIN p50 {:+.2} ms with Redis; the view call itself (imapgate_state_store_duration_seconds \
         {{op=\"view\"}}) averages {view_sequential_ms:.3} ms one login at a time, {view_loaded_ms:.3} ms at {CLIENTS} clients",
        redis_p50 - alone_p50
    );

    // Ban propagation: attackers against A only; the time from A's ban to B's. Staggered by 50 ms (one ban
    // at a time), then all at once (a botnet's burst: 100 bans in the same moment).
    println!();
    for (label, block, stagger) in [("one at a time", 20, 50), ("100 at once", 21, 0)] {
        propagation(&a, &b, label, block, Duration::from_millis(stagger), &config).await;
    }
    a.stop().await;
    b.stop().await;
}

/// `BANS` attackers against `a` only, each from its own address with six wrong passwords on one
/// connection; prints the time from each ban on `a` to the same ban on `b`.
async fn propagation(
    a: &TestProxy,
    b: &TestProxy,
    label: &str,
    block: u8,
    stagger: Duration,
    config: &Arc<rustls::ClientConfig>,
) {
    let started = Instant::now();
    let mut attackers = tokio::task::JoinSet::new();
    for i in 0..BANS {
        let (addr, config) = (a.addr, Arc::clone(config));
        attackers.spawn(async move {
            tokio::time::sleep(stagger * i as u32).await;
            // Straight to A (a PROXY header from 127.0.0.1 names the attacker).
            let header = client::proxy_v2(SocketAddr::new(source(block, i), 40_000 + i as u16), addr);
            let Ok(mut c) = TlsClient::connect_with_preamble(None, addr, config, &header).await else { return };
            let _ = c.line().await;
            for n in 0..6 {
                if c.command("a", &format!("LOGIN nobody-{block}-{i}@example.org wrong-{n}")).await.is_err() {
                    return;
                }
            }
        });
    }
    let mut banned_a: Vec<Option<Instant>> = vec![None; BANS];
    let mut banned_b: Vec<Option<Instant>> = vec![None; BANS];
    let deadline = Instant::now() + Duration::from_secs(180);
    while banned_b.iter().any(Option::is_none) && Instant::now() < deadline {
        let now = Instant::now();
        for i in 0..BANS {
            if banned_a[i].is_none() && a.defence.is_banned(source(block, i)) {
                banned_a[i] = Some(now);
            }
            if banned_b[i].is_none() && b.defence.is_banned(source(block, i)) {
                banned_b[i] = Some(now);
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    attackers.abort_all();
    let mut delays: Vec<f64> = banned_a
        .iter()
        .zip(&banned_b)
        .filter_map(|(a, b)| Some(b.as_ref()?.saturating_duration_since(*a.as_ref()?).as_secs_f64() * 1000.0))
        .collect();
    delays.sort_by(f64::total_cmp);
    let reached = delays.len();
    if reached == 0 {
        println!("ban propagation A -> B, {label}: no ban reached the other instance within 180 s");
        return;
    }
    println!(
        "ban propagation A -> B, {label}: {reached}/{BANS} bans (each after 6 failures with the shipped tarpit, \
         {:.0} s in all): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (polled every 1 ms)",
        started.elapsed().as_secs_f64(),
        percentile(&delays, 0.5),
        percentile(&delays, 0.99),
        delays[reached - 1]
    );
}

/// The mean of `imapgate_state_store_duration_seconds{op="view"}` in ms between two scrapes.
fn histogram_mean_ms(before: &str, after: &str) -> f64 {
    let series = |kind: &str| format!("imapgate_state_store_duration_seconds_{kind}{{op=\"view\"}}");
    let delta = |kind: &str| support::sample(after, &series(kind)) - support::sample(before, &series(kind));
    let count = delta("count");
    if count > 0.0 { delta("sum") / count * 1000.0 } else { f64::NAN }
}
