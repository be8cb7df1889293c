//! The backend login machine never panics on whatever a backend sends, and never lets the password out
//! before the connection is secured: in STARTTLS mode nothing it sends before the handshake holds the
//! password, and a plaintext session only sends it when the mode is plain.
#![no_main]

use imapgate::imap::backend_login::{BackendLogin, Goal, Security, Want};
use imapgate::imap::credentials::{Credentials, Username, password};
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
    let goal = if mode & 0x80 == 0 { Goal::Login { credentials, id: b"I ID NIL\r\n".to_vec() } } else { Goal::Check };
    let mut machine = BackendLogin::new(security, goal);
    let step = usize::from(mode >> 2).max(1);
    let mut chunks = rest.chunks(step);
    let mut secured = security != Security::StartTls;
    for _ in 0..rest.len() + 64 {
        match machine.next_want() {
            Want::Send(bytes) => {
                let holds = bytes.expose().windows(SECRET.len()).any(|w| w == SECRET)
                    || String::from_utf8_lossy(bytes.expose()).contains(PLAIN_IR);
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
