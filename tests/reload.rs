//! SIGHUP reloads the configuration file for new connections: a route changes from a dead backend to a
//! real Dovecot; an invalid file is refused and the running configuration stays.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::client::TlsClient;
use support::dovecot::Dovecot;
use support::pki::Pki;
use support::proxy::{TestProxy, backend, config_text};

fn sighup() {
    let pid = std::process::id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_routes_and_keeps_the_old_config_when_the_new_one_is_bad() {
    support::proxy::init_logging();
    let dir = support::scratch_dir("imapgate-reload-");
    let pki = Pki::generate(&dir);
    let dovecot = Dovecot::start("reload", &pki, &[]);
    let dead = support::free_port();
    let path = dir.join("proxy.toml");
    let with_backend =
        |port: u16| config_text(&pki, &format!("{}\n[route]\ndefault = \"mbox\"\n", backend("mbox", port)));
    std::fs::write(&path, with_backend(dead)).unwrap();
    let proxy = TestProxy::start_from_file(&path).await;
    let (addr, admin) = (proxy.addr, proxy.admin);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (mut c, _) = TlsClient::greeted(addr, &pki.ca).await;
    assert!(c.command("a", "LOGIN bob@example.com bob-pw").await.unwrap().tagged.contains("[UNAVAILABLE]"));

    // Point the route at the real Dovecot and reload. The open connection keeps its configuration; a new
    // one gets the new route.
    std::fs::write(&path, with_backend(dovecot.imap_port)).unwrap();
    sighup();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut fresh, _) = TlsClient::greeted(addr, &pki.ca).await;
    assert!(fresh.command("b", "LOGIN bob@example.com bob-pw").await.unwrap().tagged.starts_with("b OK"));
    assert!(c.command("c", "LOGIN bob@example.com bob-pw").await.unwrap().tagged.contains("[UNAVAILABLE]"));

    // A broken file is refused; the running configuration stays.
    std::fs::write(&path, "[server]\nlisten = \"nonsense\"\n").unwrap();
    sighup();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut again, _) = TlsClient::greeted(addr, &pki.ca).await;
    assert!(again.command("d", "LOGIN bob@example.com bob-pw").await.unwrap().tagged.starts_with("d OK"));
    let text = support::admin_get(admin, "/metrics").await.1;
    assert!(text.contains("imapgate_config_reloads_total{result=\"success\"} 1"), "{text}");
    assert!(text.contains("imapgate_config_reloads_total{result=\"failure\"} 1"), "{text}");
    drop((c, fresh, again));
    proxy.stop().await;
}
