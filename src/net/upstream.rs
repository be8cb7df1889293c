//! The backend leg's sockets: connect, the TLS handshakes (implicit or after STARTTLS, verified), and the
//! I/O of the sans-IO login conversation in `imap::backend_login` (greeting, STARTTLS, CAPABILITY + ID,
//! credentials), each step under its own deadline and, while a step is short, given up as soon as the
//! backend is found hung by other attempts (`net::outliers`). Fails closed at every step: credentials are
//! sent only over a verified TLS connection (unless plaintext was explicitly allowed) and only after the
//! backend behaved.

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
use tracing::Instrument;

use crate::config::{Backend, BackendMode, SendProxy};
use crate::failure::{Failure, Kind, Side};
use crate::imap::backend_login::{BackendLogin, ErrorKind, Goal, LoggedIn, OAuthReplay, Security, Step, Want};
use crate::imap::command::IdParams;
use crate::imap::credentials::Credentials;
use crate::imap::response;
use crate::net::Shared;
use crate::net::outliers::{Outliers, Waiter};
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

/// The deadline of each step of a backend login (`[backend_tls]`).
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub connect: Duration,
    pub greeting: Duration,
    pub tls: Duration,
    pub capabilities: Duration,
    pub credentials: Duration,
}

impl Deadlines {
    pub fn of(&self, step: Step) -> Duration {
        match step {
            Step::Connect => self.connect,
            Step::Greeting => self.greeting,
            Step::Tls => self.tls,
            Step::Capabilities => self.capabilities,
            Step::Credentials => self.credentials,
        }
    }
}

/// How to reach one backend: address, mode, TLS context and step deadlines. A login and a health check
/// take the same leg, up to the credentials.
pub struct Leg<'a> {
    pub backend: &'a Backend,
    pub mode: BackendMode,
    pub tls: &'a Arc<ClientConfig>,
    pub deadlines: Deadlines,
    /// Written first on the connection (`[backend_tls] send_proxy`).
    pub proxy_header: Option<Vec<u8>>,
    /// Counts the leg's TLS handshakes (full or resumed) and times its steps.
    pub metrics: &'a Metrics,
    /// The attempts waiting at each backend (evidence of a hang, and told to give up when it is found):
    /// `None` for a backend without a circuit (a lookup's ad-hoc server).
    pub outliers: Option<&'a Arc<Outliers>>,
}

impl<'a> Leg<'a> {
    pub fn new(backend: &'a Backend, shared: &'a Shared) -> Self {
        let (config, tls) = (&shared.config, &shared.backend_tls);
        let b = &config.backend_tls;
        Self {
            metrics: &shared.metrics,
            backend,
            mode: b.mode,
            tls,
            deadlines: Deadlines {
                connect: b.connect_timeout,
                greeting: b.greeting_timeout,
                tls: b.tls_timeout,
                capabilities: b.capability_timeout,
                credentials: b.login_timeout,
            },
            proxy_header: (b.send_proxy == SendProxy::V2).then(|| super::proxy_protocol::backend_header(None)),
            outliers: Some(&shared.outliers),
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

    /// A leg to a backend without a circuit: nothing to eject, no evidence to give.
    pub fn untracked(mut self) -> Self {
        self.outliers = None;
        self
    }

    fn enter(&self) -> Option<Waiter> {
        self.outliers.map(|o| o.enter(self.backend))
    }
}

/// The step an attempt is in, its deadline, and its place among the attempts waiting at the backend.
struct Progress<'l> {
    leg: &'l Leg<'l>,
    waiter: Option<Waiter>,
    step: Step,
    began: tokio::time::Instant,
}

impl<'l> Progress<'l> {
    fn start(leg: &'l Leg<'l>, step: Step) -> Self {
        let waiter = leg.enter();
        let progress = Progress { leg, waiter, step, began: tokio::time::Instant::now() };
        progress.report();
        progress
    }

    fn report(&self) {
        if let Some(waiter) = &self.waiter {
            let limit = self.leg.deadlines.of(self.step);
            waiter.step(self.step.is_short().then(|| (self.began.into_std(), limit)));
        }
    }

    /// Moves on to `step` (a new deadline); the one that ended is timed.
    fn enter(&mut self, step: Step) {
        if step == self.step {
            return;
        }
        self.finished();
        self.step = step;
        self.began = tokio::time::Instant::now();
        self.report();
    }

    /// The current step ended in time.
    fn finished(&self) {
        let took = self.began.elapsed().as_secs_f64();
        self.leg
            .metrics
            .backend_step_seconds
            .with_label_values(&[&self.leg.backend.name, self.step.as_str()])
            .observe(took);
    }

    /// Runs `io` under the current step's deadline; while the step is short, gives up as soon as the
    /// backend is ejected (other attempts found it hung).
    async fn bound<T>(&self, io: impl std::future::Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
        let deadline = self.began + self.leg.deadlines.of(self.step);
        let backend = &self.leg.backend;
        let timed_out = || {
            Failure::backend(
                Kind::Timeout(self.step),
                format!(
                    "{} step at {}:{} took over {} ms",
                    self.step.as_str(),
                    backend.host,
                    backend.port,
                    self.leg.deadlines.of(self.step).as_millis()
                ),
            )
        };
        let ejected = async {
            match (&self.waiter, self.step.is_short()) {
                (Some(waiter), true) => waiter.ejected().await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            result = tokio::time::timeout_at(deadline, io) => result.map_err(|_| timed_out())?,
            () = ejected => Err(Failure::backend(
                Kind::Ejected,
                format!("gave up at {}: other attempts found it hung", backend.name),
            )),
        }
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

async fn connect(progress: &Progress<'_>) -> Result<TcpStream, Failure> {
    let backend = progress.leg.backend;
    let target = (backend.host.as_str(), backend.port);
    let tcp = progress
        .bound(async {
            TcpStream::connect(target).await.map_err(|e| {
                Failure::backend(Kind::Connect, format!("connect to {}:{}: {e}", backend.host, backend.port))
            })
        })
        .instrument(tracing::info_span!("backend_connect", backend = %backend.name))
        .await?;
    // Latency matters more than packet count for an interactive protocol.
    let _ = tcp.set_nodelay(true);
    let mut tcp = tcp;
    if let Some(header) = &progress.leg.proxy_header {
        progress
            .bound(async {
                tcp.write_all(header)
                    .await
                    .map_err(|e| Failure::backend(Kind::Connect, format!("PROXY header to the backend: {e}")))
            })
            .await?;
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
    let mut progress = Progress::start(leg, Step::Connect);
    let tcp = connect(&progress).await?;
    let (stream, done) = drive(tcp, &mut progress, Goal::Ready).await?;
    if !done.pending.is_empty() {
        return Err(Failure::backend(Kind::Protocol, "backend sent data after its capabilities"));
    }
    Ok(Ready { stream, capabilities: done.capabilities })
}

/// Logs in as the client: on `ready` (a pooled connection: one round trip) when given, else on a new
/// connection. A pooled connection the backend closed meanwhile is replaced by a new one; one that does
/// not answer within the step's deadline is a hung backend, not retried.
pub async fn login(ctx: LoginContext<'_>, ready: Option<Ready>) -> Result<Upstream, Failure> {
    let id = response::id_command("I", &ctx.id_fields, ctx.client_id);
    let goal = || Goal::Login { credentials: ctx.credentials.clone(), id: id.clone(), oauth: ctx.oauth.cloned() };
    let security = security(ctx.leg.mode);
    let attempt = async {
        if let Some(ready) = ready {
            let machine = BackendLogin::resume(security, ready.capabilities, goal());
            let mut progress = Progress::start(&ctx.leg, machine.step());
            match run(ready.stream, &mut progress, machine, false)
                .instrument(tracing::info_span!("authenticate", pooled = true))
                .await
            {
                Ok(done) => return Ok(done),
                Err(failure)
                    if failure.side == Side::Backend && !matches!(failure.kind, Kind::Timeout(_) | Kind::Ejected) =>
                {
                    tracing::debug!(backend = %ctx.leg.backend.name, detail = %failure.detail, "pooled connection unusable; a new one");
                }
                Err(failure) => return Err(failure),
            }
        }
        let mut progress = Progress::start(&ctx.leg, Step::Connect);
        let tcp = connect(&progress).await?;
        drive(tcp, &mut progress, goal()).instrument(tracing::info_span!("authenticate")).await
    };
    let (stream, done) = attempt.await?;
    if let Some(reply) = &done.id_refused {
        tracing::warn!(backend = %ctx.leg.backend.name, reply = %reply, "backend refused ID; client address not passed on");
    }
    Ok(Upstream { stream, pending: done.pending, capabilities: done.capabilities })
}

/// A health check: the login's path up to the credentials (connect, greeting, STARTTLS and a verified TLS
/// handshake in `starttls` mode, CAPABILITY), then LOGOUT, each step under its deadline. An expired
/// certificate or a refused STARTTLS fails it as it would fail a login.
pub async fn check(leg: &Leg<'_>) -> Result<(), Failure> {
    let mut progress = Progress::start(leg, Step::Connect);
    let tcp = connect(&progress).await?;
    drive(tcp, &mut progress, Goal::Check).await?;
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
async fn drive(tcp: TcpStream, progress: &mut Progress<'_>, goal: Goal) -> Result<(BackendStream, LoggedIn), Failure> {
    let leg = progress.leg;
    let stream = match leg.mode {
        BackendMode::Tls => {
            progress.enter(Step::Tls);
            BackendStream::Tls(Box::new(progress.bound(handshake(tcp, leg)).await?))
        }
        BackendMode::Starttls | BackendMode::Plain => BackendStream::Plain(tcp),
    };
    run(stream, progress, BackendLogin::new(security(leg.mode), goal), true).await
}

/// Runs `machine` over `stream`, each step under its deadline; does the STARTTLS handshake when the
/// machine asks for one (`may_start_tls`: a resumed machine on a prepared connection never does).
async fn run(
    mut stream: BackendStream,
    progress: &mut Progress<'_>,
    mut machine: BackendLogin,
    may_start_tls: bool,
) -> Result<(BackendStream, LoggedIn), Failure> {
    // On the heap: an inline array would stay in every session task's allocation for its whole life.
    let mut buf = vec![0u8; 4096];
    loop {
        let want = machine.next_want();
        if matches!(want, Want::Send(_) | Want::Read | Want::StartTls) {
            progress.enter(machine.step());
        }
        match want {
            Want::Send(bytes) => {
                progress
                    .bound(async {
                        stream.write_all(bytes.expose()).await.map_err(io_failure)?;
                        stream.flush().await.map_err(io_failure)
                    })
                    .await?;
            }
            Want::Read => {
                let n = progress.bound(async { stream.read(&mut buf).await.map_err(io_failure) }).await?;
                if n == 0 {
                    return Err(Failure::backend(Kind::Protocol, "backend closed the connection"));
                }
                machine.feed(&buf[..n]);
            }
            Want::StartTls => {
                let (BackendStream::Plain(tcp), true) = (stream, may_start_tls) else {
                    return Err(Failure::backend(Kind::Protocol, "internal: STARTTLS on a TLS stream"));
                };
                let leg = progress.leg;
                stream = BackendStream::Tls(Box::new(
                    progress.bound(handshake(tcp, leg)).instrument(tracing::info_span!("starttls")).await?,
                ));
                machine.tls_established();
            }
            Want::Done(done) => {
                progress.finished();
                return Ok((stream, done));
            }
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
