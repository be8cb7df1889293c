//! The pre-auth state machine never panics, answers within bounds, never emits a login with a username
//! holding control characters, and stops after it asked to close.
#![no_main]

use imapgate::imap::preauth::{Action, Offer, PreAuth, Rejection};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let offer = Offer { plain: true, login: true, xoauth2: true, oauthbearer: true };
    let mut machine = PreAuth::offering(offer);
    let mut closed = false;
    // Feed in pieces split at 0xff bytes so multi-step exchanges (SASL, literals) are explored.
    for (i, piece) in data.split(|&b| b == 0xff).enumerate() {
        machine.feed(piece);
        while let Some(action) = machine.next_action() {
            assert!(!closed, "action after close");
            match action {
                Action::Send(bytes) => assert!(bytes.len() < 64 * 1024),
                Action::Login(req) => {
                    assert!(!req.credentials.username.as_str().chars().any(char::is_control));
                    if req.mechanism.oauth().is_some() && i % 3 == 0 {
                        // An OAuth error challenge, then the client's acknowledgement (or anything else).
                        machine.oauth_failed(&req.tag, "eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=");
                        continue;
                    }
                    let rejection = if i % 2 == 0 { Rejection::AUTHENTICATION_FAILED } else { Rejection::UNAVAILABLE };
                    machine.login_failed(&req.tag, rejection);
                }
                Action::Close(_) => closed = true,
            }
        }
    }
});
