//! The post-login observer never panics, stays bounded, and neutralises the same bytes however the client
//! stream is split. A second run interleaves server bytes (split at 0xff) for coverage of both directions.
#![no_main]

use std::time::Instant;

use imapgate::imap::inspect::{MAX_IN_FLIGHT, Observer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let (client, server) = rest.split_at(rest.len() / 2);
    let now = Instant::now();
    let step = usize::from(split).max(1);

    let mut whole = client.to_vec();
    Observer::new().client(&mut whole, now);
    let mut chunked = client.to_vec();
    let mut o = Observer::new();
    for chunk in chunked.chunks_mut(step) {
        o.client(chunk, now);
    }
    assert_eq!(chunked, whole, "neutralising depends on how the stream is split");

    let mut o = Observer::new();
    let mut bytes = client.to_vec();
    let mut servers = server.split(|&b| b == 0xff);
    for chunk in bytes.chunks_mut(step) {
        o.client(chunk, now);
        if let Some(piece) = servers.next() {
            o.server(piece, now);
        }
    }
    let done = o.finish(now);
    assert!(done.len() <= MAX_IN_FLIGHT + client.len());
});
