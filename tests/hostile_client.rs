//! Hostile input from clients over a real TLS connection: nothing panics, nothing unbounded is buffered,
//! nothing reaches a backend before login, and every case ends in a clear IMAP response.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::client::TlsClient;
use support::proxy::{TestProxy, backend, config_text};

fn env() -> &'static support::Env {
    support::env("hostile-client", &[])
}

async fn proxy() -> TestProxy {
    let env = env();
    let rest = format!("{}\n[route]\ndefault = \"mbox\"\n", backend("mbox", env.dovecot.imap_port));
    let text = config_text(&env.pki, &rest).replace("preauth_idle_timeout_secs = 30", "preauth_idle_timeout_secs = 1");
    TestProxy::start(&text).await
}

/// Sends `input`, then returns everything the proxy said until it closed the connection.
async fn exchange(input: &[u8]) -> String {
    let proxy = proxy().await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &env().pki.ca).await;
    c.send(input).await.unwrap();
    let out = c.rest().await;
    proxy.stop().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn literal_announced_and_never_sent_times_out() {
    let started = Instant::now();
    let out = exchange(b"a LOGIN {5}\r\n").await;
    assert_eq!(out, "+ Ready for literal data.\r\n* BYE Disconnected for inactivity.\r\n");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_non_synchronising_literal_is_never_read_as_commands() {
    let mut input = b"a LOGIN {5000+}\r\n".to_vec();
    for _ in 0..500 {
        input.extend_from_slice(b"b LOGOUT\r\n");
    }
    let out = exchange(&input).await;
    assert_eq!(out, "a BAD [TOOBIG] Literal too big.\r\n* BYE Literal too big.\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_line_without_crlf_is_refused() {
    let out = exchange(&[b'x'; 9000]).await;
    assert_eq!(out, "* BYE [TOOBIG] Line too long.\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn literal_lengths_that_are_huge_negative_or_not_numbers() {
    let out = exchange(b"a LOGIN {18446744073709551616}\r\nb LOGIN {-1}\r\nc LOGIN {1e3}\r\n").await;
    assert_eq!(
        out,
        "a BAD Invalid arguments.\r\nb BAD Invalid arguments.\r\nc BAD Invalid arguments.\r\n\
         * BYE Too many invalid commands.\r\n"
    );
    let out = exchange(b"a LOGIN {99999999999999999999999+}\r\n").await;
    assert_eq!(out, "a BAD [TOOBIG] Literal too big.\r\n* BYE Literal too big.\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crlf_smuggled_in_a_username_never_reaches_the_backend() {
    let out = exchange(b"a LOGIN {29}\r\nalice@example.org\r\nb DELETE x {8}\r\nalice-pw\r\nc LOGOUT\r\n").await;
    assert!(out.starts_with("+ Ready for literal data.\r\n+ Ready for literal data.\r\na BAD"), "{out}");
    assert!(out.contains("c OK Logout completed."), "{out}");
    assert_eq!(env().dovecot.logins_of("alice@example.org"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_cr_nul_and_odd_tags() {
    let out = exchange(b"a NO\rOP\r\nb\0 NOOP\r\n").await;
    assert_eq!(out, "a BAD Unknown command.\r\n* BAD Invalid tag.\r\n* BYE Disconnected for inactivity.\r\n");
    let long_tag = "t".repeat(1000);
    let out = exchange(format!("{long_tag} NOOP\r\n+ NOOP\r\n% NOOP\r\n").as_bytes()).await;
    assert_eq!(
        out,
        "* BAD Invalid tag.\r\n* BAD Invalid tag.\r\n* BAD Invalid tag.\r\n* BYE Too many invalid commands.\r\n"
    );
    // A bare LF ends a line like CRLF.
    let out = exchange(b"a NOOP\nb LOGOUT\n").await;
    assert_eq!(out, "a OK NOOP completed.\r\n* BYE Logging out.\r\nb OK Logout completed.\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_abuse() {
    let out =
        exchange(b"a AUTHENTICATE PLAIN\r\n*\r\nb AUTHENTICATE PLAIN !!!!\r\nc AUTHENTICATE GSSAPI\r\nd LOGOUT\r\n")
            .await;
    assert_eq!(
        out,
        "+ \r\na BAD Authentication cancelled.\r\nb BAD Invalid arguments.\r\n\
         c NO Unsupported authentication mechanism.\r\n* BYE Logging out.\r\nd OK Logout completed.\r\n"
    );
    // "\0\0\0" extra NULs, and an empty authcid.
    let out = exchange(b"a AUTHENTICATE PLAIN AGFsaWNlAHB3AHg=\r\nb AUTHENTICATE PLAIN AABwdw==\r\nc LOGOUT\r\n").await;
    assert_eq!(
        out,
        "a BAD Malformed SASL response.\r\nb BAD Malformed SASL response.\r\n* BYE Logging out.\r\nc OK Logout completed.\r\n"
    );
    // An over-long SASL response line.
    let mut input = b"a AUTHENTICATE PLAIN\r\n".to_vec();
    input.extend_from_slice(&[b'A'; 9000]);
    input.extend_from_slice(b"\r\n");
    assert_eq!(exchange(&input).await, "+ \r\n* BYE [TOOBIG] Line too long.\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_that_need_login_are_refused_locally() {
    let out = exchange(b"a COMPRESS DEFLATE\r\nb SELECT INBOX\r\nc LOGOUT\r\n").await;
    assert_eq!(
        out,
        "a BAD Command not permitted before authentication.\r\nb BAD Command not permitted before authentication.\r\n\
         * BYE Logging out.\r\nc OK Logout completed.\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_id_is_refused() {
    let mut input = b"a ID ".to_vec();
    input.extend(std::iter::repeat_n(b'(', 3000));
    input.extend(std::iter::repeat_n(b')', 3000));
    input.extend_from_slice(b"\r\nb LOGOUT\r\n");
    let out = exchange(&input).await;
    assert_eq!(out, "a BAD Invalid arguments.\r\n* BYE Logging out.\r\nb OK Logout completed.\r\n");
}
