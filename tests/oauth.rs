//! OAuth 2.0 logins through a real Dovecot whose `oauth2` passdb validates bearer tokens at an introspection
//! endpoint (RFC 7662) served by the test support, as an organisation's identity provider would: XOAUTH2
//! and OAUTHBEARER, with and without SASL-IR; an expired token gets the backend's error challenge, then
//! `NO`; token failures count for the defence (the same token once); no token ever appears in the log,
//! the audit log or the metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::sync::OnceLock;

use base64::Engine;
use support::Capture;
use support::client::TlsClient;
use support::dovecot::Dovecot;
use support::pki::Pki;
use support::proxy::{TestProxy, backend, config_text};
use support::tokens::TokenService;

struct Env {
    pki: Pki,
    tokens: TokenService,
    dovecot: Dovecot,
    dir: PathBuf,
    capture: Capture,
}

/// One identity provider and one Dovecot per binary; the log captured before any proxy starts.
fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let capture = Capture::install();
        let dir = support::scratch_dir("imapgate-oauth-");
        let pki = Pki::generate(&dir);
        let tokens = TokenService::start(&dir);
        let dovecot = Dovecot::start_with_oauth("oauth", &pki, &tokens.introspection_url());
        // A message, so that the mailbox (and the home Dovecot cannot create itself here) exists.
        dovecot.deliver("alice@example.org", "1.oauth", b"Subject: token\r\n\r\nLogged in by token.\r\n");
        Env { pki, tokens, dovecot, dir, capture }
    })
}

/// A token no other test uses (b64token characters, as identity providers issue them).
fn new_token(name: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("eyJ{name}.T0k-{n}_{nanos}~x")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> String {
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(text).unwrap()).unwrap()
}

fn xoauth2(user: &str, token: &str) -> String {
    b64(format!("user={user}\x01auth=Bearer {token}\x01\x01").as_bytes())
}

fn oauthbearer(user: &str, token: &str) -> String {
    b64(format!("n,a={user},\x01host=localhost\x01port=993\x01auth=Bearer {token}\x01\x01").as_bytes())
}

/// A proxy offering both OAuth mechanisms beside the password ones, auditing to `audit`.
async fn proxy(audit: &std::path::Path, defence: &str) -> TestProxy {
    let env = env();
    let rest = format!(
        "{}\n[route]\ndefault = \"mbox\"\n[auth]\nmechanisms = [\"PLAIN\", \"LOGIN\", \"XOAUTH2\", \"OAUTHBEARER\"]\n\
         [audit]\npath = \"{}\"\n{defence}",
        backend("mbox", env.dovecot.imap_port),
        audit.display()
    );
    TestProxy::start(&config_text(&env.pki, &rest)).await
}

/// Neither the log, the audit log nor the metrics hold any of `tokens` (nor their messages' base64).
async fn assert_no_token_anywhere(proxy: &TestProxy, audit: &std::path::Path, tokens: &[&str], users: &[&str]) {
    let metrics = support::admin_get(proxy.admin, "/metrics").await.1;
    let audit_text = std::fs::read_to_string(audit).unwrap_or_default();
    let log = env().capture.text();
    for token in tokens {
        let encoded: Vec<String> = users.iter().flat_map(|u| [xoauth2(u, token), oauthbearer(u, token)]).collect();
        for (name, text) in [("log", &log), ("audit log", &audit_text), ("metrics", &metrics)] {
            assert!(!text.contains(token), "token {token} in the {name}");
            for e in &encoded {
                assert!(!text.contains(e.as_str()), "a message with token {token} in the {name}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_tokens_log_in_with_each_mechanism_with_and_without_sasl_ir() {
    let env = env();
    let audit = env.dir.join("audit-valid.log");
    let proxy = proxy(&audit, "").await;
    let user = "alice@example.org";
    let mut used = Vec::new();
    for (mechanism, sasl_ir) in [("XOAUTH2", true), ("XOAUTH2", false), ("OAUTHBEARER", true), ("OAUTHBEARER", false)] {
        let token = new_token(&format!("{}{}", &mechanism[..2], u8::from(sasl_ir)));
        env.tokens.issue(&token, user);
        let message = if mechanism == "XOAUTH2" { xoauth2(user, &token) } else { oauthbearer(user, &token) };
        let (mut c, greeting) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
        assert!(greeting.contains("AUTH=XOAUTH2 AUTH=OAUTHBEARER"), "{greeting}");
        let reply = if sasl_ir {
            c.command("a", &format!("AUTHENTICATE {mechanism} {message}")).await.unwrap()
        } else {
            c.send(format!("a AUTHENTICATE {mechanism}\r\n").as_bytes()).await.unwrap();
            assert_eq!(c.line().await.unwrap(), "+ ");
            c.send(format!("{message}\r\n").as_bytes()).await.unwrap();
            c.until_tagged("a").await.unwrap()
        };
        assert!(reply.tagged.starts_with("a OK"), "{mechanism} sasl-ir={sasl_ir}: {reply:?}");
        let select = c.command("b", "SELECT INBOX").await.unwrap();
        assert!(select.tagged.starts_with("b OK"), "{select:?}\n{}", env.dovecot.log());
        let fetch = c.command("f", "FETCH 1 BODY.PEEK[TEXT]").await.unwrap();
        assert!(fetch.tagged.starts_with("f OK"), "{fetch:?}");
        assert_eq!(fetch.literals, vec![b"Logged in by token.\r\n".to_vec()]);
        c.command("c", "LOGOUT").await.unwrap();
        used.push(token);
    }
    // Dovecot validated each token itself (its oauth2 passdb asked the identity provider).
    let log = env.dovecot.log();
    for mechanism in ["XOAUTH2", "OAUTHBEARER"] {
        let logins = log.lines().filter(|l| l.contains("Login:") && l.contains(&format!("method={mechanism}"))).count();
        assert!(logins >= 2, "{mechanism} logins in the Dovecot log:\n{log}");
    }
    let text = support::admin_get(proxy.admin, "/metrics").await.1;
    for mechanism in ["XOAUTH2", "OAUTHBEARER"] {
        let series = format!("imapgate_auth_attempts_total{{mechanism=\"{mechanism}\",result=\"success\"}}");
        assert_eq!(support::sample(&text, &series), 2.0, "{series}");
    }
    let audit_text = std::fs::read_to_string(&audit).unwrap();
    assert!(audit_text.contains("\"mechanism\":\"OAUTHBEARER\"") && audit_text.contains(user), "{audit_text}");
    let used: Vec<&str> = used.iter().map(String::as_str).collect();
    assert_no_token_anywhere(&proxy, &audit, &used, &[user]).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_gets_the_failure_exchange_then_no_and_the_session_goes_on() {
    let env = env();
    let audit = env.dir.join("audit-expired.log");
    let proxy = proxy(&audit, "").await;
    let user = "bob@example.com";
    let (expired, fresh) = (new_token("exp"), new_token("fresh"));
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    // OAUTHBEARER with SASL-IR: Dovecot's challenge, acknowledged with ^A, then NO.
    c.send(format!("a AUTHENTICATE OAUTHBEARER {}\r\n", oauthbearer(user, &expired)).as_bytes()).await.unwrap();
    let challenge = c.line().await.unwrap();
    let json = unb64(challenge.strip_prefix("+ ").unwrap_or_else(|| panic!("no challenge: {challenge}")));
    assert!(json.contains("\"status\":\"invalid_token\""), "{json}");
    c.send(b"AQ==\r\n").await.unwrap();
    let no = c.until_tagged("a").await.unwrap();
    assert_eq!(no.tagged, "a NO [AUTHENTICATIONFAILED] Authentication failed.", "{no:?}");
    // XOAUTH2 by continuation: the message after `+ `, Google's error JSON, an empty answer, then NO.
    let other = new_token("exp2");
    c.send(b"b AUTHENTICATE XOAUTH2\r\n").await.unwrap();
    assert_eq!(c.line().await.unwrap(), "+ ");
    c.send(format!("{}\r\n", xoauth2(user, &other)).as_bytes()).await.unwrap();
    let challenge = c.line().await.unwrap();
    let json = unb64(challenge.strip_prefix("+ ").unwrap_or_else(|| panic!("no challenge: {challenge}")));
    assert!(json.contains("\"status\":\"401\"") && json.contains("\"schemes\":\"bearer\""), "{json}");
    c.send(b"\r\n").await.unwrap();
    let no = c.until_tagged("b").await.unwrap();
    assert!(no.tagged.starts_with("b NO [AUTHENTICATIONFAILED]"), "{no:?}");
    // A client that renewed its token logs in on the same connection.
    env.tokens.issue(&fresh, user);
    let ok = c.command("c", &format!("AUTHENTICATE XOAUTH2 {}", xoauth2(user, &fresh))).await.unwrap();
    assert!(ok.tagged.starts_with("c OK"), "{ok:?}");
    assert!(c.command("d", "NOOP").await.unwrap().tagged.starts_with("d OK"));
    c.command("e", "LOGOUT").await.unwrap();
    let text = support::admin_get(proxy.admin, "/metrics").await.1;
    let failed =
        support::sample(&text, "imapgate_auth_attempts_total{mechanism=\"OAUTHBEARER\",result=\"bad_credentials\"}");
    assert_eq!(failed, 1.0, "an expired token is a credential failure, not a backend error");
    assert_no_token_anywhere(&proxy, &audit, &[&expired, &other, &fresh], &[user]).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_failures_count_for_the_defence_the_same_token_once() {
    let env = env();
    let audit = env.dir.join("audit-defence.log");
    let defence =
        "[defence]\nfailures = 3\ntarpit_ms = [10]\nconnection_rate_per_minute = 100000\nconnection_burst = 1000\n";
    let proxy = proxy(&audit, defence).await;
    let user = "carol@example.org";
    let localhost = "127.0.0.1".parse().unwrap();
    let stale = new_token("stale");
    // A phone retrying one expired token: six tries, one failure counted, the backend asked once.
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    for i in 0..6 {
        c.send(format!("s{i} AUTHENTICATE XOAUTH2 {}\r\n", xoauth2(user, &stale)).as_bytes()).await.unwrap();
        let challenge = c.line().await.unwrap();
        assert!(challenge.starts_with("+ ey"), "try {i}: {challenge}");
        c.send(b"\r\n").await.unwrap();
        let no = c.until_tagged(&format!("s{i}")).await.unwrap();
        assert!(no.tagged.contains("NO [AUTHENTICATIONFAILED]"), "try {i}: {no:?}");
    }
    assert!(!proxy.defence.is_banned(localhost), "one token repeated is one failure");
    assert_eq!(
        env.tokens.introspections(&stale),
        1,
        "a repeated token is not sent to the backend again\n{}",
        env.dovecot.log()
    );
    // Different bad tokens are different guesses: beyond the budget of three, the fourth bans the address.
    let mut guesses = vec![stale.clone()];
    for i in 0..3 {
        let guess = new_token(&format!("guess{i}"));
        c.send(format!("g{i} AUTHENTICATE OAUTHBEARER {}\r\n", oauthbearer(user, &guess)).as_bytes()).await.unwrap();
        let challenge = c.line().await.unwrap();
        assert!(challenge.starts_with("+ ey"), "guess {i}: {challenge}");
        c.send(b"AQ==\r\n").await.unwrap();
        c.until_tagged(&format!("g{i}")).await.unwrap();
        guesses.push(guess);
    }
    let banned =
        support::wait_until(std::time::Duration::from_secs(5), || proxy.defence.is_banned(localhost).then_some(()));
    assert!(banned.is_some(), "four distinct bad tokens ban like four wrong passwords");
    let guesses: Vec<&str> = guesses.iter().map(String::as_str).collect();
    assert_no_token_anywhere(&proxy, &audit, &guesses, &[user]).await;
    proxy.stop().await;
}
