//! Crowd benchmark: what an organisation's crowds feel through imapgate with the SHIPPED DEFAULT defence
//! (only addresses and certificates set), against the same run with the defence switched off
//! (`[defence] enabled = false`) and against Dovecot directly. Every client of a row comes from ONE
//! address, as behind a webmail server, an office NAT or a balancer.
//!
//! Rows: crowd (N clients, M accounts, login/SELECT/FETCH/LOGOUT loops), webmail (distinct accounts at a
//! steady rate on short connections), shared mailbox (parallel logins of one account, cold and warm), and
//! a credential-stuffing attack hidden inside the crowd (same address): wrong attempts that reached
//! Dovecot, and the crowd's throughput and p99 during it.
//! Run through `scripts/crowd.sh`. Loopback only; every loop is bounded in count and time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::client::{TlsClient, tls_config};
use support::dovecot::Dovecot;
use support::gate::Gate;
use support::pki::Pki;

/// The one address every crowd client comes from.
const CROWD_IP: &str = "127.0.0.2";
const OFF: &str = "[defence]\nenabled = false\n";

struct Options {
    seconds: u64,
    clients: usize,
    accounts: usize,
    webmail_accounts: usize,
    rate: u64,
    attack_seconds: u64,
    attackers: usize,
    only: Option<String>,
}

impl Options {
    fn runs(&self, part: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == part)
    }
}

fn options() -> Options {
    let mut o = Options {
        seconds: 60,
        clients: 50,
        accounts: 200,
        webmail_accounts: 2000,
        rate: 100,
        attack_seconds: 30,
        attackers: 20,
        only: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        if pair[0] == "--only" && pair.len() == 2 {
            o.only = Some(pair[1].clone());
            continue;
        }
        let value: Option<u64> = pair.get(1).and_then(|v| v.parse().ok());
        match (pair[0].as_str(), value) {
            ("--seconds", Some(v)) => o.seconds = v.clamp(1, 600),
            ("--clients", Some(v)) => o.clients = v.clamp(1, 1000) as usize,
            ("--accounts", Some(v)) => o.accounts = v.clamp(1, 10_000) as usize,
            ("--webmail-accounts", Some(v)) => o.webmail_accounts = v.clamp(1, 20_000) as usize,
            ("--rate", Some(v)) => o.rate = v.clamp(1, 1000),
            ("--attack-seconds", Some(v)) => o.attack_seconds = v.clamp(1, 600),
            ("--attackers", Some(v)) => o.attackers = v.clamp(1, 500) as usize,
            _ => {
                eprintln!(
                    "usage: crowd [--seconds S] [--clients N] [--accounts N] [--webmail-accounts N] [--rate R] \
                     [--attack-seconds S] [--attackers N] [--only crowd|webmail|shared|stuffing]"
                );
                std::process::exit(64);
            }
        }
    }
    o
}

fn crowd_user(i: usize) -> (String, String) {
    (format!("crowd{i}@example.org"), format!("crowd-pw-{i}"))
}

fn webmail_user(i: usize) -> (String, String) {
    (format!("wm{i}@example.org"), format!("wm-pw-{i}"))
}

const SHARED: (&str, &str) = ("shared@example.org", "shared-pw");

/// What one row measured.
#[derive(Default)]
struct Tally {
    loops: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
    /// Login latencies in ms.
    logins: std::sync::Mutex<Vec<f64>>,
    /// Why loops did not complete: the tagged reply or the I/O error, counted.
    reasons: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    fn note(&self, reason: String) {
        *self.reasons.lock().unwrap().entry(reason).or_default() += 1;
    }

    fn reasons(&self) -> String {
        let reasons = self.reasons.lock().unwrap();
        reasons.iter().map(|(r, n)| format!("{n}x {r}")).collect::<Vec<_>>().join("; ")
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.logins.lock().unwrap().clone();
        v.sort_by(f64::total_cmp);
        v
    }
}

fn pct(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples[((samples.len() as f64 * p / 100.0) as usize).min(samples.len() - 1)]
}

async fn connect(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> std::io::Result<TlsClient> {
    let ip: IpAddr = CROWD_IP.parse().unwrap();
    let mut c = TlsClient::connect_from(Some(ip), addr, Arc::clone(config)).await?;
    let greeting = c.line().await?;
    if !greeting.starts_with("* OK") {
        return Err(std::io::Error::other(greeting));
    }
    Ok(c)
}

/// One LOGIN; Ok(latency ms) or the tagged reply.
async fn login(c: &mut TlsClient, user: &str, password: &str) -> std::io::Result<Result<f64, String>> {
    let started = Instant::now();
    let reply = c.command("L", &format!("LOGIN {user} {password}")).await?;
    Ok(if reply.tagged.starts_with("L OK") { Ok(started.elapsed().as_secs_f64() * 1000.0) } else { Err(reply.tagged) })
}

/// Connect, LOGIN, SELECT, FETCH, LOGOUT; counted into `tally`.
async fn crowd_loop(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, user: &str, password: &str, tally: &Tally) {
    let attempt = async {
        let mut c = connect(addr, config).await?;
        match login(&mut c, user, password).await? {
            Ok(ms) => tally.logins.lock().unwrap().push(ms),
            Err(reply) => return Ok(Err(reply)),
        }
        c.command("S", "SELECT INBOX").await?;
        c.command("F", "FETCH 1 BODY.PEEK[]").await?;
        c.command("Q", "LOGOUT").await?;
        Ok::<_, std::io::Error>(Ok(()))
    };
    match tokio::time::timeout(Duration::from_secs(30), attempt).await {
        Ok(Ok(Ok(()))) => {
            tally.loops.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Ok(Err(reply))) => {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            tally.note(reply);
        }
        // A connection closed before TLS is a refusal too (admission); other errors are errors.
        Ok(Err(e)) if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            tally.note(format!("connection closed: {e}"));
        }
        Ok(Err(e)) => {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            tally.note(format!("error: {e}"));
        }
        Err(_) => {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            tally.note("timed out after 30 s".into());
        }
    }
}

async fn crowd(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, o: &Options, seconds: u64) -> (Arc<Tally>, f64) {
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..o.clients)
        .map(|client| {
            let (config, tally, accounts) = (Arc::clone(config), Arc::clone(&tally), o.accounts);
            tokio::spawn(async move {
                let mut n = client;
                while Instant::now() < deadline {
                    let (user, password) = crowd_user(n % accounts);
                    crowd_loop(addr, &config, &user, &password, &tally).await;
                    n += 7;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (tally, start.elapsed().as_secs_f64())
}

fn crowd_row(name: &str, tally: &Tally, elapsed: f64) -> (f64, f64) {
    let logins = tally.sorted();
    let per_second = tally.loops.load(Ordering::Relaxed) as f64 / elapsed;
    println!(
        "  {name:<26} {per_second:>8.1} loops/s  {:>6} loops  refused {:>4}  errors {:>3}  login p50 {:>6.2} ms  p99 {:>7.2} ms",
        tally.loops.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        tally.errors.load(Ordering::Relaxed),
        pct(&logins, 50.0),
        pct(&logins, 99.0)
    );
    let reasons = tally.reasons();
    if !reasons.is_empty() {
        println!("  {:<26} not completed: {reasons}", "");
    }
    (per_second, pct(&logins, 99.0))
}

/// Short connections of distinct accounts at `rate` per second: connect, LOGIN, LOGOUT.
async fn webmail(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, o: &Options) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / o.rate));
    let mut tasks = Vec::with_capacity(o.webmail_accounts);
    for i in 0..o.webmail_accounts {
        tick.tick().await;
        let (config, tally) = (Arc::clone(config), Arc::clone(&tally));
        tasks.push(tokio::spawn(async move {
            let (user, password) = webmail_user(i);
            let attempt = async {
                let mut c = connect(addr, &config).await?;
                let outcome = login(&mut c, &user, &password).await?;
                c.command("Q", "LOGOUT").await?;
                Ok::<_, std::io::Error>(outcome)
            };
            match tokio::time::timeout(Duration::from_secs(30), attempt).await {
                Ok(Ok(Ok(ms))) => {
                    tally.logins.lock().unwrap().push(ms);
                    tally.loops.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(Err(_))) | Ok(Err(_)) => {
                    tally.refused.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tally
}

/// `n` parallel logins of one account; (latencies sorted, refusals).
async fn shared_burst(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, n: usize) -> (Vec<f64>, u64) {
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(connect(addr, config).await.unwrap());
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| tokio::spawn(async move { login(&mut c, SHARED.0, SHARED.1).await.ok().and_then(Result::ok) }))
        .collect();
    let mut samples = Vec::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Some(ms) => samples.push(ms),
            None => refused += 1,
        }
    }
    samples.sort_by(f64::total_cmp);
    (samples, refused)
}

/// A value of the gate's /metrics.
async fn metric(gate: &Gate, prefix: &str) -> f64 {
    let (_, body) = support::admin_get(gate.admin, "/metrics").await;
    body.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

fn backend_failures(dovecot: &Dovecot) -> usize {
    dovecot.log().lines().filter(|l| l.contains("auth failed")).count()
}

/// Wrong logins from the crowd's address: half on the crowd's own accounts, half on accounts from a leak
/// that do not exist here. Each attacker keeps one connection and reconnects when it is closed.
async fn stuffing(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    accounts: usize,
    id: usize,
    deadline: Instant,
) -> (u64, u64) {
    let (mut fired, mut refused_connections) = (0u64, 0u64);
    let mut n = id;
    while Instant::now() < deadline {
        let Ok(Ok(mut c)) = tokio::time::timeout(Duration::from_secs(10), connect(addr, &config)).await else {
            refused_connections += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while Instant::now() < deadline {
            n += 13;
            let user = if n % 2 == 0 { crowd_user(n % accounts).0 } else { format!("leaked{n}@example.net") };
            fired += 1;
            let reply =
                tokio::time::timeout(Duration::from_secs(40), login(&mut c, &user, &format!("stuffed-{n}"))).await;
            if !matches!(reply, Ok(Ok(Err(_)))) {
                break;
            }
        }
    }
    (fired, refused_connections)
}

fn deliver_one(dovecot: &Dovecot, user: &str) {
    let message = format!(
        "From: sender@example.org\r\nTo: {user}\r\nSubject: crowd\r\nMessage-ID: <{user}@crowd>\r\n\r\n{}\r\n",
        "A line of body text for the crowd benchmark.\r\n".repeat(40)
    );
    dovecot.deliver(user, "1.crowd", message.as_bytes());
}

fn main() {
    let o = options();
    let dir = support::scratch_dir("imapgate-crowd-");
    let pki = Pki::generate(&dir);
    let mut users: Vec<(String, String)> = (0..o.accounts).map(crowd_user).collect();
    users.extend((0..o.webmail_accounts).map(webmail_user));
    users.push((SHARED.0.to_owned(), SHARED.1.to_owned()));
    let dovecot = Dovecot::start("crowd", &pki, &users);
    for i in 0..o.accounts {
        deliver_one(&dovecot, &crowd_user(i).0);
    }
    let direct: SocketAddr = format!("127.0.0.1:{}", dovecot.imaps_port).parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let config = tls_config(&pki.ca, &[b"imap"]);
        println!("imapgate crowd benchmark: every client of a row from {CROWD_IP}; imapgate with the shipped defaults");
        println!("(only addresses and certificates set) unless the row says otherwise.");
        if o.runs("crowd") {
            println!();
            println!("crowd: {} clients, {} accounts, login/SELECT/FETCH/LOGOUT loops for {} s", o.clients, o.accounts, o.seconds);
            let (t, e) = crowd(direct, &config, &o, o.seconds).await;
            let (direct_rate, direct_p99) = crowd_row("Dovecot direct", &t, e);
            let gate = Gate::start(&dir, &pki, &dovecot, "crowd-off", OFF);
            let (t, e) = crowd(gate.addr, &config, &o, o.seconds).await;
            let (off_rate, off_p99) = crowd_row("imapgate, defence off", &t, e);
            drop(gate);
            let gate = Gate::start(&dir, &pki, &dovecot, "crowd-default", "");
            let (t, e) = crowd(gate.addr, &config, &o, o.seconds).await;
            let (rate, p99) = crowd_row("imapgate, defaults", &t, e);
            let refused = t.refused.load(Ordering::Relaxed) + t.errors.load(Ordering::Relaxed);
            drop(gate);
            println!(
                "  defaults/off throughput {:.2}x (target >= 0.90x {}), refusals {refused} (target 0 {}), login p99 {:.2}x (target <= 1.5x {})",
                rate / off_rate,
                verdict(rate >= 0.9 * off_rate),
                verdict(refused == 0),
                p99 / off_p99,
                verdict(p99 <= 1.5 * off_p99)
            );
            println!(
                "  defaults/direct throughput {:.2}x, login p99 {:.2}x; defence off/direct throughput {:.2}x",
                rate / direct_rate,
                p99 / direct_p99,
                off_rate / direct_rate
            );
        }
        if o.runs("webmail") {
            println!();
            println!(
                "webmail: {} distinct accounts, {} logins/s on short connections (connect, LOGIN, LOGOUT)",
                o.webmail_accounts, o.rate
            );
            for (name, extra) in [("imapgate, defence off", OFF), ("imapgate, defaults", "")] {
                let gate = Gate::start(&dir, &pki, &dovecot, "webmail", extra);
                let started = Instant::now();
                let t = webmail(gate.addr, &config, &o).await;
                let elapsed = started.elapsed().as_secs_f64();
                let logins = t.sorted();
                let delays = metric(&gate, "imapgate_tarpit_delay_seconds_count").await;
                let refused_before_tls = metric(&gate, "imapgate_connections_refused_total").await;
                println!(
                    "  {name:<26} {:>6} ok in {elapsed:.1} s  refused {} (before TLS {refused_before_tls})  errors {}  tarpit/refusal delays {delays}  login p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
                    t.loops.load(Ordering::Relaxed),
                    t.refused.load(Ordering::Relaxed),
                    t.errors.load(Ordering::Relaxed),
                    pct(&logins, 50.0),
                    pct(&logins, 99.0),
                    logins.last().copied().unwrap_or(f64::NAN)
                );
                if extra.is_empty() {
                    let bad = t.refused.load(Ordering::Relaxed) + t.errors.load(Ordering::Relaxed);
                    println!("  target: 0 refusals {}, 0 delays {}", verdict(bad == 0), verdict(delays == 0.0));
                }
            }
        }
        if o.runs("shared") {
            println!();
            println!("shared mailbox: 50 parallel logins of one account from one address");
            let (samples, refused) = shared_burst(direct, &config, 50).await;
            println!("  {:<26} ok {:>2}  refused {refused}  login p50 {:.2} ms  max {:.2} ms", "Dovecot direct", samples.len(), pct(&samples, 50.0), pct(&samples, 100.0));
            for (name, extra) in [("imapgate, defence off", OFF), ("imapgate, defaults", "")] {
                let gate = Gate::start(&dir, &pki, &dovecot, "shared", extra);
                for round in ["first (no record)", "again (familiar)"] {
                    let (samples, refused) = shared_burst(gate.addr, &config, 50).await;
                    println!(
                        "  {name:<26} {round:<18} ok {:>2}  refused {refused}  login p50 {:.2} ms  max {:.2} ms",
                        samples.len(),
                        pct(&samples, 50.0),
                        pct(&samples, 100.0)
                    );
                }
                let delays = metric(&gate, "imapgate_tarpit_delay_seconds_count").await;
                println!("  {name:<26} tarpit/account delays: {delays} (target 0 {})", verdict(delays == 0.0));
            }
        }
        if o.runs("stuffing") {
            println!();
            println!(
                "stuffing inside the crowd: {} attacker connections from {CROWD_IP} (half the crowd's accounts, half leaked names) during {} s of the crowd",
                o.attackers, o.attack_seconds
            );
            let gate = Gate::start(&dir, &pki, &dovecot, "stuffing", "");
            // The crowd has been using this front door: every account has logged in through it once, and a
            // round alone earns its standing and is the baseline.
            let warm = Arc::new(Tally::default());
            let addr = gate.addr;
            let tasks: Vec<_> = (0..o.clients.min(o.accounts))
                .map(|client| {
                    let (config, warm, step, accounts) = (Arc::clone(&config), Arc::clone(&warm), o.clients, o.accounts);
                    tokio::spawn(async move {
                        for i in (client..accounts).step_by(step) {
                            let (user, password) = crowd_user(i);
                            crowd_loop(addr, &config, &user, &password, &warm).await;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            let (t, e) = crowd(gate.addr, &config, &o, 10).await;
            let (base_rate, base_p99) = crowd_row("crowd alone (10 s before)", &t, e);
            let before = backend_failures(&dovecot);
            let deadline = Instant::now() + Duration::from_secs(o.attack_seconds);
            let attackers: Vec<_> = (0..o.attackers)
                .map(|id| tokio::spawn(stuffing(gate.addr, Arc::clone(&config), o.accounts, id, deadline)))
                .collect();
            let (t, e) = crowd(gate.addr, &config, &o, o.attack_seconds).await;
            let (mut fired, mut dropped) = (0, 0);
            for a in attackers {
                let (f, d) = a.await.unwrap();
                fired += f;
                dropped += d;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let reached = backend_failures(&dovecot) - before;
            let (rate, p99) = crowd_row("crowd during the attack", &t, e);
            println!("  wrong attempts fired {fired}, reached Dovecot {reached}, answered without backend contact {}", fired.saturating_sub(reached as u64));
            println!("  attacker connections refused or dropped {dropped}");
            let (_, body) = support::admin_get(gate.admin, "/metrics").await;
            let mut outcomes: Vec<String> = body
                .lines()
                .filter(|l| l.starts_with("imapgate_auth_attempts_total") && !l.ends_with(" 0"))
                .map(|l| l.trim_start_matches("imapgate_auth_attempts_total").to_owned())
                .collect();
            outcomes.sort();
            println!("  login outcomes at imapgate (crowd and attackers): {}", outcomes.join(", "));
            let closures = gate.terminate().lines().filter(|l| l.contains("\"unfamiliar_closed\"")).count();
            println!("  closures of the address to unfamiliar accounts: {closures}");
            println!(
                "  crowd throughput {:.2}x and login p99 {:.2}x of the crowd alone",
                rate / base_rate,
                p99 / base_p99
            );
        }
    });
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}
