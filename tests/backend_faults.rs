//! A backend's fault is never the user's failure: a member that greets with PREAUTH or BYE, sends garbage,
//! resets or never answers gets its users `NO [UNAVAILABLE]`, and nothing is counted against the client's
//! address or account. The defence is set tight (a ban after 2 failures of the address, the account
//! blocked for unfamiliar addresses after 2 of its own), so that counting even these few faults would
//! refuse the good login that follows once the member is back. A wrong password afterwards is counted,
//! which shows the counters are the ones that would have moved.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::client::TlsClient;
use support::faulty::{Fault, FaultyServer};
use support::proxy::{TestProxy, backend, config_text};

/// Logins sent at the faulty member: more than the address's and the account's budgets.
const FAULTED_LOGINS: usize = 4;

const TIGHT_DEFENCE: &str = "[defence]\ntarpit_ms = [20]\nconnection_rate_per_minute = 100000\n\
     connection_burst = 1000\nauth_in_flight = 20\nfailures = 2\naccount_delay_after = 2\naccount_block_after = 2\n";

/// `user` logs in with `password` through `proxy`: the tagged reply and how long it took.
async fn login(proxy: &TestProxy, ca: &std::path::Path, user: &str, password: &str) -> (String, Duration) {
    let started = std::time::Instant::now();
    let attempt = async {
        let mut client = TlsClient::connect(proxy.addr, ca).await.unwrap();
        client.line().await.unwrap();
        let reply = client.command("a", &format!("LOGIN \"{user}\" \"{password}\"")).await.unwrap();
        if reply.tagged.starts_with("a OK") {
            let _ = client.command("z", "LOGOUT").await;
        }
        reply.tagged
    };
    let tagged = tokio::time::timeout(Duration::from_secs(10), attempt).await.expect("an answer within 10 s");
    (tagged, started.elapsed())
}

fn assert_nothing_counted(proxy: &TestProxy, fault: Fault) {
    let (_, standing, banned) = proxy.defence.standing("127.0.0.1".parse().unwrap());
    assert!(standing.as_ref().is_none_or(|s| s.failures == 0.0), "{fault:?}: {standing:?}");
    assert!(banned.is_none(), "{fault:?}: banned for {banned:?}");
}

async fn fault_is_not_the_clients(fault: Fault) {
    let env = support::env("faults", &[]);
    let member = FaultyServer::start(env.dovecot.imap_port).await;
    let rest = format!(
        "{}\n[route]\ndefault = \"mbox\"\n[health]\ninterval_secs = 1\nfailures = 3\nbackoff_secs = 1\n\
         backoff_max_secs = 2\n{TIGHT_DEFENCE}",
        backend("mbox", member.port)
    );
    let proxy = TestProxy::start(&config_text(&env.pki, &rest)).await;
    let up = "imapgate_backend_up{backend=\"mbox\"}";
    let text = support::scrape_until(proxy.admin, up, 1.0, Duration::from_secs(20)).await;
    assert_eq!(support::sample(&text, up), 1.0, "{text}");

    let (user, password) = support::dovecot::USERS[0];
    member.set(fault);
    for attempt in 0..FAULTED_LOGINS {
        let (tagged, took) = login(&proxy, &env.pki.ca, user, password).await;
        assert!(tagged.starts_with("a NO [UNAVAILABLE]"), "{fault:?} attempt {attempt}: {tagged}");
        assert!(took < Duration::from_secs(3), "{fault:?} attempt {attempt}: {took:?}");
        assert_nothing_counted(&proxy, fault);
    }

    member.set(Fault::None);
    let text = support::scrape_until(proxy.admin, up, 1.0, Duration::from_secs(20)).await;
    assert_eq!(support::sample(&text, up), 1.0, "{fault:?}: the member did not come back\n{text}");
    let (tagged, _) = login(&proxy, &env.pki.ca, user, password).await;
    assert!(tagged.starts_with("a OK"), "{fault:?}: the good login after the faults: {tagged}");
    assert_nothing_counted(&proxy, fault);

    // The control: a wrong password is the client's, and is counted.
    let (tagged, _) = login(&proxy, &env.pki.ca, user, "not-the-password").await;
    assert!(tagged.starts_with("a NO") && !tagged.contains("[UNAVAILABLE]"), "{tagged}");
    let (_, standing, _) = proxy.defence.standing("127.0.0.1".parse().unwrap());
    // One failure, decaying from the moment it was counted.
    let failures = standing.map_or(0.0, |s| s.failures);
    assert!(failures > 0.9 && failures <= 1.0, "{fault:?}: the wrong password was not counted ({failures})");

    let text = support::admin_get(proxy.admin, "/metrics").await.1;
    let kind = match fault {
        // A reset while the greeting is read is an I/O failure of the exchange, not of the connect.
        Fault::Preauth | Fault::Bye | Fault::Garbage | Fault::Reset => "protocol",
        Fault::Silent => "greeting_timeout",
        Fault::None | Fault::Freeze => unreachable!(),
    };
    let series = format!("imapgate_backend_errors_total{{backend=\"mbox\",kind=\"{kind}\"}}");
    assert!(support::sample(&text, &series) >= 1.0, "{fault:?}: no {series}\n{text}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preauth_greeting() {
    fault_is_not_the_clients(Fault::Preauth).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bye_greeting() {
    fault_is_not_the_clients(Fault::Bye).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_greeting() {
    fault_is_not_the_clients(Fault::Garbage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_on_accept() {
    fault_is_not_the_clients(Fault::Reset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_member() {
    fault_is_not_the_clients(Fault::Silent).await;
}
