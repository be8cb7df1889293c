//! User and domain routing to two real Dovecot instances.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::client::TlsClient;
use support::dovecot::{Dovecot, password};
use support::pki::Pki;
use support::proxy::{TestProxy, backend, config_text};

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
