//! Routing by an HTTP lookup service (nginx `auth_http` protocol): a real service (tests/support/
//! lookup_service.py, as an administrator would run one) in front of two real Dovecots.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::client::TlsClient;
use support::dovecot::Dovecot;
use support::lookup::LookupService;
use support::pki::Pki;
use support::proxy::{TestProxy, backend, config_text};

struct Cluster {
    dir: std::path::PathBuf,
    pki: Pki,
    north: Dovecot,
    south: Dovecot,
}

fn cluster() -> &'static Cluster {
    static CLUSTER: std::sync::OnceLock<Cluster> = std::sync::OnceLock::new();
    CLUSTER.get_or_init(|| {
        let dir = support::scratch_dir("imapgate-lookup-");
        let pki = Pki::generate(&dir);
        let north = Dovecot::start("north", &pki, &[]);
        let south = Dovecot::start("south", &pki, &[]);
        Cluster { dir, pki, north, south }
    })
}

/// A proxy whose static rules send everyone to south, asking `service` first.
async fn proxy(service: &LookupService, extra: &str) -> TestProxy {
    let c = cluster();
    let rest = format!(
        "{}{}\n[route]\ndefault = \"south\"\n[route.lookup]\nurl = \"{}\"\ntimeout_ms = 500\n{extra}\n",
        backend("north", c.north.imap_port),
        backend("south", c.south.imap_port),
        service.url()
    );
    TestProxy::start(&config_text(&c.pki, &rest)).await
}

async fn login(proxy: &TestProxy, user: &str, password: &str) -> (String, Duration) {
    let (mut c, _) = TlsClient::greeted(proxy.addr, &cluster().pki.ca).await;
    let started = Instant::now();
    let reply = c.command("l1", &format!("LOGIN {user} {password}")).await.unwrap();
    let took = started.elapsed();
    if reply.tagged.starts_with("l1 OK") {
        c.command("l2", "LOGOUT").await.unwrap();
    }
    (reply.tagged, took)
}

fn logged_in_at(dovecot: &Dovecot, user: &str, before: usize) -> bool {
    support::wait_until(Duration::from_secs(5), || (dovecot.logins_of(user) > before).then_some(())).is_some()
}

async fn metric(proxy: &TestProxy, series: &str) -> f64 {
    support::metric(proxy.admin, series).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_routes_and_its_answers_are_cached() {
    let c = cluster();
    let service = LookupService::start(
        &c.dir,
        &json!({
            "alice@example.org": {"server": "127.0.0.1", "port": c.north.imap_port},
            "alias@example.org": {"server": "127.0.0.1", "port": c.north.imap_port, "user": "bob@example.com"},
        }),
    );
    let proxy = proxy(&service, "").await;
    let before = c.north.logins_of("alice@example.org");
    assert!(login(&proxy, "alice@example.org", "alice-pw").await.0.starts_with("l1 OK"));
    assert!(logged_in_at(&c.north, "alice@example.org", before), "not routed by the lookup");
    assert_eq!(c.south.logins_of("alice@example.org"), 0);
    let requests = service.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let request = &requests[0];
    assert_eq!(request["auth-user"], "alice@example.org");
    assert_eq!(request["auth-method"], "plain");
    assert_eq!(request["auth-protocol"], "imap");
    assert_eq!(request["auth-login-attempt"], "1");
    assert_eq!(request["client-ip"], "127.0.0.1");
    assert!(request.get("auth-pass").is_none(), "the password is not sent by default: {request}");
    // Second login: from the cache, no request.
    assert!(login(&proxy, "alice@example.org", "alice-pw").await.0.starts_with("l1 OK"));
    assert_eq!(service.requests().len(), 1);
    assert_eq!(metric(&proxy, "imapgate_lookups_total{result=\"cache_hit\"}").await, 1.0);
    // Auth-User: the client's name is mapped to the one the backend knows.
    let before = c.north.logins_of("bob@example.com");
    assert!(login(&proxy, "alias@example.org", "bob-pw").await.0.starts_with("l1 OK"));
    assert!(logged_in_at(&c.north, "bob@example.com", before));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_wait_and_are_cached_and_unknown_servers_are_refused() {
    let c = cluster();
    let service = LookupService::start(
        &c.dir,
        &json!({
            "waiter@example.org": {"status": "Temporarily blocked", "wait": 1},
            "alice@example.org": {"server": "127.0.0.2", "port": c.north.imap_port},
        }),
    );
    let proxy = proxy(&service, "negative_cache_secs = 30").await;
    let (reply, took) = login(&proxy, "nobody@example.org", "x").await;
    assert_eq!(reply, "l1 NO [AUTHENTICATIONFAILED] Authentication failed.");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let (reply, took) = login(&proxy, "waiter@example.org", "x").await;
    assert!(reply.starts_with("l1 NO [AUTHENTICATIONFAILED]"), "{reply}");
    assert!(took >= Duration::from_secs(1), "Auth-Wait not honoured: {took:?}");
    let asked = service.requests().len();
    assert!(login(&proxy, "nobody@example.org", "x").await.0.starts_with("l1 NO"));
    assert_eq!(service.requests().len(), asked, "the refusal was not cached");
    // 127.0.0.2 is neither a configured backend nor an allowed server: no credentials go there.
    let before = c.north.logins_of("alice@example.org");
    let (reply, _) = login(&proxy, "alice@example.org", "alice-pw").await;
    assert_eq!(reply, "l1 NO [UNAVAILABLE] Service temporarily unavailable, try again later.");
    assert_eq!(c.north.logins_of("alice@example.org"), before);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_in_an_allowed_network_is_used_with_its_certificate_verified() {
    let c = cluster();
    // Only south is configured; north is reached because the lookup names it inside allowed_servers.
    let service =
        LookupService::start(&c.dir, &json!({"carol@example.org": {"server": "127.0.0.1", "port": c.north.imap_port}}));
    let rest = format!(
        "{}\n[route]\ndefault = \"south\"\n[route.lookup]\nurl = \"{}\"\nallowed_servers = [\"127.0.0.0/8\"]\n",
        backend("south", c.south.imap_port),
        service.url()
    );
    let proxy = TestProxy::start(&config_text(&c.pki, &rest)).await;
    let before = c.north.logins_of("carol@example.org");
    let (reply, _) = login(&proxy, "carol@example.org", "\"sp ace\\\"quo\\\\te{5}\"").await;
    assert!(reply.starts_with("l1 OK"), "{reply}");
    assert!(logged_in_at(&c.north, "carol@example.org", before));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_is_down_falls_back_or_fails_as_configured() {
    let c = cluster();
    let mut service = LookupService::start(&c.dir, &json!({}));
    service.stop();
    let fallback = proxy(&service, "on_error = \"static\"").await;
    let before = c.south.logins_of("bob@example.com");
    assert!(login(&fallback, "bob@example.com", "bob-pw").await.0.starts_with("l1 OK"));
    assert!(logged_in_at(&c.south, "bob@example.com", before), "not routed by the static rules");
    assert_eq!(metric(&fallback, "imapgate_lookups_total{result=\"error\"}").await, 1.0);
    fallback.stop().await;
    let strict = proxy(&service, "on_error = \"fail\"").await;
    let (reply, took) = login(&strict, "bob@example.com", "bob-pw").await;
    assert_eq!(reply, "l1 NO [UNAVAILABLE] Service temporarily unavailable, try again later.");
    assert!(took < Duration::from_secs(2), "{took:?}");
    strict.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_lookups_are_made_once() {
    let c = cluster();
    let service = LookupService::start(
        &c.dir,
        &json!({"pipeline@example.org": {"server": "127.0.0.1", "port": c.north.imap_port, "delay": 0.3}}),
    );
    let proxy = proxy(&service, "").await;
    let logins: Vec<_> = (0..8)
        .map(|_| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                let (mut client, _) = TlsClient::greeted(addr, &cluster().pki.ca).await;
                client.command("c1", "LOGIN pipeline@example.org pipe-pw").await.unwrap().tagged
            })
        })
        .collect();
    for login in logins {
        assert!(login.await.unwrap().starts_with("c1 OK"));
    }
    assert_eq!(service.requests().len(), 1, "eight concurrent logins, one lookup");
    proxy.stop().await;
}
