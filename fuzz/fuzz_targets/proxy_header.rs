//! PROXY protocol headers (v1 and v2, as the listener reads them): the parser never panics, a v2 length is
//! always within the bound, and the addresses of any parsed header survive a round trip through a v1 header
//! written from them (so source and destination are never swapped or truncated).
#![no_main]

use std::net::SocketAddr;

use imapgate::net::proxy_protocol::{self, V2_MAX};
use libfuzzer_sys::fuzz_target;

fn v1(source: SocketAddr, destination: SocketAddr) -> String {
    let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {family} {} {} {} {}\r\n", source.ip(), destination.ip(), source.port(), destination.port())
}

fuzz_target!(|data: &[u8]| {
    if data.len() >= 16 {
        let mut fixed = [0u8; 16];
        fixed.copy_from_slice(&data[..16]);
        if let Ok(total) = proxy_protocol::v2_length(&fixed) {
            assert!((16..=V2_MAX).contains(&total));
        }
    }
    if let Ok(Some((source, destination))) = proxy_protocol::parse(data) {
        if source.is_ipv4() == destination.is_ipv4() {
            let again = proxy_protocol::parse(v1(source, destination).as_bytes());
            assert_eq!(again, Ok(Some((source, destination))));
        }
    }
});
