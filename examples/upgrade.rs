//! Upgrade demonstration: the release imapgate binary in front of a real Dovecot with many IDLE sessions
//! and a client connecting every 20 ms; SIGUSR2 upgrades it in place. Prints, per second of the window,
//! the BYEs the old process sent and Dovecot's logins (the reconnects), and the connections refused or
//! left without a greeting. Runs the shipped `drain_spread_secs` (300) unless `--spread S` says otherwise
//! (printed). Run with `scripts/upgrade.sh [--sessions N] [--spread S]`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::dovecot::Dovecot;
use support::gate::Gate;
use support::pki::Pki;
use support::upgrade::{self, Pid};

fn arg(name: &str) -> Option<u64> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let sessions = arg("--sessions").unwrap_or(1000) as usize;
    let spread = arg("--spread");
    let dir = support::scratch_dir("imapgate-upgrade-demo-");
    let pki = Pki::generate(&dir);
    let dovecot = Dovecot::start_for_crowds("upgrade", &pki);
    let extra = format!(
        "{}connections_per_prefix = 50000\nconnections_per_prefix_max = 50000\n",
        support::proxy::DEFAULT_TEST_DEFENCE
    );
    let spread_text = spread.map(|s| s.to_string());
    let mut env = Vec::new();
    if let Some(s) = &spread_text {
        env.push(("IMAPGATE_SERVER__DRAIN_SPREAD_SECS", s.as_str()));
    }
    let old = Gate::start_with_env(&dir, &pki, &dovecot, "old", &extra, &env);
    let window = spread.unwrap_or(300);
    match spread {
        Some(s) => println!("drain_spread_secs = {s} (--spread; the shipped default is 300)"),
        None => println!("drain_spread_secs = 300 (the shipped default)"),
    }
    let (user, password) = ("alice@example.org", support::dovecot::password("alice@example.org"));
    let opened = Instant::now();
    let idlers = upgrade::idlers(old.addr, &pki.ca, user, password, sessions, 50).await;
    println!("{sessions} IDLE sessions open in {:.1} s; a client connects every 20 ms", opened.elapsed().as_secs_f64());
    let stop = Arc::new(AtomicBool::new(false));
    let looping = upgrade::connect_loop(old.addr, pki.ca.clone(), Arc::clone(&stop));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = dovecot.log().len();
    let signalled = Instant::now();
    let _ = std::process::Command::new("kill").arg("-USR2").arg(old.pid().to_string()).status();
    let successor = upgrade::successor_from_log(&old.log, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no hand-over:\n{}", std::fs::read_to_string(&old.log).unwrap_or_default()));
    let _successor = Pid(successor);
    println!("SIGUSR2: successor {successor} ready after {:.2} s", signalled.elapsed().as_secs_f64());
    let mut byes = Vec::new();
    for idler in idlers {
        byes.push(idler.await.unwrap().duration_since(signalled).as_secs());
    }
    stop.store(true, Ordering::SeqCst);
    let (greeted, failed) = looping.await.unwrap();
    let logins = upgrade::logins_per_second(&dovecot.log()[before..]);
    println!("connections during the upgrade: {greeted} greeted, {} refused or not greeted", failed.len());
    for f in failed.iter().take(5) {
        println!("  {f}");
    }
    println!("second  BYEs  (bar)");
    let last = byes.iter().copied().max().unwrap_or(0);
    for second in 0..=last.max(window) {
        let n = byes.iter().filter(|b| **b == second).count();
        println!("{second:>6}  {n:>4}  {}", "#".repeat(n.min(120)));
    }
    let busiest = logins.values().copied().max().unwrap_or(0);
    let total: usize = logins.values().sum();
    println!(
        "Dovecot logins during the window: {total} in {} seconds with logins, busiest second {busiest}, mean over the spread {:.1}/s",
        logins.len(),
        sessions as f64 / window.saturating_sub(1).max(1) as f64
    );
    println!("Dovecot logins per second (its log's clock):");
    for (clock, n) in &logins {
        println!("  {clock} {n:>4}");
    }
    drop(old);
}
