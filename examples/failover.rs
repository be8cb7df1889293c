//! Routing benchmark: three Dovecot members in one pool behind imapgate with the shipped `[health]`
//! defaults, logins at a steady rate; one member is switched off (its address refuses connections, as a
//! crashed server's would) and on again. Prints the time until its circuit opens, the logins that failed
//! meanwhile and after (failover "none" and "next"), the time until it is used again, and the login
//! latency an HTTP lookup adds with a cold and a warm cache. Run with `scripts/failover.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::client::TlsClient;
use support::dovecot::Dovecot;
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = support::scratch_dir("imapgate-failover-");
    let pki = Pki::generate(&dir);
    let members: Vec<Dovecot> = (1..=3).map(|i| Dovecot::start(&format!("m{i}"), &pki, &[])).collect();
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
}
