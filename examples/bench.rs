//! Benchmark: the same Dovecot reached directly (implicit TLS), through imapgate (two TLS legs: implicit TLS
//! from the client, STARTTLS to the backend), through nginx's mail proxy (one TLS leg, plaintext to the
//! backend) and through HAProxy in TCP mode (a passthrough of the client's TLS), in one run. Prints, each
//! beside its comparison: memory per idle IDLE session (PSS), logins/s at 50 concurrent clients, LOGIN
//! latency with and without the ready-connection pool, proxy CPU per login and per MB, NOOP round trips,
//! FETCH throughput on a >100 MB mailbox and the observer's cost. imapgate runs its shipped defaults except
//! for the per-address limits (`BENCH_DEFENCE`: every benchmark client comes from 127.0.0.1); logins/s is
//! printed with the shipped `[defence]` too.
//! Run through `scripts/bench.sh`, which installs nginx and HAProxy from Debian when missing and builds the
//! release binaries. Loopback only; every loop is bounded in count and time.
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
use support::haproxy::Haproxy;
use support::nginx::Nginx;
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
    /// The larger idle crowd imapgate is measured at too (per-session cost within 10% of `sessions`').
    crowd: usize,
    mailbox_mb: usize,
    /// Run only this part: memory, logins, login-latency, cpu, noop, fetch or shared.
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
        crowd: 5000,
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
            ("--crowd", Some(v)) => o.crowd = v,
            ("--mailbox-mb", Some(v)) => o.mailbox_mb = v,
            _ => {
                eprintln!(
                    "usage: bench [--clients N] [--login-seconds S] [--noops N] [--logins N] [--sessions N] [--crowd N] [--mailbox-mb M] [--only memory|logins|login-latency|cpu|noop|fetch|shared]"
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

/// A proxy under test: where clients connect and which processes do its work.
struct Contender {
    name: &'static str,
    addr: SocketAddr,
    pids: Vec<u32>,
}

impl Contender {
    fn cpu_ms(&self) -> f64 {
        support::procs::cpu_ms(&self.pids)
    }

    fn pss_kib(&self) -> u64 {
        support::procs::pss_kib(&self.pids)
    }
}

/// The comparison proxies of one run (nginx only where Debian's nginx and its mail module are installed).
struct Others {
    nginx: Option<(Nginx, Contender)>,
    haproxy: (Haproxy, Contender),
}

impl Others {
    fn start(pki: &Pki, dovecot: &Dovecot) -> Others {
        let nginx = support::nginx::available().then(|| {
            let plain: SocketAddr = format!("127.0.0.1:{}", dovecot.imap_port).parse().unwrap();
            // As many workers as imapgate has runtime threads (one per core).
            let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
            let nginx = Nginx::start(pki, plain, workers);
            let contender = Contender { name: "nginx", addr: nginx.addr, pids: support::procs::family(nginx.pid()) };
            (nginx, contender)
        });
        if nginx.is_none() {
            eprintln!(
                "nginx or libnginx-mod-mail is not installed: its columns stay empty (scripts/bench.sh installs them)"
            );
        }
        let imaps: SocketAddr = format!("127.0.0.1:{}", dovecot.imaps_port).parse().unwrap();
        let haproxy = Haproxy::passthrough(imaps);
        let contender =
            Contender { name: "haproxy", addr: haproxy.addr, pids: support::procs::family(haproxy.keeper_pid()) };
        Others { nginx, haproxy: (haproxy, contender) }
    }

    fn all(&self) -> Vec<&Contender> {
        self.nginx.iter().map(|(_, c)| c).chain([&self.haproxy.1]).collect()
    }

    fn nginx(&self) -> Option<&Contender> {
        self.nginx.as_ref().map(|(_, c)| c)
    }

    fn haproxy(&self) -> &Contender {
        &self.haproxy.1
    }
}

/// One row: the direct figure, then imapgate, nginx and HAProxy, each with its ratio to direct where there
/// is a direct figure.
fn row(name: &str, direct: Option<f64>, gate: f64, nginx: Option<f64>, haproxy: Option<f64>, target: &str, met: bool) {
    let cell = |v: Option<f64>| match (v, direct) {
        (Some(v), Some(d)) => format!("{v:>9.2} {:>6.3}x", v / d),
        (Some(v), None) => format!("{v:>9.3}        "),
        (None, _) => format!("{:>9}        ", "-"),
    };
    println!(
        "{name:<30} {:>9} {} {} {}  {target} {}",
        direct.map_or("-".to_owned(), |d| format!("{d:.2}")),
        cell(Some(gate)),
        cell(nginx),
        cell(haproxy),
        if target.is_empty() {
            ""
        } else if met {
            "met"
        } else {
            "MISSED"
        }
    );
}

/// Logs in and enters IDLE, as a mail client waiting for new mail does.
async fn idling(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> TlsClient {
    let mut c = logged_in(addr, config, "alice@example.org", "alice-pw").await;
    c.command("S", "SELECT INBOX").await.unwrap();
    c.send(b"I IDLE\r\n").await.unwrap();
    let line = c.line().await.unwrap();
    assert!(line.starts_with('+'), "{line}");
    c
}

/// Opens `n` idle sessions (50 at a time) and adds them to `sessions`.
async fn open_idle(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, n: usize, sessions: &mut Vec<TlsClient>) {
    for chunk in 0..n.div_ceil(50) {
        let batch: Vec<_> = (0..50.min(n - chunk * 50))
            .map(|_| {
                let config = Arc::clone(config);
                tokio::spawn(async move { idling(addr, &config).await })
            })
            .collect();
        for task in batch {
            sessions.push(task.await.unwrap());
        }
    }
}

/// PSS growth per idle session of `contender` with `n` sessions, in KiB; the sessions are returned open.
async fn idle_cost(
    contender: &Contender,
    config: &Arc<rustls::ClientConfig>,
    n: usize,
    sessions: &mut Vec<TlsClient>,
    before: u64,
) -> f64 {
    open_idle(contender.addr, config, n - sessions.len(), sessions).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = contender.pss_kib();
    after.saturating_sub(before) as f64 / n as f64
}

fn main() {
    let o = options();
    let dir = support::scratch_dir("imapgate-bench-");
    let pki = Pki::generate(&dir);
    eprintln!("starting Dovecot, imapgate, nginx and HAProxy; filling a {} MB mailbox ...", o.mailbox_mb);
    let dovecot = Dovecot::start_for_crowds("bench", &pki);
    fill_mailbox(&dovecot, o.mailbox_mb);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let config = tls_config(&pki.ca, &[b"imap"]);
        let direct: SocketAddr = format!("127.0.0.1:{}", dovecot.imaps_port).parse().unwrap();

        println!(
            "imapgate benchmark: Dovecot direct (implicit TLS); imapgate (TLS both legs, shipped defaults but \
             [defence] per-address limits opened for one client address); nginx mail (TLS to the client, plaintext \
             to Dovecot); HAProxy TCP passthrough (the client's TLS to Dovecot's 993)"
        );
        println!(
            "machine: {} cores; client, proxies and Dovecot share them; one run, so only figures of this run compare",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!("{:<30} {:>9} {:>16} {:>16} {:>16}  target", "", "direct", "imapgate", "nginx", "haproxy");

        if o.runs("memory") {
            // Fresh processes: PSS growth per idle session in IDLE.
            let gate = Gate::start(&dir, &pki, &dovecot, "memory", BENCH_DEFENCE);
            let gate_c = Contender { name: "imapgate", addr: gate.addr, pids: vec![gate.pid()] };
            let others = Others::start(&pki, &dovecot);
            // IMAPGATE_BENCH_BASELINE=path/to/an/older/imapgate: its memory is measured in the same run.
            let baseline_path = std::env::var("IMAPGATE_BENCH_BASELINE").ok();
            let baseline = baseline_path.as_deref().map(|path| {
                let gate = Gate::start_with_env(
                    &dir,
                    &pki,
                    &dovecot,
                    "baseline",
                    BENCH_DEFENCE,
                    &[(support::gate::BINARY, path)],
                );
                let contender = Contender { name: "baseline", addr: gate.addr, pids: vec![gate.pid()] };
                (gate, contender)
            });
            let mut costs = Vec::new();
            for contender in [&gate_c].into_iter().chain(baseline.as_ref().map(|b| &b.1)).chain(others.all()) {
                // Warm up (the first sessions allocate what every later one shares).
                drop(vec![idling(contender.addr, &config).await, idling(contender.addr, &config).await]);
                tokio::time::sleep(Duration::from_millis(500)).await;
                let before = contender.pss_kib();
                let mut sessions = Vec::with_capacity(o.crowd);
                let cost = idle_cost(contender, &config, o.sessions, &mut sessions, before).await;
                let crowd = if matches!(contender.name, "imapgate" | "baseline") && o.crowd > o.sessions {
                    Some(idle_cost(contender, &config, o.crowd, &mut sessions, before).await)
                } else {
                    None
                };
                costs.push((contender.name, cost, crowd));
                drop(sessions);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let cost = |name: &str| costs.iter().find(|c| c.0 == name).map(|c| c.1);
            let gate_cost = cost("imapgate").unwrap_or(f64::MAX);
            row(
                &format!("KiB/idle session ({})", o.sessions),
                None,
                gate_cost,
                cost("nginx"),
                cost("haproxy"),
                "<=12 KiB",
                gate_cost <= 12.0,
            );
            if let Some((_, _, Some(crowd))) = costs.iter().find(|c| c.0 == "imapgate") {
                row(
                    &format!("KiB/idle session ({})", o.crowd),
                    None,
                    *crowd,
                    None,
                    None,
                    "<=12 KiB, within 10% of the above",
                    *crowd <= 12.0 && *crowd <= gate_cost * 1.1,
                );
            }
            if let Some((_, _, baseline_crowd)) = costs.iter().find(|c| c.0 == "baseline") {
                let cost = cost("baseline").unwrap_or(f64::NAN);
                let crowd = baseline_crowd.map_or(String::from("-"), |c| format!("{c:.2}"));
                println!(
                    "  baseline {}: {cost:.2} KiB/idle session ({}), {crowd} ({})",
                    baseline_path.as_deref().unwrap_or(""),
                    o.sessions,
                    o.crowd
                );
            }
            println!("  (PSS growth of each proxy's processes with the sessions logged in, SELECTed and in IDLE)");
            drop(baseline);
            drop(others);
            drop(gate);
            // Let Dovecot reap the sessions of the memory run before timing anything.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }

        let gate = Gate::start(&dir, &pki, &dovecot, "proxy", BENCH_DEFENCE);
        let gate_c = Contender { name: "imapgate", addr: gate.addr, pids: vec![gate.pid()] };
        let others = Others::start(&pki, &dovecot);
        // Each figure alternates direct and proxied rounds so that drift on a shared machine hits all.
        if o.runs("logins") {
            // Steady state: the benchmark's address has logged into the account before (the defence
            // counts parallel logins from never-seen prefixes towards its per-account limits).
            logged_in(gate.addr, &config, "alice@example.org", "alice-pw").await;
            let targets: Vec<&Contender> = [&gate_c].into_iter().chain(others.all()).collect();
            let mut rates = vec![0.0; targets.len()];
            let mut direct_rate = 0.0;
            let half = o.login_seconds.div_ceil(2);
            for _ in 0..2 {
                direct_rate += logins_per_second(direct, &config, o.clients, half).await / 2.0;
                for (i, t) in targets.iter().enumerate() {
                    rates[i] += logins_per_second(t.addr, &config, o.clients, half).await / 2.0;
                }
            }
            // The same with the shipped [defence] untouched: one address that has logged in before earns
            // its capacity (standing) and must not be throttled to a trickle.
            let shipped = Gate::start(&dir, &pki, &dovecot, "shipped-defence", "");
            logged_in(shipped.addr, &config, "alice@example.org", "alice-pw").await;
            let mut shipped_rate = 0.0;
            for _ in 0..2 {
                shipped_rate += logins_per_second(shipped.addr, &config, o.clients, half).await / 2.0;
            }
            drop(shipped);
            let rate = |name: &str| targets.iter().position(|t| t.name == name).map(|i| rates[i]);
            row(
                &format!("logins/s ({} clients), shipped [defence]", o.clients),
                Some(direct_rate),
                shipped_rate,
                None,
                None,
                ">=0.95x",
                shipped_rate >= 0.95 * direct_rate,
            );
            row(
                &format!("logins/s ({} clients)", o.clients),
                Some(direct_rate),
                rates[0],
                rate("nginx"),
                rate("haproxy"),
                ">=0.95x",
                rates[0] >= 0.95 * direct_rate,
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
            let pooled_series = "imapgate_backend_pool_logins_total{backend=\"dovecot\",connection=\"pooled\"}";
            let pooled_before = support::metric(gate.admin, pooled_series).await;
            let mut samples: Vec<Vec<f64>> = vec![Vec::new(); 5];
            let nginx_addr = others.nginx().map(|n| n.addr);
            for _ in 0..4 {
                samples[0].extend(login_samples(direct, &config, o.logins / 4).await);
                samples[1].extend(login_samples(gate.addr, &config, o.logins / 4).await);
                samples[2].extend(login_samples(nopool.addr, &config, o.logins / 4).await);
                if let Some(addr) = nginx_addr {
                    samples[3].extend(login_samples(addr, &config, o.logins / 4).await);
                }
                samples[4].extend(login_samples(others.haproxy().addr, &config, o.logins / 4).await);
            }
            let pooled = support::metric(gate.admin, pooled_series).await - pooled_before;
            let p: Vec<Option<(f64, f64)>> =
                samples.into_iter().map(|s| (!s.is_empty()).then(|| percentiles(s))).collect();
            let (d50, d99) = p[0].unwrap();
            let at = |i: usize, pick: fn((f64, f64)) -> f64| p[i].map(pick);
            row("LOGIN p50 (ms), pool", Some(d50), p[1].unwrap().0, at(3, |x| x.0), at(4, |x| x.0), "", true);
            row("LOGIN p99 (ms), pool", Some(d99), p[1].unwrap().1, at(3, |x| x.1), at(4, |x| x.1), "", true);
            row("LOGIN p50 (ms), pool off", Some(d50), p[2].unwrap().0, None, None, "", true);
            row("LOGIN p99 (ms), pool off", Some(d99), p[2].unwrap().1, None, None, "", true);
            println!(
                "  (one login at a time, {} each; {pooled} of {} proxied logins took a pooled connection; pool off: \
                 IMAPGATE_BACKEND_TLS__POOL_SIZE=0)",
                o.logins, o.logins
            );
            drop(nopool);
        }
        if o.runs("cpu") {
            // Each proxy's own CPU (user + system, /proc, 10 ms ticks) per login and per MB fetched. Clients
            // keeping their TLS session (tickets) resume; a client with resumption off does a full handshake.
            let full = {
                let mut c = (*config).clone();
                c.resumption = rustls::client::Resumption::disabled();
                Arc::new(c)
            };
            let contenders: Vec<&Contender> = [&gate_c].into_iter().chain(others.all()).collect();
            let mut per_login: Vec<(&str, Vec<f64>)> = Vec::new();
            let admin = gate.admin;
            let handshakes = move |leg: &'static str, kind: &'static str| async move {
                support::metric(admin, &format!("imapgate_tls_handshakes_total{{kind=\"{kind}\",leg=\"{leg}\"}}")).await
            };
            let backend_before = (handshakes("backend", "full").await, handshakes("backend", "resumed").await);
            for (label, client) in [("resumed", &config), ("full", &full)] {
                let mut figures = Vec::new();
                for c in &contenders {
                    login_samples(c.addr, client, 5).await;
                    let before = c.cpu_ms();
                    login_samples(c.addr, client, o.logins).await;
                    figures.push((c.cpu_ms() - before) / o.logins as f64);
                }
                per_login.push((label, figures));
            }
            let of = |figures: &[f64], name: &str| contenders.iter().position(|c| c.name == name).map(|i| figures[i]);
            for (label, figures) in &per_login {
                let nginx = of(figures, "nginx");
                row(
                    &format!("proxy CPU ms/login ({label})"),
                    None,
                    figures[0],
                    nginx,
                    of(figures, "haproxy"),
                    "<= nginx",
                    nginx.is_none_or(|n| figures[0] <= n),
                );
            }
            let mut per_mb = Vec::new();
            let mut megabytes = 0;
            for c in &contenders {
                let before = c.cpu_ms();
                let (_, bytes) = fetch_once(c.addr, &config).await;
                megabytes = bytes / 1_000_000;
                per_mb.push((c.cpu_ms() - before) / (bytes as f64 / 1e6));
            }
            let nginx = of(&per_mb, "nginx");
            row(
                &format!("proxy CPU ms/MB ({megabytes} MB)"),
                None,
                per_mb[0],
                nginx,
                of(&per_mb, "haproxy"),
                "<= nginx",
                nginx.is_none_or(|n| per_mb[0] <= n),
            );
            println!("  (CPU of each proxy's processes from /proc; logins one at a time, {} each)", o.logins);
            let (full, resumed) = (
                handshakes("backend", "full").await - backend_before.0,
                handshakes("backend", "resumed").await - backend_before.1,
            );
            println!("  (imapgate's backend leg: {resumed} of {} TLS handshakes with Dovecot resumed)", full + resumed);
        }
        if o.runs("noop") {
            let contenders: Vec<&Contender> = [&gate_c].into_iter().chain(others.all()).collect();
            let mut direct_samples = Vec::new();
            let mut samples: Vec<Vec<f64>> = vec![Vec::new(); contenders.len()];
            for _ in 0..4 {
                direct_samples.extend(noop_samples(direct, &config, o.noops / 4).await);
                for (i, c) in contenders.iter().enumerate() {
                    samples[i].extend(noop_samples(c.addr, &config, o.noops / 4).await);
                }
            }
            let (d50, d99) = percentiles(direct_samples);
            let p: Vec<(f64, f64)> = samples.into_iter().map(percentiles).collect();
            let of = |name: &str| contenders.iter().position(|c| c.name == name).map(|i| p[i]);
            let haproxy_ratio = of("haproxy").map_or(f64::MAX, |h| h.0 / d50);
            row(
                "NOOP p50 (us)",
                Some(d50),
                p[0].0,
                of("nginx").map(|x| x.0),
                of("haproxy").map(|x| x.0),
                "ratio <= haproxy's",
                p[0].0 / d50 <= haproxy_ratio,
            );
            row("NOOP p99 (us)", Some(d99), p[0].1, of("nginx").map(|x| x.1), of("haproxy").map(|x| x.1), "", true);
        }
        if o.runs("fetch") {
            let contenders: Vec<&Contender> = [&gate_c].into_iter().chain(others.all()).collect();
            let (mut fetch_direct, mut bytes) = (0.0f64, 0);
            let mut rates = vec![0.0f64; contenders.len()];
            for _ in 0..3 {
                let (rate, n) = fetch_once(direct, &config).await;
                fetch_direct = fetch_direct.max(rate);
                bytes = n;
                for (i, c) in contenders.iter().enumerate() {
                    rates[i] = rates[i].max(fetch_once(c.addr, &config).await.0);
                }
            }
            let of = |name: &str| contenders.iter().position(|c| c.name == name).map(|i| rates[i]);
            row(
                &format!("FETCH MB/s ({} MB, best of 3)", bytes / 1_000_000),
                Some(fetch_direct),
                rates[0],
                of("nginx"),
                of("haproxy"),
                ">=0.95x",
                rates[0] >= 0.95 * fetch_direct,
            );
            observer_cost(bytes, rates[0]);
        }
        drop(others);
        drop(gate);
        if o.runs("shared") {
            shared_port(&dir, &pki, &dovecot, &config, o.logins).await;
        }
    });
}

/// An HTTPS GET of `path` through `addr` (server name `localhost`, trusting `config`'s roots): MB/s of the
/// body and its size.
async fn https_get(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, path: &str) -> (f64, usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::clone(config)).connect(name, tcp).await.unwrap();
    let started = Instant::now();
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut total = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    (total as f64 / 1e6 / started.elapsed().as_secs_f64(), total)
}

/// IMAP on a port shared with a web server: the CPU per login there against 993 (the peek's cost), and the
/// passthrough's MB/s against HAProxy's TCP passthrough, both sending nginx a PROXY v2 header.
async fn shared_port(
    dir: &std::path::Path,
    pki: &Pki,
    dovecot: &Dovecot,
    config: &Arc<rustls::ClientConfig>,
    logins: usize,
) {
    if !std::path::Path::new("/usr/sbin/nginx").exists() {
        println!("shared port: skipped (no /usr/sbin/nginx; scripts/bench.sh installs nginx-light)");
        return;
    }
    // The web site: its own CA and certificate for "localhost", a large file.
    let web_pki = Pki::generate(&dir.join("web-pki"));
    let nginx = Nginx::start_web(&web_pki.cert, &web_pki.key);
    let body = 512 * 1024 * 1024;
    std::fs::File::create(nginx.dir.join("big")).unwrap().set_len(body).unwrap();
    let web_client = tls_config(&web_pki.ca, &[b"http/1.1"]);
    let port = support::free_port();
    let extra = format!(
        "{BENCH_DEFENCE}\n[[server.shared_listen]]\nlisten = \"127.0.0.1:{port}\"\nweb = \"{}\"\nimap_names = [\"imap.localhost\"]\n",
        nginx.addr
    );
    let gate = Gate::start(dir, pki, dovecot, "shared", &extra);
    let shared: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let haproxy = Haproxy::passthrough_proxied(nginx.addr);
    println!("shared port (443 beside nginx; shipped defaults but [defence] opened for one client address):");
    // CPU per login, 993 and the shared port alternating (ALPN imap routes the shared one to IMAP).
    let (mut on_993, mut on_shared) = (0.0, 0.0);
    login_samples(gate.addr, config, 5).await;
    login_samples(shared, config, 5).await;
    for _ in 0..4 {
        let before = gate.cpu_ms();
        login_samples(gate.addr, config, logins / 4).await;
        on_993 += gate.cpu_ms() - before;
        let before = gate.cpu_ms();
        login_samples(shared, config, logins / 4).await;
        on_shared += gate.cpu_ms() - before;
    }
    let n = (logins / 4 * 4) as f64;
    println!(
        "  proxy CPU ms/login: on 993 {:.3}, on the shared port {:.3} ({:+.1}%), {} logins each, alternating",
        on_993 / n,
        on_shared / n,
        (on_shared / on_993 - 1.0) * 100.0,
        logins / 4 * 4
    );
    // Passthrough MB/s, best of 3, alternating.
    let (mut via_gate, mut via_haproxy, mut size) = (0.0f64, 0.0f64, 0);
    for _ in 0..3 {
        let (rate, bytes) = https_get(shared, &web_client, "/big").await;
        via_gate = via_gate.max(rate);
        size = bytes;
        via_haproxy = via_haproxy.max(https_get(haproxy.addr, &web_client, "/big").await.0);
    }
    println!(
        "  passthrough MB/s ({} MB over HTTPS from nginx, best of 3): imapgate {via_gate:.0}, HAProxy TCP {via_haproxy:.0} ({:.2}x)",
        size / 1_000_000,
        via_gate / via_haproxy
    );
    drop(gate);
}
