//! The STARTTLS listener's plaintext machine never panics, answers within bounds, never offers a
//! continuation (no login can start in clear), and does nothing at all after STARTTLS or a close.
#![no_main]

use imapgate::imap::starttls::{Action, BeforeTls};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut machine = BeforeTls::new();
    let mut finished = false;
    for piece in data.split(|&b| b == 0xff) {
        machine.feed(piece);
        while let Some(action) = machine.next_action() {
            assert!(!finished, "action after STARTTLS or close");
            match action {
                Action::Send(bytes) => {
                    assert!(bytes.len() < 64 * 1024);
                    assert!(!bytes.starts_with(b"+ ") || bytes.starts_with(b"+ Ready for literal data."));
                }
                Action::StartTls | Action::Close(_) => finished = true,
            }
        }
    }
});
