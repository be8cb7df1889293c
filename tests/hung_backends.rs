//! A pool of two real Dovecots and a member that hangs (scripted: `support::hung`): its users fail over
//! (or get `NO [UNAVAILABLE]`) within seconds, not after the login deadline, and the others never notice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use support::dovecot::Dovecot;
use support::faulty::{Fault, FaultyServer};
use support::hung::{Hang, HungServer, Login, Outcome};
use support::pki::Pki;
use support::proxy::TestProxy;

const USERS: usize = 200;

struct Cluster {
    pki: Pki,
    members: Vec<Dovecot>,
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let pki = Pki::generate(&support::scratch_dir("imapgate-hung-"));
        let users = support::hung::users(USERS);
        let members = (1..=2).map(|i| Dovecot::start(&format!("m{i}"), &pki, &users)).collect();
        Cluster { pki, members }
    })
}

/// One round at a time: the rounds measure latency.
static ROUNDS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn round(hang: Hang, failover: &str) -> (Vec<Login>, Vec<Login>, TestProxy) {
    let c = cluster();
    let hung = HungServer::start(hang).await;
    // The shipped [backend_tls] deadlines and [health].
    let text =
        support::hung::pool_config(&c.pki, [c.members[0].imap_port, c.members[1].imap_port, hung.port], failover);
    let proxy = TestProxy::start(&text).await;
    for name in ["m1", "m2"] {
        let series = format!("imapgate_backend_up{{backend=\"{name}\"}}");
        support::scrape_until(proxy.admin, &series, 1.0, Duration::from_secs(20)).await;
    }
    let users = support::hung::users(USERS);
    let logins = support::hung::login_round(proxy.addr, &c.pki.ca, &users, 20, Duration::from_secs(20)).await;
    let (on_hung, others) = logins.into_iter().partition(|l| support::hung::order_of(&l.user)[0] == 2);
    drop(hung);
    (on_hung, others, proxy)
}

async fn fails_over_within_three_seconds(hang: Hang) {
    let _one = ROUNDS.lock().await;
    let (on_hung, others, proxy) = round(hang, "next").await;
    assert!(!on_hung.is_empty());
    for login in on_hung.iter().chain(&others) {
        assert_eq!(login.outcome, Outcome::LoggedIn, "{hang:?}: {login:?}");
        assert!(login.took < Duration::from_secs(3), "{hang:?}: {login:?}");
    }
    let c = cluster();
    for login in &on_hung {
        let next = support::hung::order_of(&login.user)[1];
        assert!(c.members[next].logins_of(&login.user) >= 1, "{hang:?}: {} not on its next member", login.user);
    }
    let text = support::admin_get(proxy.admin, "/metrics").await.1;
    assert!(
        support::sample(&text, "imapgate_circuit_transitions_total{backend=\"m3\",state=\"suspect\"}") >= 1.0,
        "{text}"
    );
    proxy.stop().await;
}

async fn answers_unavailable_within_three_seconds(hang: Hang) {
    let _one = ROUNDS.lock().await;
    let (on_hung, others, proxy) = round(hang, "none").await;
    for login in &on_hung {
        assert!(
            matches!(&login.outcome, Outcome::Refused(line) if line.contains("[UNAVAILABLE]")),
            "{hang:?}: {login:?}"
        );
        assert!(login.took < Duration::from_secs(3), "{hang:?}: {login:?}");
    }
    for login in &others {
        assert_eq!(login.outcome, Outcome::LoggedIn, "{hang:?}: {login:?}");
    }
    // Backend faults are not the client's: nothing counted against its address.
    let (_, standing, banned) = proxy.defence.standing("127.0.0.1".parse().unwrap());
    assert!(standing.as_ref().is_none_or(|s| s.failures == 0.0), "{standing:?}");
    assert!(banned.is_none());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_member_next() {
    fails_over_within_three_seconds(Hang::Silent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_hung_after_starttls_next() {
    fails_over_within_three_seconds(Hang::AfterStarttls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syn_blackhole_next() {
    fails_over_within_three_seconds(Hang::Blackhole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_member_none() {
    answers_unavailable_within_three_seconds(Hang::Silent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_hung_after_starttls_none() {
    answers_unavailable_within_three_seconds(Hang::AfterStarttls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syn_blackhole_none() {
    answers_unavailable_within_three_seconds(Hang::Blackhole).await;
}

/// A member that hangs under the proxy's ready connections: the pooled login's ID gets no answer. The
/// login gives up after the capability step's deadline and fails over, and is not retried on another
/// ready connection or a new one there (that would be a second wait); the member's other ready
/// connections are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connection_of_a_frozen_member() {
    let _one = ROUNDS.lock().await;
    let c = cluster();
    // m3 relays to the second Dovecot until frozen.
    let member = FaultyServer::start(c.members[1].imap_port).await;
    let text =
        support::hung::pool_config(&c.pki, [c.members[0].imap_port, c.members[1].imap_port, member.port], "next");
    let proxy = TestProxy::start(&text).await;
    for name in support::hung::MEMBERS {
        let series = format!("imapgate_backend_up{{backend=\"{name}\"}}");
        support::scrape_until(proxy.admin, &series, 1.0, Duration::from_secs(20)).await;
    }
    let ready = "imapgate_backend_pool_ready{backend=\"m3\"}";
    let text = support::scrape_until(proxy.admin, ready, 1.0, Duration::from_secs(20)).await;
    assert!(support::sample(&text, ready) >= 1.0, "m3's pool never filled\n{text}");

    member.set(Fault::Freeze);
    let users = support::hung::users(USERS);
    let (user, password) = users.iter().find(|(u, _)| support::hung::order_of(u)[0] == 2).unwrap();
    let logins = support::hung::login_round(
        proxy.addr,
        &c.pki.ca,
        &[(user.clone(), password.clone())],
        1,
        Duration::from_secs(20),
    )
    .await;
    let login = &logins[0];
    assert_eq!(login.outcome, Outcome::LoggedIn, "{login:?}");
    assert!(login.took < Duration::from_secs(3), "{login:?}");
    let next = support::hung::order_of(user)[1];
    assert!(c.members[next].logins_of(user) >= 1, "{user} not on its next member");

    let text = support::admin_get(proxy.admin, "/metrics").await.1;
    let m3 = |series: &str| support::sample(&text, &format!("{series}{{backend=\"m3\"{}", "}"));
    assert_eq!(
        support::sample(&text, "imapgate_backend_pool_logins_total{backend=\"m3\",connection=\"pooled\"}"),
        1.0,
        "{text}"
    );
    let errors = |kind: &str| {
        support::sample(&text, &format!("imapgate_backend_errors_total{{backend=\"m3\",kind=\"{kind}\"}}"))
    };
    assert_eq!(errors("capability_timeout"), 1.0, "{text}");
    assert_eq!(errors("greeting_timeout"), 0.0, "retried on a new connection\n{text}");
    assert_eq!(m3("imapgate_backend_pool_ready"), 0.0, "the frozen member's ready connections were kept\n{text}");
    proxy.stop().await;
}
