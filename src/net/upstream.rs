//! The backend leg's sockets: connect, the TLS handshakes (implicit or after STARTTLS, verified), and the
//! I/O of the sans-IO login conversation in `imap::backend_login` (greeting, STARTTLS, CAPABILITY + ID,
//! credentials). Fails closed at every step: credentials are sent only over a verified TLS connection
//! (unless plaintext was explicitly allowed) and only after the backend behaved.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::tls::stream::{self as tls_stream, Client, TlsStream};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::Instrument;

use crate::config::{Backend, BackendMode, SendProxy};
use crate::failure::{Failure, Kind, Side};
use crate::imap::backend_login::{BackendLogin, ErrorKind, Goal, LoggedIn, OAuthReplay, Security, Want};
use crate::imap::command::IdParams;
use crate::imap::credentials::Credentials;
use crate::imap::response;
use crate::net::Shared;
use crate::telemetry::metrics::Metrics;

/// The connection to a backend, encrypted unless plaintext was allowed.
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<Client>>),
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
    /// Written first on the connection (`[backend_tls] send_proxy`).
    pub proxy_header: Option<Vec<u8>>,
    /// Counts the leg's TLS handshakes (full or resumed).
    pub metrics: &'a Metrics,
}

impl<'a> Leg<'a> {
    pub fn new(backend: &'a Backend, shared: &'a Shared) -> Self {
        let (config, tls) = (&shared.config, &shared.backend_tls);
        Self {
            metrics: &shared.metrics,
            backend,
            mode: config.backend_tls.mode,
            tls,
            connect_timeout: config.backend_tls.connect_timeout,
            login_timeout: config.backend_tls.login_timeout,
            proxy_header: (config.backend_tls.send_proxy == SendProxy::V2)
                .then(|| super::proxy_protocol::backend_header(None)),
        }
    }

    /// A leg for a client's login: a PROXY header, when configured, names the client and the address it
    /// connected to.
    pub fn for_client(mut self, client: SocketAddr, local: SocketAddr) -> Self {
        if self.proxy_header.is_some() {
            self.proxy_header = Some(super::proxy_protocol::backend_header(Some((client, local))));
        }
        self
    }
}

/// Everything a backend login needs.
pub struct LoginContext<'a> {
    pub leg: Leg<'a>,
    pub credentials: &'a Credentials,
    /// An OAuth login's message (the password is then the token).
    pub oauth: Option<&'a OAuthReplay>,
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
    let mut tcp = tcp;
    if let Some(header) = &leg.proxy_header {
        timeout(leg.connect_timeout, tcp.write_all(header))
            .await
            .map_err(|_| Failure::backend(Kind::Timeout, "PROXY header to the backend timed out"))?
            .map_err(|e| Failure::backend(Kind::Connect, format!("PROXY header to the backend: {e}")))?;
    }
    Ok(tcp)
}

/// A backend connection made ready for a login (see `net::pool`).
pub struct Ready {
    pub stream: BackendStream,
    pub capabilities: Vec<String>,
}

/// Connects and runs the login's path up to the credentials, leaving the connection open.
pub async fn prepare(leg: &Leg<'_>) -> Result<Ready, Failure> {
    let tcp = connect(leg).await?;
    let (stream, done) = timeout(leg.login_timeout, drive(tcp, leg, Goal::Ready))
        .await
        .map_err(|_| Failure::backend(Kind::Timeout, "backend preparation timed out"))??;
    if !done.pending.is_empty() {
        return Err(Failure::backend(Kind::Protocol, "backend sent data after its capabilities"));
    }
    Ok(Ready { stream, capabilities: done.capabilities })
}

/// Logs in as the client: on `ready` (a pooled connection: one round trip) when given, else on a new
/// connection. A pooled connection the backend closed meanwhile is replaced by a new one.
pub async fn login(ctx: LoginContext<'_>, ready: Option<Ready>) -> Result<Upstream, Failure> {
    let id = response::id_command("I", &ctx.id_fields, ctx.client_id);
    let goal = || Goal::Login { credentials: ctx.credentials.clone(), id: id.clone(), oauth: ctx.oauth.cloned() };
    let security = security(ctx.leg.mode);
    let attempt = async {
        if let Some(ready) = ready {
            let machine = BackendLogin::resume(security, ready.capabilities, goal());
            match run(ready.stream, None, machine).instrument(tracing::info_span!("authenticate", pooled = true)).await
            {
                Ok(done) => return Ok(done),
                Err(failure) if failure.side == Side::Backend => {
                    tracing::debug!(backend = %ctx.leg.backend.name, detail = %failure.detail, "pooled connection unusable; a new one");
                }
                Err(failure) => return Err(failure),
            }
        }
        let tcp = connect(&ctx.leg).await?;
        drive(tcp, &ctx.leg, goal()).instrument(tracing::info_span!("authenticate")).await
    };
    let (stream, done) = timeout(ctx.leg.login_timeout, attempt)
        .await
        .map_err(|_| Failure::backend(Kind::Timeout, "backend login timed out"))??;
    if let Some(reply) = &done.id_refused {
        tracing::warn!(backend = %ctx.leg.backend.name, reply = %reply, "backend refused ID; client address not passed on");
    }
    Ok(Upstream { stream, pending: done.pending, capabilities: done.capabilities })
}

/// A health check: the login's path up to the credentials (connect, greeting, STARTTLS and a verified TLS
/// handshake in `starttls` mode, CAPABILITY), then LOGOUT. An expired certificate or a refused STARTTLS
/// fails it as it would fail a login.
pub async fn check(leg: &Leg<'_>) -> Result<(), Failure> {
    let tcp = connect(leg).await?;
    timeout(leg.login_timeout, drive(tcp, leg, Goal::Check))
        .await
        .map_err(|_| Failure::backend(Kind::Timeout, "backend check timed out"))??;
    Ok(())
}

fn security(mode: BackendMode) -> Security {
    match mode {
        BackendMode::Tls => Security::Implicit,
        BackendMode::Starttls => Security::StartTls,
        BackendMode::Plain => Security::Plain,
    }
}

/// Runs the sans-IO login machine over a new connection: its writes, its reads, its TLS handshake.
async fn drive(tcp: TcpStream, leg: &Leg<'_>, goal: Goal) -> Result<(BackendStream, LoggedIn), Failure> {
    let stream = match leg.mode {
        BackendMode::Tls => BackendStream::Tls(Box::new(handshake(tcp, leg).await?)),
        BackendMode::Starttls | BackendMode::Plain => BackendStream::Plain(tcp),
    };
    run(stream, Some(leg), BackendLogin::new(security(leg.mode), goal)).await
}

/// Runs `machine` over `stream`; `leg` does the STARTTLS handshake when the machine asks for one (a resumed
/// machine on a prepared connection never does, and has none).
async fn run(
    mut stream: BackendStream,
    leg: Option<&Leg<'_>>,
    mut machine: BackendLogin,
) -> Result<(BackendStream, LoggedIn), Failure> {
    // On the heap: an inline array would stay in every session task's allocation for its whole life.
    let mut buf = vec![0u8; 4096];
    loop {
        match machine.next_want() {
            Want::Send(bytes) => {
                stream.write_all(bytes.expose()).await.map_err(io_failure)?;
                stream.flush().await.map_err(io_failure)?;
            }
            Want::Read => {
                let n = stream.read(&mut buf).await.map_err(io_failure)?;
                if n == 0 {
                    return Err(Failure::backend(Kind::Protocol, "backend closed the connection"));
                }
                machine.feed(&buf[..n]);
            }
            Want::StartTls => {
                let (BackendStream::Plain(tcp), Some(leg)) = (stream, leg) else {
                    return Err(Failure::backend(Kind::Protocol, "internal: STARTTLS on a TLS stream"));
                };
                stream = BackendStream::Tls(Box::new(
                    handshake(tcp, leg).instrument(tracing::info_span!("starttls")).await?,
                ));
                machine.tls_established();
            }
            Want::Done(done) => return Ok((stream, done)),
            Want::Failed(e) => {
                return Err(match e.kind {
                    ErrorKind::Protocol => Failure::backend(Kind::Protocol, e.detail),
                    ErrorKind::StartTls => Failure::backend(Kind::Starttls, e.detail),
                    ErrorKind::TempFail => Failure::backend(Kind::TempFail, e.detail),
                    ErrorKind::AuthFailed => {
                        Failure { side: Side::Client, kind: Kind::AuthFailed, detail: e.detail, challenge: e.challenge }
                    }
                });
            }
        }
    }
}

async fn handshake(tcp: TcpStream, ctx: &Leg<'_>) -> Result<TlsStream<Client>, Failure> {
    let name = ServerName::try_from(ctx.backend.tls_name.clone())
        .map_err(|e| Failure::backend(Kind::Tls, format!("invalid tls_name: {e}")))?;
    let tls = tls_stream::connect(Arc::clone(ctx.tls), name, tcp)
        .await
        .map_err(|e| Failure::backend(Kind::Tls, format!("TLS handshake with {}: {e}", ctx.backend.name)))?;
    let conn = tls.negotiated();
    ctx.metrics.tls_handshakes.with_label_values(&["backend", conn.kind_label()]).inc();
    tracing::debug!(
        backend = %ctx.backend.name,
        version = ?conn.version,
        kind = ?conn.kind,
        "backend tls established"
    );
    Ok(tls)
}

fn io_failure(e: io::Error) -> Failure {
    Failure::backend(Kind::Protocol, format!("backend I/O: {e}"))
}
