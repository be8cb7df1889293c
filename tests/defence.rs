//! Brute-force defence through a real Dovecot: tarpit then ban with no backend contact while banned, bans
//! that lift, trusted networks, repeated identical passwords, the in-flight cap, and the deny list.
//! Each test acts as its own client address inside 127.0.0.0/8.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use support::client::{self, TlsClient};
use support::proxy::{TestProxy, backend, config_text};

const USERS: &[&str] = &["victim1@example.org", "victim2@example.org", "victim3@example.org", "victim4@example.org"];

fn env() -> &'static support::Env {
    static USERS_WITH_PASSWORDS: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    let extra =
        USERS_WITH_PASSWORDS.get_or_init(|| USERS.iter().map(|u| (u.to_string(), "right-pw".to_string())).collect());
    support::env("defence", extra)
}

async fn proxy(defence: &str) -> TestProxy {
    let env = env();
    let rest =
        format!("{}\n[route]\ndefault = \"mbox\"\n[defence]\n{defence}\n", backend("mbox", env.dovecot.imap_port));
    TestProxy::start(&config_text(&env.pki, &rest)).await
}

async fn client_from(proxy: &TestProxy, source: &str) -> std::io::Result<TlsClient> {
    let ip: IpAddr = source.parse().unwrap();
    let config = client::tls_config(&env().pki.ca, &[b"imap"]);
    let mut c = TlsClient::connect_from(Some(ip), proxy.addr, config).await?;
    let greeting = c.line().await?;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    Ok(c)
}

/// Authentication failures Dovecot logged for `user` (each is one backend contact with credentials).
fn backend_failures(user: &str) -> usize {
    let needle = format!("user=<{user}>");
    env().dovecot.log().lines().filter(|l| l.contains("auth failed") && l.contains(&needle)).count()
}

fn wait_for_backend_failures(user: &str, n: usize) -> usize {
    support::wait_until(Duration::from_secs(5), || (backend_failures(user) >= n).then_some(()))
        .map_or_else(|| backend_failures(user), |()| backend_failures(user))
}

const UNAVAILABLE: &str = "NO [UNAVAILABLE] Service temporarily unavailable, try again later.";
const AUTH_FAILED: &str = "NO [AUTHENTICATIONFAILED] Authentication failed.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_failures_are_tarpitted_then_banned_without_backend_contact_and_the_ban_lifts() {
    let user = USERS[0];
    let proxy = proxy("failures = 5\ntarpit_ms = [100, 200]\nban_secs = 2\n").await;
    let mut c = client_from(&proxy, "127.0.0.21").await.unwrap();
    let started = Instant::now();
    for i in 0..6 {
        let reply = c.command(&format!("f{i}"), &format!("LOGIN {user} wrong-{i}")).await.unwrap();
        assert_eq!(reply.tagged, format!("f{i} {AUTH_FAILED}"));
    }
    // Tarpit: 100 ms, then 200 ms for each later failure.
    assert!(started.elapsed() >= Duration::from_millis(1100), "{:?}", started.elapsed());
    assert_eq!(wait_for_backend_failures(user, 6), 6);

    // Banned: the right password is refused without asking Dovecot, on this connection and on new ones.
    let reply = c.command("b1", &format!("LOGIN {user} right-pw")).await.unwrap();
    assert_eq!(reply.tagged, format!("b1 {UNAVAILABLE}"));
    assert!(client_from(&proxy, "127.0.0.21").await.is_err(), "a banned prefix is refused before TLS");
    assert!(proxy.defence.is_banned("127.0.0.21".parse().unwrap()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(backend_failures(user), 6, "no backend contact while banned");
    assert_eq!(env().dovecot.logins_of(user), 0);
    // Other addresses are unaffected.
    let mut other = client_from(&proxy, "127.0.0.22").await.unwrap();
    assert!(other.command("o1", &format!("LOGIN {user} right-pw")).await.unwrap().tagged.starts_with("o1 OK"));

    // The ban lifts after its time (2 s; the sweep runs every second).
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(!proxy.defence.is_banned("127.0.0.21".parse().unwrap()));
    let mut c = client_from(&proxy, "127.0.0.21").await.unwrap();
    let reply = c.command("u1", &format!("LOGIN {user} right-pw")).await.unwrap();
    assert!(reply.tagged.starts_with("u1 OK"), "{reply:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_address_is_never_banned() {
    let user = USERS[1];
    let proxy = proxy("failures = 3\ntarpit_ms = [10]\ntrusted = [\"127.0.0.23/32\"]\n").await;
    let mut c = client_from(&proxy, "127.0.0.23").await.unwrap();
    for i in 0..10 {
        let reply = c.command(&format!("t{i}"), &format!("LOGIN {user} wrong-{i}")).await.unwrap();
        assert_eq!(reply.tagged, format!("t{i} {AUTH_FAILED}"), "attempt {i}");
    }
    assert!(!proxy.defence.is_banned("127.0.0.23".parse().unwrap()));
    assert_eq!(wait_for_backend_failures(user, 10), 10, "every attempt reached the backend");
    let reply = c.command("ok", &format!("LOGIN {user} right-pw")).await.unwrap();
    assert!(reply.tagged.starts_with("ok OK"), "{reply:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_wrong_password_twenty_times_counts_once_and_reaches_the_backend_once() {
    let user = USERS[2];
    let proxy = proxy("failures = 5\ntarpit_ms = [10, 2000]\n").await;
    let mut c = client_from(&proxy, "127.0.0.24").await.unwrap();
    let started = Instant::now();
    for i in 0..20 {
        let reply = c.command(&format!("s{i}"), &format!("LOGIN {user} old-password")).await.unwrap();
        assert_eq!(reply.tagged, format!("s{i} {AUTH_FAILED}"), "attempt {i}");
    }
    // Counted once: the tarpit never reached its 2 s step (Dovecot itself answers a failure after up to
    // 0.5 s) and the prefix is not banned.
    assert!(started.elapsed() < Duration::from_secs(14), "{:?}", started.elapsed());
    assert!(!proxy.defence.is_banned("127.0.0.24".parse().unwrap()));
    // Repeats within the repeat window are answered at the door: Dovecot checked the pair once.
    assert_eq!(wait_for_backend_failures(user, 1), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(backend_failures(user), 1);
    let reply = c.command("ok", &format!("LOGIN {user} right-pw")).await.unwrap();
    assert!(reply.tagged.starts_with("ok OK"), "{reply:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_attempts_from_one_address_are_at_most_two_in_flight() {
    let user = USERS[3];
    let proxy = proxy("failures = 100\ntarpit_ms = [300]\nauth_in_flight = 2\n").await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut c = client_from(&proxy, "127.0.0.25").await.unwrap();
        tasks.push(tokio::spawn(
            async move { c.command("p", &format!("LOGIN {user} wrong-{i}")).await.unwrap().tagged },
        ));
    }
    let started = Instant::now();
    for task in tasks {
        assert_eq!(task.await.unwrap(), format!("p {AUTH_FAILED}"));
    }
    assert_eq!(proxy.defence.stats().max_in_flight, 2);
    // Ten failures, two at a time, each holding its slot through a 300 ms tarpit: at least 5 rounds.
    assert!(started.elapsed() >= Duration::from_millis(1400), "{:?}", started.elapsed());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_prefixes_are_refused_before_tls() {
    let proxy = proxy("deny = [\"127.0.0.26/32\"]\n").await;
    assert!(client_from(&proxy, "127.0.0.26").await.is_err());
    assert!(client_from(&proxy, "127.0.0.27").await.is_ok());
    proxy.stop().await;
}
