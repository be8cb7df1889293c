//! User and domain routing to two real Dovecot instances.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::client::TlsClient;
use support::dovecot::{Dovecot, password};
use support::pki::Pki;
use support::proxy::{TestProxy, backend, config_text};
use support::sample;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_domains_reach_their_backends() {
    let dir = tempfile::Builder::new().prefix("imapgate-routing-").tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let east = Dovecot::start("east", &pki, &[]);
    let west = Dovecot::start("west", &pki, &[]);
    let rest = format!(
        "{}{}\n[route]\ndefault = \"east\"\n\
         [[route.rule]]\ndomain = \"example.com\"\nbackend = \"west\"\n\
         [[route.rule]]\nuser = \"CEO@example.org\"\nbackend = \"west\"\n",
        backend("east", east.imap_port),
        backend("west", west.imap_port)
    );
    let proxy = TestProxy::start(&config_text(&pki, &rest)).await;

    for (user, expected, other) in
        [("alice@example.org", &east, &west), ("bob@example.com", &west, &east), ("ceo@example.org", &west, &east)]
    {
        let (mut c, _) = TlsClient::greeted(proxy.addr, &pki.ca).await;
        let reply = c.command("r1", &format!("LOGIN {user} \"{}\"", password(user))).await.unwrap();
        assert!(reply.tagged.starts_with("r1 OK"), "{user}: {reply:?}");
        assert!(
            expected.wait_for_log_line(&[&format!("Login: user=<{user}>")]).is_some(),
            "{user} did not log in at {}:\n{}",
            expected.name,
            expected.log()
        );
        assert_eq!(other.logins_of(user), 0, "{user} also reached {}", other.name);
        c.command("r2", "LOGOUT").await.unwrap();
    }
    proxy.stop().await;
}

/// Two Dovecots shared by the pool tests of this binary.
fn cluster() -> &'static (Pki, Dovecot, Dovecot) {
    static CLUSTER: std::sync::OnceLock<(Pki, Dovecot, Dovecot)> = std::sync::OnceLock::new();
    CLUSTER.get_or_init(|| {
        let pki = Pki::generate(&support::scratch_dir("imapgate-pools-"));
        let north = Dovecot::start("north", &pki, &[]);
        let south = Dovecot::start("south", &pki, &[]);
        (pki, north, south)
    })
}

const USERS: &[&str] = &[
    "alice@example.org",
    "bob@example.com",
    "carol@example.org",
    "ceo@example.org",
    "big@example.org",
    "pipeline@example.org",
    "fetcher@example.org",
];

async fn login(proxy: &TestProxy, pki: &Pki, user: &str) -> String {
    let (mut c, _) = TlsClient::greeted(proxy.addr, &pki.ca).await;
    let quoted = password(user).replace('\\', "\\\\").replace('"', "\\\"");
    let reply = c.command("p1", &format!("LOGIN {user} \"{quoted}\"")).await.unwrap();
    if reply.tagged.starts_with("p1 OK") {
        c.command("p2", "LOGOUT").await.unwrap();
    }
    reply.tagged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_places_each_user_alike_on_every_instance() {
    let (pki, north, south) = cluster();
    let pool = |members: &str| {
        format!(
            "{}{}\n[[pool]]\nname = \"mail\"\nmembers = [{members}]\n[route]\ndefault = \"mail\"\n",
            backend("north", north.imap_port),
            backend("south", south.imap_port)
        )
    };
    // Two instances; the second lists the members the other way round.
    let first = TestProxy::start(&config_text(pki, &pool("{ backend = \"north\" }, { backend = \"south\" }"))).await;
    let second = TestProxy::start(&config_text(pki, &pool("{ backend = \"south\" }, { backend = \"north\" }"))).await;
    let mut placed = Vec::new();
    for user in USERS {
        let (n0, s0) = (north.logins_of(user), south.logins_of(user));
        assert!(login(&first, pki, user).await.starts_with("p1 OK"), "{user}");
        assert!(login(&second, pki, user).await.starts_with("p1 OK"), "{user}");
        let logged = support::wait_until(std::time::Duration::from_secs(5), || {
            let (n, s) = (north.logins_of(user) - n0, south.logins_of(user) - s0);
            (n + s >= 2).then_some((n, s))
        });
        let (n, s) = logged.unwrap_or_else(|| panic!("{user}: logins not seen in the Dovecot logs"));
        assert!((n, s) == (2, 0) || (n, s) == (0, 2), "{user} split across members: north {n}, south {s}");
        placed.push(n == 2);
    }
    assert!(placed.contains(&true) && placed.contains(&false), "every user on one member: {placed:?}");
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_fails_its_users_at_once_or_fails_them_over() {
    let (pki, north, _) = cluster();
    let dead = support::free_port();
    let config = |failover: &str| {
        config_text(
            pki,
            &format!(
                "{}{}\n[[pool]]\nname = \"mail\"\nfailover = \"{failover}\"\n\
                 members = [{{ backend = \"north\" }}, {{ backend = \"dead\" }}]\n[route]\ndefault = \"mail\"\n\
                 [health]\ninterval_secs = 1\nfailures = 2\nbackoff_secs = 30\n",
                backend("north", north.imap_port),
                backend("dead", dead)
            ),
        )
    };
    let strict = TestProxy::start(&config("none")).await;
    let mut on_dead = Vec::new();
    for user in USERS {
        let reply = login(&strict, pki, user).await;
        if reply.starts_with("p1 NO") {
            assert!(reply.contains("[UNAVAILABLE]"), "{user}: {reply}");
            on_dead.push(*user);
        } else {
            assert!(reply.starts_with("p1 OK"), "{user}: {reply}");
        }
    }
    assert!(!on_dead.is_empty() && on_dead.len() < USERS.len(), "{on_dead:?}");
    // Checks and failed logins open the dead member's circuit; the pool stays ready through north.
    let opened = "imapgate_circuit_transitions_total{backend=\"dead\",state=\"open\"}";
    let text = support::scrape_until(strict.admin, opened, 1.0, std::time::Duration::from_secs(10)).await;
    assert!(sample(&text, "imapgate_circuit_transitions_total{backend=\"dead\",state=\"open\"}") >= 1.0, "{text}");
    assert_eq!(sample(&text, "imapgate_backend_up{backend=\"dead\"}"), 0.0);
    assert_eq!(sample(&text, "imapgate_backend_up{backend=\"north\"}"), 1.0);
    assert_eq!(sample(&text, "imapgate_pool_members_usable{pool=\"mail\"}"), 1.0);
    assert_eq!(support::admin_get(strict.admin, "/readyz").await.0, 200);
    // With the circuit open, its users are refused without dialling.
    let started = std::time::Instant::now();
    assert!(login(&strict, pki, on_dead[0]).await.contains("[UNAVAILABLE]"));
    assert!(started.elapsed() < std::time::Duration::from_millis(500), "{:?}", started.elapsed());
    assert!(
        support::metric(strict.admin, "imapgate_backend_errors_total{backend=\"dead\",kind=\"circuit_open\"}").await
            >= 1.0
    );
    strict.stop().await;

    // Shared storage: the same users fail over to north.
    let shared = TestProxy::start(&config("next")).await;
    for user in &on_dead {
        let before = north.logins_of(user);
        assert!(login(&shared, pki, user).await.starts_with("p1 OK"), "{user}");
        assert!(
            support::wait_until(std::time::Duration::from_secs(5), || (north.logins_of(user) > before).then_some(()))
                .is_some()
        );
    }
    shared.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_whose_certificate_does_not_verify_is_checked_down() {
    let (pki, north, _) = cluster();
    let rest = format!(
        "[[backend]]\nname = \"north\"\naddress = \"127.0.0.1:{}\"\ntls_name = \"wrong.example\"\n\
         [route]\ndefault = \"north\"\n[health]\ninterval_secs = 1\nfailures = 2\n",
        north.imap_port
    );
    let proxy = TestProxy::start(&config_text(pki, &rest)).await;
    let opened = "imapgate_circuit_transitions_total{backend=\"north\",state=\"open\"}";
    let text = support::scrape_until(proxy.admin, opened, 1.0, std::time::Duration::from_secs(10)).await;
    assert!(sample(&text, "imapgate_health_checks_total{backend=\"north\",result=\"failure\"}") >= 2.0, "{text}");
    assert!(sample(&text, "imapgate_circuit_transitions_total{backend=\"north\",state=\"open\"}") >= 1.0, "{text}");
    assert_eq!(support::admin_get(proxy.admin, "/readyz").await.0, 503);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_drains_a_member_for_new_logins_and_open_sessions_stay() {
    let (pki, north, south) = cluster();
    let dir = support::scratch_dir("imapgate-pool-reload-");
    let path = dir.join("proxy.toml");
    let with = |north_member: &str| {
        config_text(
            pki,
            &format!(
                "{}{}\n[[pool]]\nname = \"mail\"\nmembers = [{north_member}, {{ backend = \"south\" }}]\n[route]\ndefault = \"mail\"\n",
                backend("north", north.imap_port),
                backend("south", south.imap_port)
            ),
        )
    };
    std::fs::write(&path, with("{ backend = \"north\" }")).unwrap();
    let proxy = imapgate::app::Prepared::new(imapgate::config::Config::load(&path).unwrap())
        .unwrap()
        .with_config_path(path.clone())
        .bind()
        .await
        .unwrap();
    let addr = proxy.local_addrs()[0];
    let admin = proxy.admin_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(proxy.serve(async {
        let _ = stopped.await;
    }));
    // A user that lives on north, with a session open there.
    let mut open = None;
    for user in USERS {
        let (n0, s0) = (north.logins_of(user), south.logins_of(user));
        let (mut c, _) = TlsClient::greeted(addr, &pki.ca).await;
        let quoted = password(user).replace('\\', "\\\\").replace('"', "\\\"");
        assert!(c.command("o1", &format!("LOGIN {user} \"{quoted}\"")).await.unwrap().tagged.starts_with("o1 OK"));
        let on_north = support::wait_until(std::time::Duration::from_secs(5), || {
            if north.logins_of(user) > n0 { Some(true) } else { (south.logins_of(user) > s0).then_some(false) }
        });
        if on_north == Some(true) {
            open = Some((user, quoted, c));
            break;
        }
    }
    let (user, quoted, mut session) = open.expect("a user on north");
    std::fs::write(&path, with("{ backend = \"north\", drain = true }")).unwrap();
    assert!(
        std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().unwrap().success()
    );
    let reloaded = support::wait_until(std::time::Duration::from_secs(5), || {
        let text = block_on(support::admin_get(admin, "/metrics"));
        text.1.contains("imapgate_config_reloads_total{result=\"success\"} 1").then_some(())
    });
    assert!(reloaded.is_some(), "no reload");
    let before = south.logins_of(user);
    let (mut c, _) = TlsClient::greeted(addr, &pki.ca).await;
    assert!(c.command("n1", &format!("LOGIN {user} \"{quoted}\"")).await.unwrap().tagged.starts_with("n1 OK"));
    assert!(
        support::wait_until(std::time::Duration::from_secs(5), || (south.logins_of(user) > before).then_some(()))
            .is_some(),
        "the drained member still took the user"
    );
    assert!(session.command("o2", "NOOP").await.unwrap().tagged.starts_with("o2 OK"), "the open session was touched");
    let _ = stop.send(());
    let _ = task.await;
}

/// Runs a future to completion from a blocking poll loop (the admin GET in `wait_until`).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}
