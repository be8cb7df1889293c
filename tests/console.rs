//! The live console in a real browser (Debian's headless Chromium through ChromeDriver): the page loads
//! without console errors, asks for a token, shows a session after a scripted login through a real Dovecot,
//! its Kick button ends that session (the IMAP client sees `* BYE`), Unban lifts a ban, a read-only token
//! sees no buttons, and a screenshot is written under `target/` for a person to look at. Skipped, with a
//! message, only when Chromium is not installed (scripts/test.sh installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::IpAddr;
use std::time::Duration;

use support::browser::Browser;
use support::client::{self, TlsClient};
use support::proxy::{TestProxy, backend, config_text, with_admin_tokens};

const OPERATOR: &str = "op-console-0123456789abcdef0123456789";
const READER: &str = "ro-console-fedcba9876543210fedcba9876";
const WAIT: Duration = Duration::from_secs(20);

async fn proxy(env: &support::Env) -> TestProxy {
    let dir = support::scratch_dir("imapgate-console-");
    let rest = format!(
        "{}\n[route]\ndefault = \"mbox\"\n[defence]\nfailures = 2\ntarpit_ms = [10]\nban_secs = 600\n",
        backend("mbox", env.dovecot.imap_port)
    );
    let tokens = format!("ops operator {OPERATOR}\nwall-screen read {READER}\n");
    let text = with_admin_tokens(&config_text(&env.pki, &rest), &dir, &tokens);
    TestProxy::start(&text).await
}

async fn connect(proxy: &TestProxy, env: &support::Env, source: Option<IpAddr>) -> TlsClient {
    let config = client::tls_config(&env.pki.ca, &[b"imap"]);
    let mut c = TlsClient::connect_from(source, proxy.addr, config).await.unwrap();
    c.line().await.unwrap();
    c
}

/// The console's sign-in with `token`, waiting until the page shows who is signed in.
async fn sign_in(browser: &Browser, token: &str) {
    browser.wait_for("return !document.getElementById('login').classList.contains('hidden');", WAIT).await;
    browser.type_into("#token", token).await;
    browser.click("#login-form button").await;
    browser.wait_for("return document.getElementById('who').textContent || null;", WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    let Some(browser) = Browser::start().await else {
        eprintln!("SKIPPED: Chromium and ChromeDriver are not installed (apt-get install chromium chromium-driver)");
        return;
    };
    let env = support::env("console", &[]);
    env.dovecot.deliver("alice@example.org", "1.console", b"Subject: hi\r\n\r\nHi.\r\n");
    let proxy = proxy(env).await;
    let url = format!("http://{}/", proxy.admin);

    // A user in Thunderbird reads her mail; an attacker gets banned.
    let mut alice = connect(&proxy, env, None).await;
    assert!(
        alice
            .command("i", "ID (\"name\" \"Thunderbird\" \"version\" \"128.4.1\")")
            .await
            .unwrap()
            .tagged
            .starts_with("i OK")
    );
    assert!(alice.command("l", "LOGIN alice@example.org alice-pw").await.unwrap().tagged.starts_with("l OK"));
    assert!(alice.command("s", "SELECT INBOX").await.unwrap().tagged.starts_with("s OK"));
    let attacker: IpAddr = "127.0.0.60".parse().unwrap();
    let mut bad = connect(&proxy, env, Some(attacker)).await;
    for i in 0..3 {
        bad.command(&format!("x{i}"), &format!("LOGIN bob@example.com wrong-{i}")).await.unwrap();
    }
    assert!(proxy.defence.is_banned(attacker));

    browser.goto(&url).await;
    sign_in(&browser, OPERATOR).await;
    let who = browser.eval("return document.getElementById('who').textContent;").await;
    assert_eq!(who, "ops (operator)");
    // The session appears with what the client said about itself.
    let row = browser
        .wait_for(
            "const r = [...document.querySelectorAll('#sessions tbody tr')].find(r => r.textContent.includes('alice@example.org'));
             return r ? r.textContent : null;",
            WAIT,
        )
        .await;
    let row = row.as_str().unwrap().to_owned();
    assert!(row.contains("Thunderbird 128.4.1") && row.contains("SELECT") && row.contains("mbox"), "{row}");
    browser.wait_for("return document.getElementById('t-sessions').textContent === '1' || null;", WAIT).await;
    browser
        .wait_for("return document.querySelector('#clients tbody').textContent.includes('thunderbird') || null;", WAIT)
        .await;
    browser.wait_for("return document.getElementById('t-bans').textContent === '1' || null;", WAIT).await;
    browser
        .wait_for("return document.querySelector('#bans tbody tr[data-prefix=\"127.0.0.60/32\"]') ? true : null;", WAIT)
        .await;
    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png");
    browser.screenshot(&screenshot).await;
    eprintln!("console screenshot: {}", screenshot.display());

    // Unban, by the button.
    browser.click("#bans tbody tr[data-prefix=\"127.0.0.60/32\"] button").await;
    browser.wait_for("return document.querySelector('#bans tbody tr') ? null : true;", WAIT).await;
    assert!(!proxy.defence.is_banned(attacker));
    let mut back = connect(&proxy, env, Some(attacker)).await;
    assert!(back.command("l", "LOGIN bob@example.com bob-pw").await.unwrap().tagged.starts_with("l OK"));

    // Kick, by the button: the IMAP client is told.
    let (_, list) =
        support::admin_request(proxy.admin, "GET", "/api/v1/sessions?user=alice%40example.org", Some(READER), None)
            .await;
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let id = list["sessions"][0]["id"].as_str().unwrap().to_owned();
    browser.click(&format!("#sessions tbody tr[data-session=\"{id}\"] button")).await;
    let bye = tokio::time::timeout(Duration::from_secs(10), alice.line()).await.unwrap().unwrap();
    assert_eq!(bye, "* BYE Disconnected by an administrator.");
    browser
        .wait_for(
            "return [...document.querySelectorAll('#sessions tbody tr')].some(r => r.textContent.includes('alice@example.org')) ? null : true;",
            WAIT,
        )
        .await;
    let status = browser.eval("return document.getElementById('status').textContent;").await;
    assert_eq!(status, "Kicked alice@example.org");

    // A read-only token sees everything but the buttons.
    browser.click("#logout").await;
    sign_in(&browser, READER).await;
    browser
        .wait_for(
            "return [...document.querySelectorAll('#sessions tbody tr')].some(r => r.textContent.includes('bob@example.com')) || null;",
            WAIT,
        )
        .await;
    assert_eq!(browser.eval("return document.querySelectorAll('button.danger').length;").await, 0);
    assert_eq!(browser.eval("return document.getElementById('who').textContent;").await, "wall-screen (read)");
    // A refused token sends the user back to the sign-in.
    browser.eval("sessionStorage.setItem('imapgate-token', 'not-a-valid-token-at-all-0123456789'); return true;").await;
    browser.goto(&url).await;
    browser.wait_for("return document.getElementById('login-error').textContent || null;", WAIT).await;

    let errors: Vec<(String, String)> = browser
        .console()
        .await
        .into_iter()
        .filter(|(level, message)| level == "SEVERE" && !message.contains("401 (Unauthorized)"))
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    browser.close().await;
    proxy.stop().await;
}
