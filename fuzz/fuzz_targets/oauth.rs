//! The OAuth SASL message parsers never panic, and whatever they accept prints without its token.
#![no_main]

use imapgate::imap::oauth::{parse_oauthbearer, parse_xoauth2};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for parsed in [parse_oauthbearer(data), parse_xoauth2(data)].into_iter().flatten() {
        assert!(!parsed.token.expose().is_empty());
        assert_eq!(format!("{:?} {:?}", parsed.token, parsed.message), "[REDACTED] [REDACTED]");
    }
});
