//! Routing benchmark: three Dovecot members in one pool behind imapgate with the shipped `[health]`
//! defaults, logins at a steady rate; one member is switched off (its address refuses connections, as a
//! crashed server's would) and on again. Prints the time until its circuit opens, the logins that failed
//! meanwhile and after (failover "none" and "next"), the time until it is used again, and the login
//! latency an HTTP lookup adds with a cold and a warm cache. Then a member that hangs instead of dying (it
//! accepts and never greets; it hangs after STARTTLS; its SYNs vanish): 200 users log in, 20 at a time,
//! and the round prints how long the hung member's users and everyone else waited, and what they got.
//! Run with `scripts/failover.sh` (`scripts/failover.sh hang` for the hung members only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::client::TlsClient;
use support::dovecot::Dovecot;
use support::hung::{Hang, HungServer, Login, Outcome};
use support::lookup::LookupService;
use support::pki::Pki;
use support::proxy::{TestProxy, backend, config_text};
use tokio::net::{TcpListener, TcpStream};

/// Demo users whose passwords need no quoting.
const USERS: &[(&str, &str)] = &[
    ("alice@example.org", "alice-pw"),
    ("bob@example.com", "bob-pw"),
    ("ceo@example.org", "ceo-pw"),
    ("big@example.org", "big-pw"),
    ("pipeline@example.org", "pipe-pw"),
    ("fetcher@example.org", "fetch-pw"),
];

/// A TCP forwarder in front of a member that can be switched off (connections refused, open ones cut)
/// and on again at the same address.
struct Switch {
    port: u16,
    on: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
}

impl Switch {
    async fn start(target: u16) -> Switch {
        let port = support::free_port();
        let on = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(AtomicU64::new(0));
        let (on2, generation2) = (Arc::clone(&on), Arc::clone(&generation));
        tokio::spawn(async move {
            loop {
                if !on2.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
                let gen_now = generation2.load(Ordering::SeqCst);
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((mut client, _)) = accepted else { continue };
                            let generation = Arc::clone(&generation2);
                            tokio::spawn(async move {
                                let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)).await else { return };
                                let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
                                tokio::pin!(copy);
                                loop {
                                    tokio::select! {
                                        _ = &mut copy => return,
                                        () = tokio::time::sleep(Duration::from_millis(20)) => {
                                            if generation.load(Ordering::SeqCst) != gen_now { return; }
                                        }
                                    }
                                }
                            });
                        }
                        () = tokio::time::sleep(Duration::from_millis(20)) => {
                            if !on2.load(Ordering::SeqCst) { break; }
                        }
                    }
                }
                drop(listener);
            }
        });
        // Listening once the first accept loop runs.
        support::wait_until(Duration::from_secs(5), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
        Switch { port, on, generation }
    }

    fn off(&self) {
        self.on.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn on(&self) {
        self.on.store(true, Ordering::SeqCst);
    }
}

async fn login(proxy: &TestProxy, ca: &std::path::Path, user: &str, pass: &str) -> (bool, Duration) {
    let started = Instant::now();
    let Ok(mut c) = TlsClient::connect(proxy.addr, ca).await else { return (false, started.elapsed()) };
    if c.line().await.is_err() {
        return (false, started.elapsed());
    }
    let t = Instant::now();
    let ok = matches!(c.command("a", &format!("LOGIN {user} {pass}")).await, Ok(r) if r.tagged.starts_with("a OK"));
    let took = t.elapsed();
    if ok {
        let _ = c.command("b", "LOGOUT").await;
    }
    (ok, took)
}

async fn sample(proxy: &TestProxy, series: &str) -> f64 {
    let (_, body) = support::admin_get(proxy.admin, "/metrics").await;
    body.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

/// One run: steady logins (10/s, round robin over the users), member m2 off at 5 s and on at 35 s.
async fn run(pki: &Pki, switches: &[Switch], failover: &str) {
    let rest = format!(
        "{}{}{}\n[[pool]]\nname = \"cluster\"\nfailover = \"{failover}\"\n\
         members = [{{ backend = \"m1\" }}, {{ backend = \"m2\" }}, {{ backend = \"m3\" }}]\n[route]\ndefault = \"cluster\"\n",
        backend("m1", switches[0].port),
        backend("m2", switches[1].port),
        backend("m3", switches[2].port)
    );
    // The shipped [health] and [defence] defaults: only the test harness's own settings are added.
    let text = config_text(pki, &rest).replace(support::proxy::DEFAULT_TEST_DEFENCE, "");
    let proxy = Arc::new(TestProxy::start(&text).await);
    let started = Instant::now();
    let (off_at, on_at, end_at) = (Duration::from_secs(5), Duration::from_secs(35), Duration::from_secs(60));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut tasks = Vec::new();
    let (mut switched_off, mut switched_on) = (false, false);
    let (mut opened, mut closed) = (None, None);
    for i in 0.. {
        tick.tick().await;
        let now = started.elapsed();
        if now >= end_at {
            break;
        }
        if now >= off_at && !switched_off {
            switches[1].off();
            switched_off = true;
        }
        if now >= on_at && !switched_on {
            switches[1].on();
            switched_on = true;
        }
        if i % 5 == 0 {
            let state_open = sample(&proxy, "imapgate_circuit_transitions_total{backend=\"m2\",state=\"open\"}").await;
            if opened.is_none() && state_open >= 1.0 {
                opened = Some(now);
            }
            if switched_on && closed.is_none() && sample(&proxy, "imapgate_backend_up{backend=\"m2\"}").await == 1.0 {
                closed = Some(now);
            }
        }
        let (user, pass) = USERS[i % USERS.len()];
        let (proxy, ca, failed) = (Arc::clone(&proxy), pki.ca.clone(), Arc::clone(&failed));
        tasks.push(tokio::spawn(async move {
            let (ok, _) = login(&proxy, &ca, user, pass).await;
            if !ok {
                failed.lock().unwrap().push(now);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let failed = failed.lock().unwrap().clone();
    let opened_at = opened.map(|o| o.saturating_sub(off_at));
    let until_open = failed.iter().filter(|t| **t >= off_at && opened.is_none_or(|o| **t < o)).count();
    let after_open = failed.iter().filter(|t| opened.is_some_and(|o| **t >= o) && **t < on_at).count();
    let back = closed.map(|c| c.saturating_sub(on_at));
    let outage_logins = (on_at - off_at).as_millis() / 100;
    println!(
        "failover {failover:<5} circuit open after {:>7}; failed logins: {until_open:>3} before it opened, {after_open:>3} while open, of {outage_logins} in the outage; used again {:>7} after it came back",
        opened_at.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64())),
        back.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64())),
    );
    if let Ok(proxy) = Arc::try_unwrap(proxy) {
        proxy.stop().await;
    }
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn lookup_latency(pki: &Pki, dir: &std::path::Path, members: &[u16]) {
    let answers: serde_json::Map<String, serde_json::Value> = USERS
        .iter()
        .enumerate()
        .map(|(i, (u, _))| {
            (u.to_string(), serde_json::json!({"server": "127.0.0.1", "port": members[i % members.len()]}))
        })
        .collect();
    let service = LookupService::start(dir, &serde_json::Value::Object(answers));
    let backends: String = members.iter().enumerate().map(|(i, p)| backend(&format!("m{}", i + 1), *p)).collect();
    let plain = TestProxy::start(&config_text(pki, &format!("{backends}\n[route]\ndefault = \"m1\"\n"))).await;
    let looked = TestProxy::start(&config_text(
        pki,
        &format!("{backends}\n[route]\ndefault = \"m1\"\n[route.lookup]\nurl = \"{}\"\n", service.url()),
    ))
    .await;
    let (mut base, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..5 {
        for (user, pass) in USERS {
            base.push(login(&plain, &pki.ca, user, pass).await.1);
        }
        // The cache is 60 s by default: the first round asks the service, the others hit the cache.
        for (user, pass) in USERS {
            let took = login(&looked, &pki.ca, user, pass).await.1;
            if round == 0 { cold.push(took) } else { warm.push(took) }
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "LOGIN p50 (ms)  static rules {:>6.2}   lookup cold cache {:>6.2}   lookup warm cache {:>6.2}   ({} lookups for {} logins)",
        ms(percentile(base, 0.5)),
        ms(percentile(cold, 0.5)),
        ms(percentile(warm, 0.5)),
        service.requests().len(),
        USERS.len() * 5
    );
    plain.stop().await;
    looked.stop().await;
}

/// Accounts of the hung-member rounds.
const HANG_USERS: usize = 200;

/// One round with a hung member m3 beside two real Dovecots: the shipped `[backend_tls]` and `[health]`
/// settings, the harness's wide per-address `[defence]` (every client comes from 127.0.0.1).
/// `hang` None: the baseline, m3 is the third real Dovecot. Returns the other members' users' p99.
async fn hung_round(pki: &Pki, members: &[Dovecot], hang: Option<Hang>, failover: &str) -> Duration {
    let hung = match hang {
        Some(hang) => Some(HungServer::start(hang).await),
        None => None,
    };
    let m3 = hung.as_ref().map_or(members[2].imap_port, |h| h.port);
    let text = support::hung::pool_config(pki, [members[0].imap_port, members[1].imap_port, m3], failover);
    let proxy = TestProxy::start(&text).await;
    // Both real members proven up (the first checks), as in a running cluster whose member just hung.
    let real: &[&str] = if hang.is_some() { &["m1", "m2"] } else { &support::hung::MEMBERS };
    for name in real {
        let series = format!("imapgate_backend_up{{backend=\"{name}\"}}");
        support::scrape_until(proxy.admin, &series, 1.0, Duration::from_secs(20)).await;
    }
    let users = support::hung::users(HANG_USERS);
    let logins = support::hung::login_round(proxy.addr, &pki.ca, &users, 20, Duration::from_secs(20)).await;
    let on_hung = |l: &&Login| support::hung::order_of(&l.user)[0] == 2;
    let (hung_users, others): (Vec<&Login>, Vec<&Login>) = logins.iter().partition(on_hung);
    let count = |set: &[&Login], f: fn(&Outcome) -> bool| set.iter().filter(|l| f(&l.outcome)).count();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let q = support::hung::quantile;
    println!(
        "{:<22} {failover:<5} hung member's {:>3} users: {:>3} in, {:>3} NO, {:>3} client timeouts (20 s), {:>2} broken; \
         p50 {:>7.0} ms p99 {:>7.0} ms max {:>7.0} ms | other {:>3} users: {:>3} in, p50 {:>5.0} ms p99 {:>5.0} ms",
        hang.map_or("none hung (baseline)", Hang::as_str),
        hung_users.len(),
        count(&hung_users, |o| *o == Outcome::LoggedIn),
        count(&hung_users, |o| matches!(o, Outcome::Refused(_))),
        count(&hung_users, |o| *o == Outcome::ClientTimeout),
        count(&hung_users, |o| matches!(o, Outcome::Broken(_))),
        ms(q(&hung_users, 0.5)),
        ms(q(&hung_users, 0.99)),
        ms(q(&hung_users, 1.0)),
        others.len(),
        count(&others, |o| *o == Outcome::LoggedIn),
        ms(q(&others, 0.5)),
        ms(q(&others, 0.99)),
    );
    if hang.is_none() {
        print_steps(&support::admin_get(proxy.admin, "/metrics").await.1);
    }
    proxy.stop().await;
    q(&others, 0.99)
}

/// Each login step's durations against the real Dovecots (all members, logins and checks), from
/// `imapgate_backend_step_duration_seconds`: the evidence for the step deadlines' defaults.
fn print_steps(exposition: &str) {
    let family = "imapgate_backend_step_duration_seconds";
    for step in ["connect", "greeting", "tls", "capability", "credentials"] {
        // le -> cumulative count, summed over the backends.
        let mut buckets: std::collections::BTreeMap<u64, f64> = std::collections::BTreeMap::new();
        let (mut sum, mut count) = (0.0, 0.0);
        for line in exposition.lines() {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            if !series.contains(&format!("step=\"{step}\"")) {
                continue;
            }
            if series.starts_with(&format!("{family}_bucket{{")) {
                let le = series.split("le=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("+Inf");
                let le = if le == "+Inf" { u64::MAX } else { (le.parse::<f64>().unwrap_or(0.0) * 1e6) as u64 };
                *buckets.entry(le).or_default() += value;
            } else if series.starts_with(&format!("{family}_sum{{")) {
                sum += value;
            } else if series.starts_with(&format!("{family}_count{{")) {
                count += value;
            }
        }
        let within = |share: f64| {
            buckets.iter().find(|(_, n)| **n >= share * count).map_or("?".to_owned(), |(le, _)| {
                if *le == u64::MAX { "+Inf".to_owned() } else { format!("{} ms", *le as f64 / 1000.0) }
            })
        };
        println!(
            "  step {step:<11} {count:>5.0} times, mean {:>7.2} ms, 99% within {:>9}, all within {:>9}",
            if count > 0.0 { sum / count * 1000.0 } else { 0.0 },
            within(0.99),
            within(1.0),
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = support::scratch_dir("imapgate-failover-");
    let pki = Pki::generate(&dir);
    let hang_users = support::hung::users(HANG_USERS);
    let members: Vec<Dovecot> = (1..=3).map(|i| Dovecot::start(&format!("m{i}"), &pki, &hang_users)).collect();
    if std::env::args().nth(1).as_deref() == Some("hang") {
        hang_rounds(&pki, &members).await;
        return;
    }
    let mut switches = Vec::new();
    for d in &members {
        switches.push(Switch::start(d.imap_port).await);
    }
    println!("imapgate routing benchmark: 3 Dovecot members in one pool, shipped [health] defaults");
    println!("(interval 5 s + jitter, 3 failures open a circuit, back-off 5 s doubling to 60 s); 10 logins/s,");
    println!("member m2 refuses connections from 5 s to 35 s");
    run(&pki, &switches, "none").await;
    run(&pki, &switches, "next").await;
    lookup_latency(&pki, &dir, &members.iter().map(|d| d.imap_port).collect::<Vec<_>>()).await;
    hang_rounds(&pki, &members).await;
}

/// The baseline round (three real members), then each kind of hang with each failover setting; the other
/// members' users' p99 beside the baseline's.
async fn hang_rounds(pki: &Pki, members: &[Dovecot]) {
    print_hang_header();
    let baseline = hung_round(pki, members, None, "next").await;
    for hang in Hang::ALL {
        for failover in ["next", "none"] {
            let p99 = hung_round(pki, members, Some(hang), failover).await;
            println!(
                "  other users' p99 {:.0} ms against the baseline's {:.0} ms ({:+.0} ms)",
                p99.as_secs_f64() * 1000.0,
                baseline.as_secs_f64() * 1000.0,
                (p99.as_secs_f64() - baseline.as_secs_f64()) * 1000.0
            );
        }
    }
}

fn print_hang_header() {
    println!(
        "hung member: pool m1, m2 (Dovecot) and m3 (hung); {HANG_USERS} users log in, 20 at a time, each giving up"
    );
    println!(
        "after 20 s; shipped [backend_tls] and [health]; [defence] wide per address: {:?}",
        support::proxy::DEFAULT_TEST_DEFENCE
    );
}
