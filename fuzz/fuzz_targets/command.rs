//! The pre-auth command parser never panics, and a parsed LOGIN always carries a valid username.
#![no_main]

use imapgate::imap::command::{self, CommandBody};
use imapgate::imap::framing::{Event, Framer, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut framer = Framer::new(Limits::CLIENT_PREAUTH);
    framer.push(data);
    while let Some(event) = framer.next_event() {
        if let Ok(Event::Frame(frame)) = event {
            if let Ok(cmd) = command::parse(&frame) {
                assert!(!cmd.tag.as_str().is_empty() && !cmd.tag.as_str().contains(['+', ' ', '\r', '\n']));
                if let CommandBody::Login(creds) = cmd.body {
                    assert!(!creds.username.as_str().chars().any(char::is_control));
                    assert!(!creds.password.expose().iter().any(|b| matches!(b, 0 | b'\r' | b'\n')));
                }
            }
        }
    }
});
