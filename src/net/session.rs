//! One client connection's whole life, top to bottom: TLS handshake, the pre-auth conversation, the backend
//! login, then the relay. Runs inside one tracing span carrying the session id and peer, in one task up to
//! the login and in a second, smaller one from there ([`Relaying`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;
use tracing::{Instrument, field};

use crate::failure::{Failure, Kind, Side};
use crate::imap::backend_login::OAuthReplay;
use crate::imap::command::{self, Tag};
use crate::imap::inspect::Observer;
use crate::imap::preauth::{Action, CloseReason, LoginRequest, PreAuth, Rejection};
use crate::imap::response;
use crate::lifecycle::Phase;
use crate::net::Shared;
use crate::net::proxy_protocol::Endpoints;
use crate::net::relay::{self, RelayEnd};
use crate::net::report;
use crate::net::tls::stream::{self as tls_stream, TlsStream};
use crate::net::upstream::{self, BackendStream, LoginContext, Upstream};
use crate::security::{ConnectionGuard, Refusal, prefix};
use crate::telemetry::audit::{AuditEvent, SessionFacts};

/// A fresh random session id (16 URL-safe characters), sent to the backend as `x-session-id`.
pub fn new_session_id() -> String {
    let bytes: [u8; 12] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// How a listener's clients start TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// TLS from the first byte (993).
    ImplicitTls,
    /// Plain IMAP until the client's `STARTTLS` (143).
    StartTls,
}

/// Runs one connection up to its login, or to its end if it never logs in (then logged here). Errors are
/// logged, never returned. A session that logged in comes back as a [`Relaying`]: the caller runs it in a
/// task of its own, so that none of this future's state (the handshake's, the pre-auth conversation's)
/// stays allocated for the relay's life. Not an `async fn`: the future is the instrumented block itself,
/// without a second state machine around it holding the arguments again.
pub fn run(
    shared: Arc<Shared>,
    tcp: TcpStream,
    mode: Mode,
    endpoints: Endpoints,
    mut admitted: ConnectionGuard,
    phase: watch::Receiver<Phase>,
) -> impl std::future::Future<Output = Option<Box<Relaying>>> + Send {
    let id = new_session_id();
    let peer = endpoints.client;
    let span = tracing::info_span!("session", session_id = %id, peer = %peer, user = field::Empty);
    async move {
        let started = Instant::now();
        match serve(&shared, tcp, mode, endpoints, &mut admitted, &id, phase).await {
            Served::Ended(end) => {
                log_end(&shared, &end, started);
                None
            }
            Served::LoggedIn(login) => {
                Some(Box::new(Relaying { shared, _admitted: admitted, span: tracing::Span::current(), started, login }))
            }
        }
    }
    .instrument(span)
}

/// A session that has logged in, with everything its relay and its close need.
pub struct Relaying {
    shared: Arc<Shared>,
    /// The client's place under the connection caps, held until the session ends.
    _admitted: ConnectionGuard,
    span: tracing::Span,
    /// When the connection was accepted.
    started: Instant,
    login: Login,
}

impl Relaying {
    /// Relays until the session ends, closes it, and logs and audits its end, inside the session's span.
    /// The session's data stay in this box; the future holds references into it, so nothing is kept twice.
    pub fn run(mut self: Box<Self>) -> impl std::future::Future<Output = ()> + Send {
        let span = self.span.clone();
        async move {
            // Moved out of the box (its 32 bytes stay there unused): closed before the farewell.
            let backend = self.login.backend;
            let registration = self.shared.sessions.register(registry_info(&self.login.facts, &self.login.logged_in));
            let session = registration.as_ref().map(|r| r.session().as_ref());
            let end = relay_session(
                &self.shared,
                &self.login.facts,
                &mut self.login.client,
                backend,
                &mut self.login.logged_in,
                session,
                &mut self.login.phase,
            )
            .await;
            drop(registration);
            let logged_in = &mut self.login.logged_in;
            let (user, backend) = (std::mem::take(&mut logged_in.user), std::mem::take(&mut logged_in.backend));
            audit_end(&self.shared, &self.login.facts, Some(user), Some(backend), &end, self.login.started);
            log_end(&self.shared, &end, self.started);
        }
        .instrument(span)
    }
}

/// What `serve` comes to.
#[allow(clippy::large_enum_variant, reason = "returned once per session, then moved into the relay's box")]
enum Served {
    /// The session ended before a login (its end audited).
    Ended(End),
    /// A login succeeded: the relay comes next.
    LoggedIn(Login),
}

/// A successful login with the connection it happened on.
struct Login {
    facts: SessionFacts,
    client: Box<TlsStream<tls_stream::Server>>,
    backend: BackendStream,
    logged_in: LoggedIn,
    phase: watch::Receiver<Phase>,
    /// When the TLS session started (the audit's duration).
    started: Instant,
}

/// The closing log line and the session-end metric.
fn log_end(shared: &Shared, end: &End, started: Instant) {
    let (stage, reason) = end.label();
    shared.metrics.session_ends.with_label_values(&[stage, reason]).inc();
    tracing::info!(duration_ms = started.elapsed().as_millis() as u64, stage, reason, end = %end, "session end");
}

/// The audit log's `session_end`.
fn audit_end(
    shared: &Shared,
    facts: &SessionFacts,
    user: Option<String>,
    backend: Option<String>,
    end: &End,
    started: Instant,
) {
    let (bytes_from_client, bytes_to_client, commands) = match end {
        End::Relayed { up, down, commands, .. } => (Some(*up), Some(*down), Some(*commands)),
        _ => (None, None, None),
    };
    shared.audit(&AuditEvent {
        user,
        backend,
        result: Some(end.label().1),
        reason: Some(end.to_string()),
        duration_ms: Some(started.elapsed().as_millis() as u64),
        bytes_from_client,
        bytes_to_client,
        commands,
        ..facts.event("session_end")
    });
}

/// Writes to a client that is being left (BYE, TLS close) wait at most this long.
const FAREWELL: Duration = Duration::from_secs(2);

/// How a session ended, for the closing log line, the audit log and the metric.
enum End {
    HandshakeFailed(String),
    ClientClosed,
    ClientError(std::io::Error),
    PreAuthClosed(CloseReason),
    Shutdown,
    Relayed { up: u64, down: u64, commands: u64, end: RelayEnd },
}

impl End {
    /// Stage and reason, from `metrics::SESSION_ENDS`.
    fn label(&self) -> (&'static str, &'static str) {
        match self {
            End::HandshakeFailed(_) => ("tls", "handshake_failed"),
            End::ClientClosed => ("preauth", "client_closed"),
            End::ClientError(e) if e.kind() == std::io::ErrorKind::TimedOut => ("preauth", "write_timeout"),
            End::ClientError(_) => ("preauth", "client_error"),
            End::PreAuthClosed(reason) => (
                "preauth",
                match reason {
                    CloseReason::Logout => "logout",
                    CloseReason::TooManyBadCommands => "bad_commands",
                    CloseReason::Framing => "framing",
                    CloseReason::IdleTimeout => "idle_timeout",
                    CloseReason::TimeLimit => "time_limit",
                },
            ),
            End::Shutdown => ("preauth", "shutdown"),
            End::Relayed { end, .. } => ("relay", end.label()),
        }
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::HandshakeFailed(e) => write!(f, "tls handshake failed: {e}"),
            End::ClientClosed => f.write_str("client closed before login"),
            End::ClientError(e) => write!(f, "client I/O error before login: {e}"),
            End::PreAuthClosed(reason) => write!(f, "closed before login: {reason:?}"),
            End::Shutdown => f.write_str("proxy shutting down"),
            End::Relayed { up, down, commands, end } => {
                write!(
                    f,
                    "relay ended ({end:?}); {commands} commands, client->backend {up} bytes, backend->client {down} bytes"
                )
            }
        }
    }
}

async fn serve(
    shared: &Shared,
    mut tcp: TcpStream,
    mode: Mode,
    endpoints: Endpoints,
    admitted: &mut ConnectionGuard,
    id: &str,
    mut phase: watch::Receiver<Phase>,
) -> Served {
    let _ = tcp.set_nodelay(true);
    // However active the client is, the phase before login has an end: in clear and over TLS together.
    let time_limit = tokio::time::Instant::now() + shared.config.server.preauth_total_timeout;
    if mode == Mode::StartTls {
        if let Err(end) = Box::pin(before_tls(shared, &mut tcp, time_limit, &mut phase))
            .instrument(tracing::info_span!("before_tls"))
            .await
        {
            return Served::Ended(end);
        }
    }
    // Futures and streams that are large are boxed: a task's allocation is the size of its largest state,
    // and what only the handshake or the login needs should not weigh on every waiting connection.
    let metrics = &shared.metrics;
    let started = Instant::now();
    // Matched without a named local: a named one would keep its storage (the whole stream before it is
    // boxed) in the session's state for the session's life.
    let mut client = match Box::pin(timeout(shared.config.server.handshake_timeout, shared.acceptor.accept(tcp)))
        .instrument(tracing::info_span!("tls_handshake"))
        .await
    {
        Err(_) => {
            metrics.tls_failures.with_label_values(&["timeout"]).inc();
            return Served::Ended(End::HandshakeFailed("timed out".into()));
        }
        Ok(Err(e)) => {
            metrics.tls_failures.with_label_values(&[tls_failure_reason(&e)]).inc();
            return Served::Ended(End::HandshakeFailed(e.to_string()));
        }
        Ok(Ok(stream)) => Box::new(stream),
    };
    metrics.tls_handshake_seconds.observe(started.elapsed().as_secs_f64());
    let mut facts = {
        let conn = client.negotiated();
        let version = match conn.version {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "other",
        };
        let sni = if client.server_name().is_some() { "yes" } else { "no" };
        metrics.tls_sessions.with_label_values(&[version, sni]).inc();
        metrics.tls_handshakes.with_label_values(&["client", conn.kind_label()]).inc();
        let cipher = conn.suite.map(|c| format!("{:?}", c.suite()));
        tracing::debug!(
            version,
            cipher = cipher.as_deref().unwrap_or("-"),
            sni = client.server_name().unwrap_or("-"),
            "tls established"
        );
        SessionFacts {
            session: id.to_owned(),
            client: Some(endpoints.client),
            peer: endpoints.via,
            listener: Some(endpoints.local),
            sni: client.server_name().map(str::to_owned),
            tls_version: Some(version.to_owned()),
            tls_cipher: cipher,
        }
    };
    shared.audit(&facts.event("session_start"));
    let started = Instant::now();
    // The match ends before the relay starts: its scrutinee is not kept in the session's state.
    match Box::pin(pre_auth(
        shared,
        &mut client,
        &mut facts,
        admitted,
        (mode, time_limit),
        &tracing::Span::current(),
        &mut phase,
    ))
    .instrument(tracing::info_span!("pre_auth"))
    .await
    {
        Ok((logged_in, backend)) => Served::LoggedIn(Login { facts, client, backend, logged_in, phase, started }),
        Err(end) => {
            audit_end(shared, &facts, None, None, &end, started);
            Served::Ended(end)
        }
    }
}

/// The plaintext conversation of a STARTTLS listener, until the client's `STARTTLS` has been answered
/// (Ok: the TLS handshake comes next) or the connection ends. Whatever the client sent after `STARTTLS`
/// is dropped with the machine: only what arrives after the `OK` reaches the TLS handshake.
async fn before_tls(
    shared: &Shared,
    tcp: &mut TcpStream,
    time_limit: tokio::time::Instant,
    phase: &mut watch::Receiver<Phase>,
) -> Result<(), End> {
    use crate::imap::starttls::{Action, BeforeTls};
    let write_limit = shared.config.server.write_timeout;
    let mut machine = BeforeTls::new();
    send(tcp, &machine.greeting(), write_limit).await.map_err(End::ClientError)?;
    let mut buf = vec![0u8; 4096];
    loop {
        while let Some(action) = machine.next_action() {
            match action {
                Action::Send(bytes) => send(tcp, &bytes, write_limit).await.map_err(End::ClientError)?,
                Action::StartTls => return Ok(()),
                Action::Close(reason) => {
                    let _ = timeout(FAREWELL, tcp.shutdown()).await;
                    return Err(End::PreAuthClosed(reason));
                }
            }
        }
        tokio::select! {
            read = timeout(shared.config.server.preauth_idle_timeout, tcp.read(&mut buf)) => match read {
                Err(_) => machine.idle_timeout(),
                Ok(Ok(0)) => return Err(End::ClientClosed),
                Ok(Ok(n)) => machine.feed(&buf[..n]),
                Ok(Err(e)) => return Err(End::ClientError(e)),
            },
            () = tokio::time::sleep_until(time_limit) => machine.time_limit(),
            () = crate::lifecycle::stopping(phase) => return Err(farewell(tcp).await),
        }
    }
}

/// A successful login: what the relay starts from.
struct LoggedIn {
    /// The client's tag for the login command; the credentials are dropped (and wiped) once used.
    tag: Tag,
    /// Bytes the backend sent after its login reply: relayed to the client first.
    pending: Vec<u8>,
    /// The backend's post-login capabilities.
    capabilities: Vec<String>,
    /// Bytes the client sent behind its login command.
    pipelined: Vec<u8>,
    /// The backend's name, for metrics and the audit log.
    backend: String,
    /// The user, for the audit log.
    user: String,
    /// The client's `ID` name and version, for the session registry.
    client_id: (Option<String>, Option<String>),
}

/// What the registry lists about a session that just logged in.
fn registry_info(facts: &SessionFacts, logged_in: &LoggedIn) -> crate::registry::SessionInfo {
    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
    crate::registry::SessionInfo {
        id: facts.session.clone(),
        user: logged_in.user.clone(),
        client: facts.client.unwrap_or(unspecified),
        listener: facts.listener.unwrap_or(unspecified),
        sni: facts.sni.clone(),
        tls_version: facts.tls_version.clone(),
        backend: logged_in.backend.clone(),
        started: std::time::SystemTime::now(),
        client_name: logged_in.client_id.0.clone(),
        client_version: logged_in.client_id.1.clone(),
    }
}

/// The `name` and `version` of a client's `ID`, each cut to 64 characters.
fn client_name_version(id: &command::IdParams) -> (Option<String>, Option<String>) {
    let field = |key: &str| {
        id.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .and_then(|(_, v)| v.as_deref())
            .map(|v| v.chars().filter(|c| !c.is_control()).take(64).collect::<String>())
    };
    (field("name"), field("version"))
}

/// The pre-auth conversation until a login succeeds or the connection ends. Its buffers live on the heap
/// and are gone once it returns, so a relayed session does not carry them.
async fn pre_auth(
    shared: &Shared,
    client: &mut TlsStream<tls_stream::Server>,
    facts: &mut SessionFacts,
    admitted: &mut ConnectionGuard,
    (mode, time_limit): (Mode, tokio::time::Instant),
    session_span: &tracing::Span,
    phase: &mut watch::Receiver<Phase>,
) -> Result<(LoggedIn, BackendStream), End> {
    let (Some(mut peer), Some(local)) = (facts.client, facts.listener) else {
        return Err(End::ClientClosed);
    };
    let id = facts.session.clone();
    let id = id.as_str();
    let forwarding_trusted = prefix::contains(&shared.config.server.id_forwarded_from, peer.ip());
    let mut machine = PreAuth::offering(offer(&shared.config.auth));
    // Logins tried on this connection (the lookup's Auth-Login-Attempt).
    let mut attempts = 0u32;
    let write_limit = shared.config.server.write_timeout;
    // After STARTTLS the conversation goes on without a second greeting (RFC 9051 6.2.1).
    if mode == Mode::ImplicitTls {
        send(client, &machine.greeting(), write_limit).await.map_err(End::ClientError)?;
    }
    let mut buf = vec![0u8; 4096];
    loop {
        while let Some(action) = machine.next_action() {
            match action {
                Action::Send(bytes) => send(client, &bytes, write_limit).await.map_err(End::ClientError)?,
                Action::Close(reason) => {
                    let _ = timeout(FAREWELL, client.shutdown()).await;
                    return Err(End::PreAuthClosed(reason));
                }
                Action::Login(request) => {
                    attempts = attempts.saturating_add(1);
                    if forwarding_trusted {
                        // A webmail server's user: its address replaces the server's, before any decision.
                        if let Some(forwarded) = command::forwarded_client(machine.client_id(), peer.port()) {
                            if forwarded != peer {
                                tracing::info!(event = "client_forwarded", client = %forwarded, via = %peer, "client address forwarded by ID");
                                shared.audit(&AuditEvent {
                                    client_ip: Some(forwarded.ip().to_string()),
                                    client_port: Some(forwarded.port()),
                                    peer_ip: Some(peer.ip().to_string()),
                                    ..facts.event("client_forwarded")
                                });
                                facts.peer = Some(peer);
                                facts.client = Some(forwarded);
                                peer = forwarded;
                            }
                        }
                    }
                    let user = &request.credentials.username;
                    let attempt = tracing::info_span!("login", user = %user, mechanism = request.mechanism.as_str());
                    let begun = shared.defence.begin_login(peer.ip(), user, &request.credentials.password);
                    // Waiting for a login place or out an account delay ends on shutdown.
                    let begun = tokio::select! {
                        begun = begun.instrument(attempt.clone()) => begun,
                        () = crate::lifecycle::stopping(phase) => return Err(farewell(client).await),
                    };
                    let permit = match begun {
                        Ok(permit) => permit,
                        Err(refusal) => {
                            // Logged by the defence; no backend is contacted. The answer waits out the
                            // tarpit, so a refused attacker cannot spin; a repeated wrong pair is answered
                            // like the wrong pair it is.
                            record_attempt(shared, facts, &request, Attempt::Refused(refusal));
                            if refusal == Refusal::Repeated {
                                let (name, version) = client_name_version(machine.client_id());
                                let app = report::client_app(name.as_deref(), version.as_deref());
                                report::stale_password(shared, facts, user.as_str(), peer.ip(), app.as_deref());
                            }
                            wait_tarpit(shared, shared.defence.refusal_delay(peer.ip(), refusal), phase).await;
                            match (refusal, request.mechanism.oauth()) {
                                (Refusal::Repeated, Some(oauth)) => {
                                    machine.oauth_failed(&request.tag, oauth.error_challenge())
                                }
                                (Refusal::Repeated, None) => {
                                    machine.login_failed(&request.tag, Rejection::AUTHENTICATION_FAILED)
                                }
                                _ => machine.login_failed(&request.tag, Rejection::UNAVAILABLE),
                            }
                            continue;
                        }
                    };
                    let logged_in = tokio::select! {
                        result = login(shared, &request, &machine, peer, local, id, attempts).instrument(attempt.clone()) => result,
                        () = crate::lifecycle::stopping(phase) => return Err(farewell(client).await),
                    };
                    match logged_in {
                        Ok((upstream, backend)) => {
                            // The session's user, recorded once: only a successful login names it.
                            session_span.record("user", user.as_str());
                            shared.defence.login_succeeded(permit);
                            admitted.logged_in();
                            record_attempt(shared, facts, &request, Attempt::Success(&backend));
                            let client_id = client_name_version(machine.client_id());
                            report::logged_in(shared, client_id.0.as_deref());
                            let pipelined = machine.into_pipelined();
                            let user = user.to_string();
                            let Upstream { stream, pending, capabilities } = upstream;
                            let logged_in = LoggedIn {
                                tag: request.tag,
                                pending,
                                capabilities,
                                pipelined,
                                backend,
                                user,
                                client_id,
                            };
                            return Ok((logged_in, stream));
                        }
                        Err(failure) => {
                            // Wrong credentials cost a tarpit delay; backend trouble does not count.
                            let tarpit = if failure.is_auth_failure() {
                                let counted = shared.defence.login_failed(permit, user, &request.credentials.password);
                                Some(counted.instrument(attempt.clone()).await)
                            } else {
                                None
                            };
                            attempt.in_scope(|| log_failure(&request, &failure, tarpit));
                            record_attempt(shared, facts, &request, Attempt::Failed(&failure));
                            if let Some(delay) = tarpit {
                                wait_tarpit(shared, delay, phase).await;
                            }
                            match &failure.challenge {
                                Some(challenge) => machine.oauth_failed(&request.tag, challenge),
                                None => machine.login_failed(&request.tag, failure.rejection()),
                            }
                        }
                    }
                }
            }
        }
        tokio::select! {
            read = timeout(shared.config.server.preauth_idle_timeout, client.read(&mut buf)) => match read {
                Err(_) => machine.idle_timeout(),
                Ok(Ok(0)) => return Err(End::ClientClosed),
                Ok(Ok(n)) => machine.feed(&buf[..n]),
                Ok(Err(e)) => return Err(End::ClientError(e)),
            },
            () = tokio::time::sleep_until(time_limit) => machine.time_limit(),
            () = crate::lifecycle::stopping(phase) => return Err(farewell(client).await),
        }
    }
}

/// The pre-auth machine's mechanisms, from `[auth]`.
fn offer(auth: &crate::config::AuthConfig) -> crate::imap::preauth::Offer {
    use crate::config::AuthMechanism as M;
    crate::imap::preauth::Offer {
        plain: auth.offers(M::Plain),
        login: auth.offers(M::Login),
        xoauth2: auth.offers(M::XOAuth2),
        oauthbearer: auth.offers(M::OAuthBearer),
    }
}

/// Before login, on shutdown: BYE and close, each with a short deadline.
async fn farewell<S: tokio::io::AsyncWrite + Unpin>(client: &mut S) -> End {
    let _ = send(client, b"* BYE Server shutting down.\r\n", FAREWELL).await;
    let _ = timeout(FAREWELL, client.shutdown()).await;
    End::Shutdown
}

/// Writes and flushes within `limit`; a peer that does not read in time gets `TimedOut`.
async fn send<S: tokio::io::AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8], limit: Duration) -> std::io::Result<()> {
    let written = timeout(limit, async {
        stream.write_all(bytes).await?;
        stream.flush().await
    });
    written.await.unwrap_or_else(|_| {
        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out: the peer does not read"))
    })
}

/// Where a login goes: backends to try in order, and the name to log in with.
struct Plan {
    /// Each with whether its circuit is kept (configured backends; not servers a lookup named by address).
    backends: Vec<(crate::config::Backend, bool)>,
    pool: Option<String>,
    login_as: Option<crate::imap::credentials::Username>,
}

/// The static rules' plan for `user`.
fn rules_plan(shared: &Shared, user: &crate::imap::credentials::Username) -> Result<Plan, Failure> {
    let route = shared.router.route(user).ok_or_else(|| Failure {
        side: Side::Proxy,
        kind: Kind::NoRoute,
        detail: "no route and no default backend".into(),
        challenge: None,
    })?;
    let backends =
        route.candidates.iter().filter_map(|&i| shared.router.backend(i)).map(|b| (b.clone(), true)).collect();
    Ok(Plan { backends, pool: route.pool, login_as: None })
}

/// The lookup service's plan (nginx `auth_http`), or the rules' when there is no lookup or it failed
/// with `on_error = "static"`.
async fn plan(shared: &Shared, request: &LoginRequest, peer: SocketAddr, attempt: u32) -> Result<Plan, Failure> {
    use crate::route::lookup::{Answer, Question};
    let user = &request.credentials.username;
    let Some(lookup) = &shared.lookup else { return rules_plan(shared, user) };
    use crate::imap::preauth::Mechanism;
    let question = Question {
        // nginx's Auth-Method names; OAuth (which nginx does not proxy) as the lower-case mechanism, with
        // the token as the password.
        method: match request.mechanism {
            Mechanism::SaslLogin => "login",
            Mechanism::Login | Mechanism::Plain => "plain",
            Mechanism::XOAuth2 => "xoauth2",
            Mechanism::OAuthBearer => "oauthbearer",
        },
        user: user.as_str(),
        password: lookup.config.send_password.then(|| request.credentials.password.expose().as_slice()),
        attempt,
        client: peer.ip(),
    };
    let lookup_failure = |detail: String| Failure { side: Side::Proxy, kind: Kind::Lookup, detail, challenge: None };
    match lookup.find(&question, &shared.metrics).await {
        Ok(Answer::Server { ip, port, user: login_as }) => {
            let configured = shared.config.backends.iter().find(|b| {
                b.port == port
                    && b.host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() == Ok(ip)
            });
            let backend = match configured {
                Some(b) => (b.clone(), true),
                None if crate::security::prefix::contains(&lookup.config.allowed_servers, ip) => {
                    let host = ip.to_string();
                    (crate::config::Backend { name: "lookup".into(), host: host.clone(), port, tls_name: host }, false)
                }
                None => {
                    return Err(lookup_failure(format!(
                        "lookup named {ip}:{port}, neither a configured backend nor in route.lookup.allowed_servers"
                    )));
                }
            };
            let login_as = match login_as {
                Some(name) => Some(
                    crate::imap::credentials::Username::parse(name.as_bytes())
                        .map_err(|e| lookup_failure(format!("lookup answered an invalid Auth-User: {e}")))?,
                ),
                None => None,
            };
            Ok(Plan { backends: vec![backend], pool: None, login_as })
        }
        Ok(Answer::Refused { status, wait }) => {
            if let Some(wait) = wait {
                tokio::time::sleep(wait).await;
            }
            Err(Failure {
                side: Side::Client,
                kind: Kind::AuthFailed,
                detail: format!("lookup refused: {status}"),
                challenge: None,
            })
        }
        Err(error) => match lookup.config.on_error {
            crate::config::OnError::Static => {
                tracing::warn!(user = %user, error = %error, "user lookup failed; routing by the static rules");
                rules_plan(shared, user)
            }
            crate::config::OnError::Fail => Err(lookup_failure(error.to_string())),
        },
    }
}

/// Logs in at the user's backend: the plan's candidates in order (one, unless its pool fails over),
/// skipping those whose circuit is open; a backend that proves unusable counts against its circuit.
#[allow(clippy::too_many_arguments)]
async fn login(
    shared: &Shared,
    request: &LoginRequest,
    machine: &PreAuth,
    peer: SocketAddr,
    local: SocketAddr,
    id: &str,
    attempts: u32,
) -> Result<(Upstream, String), Failure> {
    let user = &request.credentials.username;
    let plan = plan(shared, request, peer, attempts).await?;
    let renamed;
    let credentials = match &plan.login_as {
        Some(name) => {
            renamed = crate::imap::credentials::Credentials {
                username: name.clone(),
                password: request.credentials.password.clone(),
            };
            &renamed
        }
        None => &request.credentials,
    };
    // An OAuth message names the user: a renamed login gets a message for the new name.
    let oauth = match (request.mechanism.oauth(), &request.oauth_message) {
        (Some(mechanism), Some(message)) => Some(OAuthReplay {
            mechanism,
            message: match &plan.login_as {
                Some(name) => crate::imap::oauth::build(mechanism, name, &request.credentials.password),
                None => message.clone(),
            },
        }),
        _ => None,
    };
    let mut last = None;
    for (attempt, (backend, tracked)) in plan.backends.iter().enumerate() {
        let name = backend.name.as_str();
        if *tracked {
            let (allowed, transition) = shared.circuits.allow(backend, std::time::Instant::now());
            crate::net::health::record(shared, transition);
            if !allowed {
                shared.metrics.backend_errors.with_label_values(&[name, Kind::CircuitOpen.as_str()]).inc();
                last = Some(Failure::backend(Kind::CircuitOpen, format!("circuit open (backend {name})")));
                continue;
            }
        }
        if attempt > 0 {
            tracing::info!(user = %user, backend = name, pool = plan.pool.as_deref().unwrap_or("-"), "failing over");
        }
        let target = Target { backend, tracked: *tracked, credentials, oauth: oauth.as_ref() };
        match login_at(shared, target, request, machine, peer, local, id).await {
            Ok(upstream) => return Ok((upstream, backend.name.clone())),
            // Another member may serve the user (shared storage) when the pool fails over.
            Err(failure) if failure.side == Side::Backend => last = Some(failure),
            Err(failure) => return Err(failure),
        }
    }
    Err(last.unwrap_or_else(|| Failure::backend(Kind::CircuitOpen, "no usable backend in the route")))
}

/// One backend to log in at, as whom.
struct Target<'a> {
    backend: &'a crate::config::Backend,
    /// Its circuit is kept (a configured backend).
    tracked: bool,
    credentials: &'a crate::imap::credentials::Credentials,
    oauth: Option<&'a OAuthReplay>,
}

/// One login attempt at one backend, recorded in its metrics and its circuit.
async fn login_at(
    shared: &Shared,
    target: Target<'_>,
    request: &LoginRequest,
    machine: &PreAuth,
    peer: SocketAddr,
    local: SocketAddr,
    id: &str,
) -> Result<Upstream, Failure> {
    let Target { backend, tracked, credentials, oauth } = target;
    let config = &shared.config;
    let started = Instant::now();
    // A pooled connection for configured backends (a lookup's ad-hoc server has none).
    // Never from a backend whose circuit is not closed (suspect, or half-open on this very probe).
    let ready = (tracked
        && crate::net::pool::enabled(shared)
        && shared.circuits.state(backend) == crate::route::health::State::Closed)
        .then(|| shared.pool.take(backend, config.backend_tls.pool_max_age))
        .flatten();
    let connection = if ready.is_some() { "pooled" } else { "new" };
    if tracked {
        shared.metrics.backend_pool_logins.with_label_values(&[&backend.name, connection]).inc();
    }
    let result = upstream::login(
        LoginContext {
            leg: {
                let leg = upstream::Leg::new(backend, shared).for_client(peer, local);
                if tracked { leg } else { leg.untracked() }
            },
            credentials,
            oauth,
            id_fields: vec![
                ("x-session-id", id.to_owned()),
                ("x-originating-ip", peer.ip().to_string()),
                ("x-originating-port", peer.port().to_string()),
                ("x-connected-ip", local.ip().to_string()),
                ("x-connected-port", local.port().to_string()),
                ("x-proxy-ttl", config.server.proxy_ttl.to_string()),
            ],
            client_id: machine.client_id(),
        },
        ready,
    )
    .await;
    let metrics = &shared.metrics;
    let name = backend.name.as_str();
    metrics.backend_connect_seconds.with_label_values(&[name]).observe(started.elapsed().as_secs_f64());
    let now = std::time::Instant::now();
    if tracked {
        crate::net::health::outcome(shared, backend, result.as_ref().map(|_| ()), now);
    }
    match result {
        Ok(upstream) => {
            tracing::info!(user = %request.credentials.username, backend = name, mechanism = request.mechanism.as_str(), "login");
            Ok(upstream)
        }
        Err(failure) => {
            if failure.side == Side::Backend {
                metrics.backend_errors.with_label_values(&[name, failure.kind.as_str()]).inc();
            }
            Err(Failure { detail: format!("{} (backend {name})", failure.detail), ..failure })
        }
    }
}

/// How a login attempt ended, as the metrics and the audit log see it.
enum Attempt<'a> {
    /// Logged in at this backend.
    Success(&'a str),
    /// Refused by the defence without backend contact.
    Refused(Refusal),
    /// Failed, classified once.
    Failed(&'a Failure),
}

/// Counts a login attempt (mechanism, result) and writes its audit event.
fn record_attempt(shared: &Shared, facts: &SessionFacts, request: &LoginRequest, attempt: Attempt<'_>) {
    let (event, metric_result, audit_result, reason, backend) = match attempt {
        Attempt::Success(backend) => ("auth_success", "success", "success", None, Some(backend.to_owned())),
        Attempt::Refused(refusal) => {
            ("rate_limited", refusal.reason(), "refused", Some(refusal.reason().to_owned()), None)
        }
        Attempt::Failed(failure) => {
            (failure.audit_event(), failure.result(), failure.result(), Some(failure.reason()), None)
        }
    };
    let mechanism = request.mechanism.as_str();
    shared.metrics.auth_attempts.with_label_values(&[mechanism, metric_result]).inc();
    shared.audit(&AuditEvent {
        user: Some(request.credentials.username.to_string()),
        mechanism: Some(mechanism),
        backend,
        result: Some(audit_result),
        reason,
        ..facts.event(event)
    });
}

/// Waits out a tarpit delay (cut short by shutdown) and records it.
async fn wait_tarpit(shared: &Shared, delay: Duration, phase: &mut watch::Receiver<Phase>) {
    shared.metrics.tarpit_seconds.observe(delay.as_secs_f64());
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = crate::lifecycle::stopping(phase) => {}
    }
}

/// A bounded label for a failed client handshake.
fn tls_failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::Error as Tls;
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Tls>()) {
        Some(Tls::NoApplicationProtocol) => "alpn",
        Some(Tls::PeerIncompatible(_)) => "incompatible",
        Some(Tls::AlertReceived(_)) => "alert_received",
        Some(Tls::InvalidMessage(_) | Tls::InappropriateMessage { .. } | Tls::InappropriateHandshakeMessage { .. }) => {
            "protocol"
        }
        Some(_) => "tls_error",
        None if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => "closed",
        None => "io",
    }
}

/// The one log line of a failed login, with the tarpit delay it costs.
fn log_failure(request: &LoginRequest, failure: &Failure, tarpit: Option<Duration>) {
    let user = request.credentials.username.as_str();
    let mechanism = request.mechanism.as_str();
    let (side, kind) = (failure.side.as_str(), failure.kind.as_str());
    let tarpit_ms = tarpit.map_or(0, |d| d.as_millis() as u64);
    if failure.is_auth_failure() {
        tracing::info!(user, mechanism, side, kind, tarpit_ms, detail = %failure.detail, "login failed");
    } else {
        tracing::warn!(user, mechanism, side, kind, tarpit_ms, detail = %failure.detail, "login failed");
    }
}

/// Answers the client's login, then relays (starting with what the client pipelined behind its login) until
/// the session ends, and closes with a `* BYE` of the proxy's own where one is due and fits at a response
/// boundary. Only the opening reply is built from the login's data; credentials, capability lists and the
/// backend's early bytes are gone by the relay.
async fn relay_session(
    shared: &Shared,
    facts: &SessionFacts,
    client: &mut TlsStream<tls_stream::Server>,
    mut backend: BackendStream,
    logged_in: &mut LoggedIn,
    session: Option<&crate::registry::Session>,
    phase: &mut watch::Receiver<Phase>,
) -> End {
    let limits =
        relay::Limits { idle: shared.config.server.relay_idle_timeout, write: shared.config.server.write_timeout };
    let early_down = logged_in.pending.len() as u64;
    // In a block: the opening reply's buffer is not kept in the session's state during the relay.
    {
        let capabilities = std::mem::take(&mut logged_in.capabilities);
        let mut opening = format!(
            "{} OK [CAPABILITY {}] Logged in\r\n",
            logged_in.tag.as_str(),
            response::client_capabilities(&capabilities)
        )
        .into_bytes();
        drop(capabilities);
        opening.extend_from_slice(&logged_in.pending);
        if let Err(e) = send(client, &opening, limits.write).await {
            return End::ClientError(e);
        }
    }
    let app = {
        let (name, version) = std::mem::take(&mut logged_in.client_id);
        report::client_app(name.as_deref(), version.as_deref())
    };
    let subject = report::Subject { shared, facts, user: &logged_in.user, client: app.as_deref() };
    let on_completed = |completed: &crate::imap::inspect::Completed| report::completed(&subject, completed);
    let metrics = &shared.metrics;
    let sessions = metrics.backend_sessions.with_label_values(&[&logged_in.backend]);
    sessions.inc();
    let started = Instant::now();
    let report = relay::Report { metrics, session, completed: Some(&on_completed) };
    // Pinned here, and the observer built in the call: the relay's state holds neither a second time.
    let stop = std::pin::pin!(crate::lifecycle::phase_reached(phase, |p| *p >= Phase::Closing));
    let outcome = relay::relay(
        client,
        &mut backend,
        limits,
        std::mem::take(&mut logged_in.pipelined),
        {
            // What the backend sent behind its reply is the first the observer sees from it.
            let pending = std::mem::take(&mut logged_in.pending);
            let mut observer = Observer::new();
            observer.server(&pending, std::time::Instant::now());
            observer
        },
        report,
        stop,
    )
    .await;
    sessions.dec();
    metrics.session_seconds.observe(started.elapsed().as_secs_f64());
    metrics.bytes.with_label_values(&["backend_to_client"]).inc_by(early_down);
    drop(backend);
    let bye: Option<&[u8]> = match &outcome.end {
        RelayEnd::ClientLogout | RelayEnd::ClientClosed | RelayEnd::ClientError(_) | RelayEnd::ClientWriteTimeout => {
            None
        }
        RelayEnd::BackendClosed | RelayEnd::BackendError(_) if outcome.bye_sent => None,
        RelayEnd::BackendClosed | RelayEnd::BackendError(_) => Some(b"* BYE Backend connection closed.\r\n"),
        RelayEnd::IdleTimeout => Some(b"* BYE Disconnected for inactivity.\r\n"),
        RelayEnd::Shutdown => Some(b"* BYE Server shutting down.\r\n"),
        RelayEnd::BackendWriteTimeout => Some(b"* BYE Backend not responding.\r\n"),
        RelayEnd::GuardLost => Some(b"* BYE Connection closed by proxy.\r\n"),
        RelayEnd::Kicked => Some(b"* BYE Disconnected by an administrator.\r\n"),
        RelayEnd::Leaving => Some(b"* BYE Server restarting, please reconnect.\r\n"),
    };
    let client_gone = matches!(outcome.end, RelayEnd::ClientError(_) | RelayEnd::ClientWriteTimeout);
    if !client_gone {
        // Inside a response (a FETCH literal on its way) a BYE would corrupt it: close without one then.
        if let (Some(bye), true) = (bye, outcome.client_at_boundary) {
            let _ = send(client, bye, FAREWELL).await;
        }
        let _ = timeout(FAREWELL, client.shutdown()).await;
    }
    End::Relayed {
        up: outcome.client_to_backend,
        down: outcome.backend_to_client + early_down,
        commands: outcome.commands,
        end: outcome.end,
    }
}
