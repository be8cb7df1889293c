//! Framing never panics, never holds more than its bounds, and frames the same however input is split.
#![no_main]

use imapgate::imap::framing::{Framer, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (split, input) = match data.split_first() {
        Some((s, rest)) => (usize::from(*s).max(1), rest),
        None => return,
    };
    let mut whole = Framer::new(Limits::CLIENT_PREAUTH);
    whole.push(input);
    let mut expected = Vec::new();
    while let Some(event) = whole.next_event() {
        expected.push(event);
    }
    let mut chunked = Framer::new(Limits::CLIENT_PREAUTH);
    let mut got = Vec::new();
    for chunk in input.chunks(split) {
        chunked.push(chunk);
        while let Some(event) = chunked.next_event() {
            got.push(event);
        }
        // One partial line plus one chunk, one literal, one message: never more.
        let bound = Limits::CLIENT_PREAUTH.max_line + 2 + split + Limits::CLIENT_PREAUTH.max_message;
        assert!(chunked.buffered() <= bound, "buffered {} > {bound}", chunked.buffered());
    }
    assert_eq!(got, expected);
});
