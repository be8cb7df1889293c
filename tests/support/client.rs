//! A small IMAP client over TLS for tests: sends raw commands, reads responses with their literals.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const TIMEOUT: Duration = Duration::from_secs(20);

/// A client TLS configuration trusting `ca`, offering the given ALPN protocols.
pub fn tls_config(ca: &Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    imapgate::net::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// What came back for one command.
#[derive(Debug, Default)]
pub struct Reply {
    /// Every line, literals replaced by `{n}` markers as sent.
    pub lines: Vec<String>,
    /// The literals in order.
    pub literals: Vec<Vec<u8>>,
    /// The tagged status line.
    pub tagged: String,
}

pub struct ImapClient<S> {
    stream: S,
    buf: Vec<u8>,
    start: usize,
}

pub type TlsClient = ImapClient<tokio_rustls::client::TlsStream<TcpStream>>;

impl TlsClient {
    /// Connects with TLS, trusting `ca`, offering ALPN `imap`; reads nothing.
    pub async fn connect(addr: SocketAddr, ca: &Path) -> std::io::Result<TlsClient> {
        Self::connect_with(addr, tls_config(ca, &[b"imap"])).await
    }

    pub async fn connect_with(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> std::io::Result<TlsClient> {
        Self::connect_from(None, addr, config).await
    }

    /// Connects from a chosen loopback source address (e.g. 127.0.0.7), to act as another client.
    pub async fn connect_from(
        source: Option<std::net::IpAddr>,
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<TlsClient> {
        Self::connect_with_preamble(source, addr, config, b"").await
    }

    /// Connects from `source`, writes `preamble` (a PROXY protocol header, say), then starts TLS.
    pub async fn connect_with_preamble(
        source: Option<std::net::IpAddr>,
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        preamble: &[u8],
    ) -> std::io::Result<TlsClient> {
        use tokio::io::AsyncWriteExt;
        let mut tcp = tcp_from(source, addr).await?;
        if !preamble.is_empty() {
            tcp.write_all(preamble).await?;
        }
        let stream = TlsConnector::from(config).connect(ServerName::try_from("localhost").unwrap(), tcp).await?;
        Ok(ImapClient::new(stream))
    }

    /// Connects and reads the greeting.
    pub async fn greeted(addr: SocketAddr, ca: &Path) -> (TlsClient, String) {
        let mut client = Self::connect(addr, ca).await.expect("connect");
        let greeting = client.line().await.expect("greeting");
        (client, greeting)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ImapClient<S> {
    pub fn new(stream: S) -> Self {
        Self { stream, buf: Vec::with_capacity(64 * 1024), start: 0 }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(64 * 1024);
        tokio::time::timeout(TIMEOUT, self.stream.read_buf(&mut self.buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timed out"))?
    }

    /// One line without CRLF; an error at end of stream.
    pub async fn line(&mut self) -> std::io::Result<String> {
        loop {
            if let Some(lf) = self.buf[self.start..].iter().position(|&b| b == b'\n') {
                let raw = &self.buf[self.start..self.start + lf];
                let line = String::from_utf8_lossy(raw.strip_suffix(b"\r").unwrap_or(raw)).into_owned();
                self.start += lf + 1;
                return Ok(line);
            }
            if self.fill().await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn exact(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() - self.start < n {
            if self.fill().await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        let out = self.buf[self.start..self.start + n].to_vec();
        self.start += n;
        Ok(out)
    }

    /// Reads responses until the one tagged `tag`.
    pub async fn until_tagged(&mut self, tag: &str) -> std::io::Result<Reply> {
        let mut reply = Reply::default();
        let prefix = format!("{tag} ");
        loop {
            let mut line = self.line().await?;
            // Follow literals: the line continues after the literal's bytes.
            while let Some(n) = literal_length(&line) {
                let data = self.exact(n).await?;
                reply.literals.push(data);
                let rest = self.line().await?;
                line.push('\u{1}');
                line.push_str(&rest);
            }
            let done = line.starts_with(&prefix);
            if done {
                reply.tagged = line.clone();
            }
            reply.lines.push(line);
            if done {
                return Ok(reply);
            }
        }
    }

    /// Sends `tag command` and reads until its tagged reply.
    pub async fn command(&mut self, tag: &str, command: &str) -> std::io::Result<Reply> {
        self.send(format!("{tag} {command}\r\n").as_bytes()).await?;
        self.until_tagged(tag).await
    }

    /// Reads until end of stream; what was received.
    pub async fn rest(&mut self) -> String {
        String::from_utf8_lossy(&self.rest_bytes().await).into_owned()
    }

    /// Reads until end of stream (or a read times out); the bytes not consumed yet.
    pub async fn rest_bytes(&mut self) -> Vec<u8> {
        loop {
            match self.fill().await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        self.buf[self.start..].to_vec()
    }

    pub fn into_inner(self) -> S {
        self.stream
    }
}

/// `n` when `line` ends with `{n}` or `~{n}`.
pub fn literal_length(line: &str) -> Option<usize> {
    let body = line.strip_suffix('}')?;
    let open = body.rfind('{')?;
    body[open + 1..].trim_end_matches('+').parse().ok()
}

impl TlsClient {
    /// The client's own port (what the backend should see as x-originating-port).
    pub fn local_port(&self) -> u16 {
        self.stream.get_ref().0.local_addr().unwrap().port()
    }
}

/// A TCP connection from a chosen loopback source address (e.g. 127.0.0.7), to act as another client.
pub async fn tcp_from(source: Option<std::net::IpAddr>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = match source {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = if ip.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
    };
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// A PROXY v2 header naming `source` as the client of `destination`, as a load balancer sends it.
pub fn proxy_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (source, destination)).build().unwrap()
}
