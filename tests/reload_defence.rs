//! SIGHUP reloads `[defence]` and `[audit]` without a restart, through a real Dovecot: a lower `failures`
//! applies to the next failure while the failures counted so far stay; the audit log moves to its new
//! file; a change that needs a restart (the prefix length, the listen address) is refused with a message
//! and changes nothing. (Its own test binary: SIGHUP reaches every proxy in the process.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::IpAddr;
use std::time::Duration;

use support::client::{self, TlsClient};
use support::dovecot::Dovecot;
use support::pki::Pki;
use support::proxy::{TestProxy, backend, config_text};

fn sighup() {
    let pid = std::process::id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
}

async fn reloads(proxy: &TestProxy, result: &str, n: f64) {
    let series = format!("imapgate_config_reloads_total{{result=\"{result}\"}}");
    let text = support::scrape_until(proxy.admin, &series, n, Duration::from_secs(10)).await;
    assert_eq!(support::sample(&text, &series), n, "{text}");
}

async fn fail_from(proxy: &TestProxy, ca: &std::path::Path, source: &str, guess: &str) {
    let ip: IpAddr = source.parse().unwrap();
    let mut c = TlsClient::connect_from(Some(ip), proxy.addr, client::tls_config(ca, &[b"imap"])).await.unwrap();
    assert!(c.line().await.unwrap().starts_with("* OK"));
    let tagged = c.command("l", &format!("LOGIN alice@example.org {guess}")).await.unwrap().tagged;
    assert!(tagged.starts_with("l NO [AUTHENTICATIONFAILED]"), "{tagged}");
}

fn failures(proxy: &TestProxy, source: &str) -> f64 {
    proxy.defence.standing(source.parse().unwrap()).1.map_or(0.0, |s| s.failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_defence_and_the_audit_log_and_keeps_what_was_learnt() {
    support::proxy::init_logging();
    let dir = support::scratch_dir("imapgate-reload-defence-");
    let pki = Pki::generate(&dir);
    let dovecot = Dovecot::start("reload-defence", &pki, &[]);
    let (first, second) = (dir.join("first.log"), dir.join("second.log"));
    let path = dir.join("proxy.toml");
    let text = |failures: u32, ipv4_prefix: u8, audit: &std::path::Path| {
        config_text(
            &pki,
            &format!(
                "{}\n[route]\ndefault = \"mbox\"\n[defence]\ntarpit_ms = [20]\nconnection_rate_per_minute = 100000\n\
                 connection_burst = 1000\nauth_in_flight = 20\nfailures = {failures}\nipv4_prefix = {ipv4_prefix}\n\
                 [audit]\npath = \"{}\"\n",
                backend("mbox", dovecot.imap_port),
                audit.display()
            ),
        )
    };
    std::fs::write(&path, text(5, 32, &first)).unwrap();
    let proxy = TestProxy::start_from_file(&path).await;

    // Two failures under a budget of 5: counted, no ban.
    fail_from(&proxy, &pki.ca, "127.0.0.2", "guess-1").await;
    fail_from(&proxy, &pki.ca, "127.0.0.2", "guess-2").await;
    let before = failures(&proxy, "127.0.0.2");
    assert!(before > 1.9, "{before}");
    assert!(!proxy.defence.is_banned("127.0.0.2".parse().unwrap()));

    // A budget of 2, and the audit log in a new file.
    std::fs::write(&path, text(2, 32, &second)).unwrap();
    sighup();
    reloads(&proxy, "success", 1.0).await;
    let kept = failures(&proxy, "127.0.0.2");
    assert!(kept > 1.9 && kept <= before, "the counted failures were not kept: {kept}");
    assert!(!proxy.defence.is_banned("127.0.0.2".parse().unwrap()), "the reload itself banned");
    // The next failure is over the new budget: banned (the old budget of 5 would not have).
    fail_from(&proxy, &pki.ca, "127.0.0.2", "guess-3").await;
    assert!(proxy.defence.is_banned("127.0.0.2".parse().unwrap()), "the new failures did not apply");
    let moved = support::wait_until(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&second).ok()?;
        text.contains("\"banned\"").then_some(text)
    });
    assert!(moved.is_some(), "no ban in the new audit file");
    let old = std::fs::read_to_string(&first).unwrap_or_default();
    assert!(!old.contains("\"banned\""), "the ban went to the old audit file: {old}");

    // What needs a restart is refused, saying so, and nothing of the file is applied.
    std::fs::write(&path, text(50, 24, &second)).unwrap();
    sighup();
    reloads(&proxy, "failure", 1.0).await;
    assert!(proxy.defence.is_banned("127.0.0.2".parse().unwrap()));
    assert_eq!(proxy.defence.prefix_of("127.0.0.2".parse().unwrap()).prefix_len(), 32);
    let audit = support::wait_until(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&second).ok()?;
        text.lines().find(|l| l.contains("config_reload") && l.contains("failure")).map(str::to_owned)
    })
    .expect("the refused reload in the audit log");
    assert!(audit.contains("need a restart"), "{audit}");
    proxy.stop().await;
}
