//! The backend leg: connect, STARTTLS (or implicit TLS), verify, learn capabilities, send `ID` with the
//! client's address, replay the credentials. Fails closed at every step: credentials are sent only over a
//! verified TLS connection (unless plaintext was explicitly allowed) and only after the backend behaved.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::Instrument;

use crate::config::{Backend, BackendMode};
use crate::failure::{Failure, Kind, Side};
use crate::imap::command::IdParams;
use crate::imap::credentials::{Credentials, Secret};
use crate::imap::framing::{Event, Framer, Limits};
use crate::imap::response::{self, Encoded, Response, Status};
use crate::imap::sasl;

/// The connection to a backend, encrypted unless plaintext was allowed.
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for BackendStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How to reach one backend: address, mode, TLS context and timeouts. A login and a health check take the
/// same leg, up to the credentials.
pub struct Leg<'a> {
    pub backend: &'a Backend,
    pub mode: BackendMode,
    pub tls: &'a Arc<ClientConfig>,
    pub connect_timeout: Duration,
    pub login_timeout: Duration,
}

impl<'a> Leg<'a> {
    pub fn new(backend: &'a Backend, config: &crate::config::Config, tls: &'a Arc<ClientConfig>) -> Self {
        Self {
            backend,
            mode: config.backend_tls.mode,
            tls,
            connect_timeout: config.backend_tls.connect_timeout,
            login_timeout: config.backend_tls.login_timeout,
        }
    }
}

/// Everything a backend login needs.
pub struct LoginContext<'a> {
    pub leg: Leg<'a>,
    pub credentials: &'a Credentials,
    /// The proxy's own `x-` ID fields (session id, client address, ...).
    pub id_fields: Vec<(&'static str, String)>,
    /// The client's ID fields; its `x-` fields are dropped.
    pub client_id: &'a IdParams,
}

/// A backend session, logged in.
pub struct Upstream {
    pub stream: BackendStream,
    /// Bytes the backend sent after its login reply: relayed to the client first.
    pub pending: Vec<u8>,
    /// Post-login capabilities.
    pub capabilities: Vec<String>,
}

async fn connect(leg: &Leg<'_>) -> Result<TcpStream, Failure> {
    let backend = leg.backend;
    let target = (backend.host.as_str(), backend.port);
    let tcp = timeout(leg.connect_timeout, TcpStream::connect(target))
        .instrument(tracing::info_span!("backend_connect", backend = %backend.name))
        .await
        .map_err(|_| {
            Failure::backend(Kind::Timeout, format!("connect to {}:{} timed out", backend.host, backend.port))
        })?
        .map_err(|e| Failure::backend(Kind::Connect, format!("connect to {}:{}: {e}", backend.host, backend.port)))?;
    // Latency matters more than packet count for an interactive protocol.
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Connects to the backend and logs in as the client.
pub async fn login(ctx: LoginContext<'_>) -> Result<Upstream, Failure> {
    let tcp = connect(&ctx.leg).await?;
    timeout(ctx.leg.login_timeout, sequence(tcp, &ctx))
        .await
        .map_err(|_| Failure::backend(Kind::Timeout, "backend login timed out"))?
}

/// A health check: the login's path up to the credentials (connect, greeting, STARTTLS and a verified TLS
/// handshake in `starttls` mode, CAPABILITY), then LOGOUT. An expired certificate or a refused STARTTLS
/// fails it as it would fail a login.
pub async fn check(leg: &Leg<'_>) -> Result<(), Failure> {
    let tcp = connect(leg).await?;
    timeout(leg.login_timeout, async {
        let mut conn = secure(tcp, leg).await?;
        conn.send(b"C CAPABILITY\r\nL LOGOUT\r\n").await?;
        conn.capability_reply().await?;
        Ok(())
    })
    .await
    .map_err(|_| Failure::backend(Kind::Timeout, "backend check timed out"))?
}

/// Greeting and transport security as the mode asks.
async fn secure(tcp: TcpStream, leg: &Leg<'_>) -> Result<Conn, Failure> {
    Ok(match leg.mode {
        BackendMode::Tls => {
            let mut conn = Conn::new(BackendStream::Tls(Box::new(handshake(tcp, leg).await?)));
            conn.greeting().await?;
            conn
        }
        BackendMode::Plain => {
            let mut conn = Conn::new(BackendStream::Plain(tcp));
            conn.greeting().await?;
            conn
        }
        BackendMode::Starttls => starttls(tcp, leg).instrument(tracing::info_span!("starttls")).await?,
    })
}

async fn sequence(tcp: TcpStream, ctx: &LoginContext<'_>) -> Result<Upstream, Failure> {
    let mut conn = secure(tcp, &ctx.leg).await?;

    // Capabilities may change after TLS: ask again. ID goes in the same write (one round trip less); a
    // backend without ID answers it with BAD, which only costs the client address in its log.
    let id = response::id_command("I", &ctx.id_fields, ctx.client_id);
    conn.send(&[b"C CAPABILITY\r\n".as_slice(), &id].concat()).await?;
    let capabilities = conn.capability_reply().await?;
    let reply = conn.tagged("I", &mut None).await?;
    if reply.status != Status::Ok {
        tracing::warn!(backend = %ctx.leg.backend.name, reply = %reply.describe(), "backend refused ID; client address not passed on");
    }

    let mut collected = None;
    let reply = conn
        .authenticate(&capabilities, ctx.credentials, &mut collected)
        .instrument(tracing::info_span!("authenticate"))
        .await?;
    match reply.status {
        Status::Ok => {}
        Status::No => {
            let code = response::code_name(reply.code.as_deref());
            let temporary =
                matches!(code.as_deref(), Some("UNAVAILABLE" | "SERVERBUG" | "LIMIT" | "INUSE" | "CONTACTADMIN"));
            return Err(if temporary {
                Failure::backend(Kind::TempFail, format!("login refused: {}", reply.describe()))
            } else {
                Failure { side: Side::Client, kind: Kind::AuthFailed, detail: reply.describe() }
            });
        }
        _ => {
            return Err(Failure::backend(Kind::Protocol, format!("login answered {}", reply.describe())));
        }
    }
    let capabilities = match response::code_capabilities(reply.code.as_deref()).or(collected) {
        Some(c) => c,
        None => conn.capability().await?,
    };
    let pending = conn.framer.take_unprocessed();
    Ok(Upstream { stream: conn.stream, pending, capabilities })
}

/// Greeting, STARTTLS advertised, tagged OK with no byte behind it, then the verified TLS handshake.
async fn starttls(tcp: TcpStream, ctx: &Leg<'_>) -> Result<Conn, Failure> {
    let mut plain = Conn::new(BackendStream::Plain(tcp));
    let mut capabilities = plain.greeting().await?;
    if capabilities.is_none() {
        capabilities = Some(plain.capability().await?);
    }
    if !capabilities.as_deref().is_some_and(|c| response::has_capability(c, "STARTTLS")) {
        return Err(Failure::backend(Kind::Starttls, "backend does not advertise STARTTLS"));
    }
    plain.send(b"S STARTTLS\r\n").await?;
    let reply = plain.tagged("S", &mut None).await.map_err(|f| Failure { kind: Kind::Starttls, ..f })?;
    if reply.status != Status::Ok {
        return Err(Failure::backend(Kind::Starttls, format!("STARTTLS refused: {}", reply.describe())));
    }
    if plain.framer.buffered() > 0 {
        return Err(Failure::backend(
            Kind::Starttls,
            "backend sent data after its STARTTLS OK before the handshake (response injection)",
        ));
    }
    let BackendStream::Plain(tcp) = plain.stream else {
        return Err(Failure::backend(Kind::Protocol, "internal: STARTTLS on a TLS stream"));
    };
    Ok(Conn::new(BackendStream::Tls(Box::new(handshake(tcp, ctx).await?))))
}

async fn handshake(tcp: TcpStream, ctx: &Leg<'_>) -> Result<TlsStream<TcpStream>, Failure> {
    let name = ServerName::try_from(ctx.backend.tls_name.clone())
        .map_err(|e| Failure::backend(Kind::Tls, format!("invalid tls_name: {e}")))?;
    let tls = TlsConnector::from(Arc::clone(ctx.tls))
        .connect(name, tcp)
        .await
        .map_err(|e| Failure::backend(Kind::Tls, format!("TLS handshake with {}: {e}", ctx.backend.name)))?;
    let (_, conn) = tls.get_ref();
    tracing::debug!(
        backend = %ctx.backend.name,
        version = ?conn.protocol_version(),
        kind = ?conn.handshake_kind(),
        "backend tls established"
    );
    Ok(tls)
}

/// A tagged reply, reduced.
struct Reply {
    status: Status,
    code: Option<String>,
    text: String,
}

impl Reply {
    fn describe(&self) -> String {
        let status = match self.status {
            Status::Ok => "OK",
            Status::No => "NO",
            Status::Bad => "BAD",
            Status::PreAuth => "PREAUTH",
            Status::Bye => "BYE",
        };
        let code = self.code.as_deref().map(|c| format!("[{c}] ")).unwrap_or_default();
        response::loggable(format!("{status} {code}{}", self.text).as_bytes())
    }
}

/// A backend connection during login: a stream and a bounded response framer.
struct Conn {
    stream: BackendStream,
    framer: Framer,
}

impl Conn {
    fn new(stream: BackendStream) -> Self {
        Self { stream, framer: Framer::new(Limits::BACKEND_LOGIN) }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        self.stream.write_all(bytes).await.map_err(io_failure)?;
        self.stream.flush().await.map_err(io_failure)
    }

    async fn response(&mut self) -> Result<Response, Failure> {
        // On the heap: an inline array would stay in every session task's allocation for its whole life.
        let mut buf = vec![0u8; 4096];
        loop {
            match self.framer.next_event() {
                Some(Ok(Event::Frame(frame))) => {
                    let parsed = Response::parse(&frame);
                    if parsed == Response::Malformed {
                        return Err(Failure::backend(
                            Kind::Protocol,
                            format!("malformed response: {}", response::loggable(frame.first_line())),
                        ));
                    }
                    return Ok(parsed);
                }
                Some(Ok(Event::LiteralAccepted { .. })) => continue,
                Some(Err(e)) => {
                    return Err(Failure::backend(Kind::Protocol, format!("backend response: {e}")));
                }
                None => {}
            }
            let n = self.stream.read(&mut buf).await.map_err(io_failure)?;
            if n == 0 {
                return Err(Failure::backend(Kind::Protocol, "backend closed the connection"));
            }
            self.framer.push(&buf[..n]);
        }
    }

    /// Reads the greeting; returns the capabilities it carried.
    async fn greeting(&mut self) -> Result<Option<Vec<String>>, Failure> {
        match self.response().await? {
            Response::Status { tag: None, status: Status::Ok, code, .. } => {
                Ok(response::code_capabilities(code.as_deref()))
            }
            Response::Status { tag: None, status: Status::PreAuth, text, .. } => Err(Failure::backend(
                Kind::Protocol,
                format!("backend greeted with PREAUTH: {}", response::loggable(text.as_bytes())),
            )),
            Response::Status { status: Status::Bye, text, .. } => Err(Failure::backend(
                Kind::Protocol,
                format!("backend greeted with BYE: {}", response::loggable(text.as_bytes())),
            )),
            _ => Err(Failure::backend(Kind::Protocol, "backend greeting is not * OK")),
        }
    }

    async fn capability(&mut self) -> Result<Vec<String>, Failure> {
        self.send(b"C CAPABILITY\r\n").await?;
        self.capability_reply().await
    }

    /// Reads the reply to a `C CAPABILITY` already sent.
    async fn capability_reply(&mut self) -> Result<Vec<String>, Failure> {
        let mut caps = None;
        let reply = self.tagged("C", &mut caps).await?;
        match (reply.status, caps.or_else(|| response::code_capabilities(reply.code.as_deref()))) {
            (Status::Ok, Some(caps)) => Ok(caps),
            _ => Err(Failure::backend(Kind::Protocol, format!("CAPABILITY answered {}", reply.describe()))),
        }
    }

    /// Reads until the tagged reply for `tag`, keeping any untagged CAPABILITY seen on the way.
    async fn tagged(&mut self, tag: &str, capabilities: &mut Option<Vec<String>>) -> Result<Reply, Failure> {
        loop {
            match self.response().await? {
                Response::Status { tag: Some(t), status, code, text } if t == tag => {
                    return Ok(Reply { status, code, text });
                }
                Response::Status { tag: None, status: Status::Bye, text, .. } => {
                    return Err(Failure::backend(
                        Kind::Protocol,
                        format!("backend said BYE: {}", response::loggable(text.as_bytes())),
                    ));
                }
                Response::Status { tag: Some(t), .. } => {
                    return Err(Failure::backend(
                        Kind::Protocol,
                        format!("reply for unknown tag {}", response::loggable(t.as_bytes())),
                    ));
                }
                Response::Continuation => {
                    return Err(Failure::backend(Kind::Protocol, format!("unexpected continuation for {tag}")));
                }
                Response::Capability(c) => *capabilities = Some(c),
                Response::Status { tag: None, .. } | Response::Data | Response::Malformed => {}
            }
        }
    }

    /// Waits for a `+` continuation; a tagged reply instead ends the attempt.
    async fn continuation(&mut self, tag: &str) -> Result<Option<Reply>, Failure> {
        loop {
            match self.response().await? {
                Response::Continuation => return Ok(None),
                Response::Status { tag: Some(t), status, code, text } if t == tag => {
                    return Ok(Some(Reply { status, code, text }));
                }
                Response::Status { tag: None, status: Status::Bye, .. } | Response::Status { tag: Some(_), .. } => {
                    return Err(Failure::backend(Kind::Protocol, "unexpected reply while waiting for continuation"));
                }
                _ => {}
            }
        }
    }

    /// Replays the credentials: `AUTHENTICATE PLAIN` when offered (with SASL-IR when offered), else `LOGIN`
    /// with values re-encoded from their decoded form.
    async fn authenticate(
        &mut self,
        capabilities: &[String],
        credentials: &Credentials,
        collected: &mut Option<Vec<String>>,
    ) -> Result<Reply, Failure> {
        if response::has_capability(capabilities, "AUTH=PLAIN") {
            let ir = sasl::encode_plain(&credentials.username, &credentials.password);
            if response::has_capability(capabilities, "SASL-IR") {
                let line = Secret::new([b"L AUTHENTICATE PLAIN ", ir.expose().as_slice(), b"\r\n"].concat());
                self.send(line.expose()).await?;
            } else {
                self.send(b"L AUTHENTICATE PLAIN\r\n").await?;
                if let Some(reply) = self.continuation("L").await? {
                    return Ok(reply);
                }
                let line = Secret::new([ir.expose().as_slice(), b"\r\n"].concat());
                self.send(line.expose()).await?;
            }
            return self.tagged("L", collected).await;
        }
        if response::has_capability(capabilities, "LOGINDISABLED") {
            return Err(Failure::backend(Kind::Protocol, "backend offers neither AUTH=PLAIN nor LOGIN"));
        }
        let non_sync = response::has_capability(capabilities, "LITERAL+");
        // Each piece is sent as it becomes allowed: a synchronising literal waits for its continuation.
        let mut pending = Secret::new(b"L LOGIN ".to_vec());
        let values = [credentials.username.as_str().as_bytes(), credentials.password.expose().as_slice()];
        for (i, value) in values.into_iter().enumerate() {
            if i == 1 {
                pending = Secret::new([pending.expose().as_slice(), b" "].concat());
            }
            match response::encode_string(value, non_sync) {
                Encoded::Quoted(q) => {
                    pending = Secret::new([pending.expose().as_slice(), q.as_slice()].concat());
                    drop(Secret::new(q));
                }
                Encoded::Literal { header, data } => {
                    let data = Secret::new(data);
                    let head = Secret::new([pending.expose().as_slice(), header.as_slice(), b"\r\n"].concat());
                    self.send(head.expose()).await?;
                    if !non_sync {
                        if let Some(reply) = self.continuation("L").await? {
                            return Ok(reply);
                        }
                    }
                    pending = data;
                }
            }
        }
        let last = Secret::new([pending.expose().as_slice(), b"\r\n"].concat());
        self.send(last.expose()).await?;
        self.tagged("L", collected).await
    }
}

fn io_failure(e: io::Error) -> Failure {
    Failure::backend(Kind::Protocol, format!("backend I/O: {e}"))
}
