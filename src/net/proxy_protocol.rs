//! The PROXY protocol (v1 text and v2 binary, HAProxy's `doc/proxy-protocol.txt`) on the client listeners:
//! a load balancer in front of imapgate tells it the real client's address before the TLS handshake.
//!
//! Only peers in `server.proxy_protocol_from` may send a header; a header from anyone else is refused (it
//! would let a client choose its own address). The header is read exactly — never a byte of the TLS
//! handshake behind it — bounded in size and within the handshake timeout. Parsing is `ppp`'s; this module
//! decides what a header means for the connection.

use std::net::{IpAddr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::{ProxyProtocolMode, ServerConfig};
use crate::security::prefix;

/// The longest v1 header (the specification's 107 bytes).
pub const V1_MAX: usize = 107;
/// The longest v2 header accepted: the 16-byte fixed part plus addresses and TLVs. HAProxy sends well
/// under this; the format allows 64 KiB, which no balancer needs.
pub const V2_MAX: usize = 16 + 1024;

/// The addresses a session works with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    /// The client, as the header tells it (or the TCP peer without a header).
    pub client: SocketAddr,
    /// The address the client connected to (the header's destination, or the local socket).
    pub local: SocketAddr,
    /// The TCP peer when it is not the client (the balancer).
    pub via: Option<SocketAddr>,
}

/// Why a connection is closed before TLS while reading the header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("PROXY header from a peer not in server.proxy_protocol_from")]
    Untrusted,
    #[error("no PROXY header, and server.proxy_protocol = \"required\"")]
    Missing,
    #[error("PROXY header larger than allowed")]
    Oversized,
    #[error("malformed PROXY header: {0}")]
    Invalid(String),
    #[error("PROXY header not complete within the handshake timeout")]
    Timeout,
    #[error("v2 LOCAL command (a balancer's health check)")]
    Local,
    #[error("connection closed while reading the PROXY header: {0}")]
    Io(String),
}

impl HeaderError {
    /// The `result` label of `imapgate_proxy_protocol_total`.
    pub fn label(&self) -> &'static str {
        match self {
            HeaderError::Untrusted => "untrusted",
            HeaderError::Missing => "missing",
            HeaderError::Oversized => "oversized",
            HeaderError::Invalid(_) => "invalid",
            HeaderError::Timeout => "timeout",
            HeaderError::Local => "local",
            HeaderError::Io(_) => "io",
        }
    }
}

/// What the first byte of a connection says it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    V1,
    V2,
    /// Anything else: a TLS ClientHello (0x16) or garbage for the handshake to refuse.
    Other,
}

pub fn classify(first: u8) -> Start {
    match first {
        b'P' => Start::V1,
        b'\r' => Start::V2,
        _ => Start::Other,
    }
}

/// A parsed header: `Some` addresses for a proxied TCP connection, `None` for v1 `UNKNOWN` and v2 families
/// without addresses (the real connection's addresses stay).
pub fn parse(bytes: &[u8]) -> Result<Option<(SocketAddr, SocketAddr)>, HeaderError> {
    match classify(bytes.first().copied().unwrap_or(0)) {
        Start::V1 => {
            let header = ppp::v1::Header::try_from(bytes).map_err(|e| HeaderError::Invalid(e.to_string()))?;
            Ok(match header.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    Some(pair(a.source_address, a.source_port, a.destination_address, a.destination_port))
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    Some(pair(a.source_address, a.source_port, a.destination_address, a.destination_port))
                }
                ppp::v1::Addresses::Unknown => None,
            })
        }
        Start::V2 => {
            let header = ppp::v2::Header::try_from(bytes).map_err(|e| HeaderError::Invalid(e.to_string()))?;
            if header.command == ppp::v2::Command::Local {
                return Err(HeaderError::Local);
            }
            Ok(match header.addresses {
                ppp::v2::Addresses::IPv4(a) => {
                    Some(pair(a.source_address, a.source_port, a.destination_address, a.destination_port))
                }
                ppp::v2::Addresses::IPv6(a) => {
                    Some(pair(a.source_address, a.source_port, a.destination_address, a.destination_port))
                }
                ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
            })
        }
        Start::Other => Err(HeaderError::Invalid("not a PROXY header".into())),
    }
}

/// (source, destination) from a header's address fields, whatever their family.
fn pair(
    source: impl Into<IpAddr>,
    source_port: u16,
    destination: impl Into<IpAddr>,
    port: u16,
) -> (SocketAddr, SocketAddr) {
    (SocketAddr::new(source.into(), source_port), SocketAddr::new(destination.into(), port))
}

/// How many bytes the v2 header whose fixed part is `fixed` has in all.
pub fn v2_length(fixed: &[u8; 16]) -> Result<usize, HeaderError> {
    if &fixed[..12] != ppp::v2::PROTOCOL_PREFIX {
        return Err(HeaderError::Invalid("bad v2 signature".into()));
    }
    let total = 16 + usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if total > V2_MAX {
        return Err(HeaderError::Oversized);
    }
    Ok(total)
}

/// Reads the header a connection may carry, as the configuration says, and returns the session's
/// addresses. `Ok(None)`-free: a connection without a header (where allowed) gets the socket's addresses.
pub async fn accept(
    config: &ServerConfig,
    tcp: &mut TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<(Endpoints, &'static str), HeaderError> {
    let plain = Endpoints { client: peer, local, via: None };
    if config.proxy_protocol == ProxyProtocolMode::Off {
        return Ok((plain, "none"));
    }
    let trusted = prefix::contains(&config.proxy_protocol_from, peer.ip());
    if !trusted && config.proxy_protocol == ProxyProtocolMode::Required {
        return Err(HeaderError::Missing);
    }
    let deadline = config.handshake_timeout;
    let read = async {
        let mut first = [0u8; 1];
        // Waits for the first byte without taking it, so that a TLS ClientHello stays for the handshake.
        let n = tcp.peek(&mut first).await.map_err(|e| HeaderError::Io(e.to_string()))?;
        if n == 0 {
            return Err(HeaderError::Io("closed".into()));
        }
        let start = classify(first[0]);
        match (start, trusted) {
            (Start::Other, _) if config.proxy_protocol == ProxyProtocolMode::Required => Err(HeaderError::Missing),
            (Start::Other, _) => Ok(None),
            (_, false) => Err(HeaderError::Untrusted),
            (Start::V1, true) => read_v1(tcp).await.map(|h| Some(("v1", h))),
            (Start::V2, true) => read_v2(tcp).await.map(|h| Some(("v2", h))),
        }
    };
    let header = tokio::time::timeout(deadline, read).await.map_err(|_| HeaderError::Timeout)??;
    match header {
        None => Ok((plain, "none")),
        Some((version, bytes)) => match parse(&bytes)? {
            Some((client, destination)) => {
                Ok((Endpoints { client: canonical(client), local: canonical(destination), via: Some(peer) }, version))
            }
            None => Ok((plain, version)),
        },
    }
}

/// PROXY v2 `LOCAL`: a connection of the proxy's own (a health check), no client behind it.
const V2_LOCAL: [u8; 16] =
    [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x20, 0x00, 0x00, 0x00];

/// The PROXY v2 header a backend gets first (`[backend_tls] send_proxy = "v2"`): the client's address and
/// the address it connected to, or `LOCAL` for the proxy's own connections. Mixed families are sent as
/// IPv6 (IPv4-mapped), which the format requires to be one family.
pub fn backend_header(client: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    let Some((source, destination)) = client else { return V2_LOCAL.to_vec() };
    let v6 = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        v6 => v6,
    };
    let pair =
        if source.is_ipv4() == destination.is_ipv4() { (source, destination) } else { (v6(source), v6(destination)) };
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, pair)
        .build()
        .unwrap_or_else(|_| V2_LOCAL.to_vec())
}

/// IPv4-mapped IPv6 addresses as IPv4, as everywhere else.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

async fn read_v1(tcp: &mut TcpStream) -> Result<Vec<u8>, HeaderError> {
    // Byte by byte up to the CRLF: never a byte of the TLS handshake that follows.
    let mut header = Vec::with_capacity(V1_MAX);
    while !header.ends_with(b"\r\n") {
        if header.len() == V1_MAX {
            return Err(HeaderError::Oversized);
        }
        let byte = tcp.read_u8().await.map_err(|e| HeaderError::Io(e.to_string()))?;
        header.push(byte);
    }
    Ok(header)
}

async fn read_v2(tcp: &mut TcpStream) -> Result<Vec<u8>, HeaderError> {
    let mut fixed = [0u8; 16];
    tcp.read_exact(&mut fixed).await.map_err(|e| HeaderError::Io(e.to_string()))?;
    let total = v2_length(&fixed)?;
    let mut header = vec![0u8; total];
    header[..16].copy_from_slice(&fixed);
    tcp.read_exact(&mut header[16..]).await.map_err(|e| HeaderError::Io(e.to_string()))?;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Builder, Command, Protocol, Type, Version};

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let (src, dst) = parse(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 993\r\n").unwrap().unwrap();
        assert_eq!(src, "192.0.2.7:40000".parse().unwrap());
        assert_eq!(dst, "198.51.100.1:993".parse().unwrap());
        let (src, _) = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 993\r\n").unwrap().unwrap();
        assert_eq!(src, "[2001:db8::7]:40000".parse().unwrap());
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), None);
        assert!(matches!(parse(b"PROXY TCP4 999.0.2.7 198.51.100.1 40000 993\r\n"), Err(HeaderError::Invalid(_))));
    }

    #[test]
    fn v2_with_tlvs_local_and_bad_signature() {
        let header = Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            (SocketAddr::from(([192, 0, 2, 9], 5555)), SocketAddr::from(([198, 51, 100, 1], 993))),
        )
        .write_tlv(Type::Authority, b"mail.example.org")
        .unwrap()
        .write_tlv(Type::UniqueId, b"abc")
        .unwrap()
        .build()
        .unwrap();
        let mut fixed = [0u8; 16];
        fixed.copy_from_slice(&header[..16]);
        assert_eq!(v2_length(&fixed).unwrap(), header.len());
        let (src, dst) = parse(&header).unwrap().unwrap();
        assert_eq!(src, "192.0.2.9:5555".parse().unwrap());
        assert_eq!(dst.port(), 993);

        let local = Builder::with_addresses(
            Version::Two | Command::Local,
            Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .unwrap();
        assert_eq!(parse(&local), Err(HeaderError::Local));

        let mut bad = fixed;
        bad[3] = b'X';
        assert!(matches!(v2_length(&bad), Err(HeaderError::Invalid(_))));
        let mut huge = fixed;
        huge[14..16].copy_from_slice(&4000u16.to_be_bytes());
        assert_eq!(v2_length(&huge), Err(HeaderError::Oversized));
    }

    #[test]
    fn first_byte_classifies() {
        assert_eq!(classify(0x16), Start::Other);
        assert_eq!(classify(b'P'), Start::V1);
        assert_eq!(classify(b'\r'), Start::V2);
    }

    #[test]
    fn backend_headers_parse_back_as_sent() {
        let client: SocketAddr = "192.0.2.9:5555".parse().unwrap();
        let local: SocketAddr = "198.51.100.1:993".parse().unwrap();
        let header = backend_header(Some((client, local)));
        assert_eq!(parse(&header).unwrap(), Some((client, local)));
        // Mixed families go as IPv6; read back, the IPv4 side is the same address.
        let v6: SocketAddr = "[2001:db8::1]:993".parse().unwrap();
        let header = backend_header(Some((client, v6)));
        let (src, dst) = parse(&header).unwrap().unwrap();
        assert_eq!((canonical(src), dst), (client, v6));
        // LOCAL: no addresses.
        let local_header = backend_header(None);
        let mut fixed = [0u8; 16];
        fixed.copy_from_slice(&local_header);
        assert_eq!(v2_length(&fixed).unwrap(), 16);
        assert!(matches!(parse(&local_header), Err(HeaderError::Local)));
    }
}
