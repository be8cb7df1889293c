//! Several imapgate instances acting as one through a real Redis (Debian's `redis-server`), in front of a
//! real Dovecot: failures spread over two instances ban after the budget of one, a ban made on one refuses
//! on the other within a second, an account attacked through one is protected on the other while its
//! familiar prefixes keep access, Redis slow, down and back (logins still served, within the timeout,
//! metrics say so, state shared again), `on_error = "closed"`, and HAProxy with `send-proxy-v2` in front of
//! two instances (the ban follows the client, Dovecot sees the client, a drained instance loses no login).
//!
//! One Redis per test binary, each test under its own namespace; the outage test has a Redis of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use support::client::{self, TlsClient};
use support::haproxy::Haproxy;
use support::proxy::{TestProxy, backend, config_text, with_admin_tokens};
use support::redis::Redis;

const USERS: &[&str] = &[
    "fl-victim@example.org",
    "fl-user@example.org",
    "fl-account@example.org",
    "fl-outage@example.org",
    "fl-closed@example.org",
    "fl-hx@example.org",
    "fl-hx-victim@example.org",
    "fl-repeat@example.org",
    "fl-repeat-control@example.org",
];
const PASSWORD: &str = "right-pw";
const AUTH_FAILED: &str = "NO [AUTHENTICATIONFAILED] Authentication failed.";
const UNAVAILABLE: &str = "NO [UNAVAILABLE] Service temporarily unavailable, try again later.";

fn env() -> &'static support::Env {
    static EXTRA: OnceLock<Vec<(String, String)>> = OnceLock::new();
    let extra = EXTRA.get_or_init(|| USERS.iter().map(|u| (u.to_string(), PASSWORD.to_string())).collect());
    support::env("fleet", extra)
}

fn shared_redis() -> &'static Redis {
    static REDIS: OnceLock<Redis> = OnceLock::new();
    REDIS.get_or_init(Redis::start)
}

/// An instance sharing state through `redis_url` under `namespace`.
async fn instance(redis_url: &str, namespace: &str, server: &str, defence: &str, state: &str) -> TestProxy {
    let env = env();
    let rest = format!(
        "{}\n[route]\ndefault = \"mbox\"\n[defence]\ntarpit_ms = [10]\n{defence}\n\
         [state]\nredis = \"{redis_url}\"\nprefix = \"{namespace}\"\n{state}\n",
        backend("mbox", env.dovecot.imap_port)
    );
    let text = config_text(&env.pki, &rest).replacen("[server]\n", &format!("[server]\n{server}\n"), 1);
    TestProxy::start(&text).await
}

fn tls() -> std::sync::Arc<rustls::ClientConfig> {
    client::tls_config(&env().pki.ca, &[b"imap"])
}

async fn connect(addr: std::net::SocketAddr, source: &str) -> std::io::Result<TlsClient> {
    let source: IpAddr = source.parse().unwrap();
    let mut c = TlsClient::connect_from(Some(source), addr, tls()).await?;
    let greeting = c.line().await?;
    if !greeting.starts_with("* OK") {
        return Err(std::io::Error::other(greeting));
    }
    Ok(c)
}

async fn login(c: &mut TlsClient, user: &str, password: &str) -> String {
    c.command("l", &format!("LOGIN {user} \"{password}\"")).await.unwrap().tagged
}

/// Polls `check` every 20 ms for up to `within`; returns how long it took.
async fn within(within: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if check() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Whether `series` (present in the exposition) takes `value` within `within`.
async fn metric_becomes(admin: std::net::SocketAddr, series: &str, value: f64, within: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < within {
        let text = support::admin_get(admin, "/metrics").await.1;
        if text.lines().any(|l| l.strip_prefix(series).and_then(|v| v.trim().parse::<f64>().ok()) == Some(value)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// `count` wrong logins of `user` from `source`, each on a new connection, through `gates` in turn;
/// every one is answered as a wrong password. `password(i)` is the i-th password sent.
async fn fail_in_turn(
    gates: &[&TestProxy],
    source: &str,
    user: &str,
    password: impl Fn(usize) -> String,
    count: usize,
) {
    for i in 0..count {
        let gate = gates[i % gates.len()];
        let mut c = connect(gate.addr, source).await.unwrap();
        assert_eq!(login(&mut c, user, &password(i)).await, format!("l {AUTH_FAILED}"), "attempt {i} from {source}");
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_spread_over_two_instances_ban_after_the_budget_of_one_and_the_ban_reaches_both() {
    let url = shared_redis().url();
    let defence = "failures = 5\nban_secs = 60\n";
    let a = instance(&url, "spread", "", defence, "").await;
    let b = instance(&url, "spread", "", defence, "").await;
    let user = "fl-victim@example.org";
    let source = "127.0.0.31";

    // Five failures, alternating: within the budget of one instance, so no ban anywhere.
    fail_in_turn(&[&a, &b], source, user, |i| format!("wrong-{i}"), 5).await;
    assert!(!a.defence.is_banned(ip(source)) && !b.defence.is_banned(ip(source)));
    // The sixth spends it, on B, which has seen two failures itself: banned on both, A within a second.
    let mut c = connect(b.addr, source).await.unwrap();
    assert_eq!(login(&mut c, user, "wrong-5").await, format!("l {AUTH_FAILED}"));
    assert!(b.defence.is_banned(ip(source)), "B bans on the fleet's count");
    let took = within(Duration::from_secs(1), || a.defence.is_banned(ip(source))).await;
    assert!(took.is_some(), "the ban did not reach A within 1 s");
    assert!(connect(a.addr, source).await.is_err(), "A refuses the banned client before TLS");
    assert_eq!(login(&mut c, user, PASSWORD).await, format!("l {UNAVAILABLE}"));
    // Other clients are not touched.
    let mut other = connect(a.addr, "127.0.0.32").await.unwrap();
    assert!(login(&mut other, "fl-user@example.org", PASSWORD).await.starts_with("l OK"));
    let received = support::metric(a.admin, "imapgate_state_store_bans_received_total").await;
    assert_eq!(received, 1.0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_lifts_a_ban_on_one_instance_and_the_whole_fleet_lets_the_client_in() {
    let url = shared_redis().url();
    let defence = "failures = 2\nban_secs = 600\n";
    let token = "fleet-ops-0123456789abcdef0123456789abcdef";
    let dir = support::scratch_dir("imapgate-fleet-admin-");
    let env = env();
    let rest = format!(
        "{}\n[route]\ndefault = \"mbox\"\n[defence]\ntarpit_ms = [10]\n{defence}\n\
         [state]\nredis = \"{url}\"\nprefix = \"unban\"\n",
        backend("mbox", env.dovecot.imap_port)
    );
    let text = with_admin_tokens(&config_text(&env.pki, &rest), &dir, &format!("ops operator {token}\n"));
    let a = TestProxy::start(&text).await;
    let b = instance(&url, "unban", "", defence, "").await;
    let (user, source) = ("fl-user@example.org", "127.0.0.38");
    fail_in_turn(&[&a, &b], source, user, |i| format!("wrong-{i}"), 3).await;
    assert!(
        within(Duration::from_secs(1), || a.defence.is_banned(ip(source)) && b.defence.is_banned(ip(source)))
            .await
            .is_some()
    );
    let (status, body) =
        support::admin_request(a.admin, "DELETE", &format!("/api/v1/bans/{source}"), Some(token), None).await;
    assert_eq!(status, 200, "{body}");
    // B hears of it: the client is let in there, and its failures were forgiven fleet-wide.
    let took = within(Duration::from_secs(1), || !b.defence.is_banned(ip(source))).await;
    assert!(took.is_some(), "the lifted ban did not reach B within 1 s");
    assert!(!a.defence.is_banned(ip(source)));
    let mut c = connect(b.addr, source).await.unwrap();
    assert!(login(&mut c, user, PASSWORD).await.starts_with("l OK"));
    let score = shared_redis().command(&format!("ZSCORE unban:bans {source}/32"));
    assert_eq!(score.as_deref(), Some("$-1\r\n"), "the ban left the set of bans in force");
    // One more wrong password is one failure again, not a ban.
    let mut c = connect(a.addr, source).await.unwrap();
    assert_eq!(login(&mut c, user, "wrong-again").await, format!("l {AUTH_FAILED}"));
    assert!(!a.defence.is_banned(ip(source)) && !b.defence.is_banned(ip(source)));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_attacked_through_one_instance_is_protected_on_the_other_and_keeps_its_familiar_prefix() {
    let url = shared_redis().url();
    // Budgets per prefix wide open: this is about the account.
    let defence = "failures = 100\naccount_delay_after = 100\naccount_block_after = 4\n";
    let a = instance(&url, "account", "", defence, "").await;
    let b = instance(&url, "account", "", defence, "").await;
    let user = "fl-account@example.org";

    // The owner logs in from its usual address through A.
    let mut owner = connect(a.addr, "127.0.0.41").await.unwrap();
    assert!(login(&mut owner, user, PASSWORD).await.starts_with("l OK"));
    drop(owner);
    // An attacker from four addresses, through A only.
    for i in 0..4 {
        let mut c = connect(a.addr, &format!("127.0.0.{}", 42 + i)).await.unwrap();
        assert_eq!(login(&mut c, user, &format!("guess-{i}")).await, format!("l {AUTH_FAILED}"));
    }
    // Through B, a new address is refused without asking Dovecot, even with the right password...
    let before = env().dovecot.logins_of(user);
    let mut fresh = connect(b.addr, "127.0.0.49").await.unwrap();
    assert_eq!(login(&mut fresh, user, PASSWORD).await, format!("l {UNAVAILABLE}"));
    // ...while the owner's address, familiar from its login through A, logs in through B.
    let mut owner = connect(b.addr, "127.0.0.41").await.unwrap();
    assert!(login(&mut owner, user, PASSWORD).await.starts_with("l OK"));
    assert!(
        support::wait_until(Duration::from_secs(5), || (env().dovecot.logins_of(user) == before + 1).then_some(()))
            .is_some(),
        "exactly the owner's login reached Dovecot"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_slow_down_and_back_logins_go_on_locally_then_state_is_shared_again() {
    let mut redis = Redis::start();
    let url = redis.url();
    let defence = "failures = 3\nban_secs = 60\n";
    let a = instance(&url, "outage", "", defence, "").await;
    let b = instance(&url, "outage", "", defence, "").await;
    let closed = instance(&url, "outage", "", defence, "on_error = \"closed\"").await;
    let user = "fl-outage@example.org";
    let up = "imapgate_state_store_up{store=\"redis\"}";

    // Slow: Redis blocked for 3 s. A login waits at most the 50 ms timeout for it, then goes on locally.
    let pause = std::thread::spawn({
        let redis_addr = redis.addr;
        move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(redis_addr).unwrap();
            s.write_all(b"DEBUG SLEEP 3\r\n").unwrap();
            let mut buf = [0u8; 16];
            let _ = s.read(&mut buf);
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = connect(a.addr, "127.0.0.51").await.unwrap();
    let started = Instant::now();
    assert!(login(&mut c, user, PASSWORD).await.starts_with("l OK"));
    let slow_login = started.elapsed();
    assert!(slow_login < Duration::from_millis(1500), "a login waited {slow_login:?} for a stalled Redis");
    assert_eq!(support::metric(a.admin, up).await, 0.0);
    // Counted (the login's own call, or the probe's that found Redis stalled first and spared the login).
    let exposition = support::admin_get(a.admin, "/metrics").await.1;
    let errors: f64 = ["view", "sync", "subscribe"]
        .iter()
        .map(|op| support::sample(&exposition, &format!("imapgate_state_store_errors_total{{op=\"{op}\"}}")))
        .sum();
    assert!(errors >= 1.0, "{exposition}");
    pause.join().unwrap();

    // Down: killed. Logins are served (decided locally); the closed instance refuses them; no crash.
    redis.stop();
    let mut c = connect(b.addr, "127.0.0.52").await.unwrap();
    assert!(login(&mut c, user, PASSWORD).await.starts_with("l OK"));
    let mut c = connect(closed.addr, "127.0.0.53").await.unwrap();
    let reply = login(&mut c, user, PASSWORD).await;
    assert_eq!(reply, format!("l {UNAVAILABLE}"));
    assert!(metric_becomes(b.admin, up, 0.0, Duration::from_secs(5)).await, "B's metric says the store is down");
    // The local defence still works alone: three failures and the fourth ban on B.
    fail_in_turn(&[&b], "127.0.0.54", user, |i| format!("wrong-{i}"), 4).await;
    assert!(b.defence.is_banned(ip("127.0.0.54")));
    assert!(!a.defence.is_banned(ip("127.0.0.54")), "nothing is shared while Redis is down");

    // Back (empty: nothing was saved): each instance rejoins without a restart and shares again.
    redis.resume();
    for gate in [&a, &b, &closed] {
        assert!(metric_becomes(gate.admin, up, 1.0, Duration::from_secs(10)).await, "an instance did not rejoin");
    }
    let mut c = connect(closed.addr, "127.0.0.53").await.unwrap();
    assert!(login(&mut c, user, PASSWORD).await.starts_with("l OK"), "closed serves again");
    // The ban B made alone is brought back to the fleet: A refuses that client too.
    let brought = within(Duration::from_secs(5), || a.defence.is_banned(ip("127.0.0.54")));
    assert!(brought.await.is_some(), "B's ban from the outage did not reach A");
    fail_in_turn(&[&a, &b], "127.0.0.55", user, |i| format!("again-{i}"), 4).await;
    let both = within(Duration::from_secs(1), || {
        a.defence.is_banned(ip("127.0.0.55")) && b.defence.is_banned(ip("127.0.0.55"))
    });
    assert!(both.await.is_some(), "after the outage, failures spread over both ban on both\n{}", redis.log());
    for gate in [a, b, closed] {
        gate.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_from_a_file_authenticates_and_a_wrong_one_is_reported_not_fatal() {
    let redis = Redis::start_with_password(Some("fleet-s3cret"));
    let dir = support::scratch_dir("imapgate-fleet-password-");
    let (right, wrong) = (dir.join("right"), dir.join("wrong"));
    std::fs::write(&right, "fleet-s3cret\n").unwrap();
    std::fs::write(&wrong, "not-it\n").unwrap();
    let defence = "failures = 3\nban_secs = 60\n";
    let file = |path: &std::path::Path| format!("password_file = \"{}\"", path.display());
    let a = instance(&redis.url(), "password", "", defence, &file(&right)).await;
    let b = instance(&redis.url(), "password", "", defence, &file(&right)).await;
    let locked_out = instance(&redis.url(), "password", "", defence, &file(&wrong)).await;
    // Shared: failures through both ban on both.
    fail_in_turn(&[&a, &b], "127.0.0.58", "fl-user@example.org", |i| format!("wrong-{i}"), 4).await;
    let both = within(Duration::from_secs(1), || {
        a.defence.is_banned(ip("127.0.0.58")) && b.defence.is_banned(ip("127.0.0.58"))
    });
    assert!(both.await.is_some(), "the password authenticated both");
    // The wrong password: the store is down for that instance, which goes on alone.
    let mut c = connect(locked_out.addr, "127.0.0.59").await.unwrap();
    assert!(login(&mut c, "fl-user@example.org", PASSWORD).await.starts_with("l OK"));
    let up = "imapgate_state_store_up{store=\"redis\"}";
    assert!(metric_becomes(locked_out.admin, up, 0.0, Duration::from_secs(5)).await);
    assert!(!locked_out.defence.is_banned(ip("127.0.0.58")), "it heard nothing");
    for gate in [a, b, locked_out] {
        gate.stop().await;
    }
}

/// Failed logins of `user` that reached Dovecot.
fn backend_failures(user: &str) -> usize {
    let needle = format!("user=<{user}>");
    env().dovecot.log().lines().filter(|l| l.contains("auth failed") && l.contains(&needle)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_repeated_through_both_instances_counts_once_with_a_fleet_fingerprint_key() {
    let url = shared_redis().url();
    let dir = support::scratch_dir("imapgate-fleet-fingerprint-");
    let key = dir.join("fingerprint.key");
    std::fs::write(&key, "6f1c0e7d2b9a4c3e8f5a7d1b0c9e2f4a6b8d0c1e3f5a7b9c2d4e6f8a0b1c3d5e\n").unwrap();
    // A budget of one failure: counting the phone's old password twice would ban its address.
    let defence = "failures = 1\nban_secs = 60\n";
    let keyed = format!("fingerprint_key_file = \"{}\"", key.display());
    let a = instance(&url, "fingerprint", "", defence, &keyed).await;
    let b = instance(&url, "fingerprint", "", defence, &keyed).await;
    let (user, source) = ("fl-repeat@example.org", "127.0.0.71");
    fail_in_turn(&[&a, &b], source, user, |_| "old-password".into(), 8).await;
    assert!(!a.defence.is_banned(ip(source)) && !b.defence.is_banned(ip(source)), "counted once");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(backend_failures(user), 1, "Dovecot checked the pair once");
    // Then the right password, through either instance.
    let mut c = connect(b.addr, source).await.unwrap();
    assert!(login(&mut c, user, PASSWORD).await.starts_with("l OK"));
    a.stop().await;
    b.stop().await;

    // The same without the shared key: each instance counts the pair once, the fleet twice: banned.
    let a = instance(&url, "fingerprint-control", "", defence, "").await;
    let b = instance(&url, "fingerprint-control", "", defence, "").await;
    let (user, source) = ("fl-repeat-control@example.org", "127.0.0.72");
    fail_in_turn(&[&a, &b], source, user, |_| "old-password".into(), 2).await;
    assert!(b.defence.is_banned(ip(source)), "without a fleet key the repeat counts on each instance");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_the_ban_follows_the_client_dovecot_sees_it_and_a_drain_loses_no_login() {
    let url = shared_redis().url();
    let server = "proxy_protocol = \"required\"\nproxy_protocol_from = [\"127.0.0.1/32\"]";
    let defence = "failures = 3\nban_secs = 60\n";
    let a = instance(&url, "haproxy", server, defence, "").await;
    let b = instance(&url, "haproxy", server, defence, "").await;
    let haproxy = Haproxy::start(&[a.addr, b.addr]);

    // The client's real address reaches Dovecot through HAProxy and either instance.
    for _ in 0..2 {
        let mut c = connect(haproxy.addr, "127.0.0.61").await.unwrap();
        assert!(login(&mut c, "fl-hx@example.org", PASSWORD).await.starts_with("l OK"));
    }
    let seen = env().dovecot.wait_for_log_line(&["Login: ", "user=<fl-hx@example.org>", "rip=127.0.0.61,"]);
    assert!(seen.is_some(), "Dovecot logs the client behind HAProxy and imapgate");

    // An attacker: its connections alternate between the instances (round robin); the fourth failure bans
    // it on both, so no instance lets it in again.
    for i in 0..4 {
        let mut c = connect(haproxy.addr, "127.0.0.62").await.unwrap();
        let reply = login(&mut c, "fl-hx-victim@example.org", &format!("wrong-{i}")).await;
        assert_eq!(reply, format!("l {AUTH_FAILED}"), "attempt {i}");
    }
    let both = within(Duration::from_secs(1), || {
        a.defence.is_banned(ip("127.0.0.62")) && b.defence.is_banned(ip("127.0.0.62"))
    });
    assert!(both.await.is_some(), "the ban is on both instances");
    for _ in 0..4 {
        assert!(connect(haproxy.addr, "127.0.0.62").await.is_err(), "refused whichever instance HAProxy picks");
    }
    assert!(!a.defence.is_banned(ip("127.0.0.1")), "the balancer is never banned");

    // Drain A: it stops listening, HAProxy moves new connections to B; every login succeeds meanwhile.
    let drained = tokio::spawn(a.stop());
    for i in 0..12 {
        let mut c = connect(haproxy.addr, "127.0.0.63").await.unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let reply = login(&mut c, "fl-hx@example.org", PASSWORD).await;
        assert!(reply.starts_with("l OK"), "login {i} during the drain: {reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drained.await.unwrap();
    drop(haproxy);
    b.stop().await;
}
