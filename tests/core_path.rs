//! The core path end to end: a client over TLS, imapgate, a real Dovecot over verified STARTTLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use base64::Engine;
use support::client::{self, TlsClient};
use support::dovecot::password;
use support::proxy::{TestProxy, backend, config_text};

fn env() -> &'static support::Env {
    support::env("core", &[])
}

async fn proxy() -> TestProxy {
    support::proxy::in_front_of(&env().pki, env().dovecot.imap_port, "").await
}

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn message(subject: &str, body: &str) -> Vec<u8> {
    format!("From: sender@example.net\r\nTo: someone@example.org\r\nSubject: {subject}\r\n\r\n{body}\r\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_select_fetch_through_the_proxy() {
    let env = env();
    let msg = message("hello through imapgate", "first message");
    env.dovecot.deliver("alice@example.org", "1.alice", &msg);
    let proxy = proxy().await;
    let (mut c, greeting) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    assert_eq!(greeting, "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL- ID AUTH=PLAIN AUTH=LOGIN] Server ready.");

    let login = c.command("a1", "LOGIN alice@example.org alice-pw").await.unwrap();
    assert!(login.tagged.starts_with("a1 OK [CAPABILITY IMAP4rev1"), "{login:?}");
    assert!(login.tagged.contains("IDLE"), "backend capabilities are passed on: {}", login.tagged);
    assert!(!login.tagged.contains("COMPRESS="), "{}", login.tagged);
    assert!(login.tagged.ends_with("] Logged in"), "{}", login.tagged);

    let select = c.command("a2", "SELECT INBOX").await.unwrap();
    assert!(select.tagged.starts_with("a2 OK [READ-WRITE]"), "{select:?}");
    assert!(select.lines.iter().any(|l| l == "* 1 EXISTS"), "{select:?}");
    let fetch = c.command("a3", "FETCH 1 (BODY.PEEK[])").await.unwrap();
    assert!(fetch.tagged.starts_with("a3 OK"), "{fetch:?}");
    assert_eq!(fetch.literals, vec![msg]);
    let logout = c.command("a4", "LOGOUT").await.unwrap();
    assert!(logout.lines[0].starts_with("* BYE"), "{logout:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_then_right_one_on_the_same_connection() {
    let env = env();
    let proxy = proxy().await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    let wrong = c.command("b1", "LOGIN bob@example.com not-the-password").await.unwrap();
    assert_eq!(wrong.tagged, "b1 NO [AUTHENTICATIONFAILED] Authentication failed.");
    // Still unauthenticated: only pre-auth commands work.
    let select = c.command("b2", "SELECT INBOX").await.unwrap();
    assert!(select.tagged.starts_with("b2 BAD"), "{select:?}");
    let right = c.command("b3", "LOGIN bob@example.com bob-pw").await.unwrap();
    assert!(right.tagged.starts_with("b3 OK [CAPABILITY"), "{right:?}");
    let noop = c.command("b4", "NOOP").await.unwrap();
    assert!(noop.tagged.starts_with("b4 OK"), "{noop:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticate_plain_with_and_without_sasl_ir() {
    let env = env();
    let proxy = proxy().await;
    let ir = b64(format!("\0bob@example.com\0{}", password("bob@example.com")).as_bytes());

    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    let reply = c.command("p1", &format!("AUTHENTICATE PLAIN {ir}")).await.unwrap();
    assert!(reply.tagged.starts_with("p1 OK [CAPABILITY"), "{reply:?}");

    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    c.send(b"p2 AUTHENTICATE PLAIN\r\n").await.unwrap();
    assert_eq!(c.line().await.unwrap(), "+ ");
    c.send(format!("{ir}\r\n").as_bytes()).await.unwrap();
    let reply = c.until_tagged("p2").await.unwrap();
    assert!(reply.tagged.starts_with("p2 OK [CAPABILITY"), "{reply:?}");

    // AUTHENTICATE LOGIN, and a wrong PLAIN password.
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    let bad = b64(b"\0bob@example.com\0nope");
    let reply = c.command("p3", &format!("AUTHENTICATE PLAIN {bad}")).await.unwrap();
    assert_eq!(reply.tagged, "p3 NO [AUTHENTICATIONFAILED] Authentication failed.");
    c.send(b"p4 AUTHENTICATE LOGIN\r\n").await.unwrap();
    assert_eq!(c.line().await.unwrap(), "+ VXNlcm5hbWU6");
    c.send(format!("{}\r\n", b64(b"bob@example.com")).as_bytes()).await.unwrap();
    assert_eq!(c.line().await.unwrap(), "+ UGFzc3dvcmQ6");
    c.send(format!("{}\r\n", b64(b"bob-pw")).as_bytes()).await.unwrap();
    let reply = c.until_tagged("p4").await.unwrap();
    assert!(reply.tagged.starts_with("p4 OK [CAPABILITY"), "{reply:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_with_quoted_specials_and_literals() {
    let env = env();
    let proxy = proxy().await;
    // carol's password has a space, a quote, a backslash and braces: quoted with escapes.
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    let reply = c.command("q1", r#"LOGIN "carol@example.org" "sp ace\"quo\\te{5}""#).await.unwrap();
    assert!(reply.tagged.starts_with("q1 OK [CAPABILITY"), "{reply:?}");

    // jürgen's name and password are UTF-8: synchronising literals, answered with "+".
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    let user = "jürgen@example.org";
    let pass = password(user);
    c.send(format!("q2 LOGIN {{{}}}\r\n", user.len()).as_bytes()).await.unwrap();
    assert!(c.line().await.unwrap().starts_with("+ "));
    c.send(format!("{user} {{{}}}\r\n", pass.len()).as_bytes()).await.unwrap();
    assert!(c.line().await.unwrap().starts_with("+ "));
    c.send(format!("{pass}\r\n").as_bytes()).await.unwrap();
    let reply = c.until_tagged("q2").await.unwrap();
    assert!(reply.tagged.starts_with("q2 OK [CAPABILITY"), "{reply:?}");

    // The same with non-synchronising literals (LITERAL-), in one segment.
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    let line = format!("q3 LOGIN {{{}+}}\r\n{user} {{{}+}}\r\n{pass}\r\n", user.len(), pass.len());
    c.send(line.as_bytes()).await.unwrap();
    let reply = c.until_tagged("q3").await.unwrap();
    assert!(reply.tagged.starts_with("q3 OK [CAPABILITY"), "{reply:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pipelined_behind_login_reach_the_backend_in_order() {
    let env = env();
    env.dovecot.deliver("pipeline@example.org", "1.pipe", &message("pipelined", "x"));
    let proxy = proxy().await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    c.send(b"l1 LOGIN pipeline@example.org pipe-pw\r\nl2 SELECT INBOX\r\nl3 FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\nl4 LOGOUT\r\n")
        .await
        .unwrap();
    let login = c.until_tagged("l1").await.unwrap();
    assert!(login.tagged.starts_with("l1 OK [CAPABILITY"), "{login:?}");
    let select = c.until_tagged("l2").await.unwrap();
    assert!(select.tagged.starts_with("l2 OK"), "{select:?}");
    let fetch = c.until_tagged("l3").await.unwrap();
    assert!(String::from_utf8_lossy(&fetch.literals[0]).contains("Subject: pipelined"), "{fetch:?}");
    let logout = c.until_tagged("l4").await.unwrap();
    assert!(logout.tagged.starts_with("l4 OK"), "{logout:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_megabyte_message_arrives_intact() {
    let env = env();
    let mut msg = message("big", "").to_vec();
    msg.truncate(msg.len() - 2);
    // 20 MB of varied, line-structured content.
    let mut state: u32 = 7;
    while msg.len() < 20 * 1024 * 1024 {
        let mut line = Vec::with_capacity(78);
        for _ in 0..76 {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            line.push(b'!' + ((state >> 16) % 90) as u8);
        }
        line.extend_from_slice(b"\r\n");
        msg.extend_from_slice(&line);
    }
    env.dovecot.deliver("big@example.org", "1.big", &msg);
    let expected = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &msg);

    let proxy = proxy().await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    assert!(c.command("z1", "LOGIN big@example.org big-pw").await.unwrap().tagged.starts_with("z1 OK"));
    assert!(c.command("z2", "SELECT INBOX").await.unwrap().tagged.starts_with("z2 OK"));
    let fetch = c.command("z3", "FETCH 1 (BODY.PEEK[])").await.unwrap();
    assert!(fetch.tagged.starts_with("z3 OK"), "{}", fetch.tagged);
    assert_eq!(fetch.literals.len(), 1);
    assert_eq!(fetch.literals[0].len(), msg.len());
    let got = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &fetch.literals[0]);
    assert_eq!(got.as_ref(), expected.as_ref(), "SHA-256 of the fetched message differs");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_sees_the_client_address() {
    let env = env();
    let proxy = proxy().await;
    let mut c = TlsClient::connect(proxy.addr, &env.pki.ca).await.unwrap();
    let client_port = c.local_port();
    c.line().await.unwrap();
    c.send(b"i1 ID (\"name\" \"imapgate-test\" \"x-originating-ip\" \"203.0.113.66\")\r\n").await.unwrap();
    assert!(c.until_tagged("i1").await.unwrap().tagged.starts_with("i1 OK"));
    let login = c.command("i2", "LOGIN fetcher@example.org fetch-pw").await.unwrap();
    assert!(login.tagged.starts_with("i2 OK"), "{login:?}");
    // Dovecot trusts the proxy (login_trusted_networks) and logs the client's address and port it was
    // given; the client's own x-originating-ip was dropped.
    let line = env
        .dovecot
        .wait_for_log_line(&["Login: user=<fetcher@example.org>", &format!("rport={client_port},")])
        .unwrap_or_else(|| panic!("no login line with rport={client_port}:\n{}", env.dovecot.log()));
    assert!(line.contains("rip=127.0.0.1"), "{line}");
    assert!(!env.dovecot.log().contains("203.0.113.66"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_gives_unavailable() {
    let env = env();
    let closed_port = support::free_port();
    let rest = format!("{}\n[route]\ndefault = \"down\"\n", backend("down", closed_port));
    let proxy = TestProxy::start(&config_text(&env.pki, &rest)).await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    let reply = c.command("d1", "LOGIN alice@example.org alice-pw").await.unwrap();
    assert_eq!(reply.tagged, "d1 NO [UNAVAILABLE] Service temporarily unavailable, try again later.");
    // The connection stays usable.
    assert!(c.command("d2", "NOOP").await.unwrap().tagged.starts_with("d2 OK"));
    proxy.stop().await;
}

/// The proxy trusts another CA, or expects another name: the handshake fails and no credentials leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_backend_certificate_gives_unavailable_and_no_credentials() {
    let env = env();
    let user = "ceo@example.org";
    for (label, rest) in [
        (
            "other CA",
            format!("{}\n[route]\ndefault = \"mbox\"\n", backend("mbox", env.dovecot.imap_port)).replace(
                "[[backend]]",
                &format!("[backend_tls]\nca = \"{}\"\n[[backend]]", env.pki.rogue_cert.display()),
            ),
        ),
        (
            "wrong name",
            format!("{}\n[route]\ndefault = \"mbox\"\n", backend("mbox", env.dovecot.imap_port))
                .replace("tls_name = \"localhost\"", "tls_name = \"mail.example.net\""),
        ),
    ] {
        let text = config_text(&env.pki, &rest);
        // Later keys win in TOML only if not duplicated: drop the default [backend_tls] for the CA case.
        let text = if label == "other CA" { drop_first_backend_tls(&text) } else { text };
        let proxy = TestProxy::start(&text).await;
        let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
        let reply = c.command("t1", &format!("LOGIN {user} {}", password(user))).await.unwrap();
        assert_eq!(reply.tagged, "t1 NO [UNAVAILABLE] Service temporarily unavailable, try again later.", "{label}");
        proxy.stop().await;
    }
    assert!(
        !env.dovecot.log().contains(&format!("user=<{user}>")),
        "credentials reached Dovecot:\n{}",
        env.dovecot.log()
    );
}

fn drop_first_backend_tls(text: &str) -> String {
    let start = text.find("[backend_tls]").unwrap();
    let end = start + text[start..].find("\n\n").unwrap();
    format!("{}{}", &text[..start], &text[end..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_auth_commands_are_answered_locally() {
    let env = env();
    let proxy = proxy().await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    let caps = c.command("c1", "CAPABILITY").await.unwrap();
    assert_eq!(caps.lines[0], "* CAPABILITY IMAP4rev1 SASL-IR LITERAL- ID AUTH=PLAIN AUTH=LOGIN");
    assert_eq!(c.command("c2", "STARTTLS").await.unwrap().tagged, "c2 BAD TLS is already active.");
    assert_eq!(c.command("c3", "NOOP").await.unwrap().tagged, "c3 OK NOOP completed.");
    let logout = c.command("c4", "LOGOUT").await.unwrap();
    assert_eq!(logout.lines, vec!["* BYE Logging out.", "c4 OK Logout completed."]);
    assert_eq!(c.rest().await, "");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_without_imap_is_refused() {
    let env = env();
    let proxy = proxy().await;
    let wrong = client::tls_config(&env.pki.ca, &[b"h2", b"http/1.1"]);
    let refused = TlsClient::connect_with(proxy.addr, wrong).await;
    let greeting = match refused {
        Err(_) => None,
        Ok(mut c) => c.line().await.ok(),
    };
    assert_eq!(greeting, None, "a client offering only h2/http/1.1 must not get an IMAP greeting");
    // No ALPN at all is fine (most IMAP clients).
    let none = client::tls_config(&env.pki.ca, &[]);
    let mut c = TlsClient::connect_with(proxy.addr, none).await.unwrap();
    assert!(c.line().await.unwrap().starts_with("* OK"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_says_bye_before_login() {
    let env = env();
    let proxy = proxy().await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    let addr = proxy.addr;
    proxy.stop().await;
    assert_eq!(c.line().await.unwrap(), "* BYE Server shutting down.");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "listener still open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_modes_implicit_tls_and_plain() {
    let env = env();
    // Implicit TLS to Dovecot's IMAPS port.
    let rest = format!("{}\n[route]\ndefault = \"mbox\"\n", backend("mbox", env.dovecot.imaps_port));
    let text = config_text(&env.pki, &rest).replace("[backend_tls]\n", "[backend_tls]\nmode = \"tls\"\n");
    let proxy = TestProxy::start(&text).await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    let reply = c.command("m1", "LOGIN bob@example.com bob-pw").await.unwrap();
    assert!(reply.tagged.starts_with("m1 OK [CAPABILITY"), "{reply:?}");
    proxy.stop().await;

    // Plain, only with the explicit opt-in (Dovecot accepts plaintext logins from loopback).
    let rest = format!("{}\n[route]\ndefault = \"mbox\"\n", backend("mbox", env.dovecot.imap_port));
    let text = config_text(&env.pki, &rest)
        .replace("[backend_tls]\n", "[backend_tls]\nmode = \"plain\"\nallow_plaintext = true\n");
    let proxy = TestProxy::start(&text).await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    let reply = c.command("m2", "LOGIN bob@example.com bob-pw").await.unwrap();
    assert!(reply.tagged.starts_with("m2 OK [CAPABILITY"), "{reply:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_bad_commands_end_the_connection() {
    let env = env();
    let proxy = proxy().await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    c.send(b"x1 SELECT INBOX\r\nx2 FOO\r\nx3 LOGIN\r\nx4 NOOP\r\n").await.unwrap();
    let rest = c.rest().await;
    assert_eq!(
        rest,
        "x1 BAD Command not permitted before authentication.\r\nx2 BAD Unknown command.\r\n\
         x3 BAD Invalid arguments.\r\n* BYE Too many invalid commands.\r\n"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_and_compress_after_login_are_never_forwarded() {
    let env = env();
    let proxy = proxy().await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    // STARTTLS pipelined behind the login, then STARTTLS and COMPRESS on their own.
    c.send(b"g1 LOGIN bob@example.com bob-pw\r\ng2 STARTTLS\r\n").await.unwrap();
    assert!(c.until_tagged("g1").await.unwrap().tagged.starts_with("g1 OK"));
    let reply = c.until_tagged("g2").await.unwrap();
    assert!(reply.tagged.starts_with("g2 BAD"), "{reply:?}");
    let reply = c.command("g3", "starttls").await.unwrap();
    assert!(reply.tagged.starts_with("g3 BAD"), "{reply:?}");
    let reply = c.command("g4", "COMPRESS DEFLATE").await.unwrap();
    assert!(reply.tagged.starts_with("g4 BAD"), "{reply:?}");
    // The session goes on, uncompressed and in the clear inside TLS.
    let reply = c.command("g5", "NOOP").await.unwrap();
    assert!(reply.tagged.starts_with("g5 OK"), "{reply:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_literal_cannot_smuggle_compress_or_starttls_past_the_guard() {
    let env = env();
    // A user of its own, with a home (delivery creates it) for the APPEND below.
    env.dovecot.deliver("fetcher@example.org", "1.fetcher", &message("guard", "x"));
    // The test can fail: this Dovecot compresses after login when asked.
    let mut direct = TlsClient::connect(([127, 0, 0, 1], env.dovecot.imaps_port).into(), &env.pki.ca).await.unwrap();
    direct.line().await.unwrap();
    let caps = direct.command("d1", "LOGIN fetcher@example.org fetch-pw").await.unwrap();
    assert!(caps.tagged.contains("COMPRESS=DEFLATE"), "{caps:?}");

    let proxy = proxy().await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    assert!(c.command("s0", "LOGIN fetcher@example.org fetch-pw").await.unwrap().tagged.starts_with("s0 OK"));
    // One write: Dovecot answers s1 BAD without '+' and reads the bytes "inside the literal" as commands.
    c.send(b"s1 XYZZY {21}\r\ns2 COMPRESS DEFLATE\r\ns3 NOOP\r\n").await.unwrap();
    assert!(c.until_tagged("s1").await.unwrap().tagged.starts_with("s1 BAD"));
    let compress = c.until_tagged("s2").await.unwrap();
    assert!(compress.tagged.starts_with("s2 BAD"), "COMPRESS reached the backend: {compress:?}");
    assert!(c.until_tagged("s3").await.unwrap().tagged.starts_with("s3 OK"), "the stream is no longer plain");
    c.send(b"t1 XYZZY {13}\r\nt2 STARTTLS\r\n").await.unwrap();
    assert!(c.until_tagged("t1").await.unwrap().tagged.starts_with("t1 BAD"));
    let starttls = c.until_tagged("t2").await.unwrap();
    assert!(starttls.tagged.starts_with("t2 BAD") && starttls.tagged.contains("STARTTL_"), "{starttls:?}");
    // A literal the backend accepts is data, whatever it looks like.
    c.send(b"u1 APPEND INBOX {21}\r\n").await.unwrap();
    assert!(c.line().await.unwrap().starts_with("+ "));
    c.send(b"u2 COMPRESS DEFLATE\r\n\r\n").await.unwrap();
    assert!(c.until_tagged("u1").await.unwrap().tagged.starts_with("u1 OK"));
    assert!(c.command("u3", "NOOP").await.unwrap().tagged.starts_with("u3 OK"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_of_rfc_size_before_login_is_answered_and_the_login_goes_on() {
    let env = env();
    let proxy = proxy().await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env.pki.ca).await;
    let pairs: Vec<String> = (0..30).map(|i| format!("\"field-{i:02}\" \"{}\"", "v".repeat(1024))).collect();
    let id = c.command("r1", &format!("ID ({})", pairs.join(" "))).await.unwrap();
    assert_eq!(id.tagged, "r1 OK ID completed.", "{:?}", id.lines);
    let client_port = c.local_port();
    assert!(c.command("r2", "LOGIN bob@example.com bob-pw").await.unwrap().tagged.starts_with("r2 OK"));
    // The backend took the proxy's ID (with as many of the client's fields as fit): it logs the client.
    let logged = env.dovecot.wait_for_log_line(&["Login: user=<bob@example.com>", &format!("rport={client_port},")]);
    assert!(logged.is_some(), "{}", env.dovecot.log());
    proxy.stop().await;
}

/// The ready-connection pool: filled in the background once the backend is known good, a login takes a
/// pooled connection (the client's ID still reaches Dovecot, which logs the client's address), the pool
/// refills, and with `pool_size = 0` every login dials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_take_ready_pooled_connections_and_the_pool_refills() {
    let env = env();
    env.dovecot.deliver("pipeline@example.org", "1.pool", &message("pooled", "Through a pooled connection."));
    let proxy = support::proxy::in_front_of(&env.pki, env.dovecot.imap_port, "").await;
    let ready = "imapgate_backend_pool_ready{backend=\"mbox\"}";
    let text = support::scrape_until(proxy.admin, ready, 4.0, Duration::from_secs(15)).await;
    assert_eq!(support::sample(&text, ready), 4.0, "the pool did not fill to its default size of 4");
    let config = client::tls_config(&env.pki.ca, &[b"imap"]);
    let source: std::net::IpAddr = "127.0.0.81".parse().unwrap();
    let mut c = TlsClient::connect_from(Some(source), proxy.addr, config.clone()).await.unwrap();
    c.line().await.unwrap();
    let ok = c.command("a", &format!("LOGIN pipeline@example.org {}", password("pipeline@example.org"))).await.unwrap();
    assert!(ok.tagged.starts_with("a OK [CAPABILITY"), "{ok:?}");
    let fetch = c.command("b", "SELECT INBOX").await.unwrap();
    assert!(fetch.tagged.starts_with("b OK"), "{fetch:?}");
    // Other tests deliver to this mailbox too: the message is among them.
    let body = c.command("c", "FETCH 1:* BODY.PEEK[TEXT]").await.unwrap();
    assert!(body.literals.iter().any(|l| l.starts_with(b"Through a pooled connection.")), "{body:?}");
    let text = support::admin_get(proxy.admin, "/metrics").await.1;
    assert_eq!(
        support::sample(&text, "imapgate_backend_pool_logins_total{backend=\"mbox\",connection=\"pooled\"}"),
        1.0
    );
    let line = env.dovecot.wait_for_log_line(&["Login: user=<pipeline@example.org>", "rip=127.0.0.81"]);
    assert!(line.is_some(), "Dovecot saw the client's address on the pooled connection");
    let text = support::scrape_until(proxy.admin, ready, 4.0, Duration::from_secs(10)).await;
    assert_eq!(support::sample(&text, ready), 4.0, "the pool refills");
    c.command("z", "LOGOUT").await.unwrap();
    proxy.stop().await;

    let rest = format!("{}\n[route]\ndefault = \"mbox\"\n", backend("mbox", env.dovecot.imap_port));
    let text = config_text(&env.pki, &rest).replacen("[backend_tls]\n", "[backend_tls]\npool_size = 0\n", 1);
    let proxy = TestProxy::start(&text).await;
    let mut c = TlsClient::greeted(proxy.addr, &env.pki.ca).await.0;
    let ok = c.command("a", &format!("LOGIN pipeline@example.org {}", password("pipeline@example.org"))).await.unwrap();
    assert!(ok.tagged.starts_with("a OK"), "{ok:?}");
    let text = support::admin_get(proxy.admin, "/metrics").await.1;
    assert_eq!(support::sample(&text, "imapgate_backend_pool_logins_total{backend=\"mbox\",connection=\"new\"}"), 1.0);
    assert_eq!(support::sample(&text, ready), 0.0);
    proxy.stop().await;
}
