//! The backend login machine never panics on whatever a backend sends, and never lets the password out
//! before the connection is secured: in STARTTLS mode nothing it sends before the handshake holds the
//! password (or an OAuth token), and a plaintext session only sends it when the mode is plain.
#![no_main]

use imapgate::imap::backend_login::{BackendLogin, Goal, OAuthReplay, Security, Want};
use imapgate::imap::credentials::{Credentials, Secret, Username, password};
use imapgate::imap::oauth::{self, OAuthMechanism};
use imapgate::imap::sasl;
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"Fuzz-Secret-Pw";
/// The AUTHENTICATE PLAIN response for these credentials, base64.
const PLAIN_IR: &str = "AGZ1enpAZXhhbXBsZS5vcmcARnV6ei1TZWNyZXQtUHc=";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let security = match mode % 3 {
        0 => Security::StartTls,
        1 => Security::Implicit,
        _ => Security::Plain,
    };
    let credentials = Credentials {
        username: Username::parse(b"fuzz@example.org").unwrap(),
        password: password(SECRET.to_vec()).unwrap(),
    };
    // With bit 0x40 the password is an OAuth token, in an XOAUTH2 message (or rebuilt as OAUTHBEARER).
    let oauth = (mode & 0x40 != 0).then(|| OAuthReplay {
        mechanism: OAuthMechanism::XOAuth2,
        message: oauth::build(OAuthMechanism::XOAuth2, &credentials.username, &credentials.password),
    });
    let encodings: Vec<Secret<Vec<u8>>> = [OAuthMechanism::XOAuth2, OAuthMechanism::OAuthBearer]
        .into_iter()
        .map(|m| sasl::encode(oauth::build(m, &credentials.username, &credentials.password).expose()))
        .collect();
    let goal = if mode & 0x80 == 0 {
        Goal::Login { credentials, id: b"I ID NIL\r\n".to_vec(), oauth }
    } else {
        Goal::Check
    };
    let mut machine = BackendLogin::new(security, goal);
    let step = usize::from(mode >> 2).max(1);
    let mut chunks = rest.chunks(step);
    let mut secured = security != Security::StartTls;
    for _ in 0..rest.len() + 64 {
        match machine.next_want() {
            Want::Send(bytes) => {
                let holds = bytes.expose().windows(SECRET.len()).any(|w| w == SECRET)
                    || String::from_utf8_lossy(bytes.expose()).contains(PLAIN_IR)
                    || encodings.iter().any(|e| bytes.expose().windows(e.expose().len()).any(|w| w == e.expose()));
                assert!(secured || !holds, "password sent before TLS");
            }
            Want::Read => match chunks.next() {
                Some(chunk) => machine.feed(chunk),
                None => return,
            },
            Want::StartTls => {
                secured = true;
                machine.tls_established();
            }
            Want::Done(_) | Want::Failed(_) => return,
        }
    }
});
