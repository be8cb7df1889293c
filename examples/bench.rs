//! Benchmark: the same Dovecot reached directly (implicit TLS) and through imapgate (STARTTLS backend), in
//! one run. Prints logins/s at 50 concurrent clients, NOOP round trips, FETCH throughput on a >100 MB
//! mailbox, imapgate's resident memory per idle authenticated session, and the ratios against the targets.
//! Run through `scripts/bench.sh`, which builds the release binaries first. Loopback only; every loop is
//! bounded in count and time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::client::{TlsClient, tls_config};
use support::dovecot::Dovecot;
use support::gate::Gate;
use support::pki::Pki;

/// Every benchmark client comes from 127.0.0.1: per-address limits are opened wide (the defence still runs).
const BENCH_DEFENCE: &str = "[defence]\nconnections_per_prefix = 5000\nconnection_rate_per_minute = 1000000\n\
                             connection_burst = 10000\nauth_in_flight = 200\n";

struct Options {
    clients: usize,
    login_seconds: u64,
    noops: usize,
    /// Sequential logins timed for the LOGIN latency rows.
    logins: usize,
    sessions: usize,
    mailbox_mb: usize,
    /// Run only this part: memory, logins, login-latency, cpu, noop or fetch.
    only: Option<String>,
}

impl Options {
    fn runs(&self, part: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == part)
    }
}

fn options() -> Options {
    let mut o = Options {
        clients: 50,
        login_seconds: 8,
        noops: 3000,
        logins: 400,
        sessions: 1000,
        mailbox_mb: 110,
        only: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        if pair[0] == "--only" && pair.len() == 2 {
            o.only = Some(pair[1].clone());
            continue;
        }
        let value = pair.get(1).and_then(|v| v.parse().ok());
        match (pair[0].as_str(), value) {
            ("--clients", Some(v)) => o.clients = v,
            ("--login-seconds", Some(v)) => o.login_seconds = v as u64,
            ("--noops", Some(v)) => o.noops = v,
            ("--logins", Some(v)) => o.logins = v,
            ("--sessions", Some(v)) => o.sessions = v,
            ("--mailbox-mb", Some(v)) => o.mailbox_mb = v,
            _ => {
                eprintln!(
                    "usage: bench [--clients N] [--login-seconds S] [--noops N] [--logins N] [--sessions N] [--mailbox-mb M] [--only memory|logins|login-latency|cpu|noop|fetch]"
                );
                std::process::exit(64);
            }
        }
    }
    o
}

async fn logged_in(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, user: &str, pass: &str) -> TlsClient {
    let mut c = TlsClient::connect_with(addr, Arc::clone(config)).await.unwrap();
    c.line().await.unwrap();
    let reply = c.command("L", &format!("LOGIN {user} {pass}")).await.unwrap();
    assert!(reply.tagged.starts_with("L OK"), "{reply:?}");
    c
}

/// Logins per second with `clients` concurrent loops of connect + LOGIN + LOGOUT.
async fn logins_per_second(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, clients: usize, seconds: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (config, done, failed) = (Arc::clone(config), Arc::clone(&done), Arc::clone(&failed));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let attempt = async {
                    let mut c = TlsClient::connect_with(addr, Arc::clone(&config)).await?;
                    c.line().await?;
                    let reply = c.command("L", "LOGIN alice@example.org alice-pw").await?;
                    if !reply.tagged.starts_with("L OK") {
                        return Err(std::io::Error::other(reply.tagged));
                    }
                    c.command("Q", "LOGOUT").await?;
                    Ok::<_, std::io::Error>(())
                };
                match tokio::time::timeout(Duration::from_secs(20), attempt).await {
                    Ok(Ok(())) => done.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let failures = failed.load(Ordering::Relaxed);
    if failures > 0 {
        eprintln!("  ({failures} login attempts failed)");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// NOOP round trips on one session, in microseconds.
async fn noop_samples(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, count: usize) -> Vec<f64> {
    let mut c = logged_in(addr, config, "alice@example.org", "alice-pw").await;
    for _ in 0..100 {
        c.command("W", "NOOP").await.unwrap();
    }
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        c.command("N", "NOOP").await.unwrap();
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples
}

/// (p50, p99) of the samples.
/// `count` logins one after another, each on a new connection: the LOGIN command's round trip (ms).
async fn login_samples(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, count: usize) -> Vec<f64> {
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let mut c = TlsClient::connect_with(addr, Arc::clone(config)).await.unwrap();
        c.line().await.unwrap();
        let started = std::time::Instant::now();
        let reply = c.command("l", "LOGIN alice@example.org alice-pw").await.unwrap();
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        assert!(reply.tagged.starts_with("l OK"), "{reply:?}");
        let _ = c.command("o", "LOGOUT").await;
    }
    samples
}

fn percentiles(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    (samples[n / 2], samples[n * 99 / 100])
}

/// MB/s of one `FETCH 1:* BODY.PEEK[]` on the big mailbox, and the bytes fetched.
async fn fetch_once(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> (f64, usize) {
    let mut c = logged_in(addr, config, "fetcher@example.org", "fetch-pw").await;
    c.command("S", "EXAMINE INBOX").await.unwrap();
    let t = Instant::now();
    let reply = c.command("F", "FETCH 1:* BODY.PEEK[]").await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(reply.tagged.starts_with("F OK"), "{}", reply.tagged);
    let bytes: usize = reply.literals.iter().map(Vec::len).sum();
    (bytes as f64 / 1e6 / secs, bytes)
}

/// The post-login observer's share of a proxied FETCH: it runs on every relayed byte, so its own speed on
/// the same stream (fed in 16 KiB reads, as the relay does) against the proxied rate gives its cost.
/// Also reported: its speed on a stream of small untagged lines, where it reads every byte.
fn observer_cost(fetch_bytes: usize, proxied_mb_s: f64) {
    use imapgate::imap::inspect::Observer;
    let message = vec![b'x'; 2 * 1024 * 1024];
    let mut stream = Vec::with_capacity(fetch_bytes + 4096);
    let mut n = 0;
    while stream.len() < fetch_bytes {
        n += 1;
        stream.extend_from_slice(format!("* {n} FETCH (BODY[] {{{}}}\r\n", message.len()).as_bytes());
        stream.extend_from_slice(&message);
        stream.extend_from_slice(b")\r\n");
    }
    stream.extend_from_slice(b"F OK Fetch completed.\r\n");
    let mut small: Vec<u8> =
        (0..400_000).flat_map(|i| format!("* {i} FETCH (FLAGS (\\Seen) UID {i})\r\n").into_bytes()).collect();
    small.extend_from_slice(b"F OK Fetch completed.\r\n");
    let time = |data: &[u8]| {
        (0..5)
            .map(|_| {
                let mut o = Observer::new();
                let now = std::time::Instant::now();
                o.client(&mut b"F UID FETCH 1:* BODY.PEEK[]\r\n".to_vec(), now);
                let t = Instant::now();
                for chunk in data.chunks(16 * 1024) {
                    o.server(chunk, now);
                }
                assert_eq!(o.drain().count(), 1);
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    let literal_secs = time(&stream);
    let small_secs = time(&small);
    let fetch_secs = stream.len() as f64 / 1e6 / proxied_mb_s;
    println!(
        "{:<28} {:>12.3} {:>12.3}% of the proxied FETCH time  target <5% {}",
        "observer ms per FETCH",
        literal_secs * 1e3,
        100.0 * literal_secs / fetch_secs,
        if literal_secs / fetch_secs < 0.05 { "met" } else { "MISSED" }
    );
    println!(
        "{:<28} {:>12.0} MB/s on small untagged lines ({} MB)",
        "observer speed",
        small.len() as f64 / 1e6 / small_secs,
        small.len() / 1_000_000
    );
}

fn fill_mailbox(dovecot: &Dovecot, megabytes: usize) {
    let per_message = 2 * 1024 * 1024;
    let mut state: u32 = 1;
    for i in 0..megabytes.div_ceil(2) {
        let mut msg = format!("From: bench@example.net\r\nSubject: bench {i}\r\n\r\n").into_bytes();
        while msg.len() < per_message {
            for _ in 0..76 {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                msg.push(b'!' + ((state >> 16) % 90) as u8);
            }
            msg.extend_from_slice(b"\r\n");
        }
        dovecot.deliver("fetcher@example.org", &format!("{i}.bench"), &msg);
    }
}

fn ratio_line(name: &str, direct: f64, proxied: f64, target: &str, ok: bool) {
    println!(
        "{name:<28} {direct:>12.1} {proxied:>12.1} {:>8.3}x  target {target:<8} {}",
        proxied / direct,
        if ok { "met" } else { "MISSED" }
    );
}

fn main() {
    let o = options();
    let dir = support::scratch_dir("imapgate-bench-");
    let pki = Pki::generate(&dir);
    eprintln!("starting Dovecot and imapgate; filling a {} MB mailbox ...", o.mailbox_mb);
    let dovecot = Dovecot::start("bench", &pki, &[]);
    fill_mailbox(&dovecot, o.mailbox_mb);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let config = tls_config(&pki.ca, &[b"imap"]);
        let direct: SocketAddr = format!("127.0.0.1:{}", dovecot.imaps_port).parse().unwrap();

        println!("imapgate benchmark: Dovecot direct (implicit TLS) vs through imapgate (STARTTLS backend)");
        println!(
            "machine: {} cores; client, imapgate and Dovecot share them",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!("{:<28} {:>12} {:>12} {:>9}", "", "direct", "imapgate", "ratio");

        if o.runs("memory") {
            // On a fresh imapgate process: RSS growth per idle authenticated session.
            let gate = Gate::start(&dir, &pki, &dovecot, "memory", BENCH_DEFENCE);
            for _ in 0..20 {
                logged_in(gate.addr, &config, "alice@example.org", "alice-pw").await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before = gate.rss_kib();
            let mut sessions = Vec::with_capacity(o.sessions);
            let addr = gate.addr;
            for chunk in 0..o.sessions.div_ceil(50) {
                let n = 50.min(o.sessions - chunk * 50);
                let batch: Vec<_> = (0..n)
                    .map(|_| {
                        let config = Arc::clone(&config);
                        tokio::spawn(async move { logged_in(addr, &config, "alice@example.org", "alice-pw").await })
                    })
                    .collect();
                for task in batch {
                    sessions.push(task.await.unwrap());
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = gate.rss_kib();
            let per_session_kib = (after.saturating_sub(before)) as f64 / o.sessions as f64;
            println!(
                "{:<28} {:>12} {:>12.1}            target <=12 KiB {}",
                format!("KiB/idle session ({})", o.sessions),
                "-",
                per_session_kib,
                if per_session_kib <= 12.0 { "met" } else { "MISSED" }
            );
            println!("  (imapgate RSS: {before} KiB before, {after} KiB with {} idle sessions)", o.sessions);
            drop(sessions);
        }

        // Let Dovecot reap the sessions of the memory run before timing anything.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let gate = Gate::start(&dir, &pki, &dovecot, "proxy", BENCH_DEFENCE);
        // Each figure alternates direct and proxied rounds so that drift on a shared machine hits both.
        if o.runs("logins") {
            // Steady state: the benchmark's address has logged into the account before (the defence
            // counts parallel logins from never-seen prefixes towards its per-account limits).
            logged_in(gate.addr, &config, "alice@example.org", "alice-pw").await;
            let (mut direct_rate, mut proxy_rate) = (0.0, 0.0);
            let half = o.login_seconds.div_ceil(2);
            for _ in 0..2 {
                direct_rate += logins_per_second(direct, &config, o.clients, half).await / 2.0;
                proxy_rate += logins_per_second(gate.addr, &config, o.clients, half).await / 2.0;
            }
            ratio_line(
                &format!("logins/s ({} clients)", o.clients),
                direct_rate,
                proxy_rate,
                ">=0.95x",
                proxy_rate >= 0.95 * direct_rate,
            );
        }
        if o.runs("login-latency") {
            // The same build with the pool switched off, for comparison (the shipped default has it on).
            let nopool = Gate::start_with_env(
                &dir,
                &pki,
                &dovecot,
                "nopool",
                BENCH_DEFENCE,
                &[("IMAPGATE_BACKEND_TLS__POOL_SIZE", "0")],
            );
            logged_in(nopool.addr, &config, "alice@example.org", "alice-pw").await;
            let ready = "imapgate_backend_pool_ready{backend=\"dovecot\"}";
            for _ in 0..100 {
                if support::metric(gate.admin, ready).await >= 1.0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let pooled_before = support::metric(
                gate.admin,
                "imapgate_backend_pool_logins_total{backend=\"dovecot\",connection=\"pooled\"}",
            )
            .await;
            let (mut direct_samples, mut pool_samples, mut nopool_samples) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..4 {
                direct_samples.extend(login_samples(direct, &config, o.logins / 4).await);
                pool_samples.extend(login_samples(gate.addr, &config, o.logins / 4).await);
                nopool_samples.extend(login_samples(nopool.addr, &config, o.logins / 4).await);
            }
            let pooled = support::metric(
                gate.admin,
                "imapgate_backend_pool_logins_total{backend=\"dovecot\",connection=\"pooled\"}",
            )
            .await
                - pooled_before;
            let (p50_direct, p99_direct) = percentiles(direct_samples);
            let (p50_pool, p99_pool) = percentiles(pool_samples);
            let (p50_nopool, p99_nopool) = percentiles(nopool_samples);
            ratio_line("LOGIN p50 (ms), pool", p50_direct, p50_pool, "-", true);
            ratio_line("LOGIN p99 (ms), pool", p99_direct, p99_pool, "-", true);
            ratio_line("LOGIN p50 (ms), pool off", p50_direct, p50_nopool, "-", true);
            ratio_line("LOGIN p99 (ms), pool off", p99_direct, p99_nopool, "-", true);
            println!(
                "  (one login at a time, {} each; {pooled} of {} proxied logins took a pooled connection; pool off: \
                 IMAPGATE_BACKEND_TLS__POOL_SIZE=0)",
                o.logins, o.logins
            );
            drop(nopool);
        }
        if o.runs("cpu") {
            // imapgate's own CPU (user + system, /proc, 10 ms ticks) per login and per MB fetched. Clients
            // keeping their TLS session (tickets) resume; a client with resumption off does a full handshake.
            let full = {
                let mut c = (*config).clone();
                c.resumption = rustls::client::Resumption::disabled();
                Arc::new(c)
            };
            let logins = o.logins;
            let mut per_login = Vec::new();
            for (label, client) in [("resumed", &config), ("full", &full)] {
                login_samples(gate.addr, client, 5).await;
                let before = gate.cpu_ms();
                login_samples(gate.addr, client, logins).await;
                per_login.push((label, (gate.cpu_ms() - before) / logins as f64));
            }
            for (label, ms) in per_login {
                println!(
                    "{:<28} {:>12} {:>12.3}            (client TLS handshake {label})",
                    "proxy CPU ms per login", "-", ms
                );
            }
            let before = gate.cpu_ms();
            let (_, bytes) = fetch_once(gate.addr, &config).await;
            let ms_per_mb = (gate.cpu_ms() - before) / (bytes as f64 / 1e6);
            println!(
                "{:<28} {:>12} {:>12.3}            (FETCH 1:* BODY.PEEK[], {} MB)",
                "proxy CPU ms per MB",
                "-",
                ms_per_mb,
                bytes / 1_000_000
            );
        }
        if o.runs("noop") {
            let (mut direct_samples, mut proxy_samples) = (Vec::new(), Vec::new());
            for _ in 0..4 {
                direct_samples.extend(noop_samples(direct, &config, o.noops / 4).await);
                proxy_samples.extend(noop_samples(gate.addr, &config, o.noops / 4).await);
            }
            let (p50_direct, p99_direct) = percentiles(direct_samples);
            let (p50_proxy, p99_proxy) = percentiles(proxy_samples);
            ratio_line("NOOP p50 (us)", p50_direct, p50_proxy, "<=1.10x", p50_proxy <= 1.10 * p50_direct);
            ratio_line("NOOP p99 (us)", p99_direct, p99_proxy, "-", true);
        }
        if o.runs("fetch") {
            let (mut fetch_direct, mut fetch_proxy, mut bytes) = (0.0f64, 0.0f64, 0);
            for _ in 0..3 {
                let (rate, n) = fetch_once(direct, &config).await;
                fetch_direct = fetch_direct.max(rate);
                bytes = n;
                fetch_proxy = fetch_proxy.max(fetch_once(gate.addr, &config).await.0);
            }
            ratio_line(
                &format!("FETCH MB/s ({} MB, best of 3)", bytes / 1_000_000),
                fetch_direct,
                fetch_proxy,
                ">=0.95x",
                fetch_proxy >= 0.95 * fetch_direct,
            );
            observer_cost(bytes, fetch_proxy);
        }
        drop(gate);
    });
}
