//! Backends that misbehave before login: the proxy must fail closed and never send credentials.
//! These peers are scripted on purpose (a real Dovecot cannot be made to misbehave this way).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{Arc, Mutex, OnceLock};

use support::client::TlsClient;
use support::pki::Pki;
use support::proxy::{TestProxy, backend, config_text};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const PASSWORD: &str = "s3cret-never-leaks";
const UNAVAILABLE: &str = "NO [UNAVAILABLE] Service temporarily unavailable, try again later.";

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| Pki::generate(&support::scratch_dir("imapgate-hostile-")))
}

#[derive(Clone, Copy, Debug)]
enum Script {
    PreauthGreeting,
    ByeGreeting,
    StarttlsNotAdvertised,
    StarttlsAnswered(&'static str),
    /// `+ go ahead` instead of a tagged reply.
    StarttlsContinuation,
    BytesAfterStarttlsOk,
    HostileBanner,
    /// A well-behaved TLS backend that answers the login with a referral.
    Referral,
    /// A TLS backend that implements RFC 8437 UNAUTHENTICATE (as Cyrus does) and accepts the login.
    Unauthenticate,
}

/// Records every byte the backend received (after TLS when there is TLS).
type Received = Arc<Mutex<Vec<u8>>>;

async fn spawn_backend(script: Script) -> (u16, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received: Received = Arc::default();
    let log = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let _ = serve(script, tcp, log).await;
            });
        }
    });
    (port, received)
}

async fn lines<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    log: &Received,
    mut answer: impl FnMut(&str) -> Option<String>,
) -> std::io::Result<S> {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(reader.into_inner());
        }
        log.lock().unwrap().extend_from_slice(line.as_bytes());
        match answer(line.trim_end()) {
            Some(reply) => reader.get_mut().write_all(reply.as_bytes()).await?,
            None => return Ok(reader.into_inner()),
        }
    }
}

async fn serve(script: Script, mut tcp: tokio::net::TcpStream, log: Received) -> std::io::Result<()> {
    let greeting: Vec<u8> = match script {
        Script::PreauthGreeting => b"* PREAUTH [CAPABILITY IMAP4rev1 STARTTLS] Logged in as root\r\n".to_vec(),
        Script::ByeGreeting => b"* BYE Too many connections\r\n".to_vec(),
        Script::StarttlsNotAdvertised => b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n".to_vec(),
        Script::HostileBanner => b"* OK [CAPABILITY IMAP4rev1 STARTTLS] %s%n%x\x07\x1b[2J\xff ready\r\n".to_vec(),
        _ => b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n".to_vec(),
    };
    tcp.write_all(&greeting).await?;
    let tcp = lines(tcp, &log, |line| {
        let tag = line.split(' ').next().unwrap_or("*").to_owned();
        match (script, line.to_ascii_uppercase().contains("STARTTLS")) {
            (Script::StarttlsAnswered(reply), true) => Some(format!("{tag} {reply}\r\n")),
            (Script::StarttlsContinuation, true) => Some("+ go ahead\r\n".into()),
            (Script::BytesAfterStarttlsOk, true) => {
                Some(format!("{tag} OK Begin TLS\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n"))
            }
            (Script::HostileBanner, true) => Some(format!("{tag} BAD %s%n\x00\r\n")),
            (Script::Referral | Script::Unauthenticate, true) => {
                // Reply, then hand over to TLS.
                None
            }
            (_, false) if line.to_ascii_uppercase().ends_with("CAPABILITY") => {
                Some(format!("* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\n{tag} OK done\r\n"))
            }
            _ => Some(format!("{tag} BAD what?\r\n")),
        }
    })
    .await?;
    if let Script::Referral | Script::Unauthenticate = script {
        let mut tcp = tcp;
        tcp.write_all(b"S OK Begin TLS\r\n").await?;
        let tls = imapgate::config::TlsConfig {
            cert: pki().cert.clone(),
            key: pki().key.clone(),
            certificates: Vec::new(),
            unknown_name: imapgate::config::UnknownName::Default,
            cipher_preference: imapgate::config::CipherPreference::Server,
        };
        let ticketer = imapgate::net::tls::ticketer().unwrap();
        let (config, _) = imapgate::net::tls::server_config(&tls, &ticketer).unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
        lines(tls, &log, |line| {
            let tag = line.split(' ').next().unwrap_or("*").to_owned();
            let upper = line.to_ascii_uppercase();
            Some(if upper.ends_with("CAPABILITY") {
                format!("* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR ID\r\n{tag} OK done\r\n")
            } else if upper.contains(" ID ") {
                format!("* ID NIL\r\n{tag} OK ID done\r\n")
            } else if upper.contains("AUTHENTICATE") && matches!(script, Script::Referral) {
                format!("{tag} NO [REFERRAL imap://alice@evil.example/] Try elsewhere\r\n")
            } else if upper.contains("AUTHENTICATE") || upper.contains(" LOGIN ") {
                // RFC 8437: UNAUTHENTICATE returns to the not-authenticated state; a login follows.
                format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE UNAUTHENTICATE] Logged in\r\n")
            } else {
                format!("{tag} BAD what?\r\n")
            })
        })
        .await?;
    }
    Ok(())
}

async fn attempt(script: Script) -> (String, String) {
    let (port, received) = spawn_backend(script).await;
    let rest = format!("{}\n[route]\ndefault = \"hostile\"\n", backend("hostile", port));
    let proxy = TestProxy::start(&config_text(pki(), &rest)).await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &pki().ca).await;
    let reply = c.command("h1", &format!("LOGIN alice@example.org {PASSWORD}")).await.unwrap();
    // The session survives: the client may go on.
    let noop = c.command("h2", "NOOP").await.unwrap();
    assert_eq!(noop.tagged, "h2 OK NOOP completed.", "{script:?}");
    proxy.stop().await;
    let seen = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
    (reply.tagged, seen)
}

async fn assert_fails_closed(script: Script) {
    let (reply, seen) = attempt(script).await;
    assert_eq!(reply, format!("h1 {UNAVAILABLE}"), "{script:?}");
    assert!(!seen.contains(PASSWORD), "{script:?}: password reached the backend: {seen:?}");
    assert!(!seen.to_ascii_uppercase().contains("LOGIN"), "{script:?}: {seen:?}");
    assert!(!seen.to_ascii_uppercase().contains("AUTHENTICATE"), "{script:?}: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preauth_greeting_is_fatal() {
    assert_fails_closed(Script::PreauthGreeting).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bye_greeting_is_fatal() {
    assert_fails_closed(Script::ByeGreeting).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_must_be_advertised() {
    assert_fails_closed(Script::StarttlsNotAdvertised).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_answered_bad_no_or_continuation() {
    for reply in ["BAD not now", "NO [UNAVAILABLE] no TLS today"] {
        assert_fails_closed(Script::StarttlsAnswered(reply)).await;
    }
    assert_fails_closed(Script::StarttlsContinuation).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_starttls_ok_abort_the_handshake() {
    assert_fails_closed(Script::BytesAfterStarttlsOk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_banner_is_survived() {
    assert_fails_closed(Script::HostileBanner).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referral_is_neither_followed_nor_forwarded() {
    let (reply, seen) = attempt(Script::Referral).await;
    assert_eq!(reply, "h1 NO [AUTHENTICATIONFAILED] Authentication failed.");
    assert!(seen.contains("AUTHENTICATE PLAIN"), "{seen:?}");
    assert!(seen.contains("\"x-originating-ip\" \"127.0.0.1\""), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticate_and_logins_after_login_never_reach_the_backend() {
    let (port, received) = spawn_backend(Script::Unauthenticate).await;
    let rest = format!("{}\n[route]\ndefault = \"hostile\"\n", backend("hostile", port));
    let proxy = TestProxy::start(&config_text(pki(), &rest)).await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &pki().ca).await;
    let reply = c.command("u1", &format!("LOGIN alice@example.org {PASSWORD}")).await.unwrap();
    assert!(reply.tagged.starts_with("u1 OK [CAPABILITY IMAP4rev1 IDLE] "), "not advertised: {reply:?}");
    // Inside the relay: back to not-authenticated, then guesses and a forged client address.
    for (tag, command) in [
        ("u2", "UNAUTHENTICATE"),
        ("u3", "LOGIN victim@example.org guess-1"),
        ("u4", "AUTHENTICATE PLAIN AHZpY3RpbQBndWVzcy0y"),
        ("u5", "ID (\"x-originating-ip\" \"203.0.113.9\")"),
    ] {
        let reply = c.command(tag, command).await.unwrap();
        assert!(reply.tagged.starts_with(&format!("{tag} BAD")) || tag == "u5", "{command}: {reply:?}");
    }
    proxy.stop().await;
    let seen = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
    // Everything after the proxy's own login (whose credentials travel base64-encoded).
    let after_login = seen.find("u2 ").map(|at| seen[at..].to_owned()).unwrap_or_default();
    assert!(after_login.contains("u2 UNAUTHENTICAT_"), "{seen:?}");
    assert!(after_login.contains("u3 LOGI_ victim"), "{seen:?}");
    assert!(after_login.contains("u4 AUTHENTICAT_ PLAIN"), "{seen:?}");
    for word in ["UNAUTHENTICATE", " LOGIN ", "AUTHENTICATE "] {
        assert!(!after_login.contains(word), "{word} reached the backend after login: {after_login:?}");
    }
}
