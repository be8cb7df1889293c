//! A port shared with the organisation's web server (443): each connection's TLS ClientHello is read
//! without being consumed (`MSG_PEEK`) and without terminating TLS, and parsed by rustls's `Acceptor`.
//! ALPN `imap`, or a server name configured for IMAP, goes on as IMAP over TLS (the ordinary session,
//! which then reads the same bytes); anything else is passed through unchanged, ClientHello included, to
//! the web server, with a PROXY v2 header when configured. The peek is bounded in size
//! ([`MAX_HELLO`]) and in time (the handshake timeout); a first byte that is not a TLS handshake record,
//! or a ClientHello rustls rejects, closes the connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::SharedListen;

/// The most bytes a ClientHello may take (two full TLS records); a larger one is refused.
pub const MAX_HELLO: usize = 2 * (16 * 1024 + 5);
/// Between peeks while a ClientHello is incomplete (the bytes stay in the kernel until read).
const PEEK_PAUSE: Duration = Duration::from_millis(5);

/// What the bytes received so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    NeedMore,
    Hello {
        server_name: Option<String>,
        alpn: Vec<Vec<u8>>,
    },
    /// The first byte is not a TLS handshake record (plain HTTP, IMAP without TLS, garbage).
    NotTls,
    /// rustls refused it as a ClientHello.
    Malformed,
}

/// Parses the start of a connection (sans-IO): a fresh rustls `Acceptor` each time, fed all of `bytes`.
pub fn peek_hello(bytes: &[u8]) -> Peeked {
    match bytes.first() {
        None => return Peeked::NeedMore,
        Some(0x16) => {}
        Some(_) => return Peeked::NotTls,
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(None) => Peeked::NeedMore,
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            Peeked::Hello {
                server_name: hello.server_name().map(str::to_ascii_lowercase),
                alpn: hello.alpn().map(|protocols| protocols.map(<[u8]>::to_vec).collect()).unwrap_or_default(),
            }
        }
        Err(_) => Peeked::Malformed,
    }
}

/// Where a connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Imap,
    Web,
}

/// ALPN `imap` or a configured name is IMAP; no SNI is IMAP only where configured; the rest is web.
pub fn route(config: &SharedListen, server_name: Option<&str>, alpn: &[Vec<u8>]) -> Route {
    if alpn.iter().any(|p| p == b"imap") {
        return Route::Imap;
    }
    match server_name {
        Some(name) if config.imap_names.iter().any(|n| n == name.trim_end_matches('.')) => Route::Imap,
        None if alpn.is_empty() && config.imap_without_sni => Route::Imap,
        _ => Route::Web,
    }
}

/// Why a connection was closed before it was routed (`imapgate_shared_listen_hellos_total{route}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrouted {
    NotTls,
    Malformed,
    Oversized,
    Timeout,
    Closed,
}

impl Unrouted {
    pub fn label(self) -> &'static str {
        match self {
            Unrouted::NotTls => "not_tls",
            Unrouted::Malformed => "malformed",
            Unrouted::Oversized => "oversized",
            Unrouted::Timeout => "timeout",
            Unrouted::Closed => "closed",
        }
    }
}

/// Peeks until the ClientHello is complete (bounded by `MAX_HELLO` and `within`) and routes it.
pub async fn classify(tcp: &TcpStream, config: &SharedListen, within: Duration) -> Result<Route, Unrouted> {
    let deadline = tokio::time::Instant::now() + within;
    // A typical ClientHello fits the first size; the buffer grows (to one byte past the bound) only for
    // one that fills it.
    let mut buf = vec![0u8; 2048];
    let mut seen = 0;
    loop {
        let peeked = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Err(_) => return Err(Unrouted::Timeout),
            Ok(Err(_)) | Ok(Ok(0)) => return Err(Unrouted::Closed),
            Ok(Ok(n)) => n,
        };
        if peeked == buf.len() && buf.len() <= MAX_HELLO {
            buf.resize((buf.len() * 4).min(MAX_HELLO + 1), 0);
            continue;
        }
        if peeked > seen {
            seen = peeked;
            match peek_hello(&buf[..peeked]) {
                Peeked::Hello { server_name, alpn } => return Ok(route(config, server_name.as_deref(), &alpn)),
                Peeked::NotTls => return Err(Unrouted::NotTls),
                Peeked::Malformed => return Err(Unrouted::Malformed),
                Peeked::NeedMore if peeked > MAX_HELLO => return Err(Unrouted::Oversized),
                Peeked::NeedMore => {}
            }
        }
        // Nothing new yet: the peek returns at once while bytes wait, so pause before looking again.
        if tokio::time::Instant::now() + PEEK_PAUSE > deadline {
            return Err(Unrouted::Timeout);
        }
        tokio::time::sleep(PEEK_PAUSE).await;
    }
}

/// The bytes a passed-through connection moved: (client to web, web to client).
pub type Moved = (u64, u64);

/// Relays `client` to the web server unchanged (its ClientHello is still unread in the socket), after a
/// PROXY v2 header naming `client_addr` and `local` when configured. Ends when both sides have closed;
/// `life` bounds the whole connection (the web server's own timeouts end idle ones sooner).
pub async fn pass_through(
    mut client: TcpStream,
    client_addr: SocketAddr,
    local: SocketAddr,
    config: &SharedListen,
    connect_within: Duration,
    life: Duration,
) -> std::io::Result<Moved> {
    let mut web = tokio::time::timeout(connect_within, TcpStream::connect(config.web))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect to the web server timed out"))??;
    let _ = web.set_nodelay(true);
    if config.send_proxy {
        let header = crate::net::proxy_protocol::backend_header(Some((client_addr, local)));
        web.write_all(&header).await?;
    }
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut web, 16 * 1024, 16 * 1024);
    match tokio::time::timeout(life, copy).await {
        Ok(moved) => moved,
        Err(_) => {
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "passed-through connection outlived its limit"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(name: Option<&str>, alpn: &[&[u8]]) -> Vec<u8> {
        // A real ClientHello from rustls's own client.
        crate::net::tls::install_crypto_provider();
        let roots = rustls::RootCertStore::empty();
        let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.enable_sni = name.is_some();
        let server = rustls::pki_types::ServerName::try_from(name.unwrap_or("unnamed.invalid").to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    fn shared(names: &[&str], without_sni: bool) -> SharedListen {
        SharedListen {
            listen: "127.0.0.1:443".parse().unwrap(),
            web: "127.0.0.1:8443".parse().unwrap(),
            imap_names: names.iter().map(|n| n.to_string()).collect(),
            imap_without_sni: without_sni,
            send_proxy: true,
        }
    }

    #[test]
    fn a_client_hello_is_read_whole_or_asked_for_more() {
        let bytes = hello(Some("Mail.Example.org"), &[b"imap"]);
        assert_eq!(
            peek_hello(&bytes),
            Peeked::Hello { server_name: Some("mail.example.org".into()), alpn: vec![b"imap".to_vec()] }
        );
        for cut in [1, 5, 6, bytes.len() / 2, bytes.len() - 1] {
            assert_eq!(peek_hello(&bytes[..cut]), Peeked::NeedMore, "cut at {cut}");
        }
        assert_eq!(peek_hello(b""), Peeked::NeedMore);
        assert_eq!(peek_hello(b"GET / HTTP/1.1\r\n"), Peeked::NotTls);
        assert_eq!(peek_hello(b"a LOGIN x y\r\n"), Peeked::NotTls);
        let mut garbage = bytes.clone();
        garbage[5] = 0x02; // a ServerHello where a ClientHello must be
        assert_eq!(peek_hello(&garbage), Peeked::Malformed);
    }

    #[test]
    fn routes_by_alpn_then_name() {
        let config = shared(&["imap.example.org"], false);
        assert_eq!(route(&config, Some("www.example.org"), &[b"imap".to_vec()]), Route::Imap);
        assert_eq!(route(&config, Some("imap.example.org"), &[]), Route::Imap);
        assert_eq!(route(&config, Some("imap.example.org."), &[b"h2".to_vec()]), Route::Imap);
        assert_eq!(route(&config, Some("www.example.org"), &[b"h2".to_vec(), b"http/1.1".to_vec()]), Route::Web);
        assert_eq!(route(&config, None, &[]), Route::Web);
        assert_eq!(route(&shared(&[], true), None, &[]), Route::Imap);
        assert_eq!(route(&shared(&[], true), None, &[b"http/1.1".to_vec()]), Route::Web);
    }
}
