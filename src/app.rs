//! Wires it together: prepares everything that can fail from configuration (TLS, routes) before any port
//! is bound, binds the listeners, accepts, and drains on shutdown: stop accepting, BYE to sessions not yet
//! logged in, a grace period for relayed sessions, then close the rest.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::admin::{self, AdminState};
use crate::config::{BackendMode, Config};
use crate::fleet::{RedisSetup, RedisStore};
use crate::lifecycle::Phase;
use crate::net::inherit::{self, Inherited, Role};
use crate::net::outliers::Outliers;
use crate::net::pool::Pool;
use crate::net::proxy_protocol::{self, HeaderError};
use crate::net::session::Mode;
use crate::net::tls::{self, TlsConfigError};
use crate::net::{Shared, session};
use crate::registry::Registry;
use crate::route::Router;
use crate::route::health::Circuits;
use crate::security::{Defence, DefenceEvent};
use crate::signals::Signals;
use crate::telemetry::audit::{AuditError, AuditEvent, AuditLog};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::panics;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// What can stop the proxy from starting: configuration that looked valid but cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("{0}")]
    Lookup(String),
    #[error(transparent)]
    StateStore(#[from] crate::fleet::SetupError),
    #[error("admin.token_file: {0}")]
    AdminTokens(#[from] admin::auth::TokenError),
}

fn defence_audit_event(event: &DefenceEvent) -> AuditEvent {
    match event {
        DefenceEvent::Banned { prefix, reason, user, duration } => AuditEvent {
            event: "banned",
            prefix: Some(prefix.to_string()),
            reason: Some((*reason).to_owned()),
            user: Some(user.clone()),
            ban_secs: Some(duration.as_secs()),
            ..AuditEvent::default()
        },
        DefenceEvent::Unbanned { prefix } => {
            AuditEvent { event: "unbanned", prefix: Some(prefix.to_string()), ..AuditEvent::default() }
        }
        DefenceEvent::Closed { prefix, user, duration } => AuditEvent {
            event: "unfamiliar_closed",
            prefix: Some(prefix.to_string()),
            reason: Some("failure_budget".to_owned()),
            user: Some(user.clone()),
            ban_secs: Some(duration.as_secs()),
            ..AuditEvent::default()
        },
        DefenceEvent::Reopened { prefix } => {
            AuditEvent { event: "reopened", prefix: Some(prefix.to_string()), ..AuditEvent::default() }
        }
    }
}

/// What survives a reload: the defence's state, the metrics, the audit log and the backends' circuits.
#[derive(Clone)]
struct Lasting {
    defence: Arc<Defence>,
    metrics: Arc<Metrics>,
    audit: Option<Arc<AuditLog>>,
    circuits: Arc<Circuits>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    sessions: Arc<Registry>,
    signals: Arc<Signals>,
    pool: Arc<Pool>,
    outliers: Arc<Outliers>,
}

impl Lasting {
    fn of(shared: &Shared) -> Self {
        Self {
            defence: Arc::clone(&shared.defence),
            metrics: Arc::clone(&shared.metrics),
            audit: shared.audit.clone(),
            circuits: Arc::clone(&shared.circuits),
            ticketer: Arc::clone(&shared.ticketer),
            sessions: Arc::clone(&shared.sessions),
            signals: Arc::clone(&shared.signals),
            pool: Arc::clone(&shared.pool),
            outliers: Arc::clone(&shared.outliers),
        }
    }
}

/// The parts of [`Shared`] that come from the configuration file, built around the long-lived parts.
fn build_shared(config: Config, lasting: Lasting) -> Result<Shared, StartError> {
    let Lasting { defence, metrics, audit, circuits, ticketer, sessions, signals, pool, outliers } = lasting;
    circuits.reconfigure(config.health.clone());
    let (server, expiries) = tls::server_config(&config.tls, &ticketer)?;
    // The names of the set now served (a reload may drop some).
    metrics.tls_certificate_expiry.reset();
    for expiry in &expiries {
        metrics.tls_certificate_expiry.with_label_values(&[expiry.name.as_str()]).set(expiry.not_after);
    }
    let backend_tls = tls::client_config(config.backend_tls.ca.as_deref())?;
    if config.backend_tls.mode == BackendMode::Plain {
        tracing::warn!("backend_tls.mode = \"plain\": passwords travel to backends unencrypted");
    }
    let router = Router::new(&config);
    let acceptor = crate::net::tls::stream::Acceptor::new(server);
    let lookup = match &config.route.lookup {
        Some(l) => Some(crate::net::lookup::Lookup::new(l.clone()).map_err(StartError::Lookup)?),
        None => None,
    };
    Ok(Shared {
        config,
        router,
        acceptor,
        backend_tls,
        defence,
        lookup,
        circuits,
        metrics,
        audit,
        ticketer,
        sessions,
        signals,
        pool,
        outliers,
    })
}

/// What `[state]` needs before anything starts: the Redis client (not connected) and the fleet's
/// fingerprint secret.
fn state_setup(config: &Config) -> Result<(Option<RedisSetup>, Option<Vec<u8>>), StartError> {
    let Some(state) = &config.state else { return Ok((None, None)) };
    Ok((Some(RedisSetup::new(state)?), crate::fleet::fingerprint_secret(state)?))
}

/// Everything validated and loaded, nothing bound yet.
pub struct Prepared {
    shared: Arc<Shared>,
    config_path: Option<PathBuf>,
    store: Option<RedisSetup>,
    tokens: Option<admin::auth::Tokens>,
    inherited: Inherited,
    upgrade: Option<Upgrade>,
}

/// How this process starts its successor on SIGUSR2: the binary's path (as it was when this one started:
/// a package upgrade puts the new binary there) and the arguments it was started with.
#[derive(Debug, Clone)]
pub struct Upgrade {
    pub exe: PathBuf,
    pub args: Vec<std::ffi::OsString>,
}

impl Prepared {
    /// Loads certificates and keys and builds the routes. Errors here are configuration errors.
    pub fn new(config: Config) -> Result<Self, StartError> {
        tls::install_crypto_provider();
        crate::telemetry::panics::install_hook();
        let (store, secret) = state_setup(&config)?;
        let defence = Defence::with_fingerprint_secret(config.defence.clone(), secret.as_deref());
        if let Some(path) = &config.memory {
            crate::memory::restore(&defence, path);
        }
        let backends: Vec<String> = config.backends.iter().map(|b| b.name.clone()).collect();
        let metrics = Arc::new(Metrics::new(&backends));
        let audit = match &config.audit {
            Some(audit) => Some(Arc::new(AuditLog::open(audit.clone(), metrics.audit_dropped.clone())?)),
            None => None,
        };
        if let Some(audit) = &audit {
            let audit = Arc::clone(audit);
            defence.set_event_sink(move |event| audit.record(&defence_audit_event(event)));
        }
        let circuits = Arc::new(Circuits::new(config.health.clone()));
        let ticketer = tls::ticketer()?;
        // Sessions are bounded by the connection limit; so is their registry (a restart changes both).
        let sessions = Registry::new(config.server.max_connections);
        let tokens = config.admin.token_file.as_deref().map(admin::auth::Tokens::load).transpose()?;
        let signals = Arc::new(Signals::default());
        let pool = Arc::new(Pool::default());
        let outliers = Arc::new(Outliers::default());
        let lasting = Lasting { defence, metrics, audit, circuits, ticketer, sessions, signals, pool, outliers };
        let shared = build_shared(config, lasting)?;
        Ok(Self {
            shared: Arc::new(shared),
            config_path: None,
            store,
            tokens,
            inherited: Inherited::none(),
            upgrade: None,
        })
    }

    /// Everything `new` checks (certificates, keys, routes, the lookup URL) without opening the audit
    /// file or starting anything: what `imapgate check` runs, so that it works where the service's
    /// directories are not writable (ExecStartPre before systemd made them, a read-only image).
    pub fn check(config: Config) -> Result<(), StartError> {
        tls::install_crypto_provider();
        let defence = Defence::new(config.defence.clone());
        let backends: Vec<String> = config.backends.iter().map(|b| b.name.clone()).collect();
        let metrics = Arc::new(Metrics::new(&backends));
        let circuits = Arc::new(Circuits::new(config.health.clone()));
        state_setup(&config)?;
        let ticketer = tls::ticketer()?;
        config.admin.token_file.as_deref().map(admin::auth::Tokens::load).transpose()?;
        let sessions = Registry::new(1);
        let signals = Arc::new(Signals::default());
        let pool = Arc::new(Pool::default());
        let outliers = Arc::new(Outliers::default());
        let lasting = Lasting { defence, metrics, audit: None, circuits, ticketer, sessions, signals, pool, outliers };
        build_shared(config, lasting).map(|_| ())
    }

    /// The file the configuration came from: SIGHUP reloads it (certificates, backends, routes, timeouts).
    pub fn with_config_path(mut self, path: PathBuf) -> Self {
        self.config_path = Some(path);
        self
    }

    /// Listening sockets handed to this process (systemd's socket activation, or the imapgate it
    /// replaces): listeners they match use them instead of binding.
    pub fn with_inherited(mut self, inherited: Inherited) -> Self {
        self.inherited = inherited;
        self
    }

    /// SIGUSR2 upgrades in place (starts `upgrade.exe` with the listeners, then leaves slowly) and SIGQUIT
    /// leaves slowly; for the binary, not for a proxy embedded in another process.
    pub fn with_upgrade(mut self, upgrade: Upgrade) -> Self {
        self.upgrade = Some(upgrade);
        self
    }

    /// Binds every configured listener and the admin server (or takes the inherited socket for it).
    pub async fn bind(mut self) -> std::io::Result<Proxy> {
        let mut inherited = std::mem::replace(&mut self.inherited, Inherited::none());
        let admin_addr = self.shared.config.admin.listen;
        let admin = match inherited.take(Role::Admin, 0, admin_addr) {
            Some(listener) => TcpListener::from_std(listener)?,
            None => TcpListener::bind(admin_addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("bind admin {admin_addr}: {e}")))?,
        };
        let mut listeners = Vec::new();
        let server = &self.shared.config.server;
        let addresses = server
            .listen
            .iter()
            .enumerate()
            .map(|(i, a)| (i, a, Mode::ImplicitTls))
            .chain(server.starttls_listen.iter().enumerate().map(|(i, a)| (i, a, Mode::StartTls)));
        let addresses = addresses
            .map(|(i, a, mode)| (i, *a, Kind::Imap(mode)))
            .chain(server.shared_listen.iter().enumerate().map(|(i, s)| (i, s.listen, Kind::Shared(i))));
        for (index, addr, kind) in addresses {
            let role = match kind {
                Kind::Imap(Mode::StartTls) => Role::StartTls,
                Kind::Imap(_) => Role::ImplicitTls,
                Kind::Shared(_) => Role::Shared,
            };
            let listener = match inherited.take(role, index, addr) {
                Some(listener) => TcpListener::from_std(listener)?,
                None => TcpListener::bind(addr)
                    .await
                    .map_err(|e| std::io::Error::new(e.kind(), format!("bind {addr}: {e}")))?,
            };
            listeners.push((listener, kind, inherit::name(role, index)));
        }
        inherited.close_unclaimed();
        Ok(Proxy {
            shared: self.shared,
            listeners,
            admin,
            config_path: self.config_path,
            store: self.store,
            tokens: self.tokens,
            upgrade: self.upgrade,
        })
    }
}

/// A bound proxy, ready to serve.
pub struct Proxy {
    shared: Arc<Shared>,
    /// Each with the name it is handed over under (`net::inherit::name`).
    listeners: Vec<(TcpListener, Kind, String)>,
    admin: TcpListener,
    config_path: Option<PathBuf>,
    store: Option<RedisSetup>,
    tokens: Option<admin::auth::Tokens>,
    upgrade: Option<Upgrade>,
}

/// The configuration new connections get; a reload swaps it, sessions keep the one they started with.
type Current = Arc<RwLock<Arc<Shared>>>;

fn current(shared: &Current) -> Arc<Shared> {
    Arc::clone(&shared.read().unwrap_or_else(|p| p.into_inner()))
}

impl Proxy {
    /// The bound implicit-TLS addresses (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(Mode::ImplicitTls)
    }

    /// The bound STARTTLS addresses.
    pub fn starttls_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(Mode::StartTls)
    }

    fn addrs(&self, wanted: Mode) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter(|(_, kind, _)| *kind == Kind::Imap(wanted))
            .filter_map(|(l, _, _)| l.local_addr().ok())
            .collect()
    }

    /// The admin server's address (useful with port 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    /// The brute-force defence, for inspection (tests, benchmarks).
    pub fn defence(&self) -> Arc<Defence> {
        Arc::clone(&self.shared.defence)
    }

    /// Serves until `shutdown` resolves, then drains. Returns when every session has ended.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let (phase_tx, phase_rx) = watch::channel(Phase::Running);
        let live: Current = Arc::new(RwLock::new(Arc::clone(&self.shared)));
        tokio::spawn(sweep_loop(Arc::clone(&self.shared), phase_rx.clone()));
        if let Some(setup) = self.store {
            let shared = &self.shared;
            let (defence, metrics) = (shared.defence.state(), Arc::clone(&shared.metrics));
            match RedisStore::start(setup, shared.config.defence.clone(), defence, metrics, phase_rx.clone()) {
                Ok(store) => shared.defence.attach_store(Arc::new(store)),
                Err(e) => tracing::error!(error = %e, "shared state store not started: this instance decides alone"),
            }
        }
        {
            let live = Arc::clone(&live);
            tokio::spawn(crate::net::health::run(move || current(&live), phase_rx.clone()));
        }
        {
            let live = Arc::clone(&live);
            tokio::spawn(crate::net::pool::run(move || current(&live), phase_rx.clone()));
        }
        let admin_state = Arc::new(AdminState {
            metrics: Arc::clone(&self.shared.metrics),
            listening: AtomicBool::new(false),
            usable: {
                let live = Arc::clone(&live);
                Box::new(move || crate::net::health::ready(&current(&live)))
            },
            phase: phase_rx.clone(),
            tokens: std::sync::RwLock::new(self.tokens.map(Arc::new)),
            current: {
                let live = Arc::clone(&live);
                Box::new(move || current(&live))
            },
            reload: self.config_path.clone().map(|path| {
                let live = Arc::clone(&live);
                let reload: admin::Reloader =
                    Box::new(move |state: &AdminState| reload_config(&live, &path, Some(state)));
                reload
            }),
            history: admin::console::History::default(),
        });
        // Copies of the listening sockets for a successor (an upgrade), taken before the loops own them.
        let handover: Vec<(String, std::os::fd::OwnedFd)> = if self.upgrade.is_some() {
            use std::os::fd::AsFd;
            let admin = std::iter::once((inherit::name(Role::Admin, 0), self.admin.as_fd().try_clone_to_owned()));
            let others = self.listeners.iter().map(|(l, _, name)| (name.clone(), l.as_fd().try_clone_to_owned()));
            admin.chain(others).filter_map(|(name, fd)| fd.ok().map(|fd| (name, fd))).collect()
        } else {
            Vec::new()
        };
        // After a hand-over the successor answers on the admin address; this process stops accepting there.
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        {
            let serving = admin::serve(self.admin, Arc::clone(&admin_state), phase_rx.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = serving => {}
                    Ok(()) = admin_stopped => {}
                }
            });
        }
        let (leave_tx, mut leave_rx) = mpsc::channel::<Leave>(1);
        if let Some(upgrade) = self.upgrade.clone() {
            let timeout = self.shared.config.server.upgrade_timeout;
            let shared = Arc::clone(&self.shared);
            tokio::spawn(on_leave_signals(shared, upgrade, handover, timeout, leave_tx, phase_rx.clone()));
        }
        tokio::spawn(on_signals(
            Arc::clone(&live),
            self.config_path.clone(),
            Arc::clone(&admin_state),
            phase_rx.clone(),
        ));
        // Every task holds a sender; `recv` returns None once all of them have ended.
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let slots = Arc::new(Semaphore::new(self.shared.config.server.max_connections));
        for (listener, mode, _) in self.listeners {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(listen = %addr, kind = ?mode, "listening");
            }
            tokio::spawn(accept_loop(
                listener,
                mode,
                Arc::clone(&live),
                Arc::clone(&slots),
                phase_rx.clone(),
                done_tx.clone(),
            ));
        }
        drop(done_tx);
        admin_state.listening.store(true, Ordering::Relaxed);
        crate::net::notify::ready();
        let leave = tokio::select! {
            () = shutdown => None,
            Some(leave) = leave_rx.recv() => Some(leave),
        };
        let server = &self.shared.config.server;
        let wait = match leave {
            None => {
                tracing::info!(grace_secs = server.shutdown_grace.as_secs(), "shutting down");
                server.shutdown_grace
            }
            Some(leave) => {
                if leave == Leave::HandedOver {
                    let _ = admin_stop.send(());
                }
                tracing::info!(
                    event = "leaving",
                    handed_over = leave == Leave::HandedOver,
                    sessions = self.shared.sessions.len(),
                    spread_secs = server.drain_spread.as_secs(),
                    "leaving: no new connections; sessions end at random moments over the drain spread"
                );
                let sessions = Arc::clone(&self.shared.sessions);
                tokio::spawn(crate::net::leave::spread_kicks(sessions, server.drain_spread, phase_rx.clone()));
                server.drain_spread + server.shutdown_grace
            }
        };
        let _ = phase_tx.send(if leave.is_some() { Phase::Leaving } else { Phase::Draining });
        let drained = tokio::time::timeout(wait, done_rx.recv()).await;
        if drained.is_err() {
            tracing::info!("grace period over; closing remaining sessions");
            let _ = phase_tx.send(Phase::Closing);
            // Closing sessions say BYE where they can, with short write deadlines; what is still there
            // after that (a client that reads nothing) is dropped.
            if tokio::time::timeout(CLOSING, done_rx.recv()).await.is_err() {
                tracing::info!("aborting sessions that did not close");
            }
        }
        let _ = phase_tx.send(Phase::Aborted);
        let _ = tokio::time::timeout(CLOSING, done_rx.recv()).await;
        // The successor of a hand-over has the newer memory; otherwise this is the last word.
        if leave != Some(Leave::HandedOver) {
            save_memory(&current(&live)).await;
        }
        if let Some(audit) = current(&live).audit.clone() {
            // The last lines (session ends, summaries) reach the file before the process exits.
            let flushed = tokio::task::spawn_blocking(move || audit.flush(std::time::Duration::from_secs(2))).await;
            if !matches!(flushed, Ok(true)) {
                tracing::warn!("audit log not flushed within 2 s");
            }
        }
        tracing::info!("stopped");
    }
}

/// Why the process leaves slowly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    /// An upgrade: the successor is ready and holds the listeners.
    HandedOver,
    /// SIGQUIT: no successor here (a rolling update elsewhere takes the clients).
    Asked,
}

/// SIGUSR2 starts a successor with the listening sockets and, once it is ready, leaves; a failed upgrade
/// is logged and this process serves on. SIGQUIT leaves without a successor.
async fn on_leave_signals(
    shared: Arc<Shared>,
    upgrade: Upgrade,
    handover: Vec<(String, std::os::fd::OwnedFd)>,
    timeout: std::time::Duration,
    leave: mpsc::Sender<Leave>,
    mut phase: watch::Receiver<Phase>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut usr2), Ok(mut quit)) = (signal(SignalKind::user_defined2()), signal(SignalKind::quit())) else {
        tracing::warn!("cannot install SIGUSR2/SIGQUIT handlers: no upgrade in place");
        return;
    };
    loop {
        tokio::select! {
            _ = usr2.recv() => {}
            _ = quit.recv() => {
                let _ = leave.send(Leave::Asked).await;
                return;
            }
            () = crate::lifecycle::stopping(&mut phase) => return,
        }
        let sockets: Vec<(String, std::os::fd::OwnedFd)> =
            handover.iter().filter_map(|(name, fd)| fd.try_clone().ok().map(|fd| (name.clone(), fd))).collect();
        tracing::info!(path = %upgrade.exe.display(), sockets = sockets.len(), "upgrade: starting the successor");
        // The successor starts from what the defence knows now.
        save_memory(&shared).await;
        match crate::net::successor::start(&upgrade.exe, &upgrade.args, sockets, timeout).await {
            Ok(pid) => {
                tracing::info!(event = "handed_over", successor = pid, "upgrade: the successor is ready and accepting");
                let _ = leave.send(Leave::HandedOver).await;
                return;
            }
            Err(e) => tracing::error!(event = "upgrade_failed", error = %e, "upgrade failed; this process serves on"),
        }
    }
}

/// What a listener serves: IMAP (implicit TLS or STARTTLS), or a port shared with a web server
/// (`server.shared_listen[i]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Imap(Mode),
    Shared(usize),
}

/// How long closing sessions get after the grace period before they are aborted.
const CLOSING: std::time::Duration = std::time::Duration::from_millis(500);

async fn accept_loop(
    listener: TcpListener,
    mode: Kind,
    live: Current,
    slots: Arc<Semaphore>,
    mut phase: watch::Receiver<Phase>,
    done: mpsc::Sender<()>,
) {
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = crate::lifecycle::phase_reached(&mut phase, |p| *p != Phase::Running) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = current(&live);
        // Cheap refusals before any TLS work: the global cap here, then (in the connection's own task, once a
        // PROXY header has named the real client) deny list, bans, per-prefix caps and rates.
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(event = "refused", %peer, reason = "max_connections", "connection refused before TLS");
            shared.metrics.connections_refused.with_label_values(&["max_connections"]).inc();
            continue;
        };
        let local = tcp.local_addr().ok().or(local).unwrap_or(peer);
        let (phase, done) = (phase.clone(), done.clone());
        tokio::spawn(async move {
            let mut aborted = phase.clone();
            let held = Arc::clone(&shared);
            let relaying = tokio::select! {
                relaying = panics::catch(connection(shared, tcp, mode, peer, local, phase)) => relaying,
                () = crate::lifecycle::phase_reached(&mut aborted, |p| *p == Phase::Aborted) => Ok(None),
            };
            let relaying = relaying.unwrap_or_else(|panicked| {
                session_panicked(&held, peer, "preauth", &panicked);
                None
            });
            // A session that logged in relays in a task of its own: this one ends, and its state (sized for
            // the handshake and the pre-auth conversation) is freed.
            if let Some((relaying, active)) = relaying {
                tokio::spawn(async move {
                    tokio::select! {
                        ended = panics::catch(relaying.run()) => {
                            if let Err(panicked) = ended {
                                session_panicked(&held, peer, "relay", &panicked);
                            }
                        }
                        () = crate::lifecycle::phase_reached(&mut aborted, |p| *p == Phase::Aborted) => {}
                    }
                    drop(active);
                    drop(permit);
                    drop(done);
                });
            }
        });
    }
}

/// A session's task panicked (a bug of ours): its connection is closed with the task, the end is counted
/// (`stage`, `internal_error`), logged on one line without a backtrace, and audited.
fn session_panicked(shared: &Shared, peer: SocketAddr, stage: &'static str, panicked: &panics::Panicked) {
    shared.metrics.session_ends.with_label_values(&[stage, "internal_error"]).inc();
    tracing::error!(event = "session_panic", %peer, stage, reason = "internal_error", panic = %panicked.0, "session end");
    shared.audit(&AuditEvent {
        event: "session_end",
        peer_ip: Some(peer.ip().to_string()),
        result: Some("internal_error"),
        reason: Some(format!("internal error ({stage})")),
        ..AuditEvent::default()
    });
}

/// One accepted connection: its PROXY header (when configured), admission, then the session up to its login.
/// A session that logged in comes back to be relayed, with its place in `imapgate_connections_active`.
async fn connection(
    shared: Arc<Shared>,
    mut tcp: TcpStream,
    kind: Kind,
    peer: SocketAddr,
    local: SocketAddr,
    phase: watch::Receiver<Phase>,
) -> Option<(Box<session::Relaying>, Active)> {
    let endpoints = match proxy_protocol::accept(&shared.config.server, &mut tcp, peer, local).await {
        Ok((endpoints, result)) => {
            shared.metrics.proxy_headers.with_label_values(&[result]).inc();
            endpoints
        }
        Err(error) => {
            shared.metrics.proxy_headers.with_label_values(&[error.label()]).inc();
            if error != HeaderError::Local {
                tracing::info!(event = "refused", %peer, reason = "proxy_protocol", error = %error, "connection refused before TLS");
            }
            return None;
        }
    };
    let client = endpoints.client;
    let admitted = match shared.defence.admit(client.ip()) {
        Ok(admitted) => admitted,
        Err(refusal) => {
            shared.metrics.connections_refused.with_label_values(&[refusal.reason()]).inc();
            shared.audit(&AuditEvent {
                event: "rate_limited",
                client_ip: Some(client.ip().to_string()),
                client_port: Some(client.port()),
                peer_ip: endpoints.via.map(|v| v.ip().to_string()),
                listener: Some(endpoints.local.to_string()),
                result: Some("refused_before_tls"),
                reason: Some(refusal.reason().to_owned()),
                // Refusals are summed per prefix and reason in the audit log.
                prefix: Some(shared.defence.prefix_of(client.ip()).to_string()),
                ..AuditEvent::default()
            });
            return None;
        }
    };
    let mode = match kind {
        Kind::Imap(mode) => mode,
        Kind::Shared(index) => {
            let config = shared.config.server.shared_listen.get(index).cloned()?;
            let route = crate::net::shared_port::classify(&tcp, &config, shared.config.server.handshake_timeout).await;
            match route {
                Ok(crate::net::shared_port::Route::Imap) => {
                    shared.metrics.shared_hellos.with_label_values(&["imap"]).inc();
                    Mode::ImplicitTls
                }
                Ok(crate::net::shared_port::Route::Web) => {
                    shared.metrics.shared_hellos.with_label_values(&["web"]).inc();
                    // The per-prefix caps applied at admission; a web connection does not hold an IMAP place.
                    drop(admitted);
                    pass_through(&shared, tcp, &endpoints, &config).await;
                    return None;
                }
                Err(unrouted) => {
                    shared.metrics.shared_hellos.with_label_values(&[unrouted.label()]).inc();
                    tracing::debug!(peer = %client, reason = unrouted.label(), "shared port: closed before routing");
                    return None;
                }
            }
        }
    };
    shared.metrics.connections_accepted.inc();
    // Counted down however the session ends, aborted included.
    let active = Active::new(Arc::clone(&shared.metrics));
    let relaying = session::run(shared, tcp, mode, endpoints, admitted, phase).await?;
    Some((relaying, active))
}

/// A connection on a shared port that is not IMAP: relayed to the web server, counted and audited (one
/// line, no content).
async fn pass_through(
    shared: &Shared,
    tcp: TcpStream,
    endpoints: &proxy_protocol::Endpoints,
    config: &crate::config::SharedListen,
) {
    let started = std::time::Instant::now();
    let target = config.web.to_string();
    let server = &shared.config.server;
    let moved = crate::net::shared_port::pass_through(
        tcp,
        endpoints.client,
        endpoints.local,
        config,
        shared.config.backend_tls.connect_timeout,
        server.relay_idle_timeout,
    )
    .await;
    let result = match &moved {
        Ok(_) => "relayed",
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "timeout",
        Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound) => {
            "connect_failed"
        }
        Err(_) => "error",
    };
    let metrics = &shared.metrics;
    metrics.passthrough.with_label_values(&[&target, result]).inc();
    let (up, down) = moved.as_ref().map_or((0, 0), |m| *m);
    metrics.passthrough_bytes.with_label_values(&[&target, "client_to_web"]).inc_by(up);
    metrics.passthrough_bytes.with_label_values(&[&target, "web_to_client"]).inc_by(down);
    if let Err(e) = &moved {
        tracing::info!(peer = %endpoints.client, target = %target, error = %e, "passed-through connection ended");
    }
    shared.audit(&AuditEvent {
        event: "passthrough",
        client_ip: Some(endpoints.client.ip().to_string()),
        client_port: Some(endpoints.client.port()),
        peer_ip: endpoints.via.map(|v| v.ip().to_string()),
        listener: Some(endpoints.local.to_string()),
        backend: Some(target),
        result: Some(result),
        duration_ms: Some(started.elapsed().as_millis() as u64),
        bytes_from_client: Some(up),
        bytes_to_client: Some(down),
        ..AuditEvent::default()
    });
}

/// One open client connection in `imapgate_connections_active`.
struct Active(Arc<Metrics>);

impl Active {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.connections_active.inc();
        Self(metrics)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.connections_active.dec();
    }
}

/// Defence housekeeping every few seconds: lift bans, forget idle entries, prune limiters.
async fn sweep_loop(shared: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    let defence = &shared.defence;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 1u64.. {
        tokio::select! {
            _ = tick.tick() => {
                defence.sweep();
                shared.metrics.bans_active.set(defence.stats().active_bans as i64);
            }
            () = crate::lifecycle::stopping(&mut phase) => break,
        }
        if n % 60 == 0 {
            log_defence_stats(defence);
        }
        // While this process is the one serving (after a hand-over the successor writes the file).
        if n % crate::memory::SAVE_EVERY.as_secs() == 0 && *phase.borrow() == Phase::Running {
            save_memory(&shared).await;
        }
    }
    log_defence_stats(defence);
}

/// Writes the defence's memory (`[state] path`) off the async workers; failures are logged.
async fn save_memory(shared: &Arc<Shared>) {
    let Some(path) = shared.config.memory.clone() else { return };
    let defence = Arc::clone(&shared.defence);
    let saved = tokio::task::spawn_blocking(move || crate::memory::save(&defence, &path)).await;
    match saved {
        Ok(Ok(bytes)) => tracing::debug!(bytes, "defence memory written"),
        Ok(Err(e)) => tracing::warn!(event = "defence_memory_not_written", error = %e, "defence memory not written"),
        Err(e) => tracing::warn!(error = %e, "defence memory writer failed"),
    }
}

fn log_defence_stats(defence: &Defence) {
    let stats = defence.stats();
    tracing::info!(
        event = "defence_stats",
        tracked_prefixes = stats.tracked_prefixes,
        tracked_accounts = stats.tracked_accounts,
        ban_entries = stats.ban_entries,
        active_bans = stats.active_bans,
        evicted = stats.evicted,
        max_in_flight = stats.max_in_flight,
        "defence tables"
    );
}

/// SIGHUP reloads the configuration (when it came from a file) and reopens the audit log; SIGUSR1 only
/// reopens the audit log (logrotate).
async fn on_signals(
    live: Current,
    config_path: Option<PathBuf>,
    admin: Arc<AdminState>,
    mut phase: watch::Receiver<Phase>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut hup), Ok(mut usr1)) = (signal(SignalKind::hangup()), signal(SignalKind::user_defined1())) else {
        tracing::warn!("cannot install SIGHUP/SIGUSR1 handlers: no reload, no audit log reopening");
        return;
    };
    loop {
        let reload = tokio::select! {
            _ = hup.recv() => true,
            _ = usr1.recv() => false,
            () = crate::lifecycle::stopping(&mut phase) => return,
        };
        let shared = current(&live);
        if let Some(audit) = &shared.audit {
            audit.reopen();
        }
        if let (true, Some(path)) = (reload, config_path.as_deref()) {
            let _ = reload_config(&live, path, Some(&admin));
        }
    }
}

/// Loads and validates the file again and swaps it in for new connections. Listener and admin addresses,
/// the defence's settings and the audit target need a restart; a change to them is reported and ignored.
/// The admin API's token file is read again (a broken one fails the reload and keeps the old tokens).
fn reload_config(live: &Current, path: &Path, admin: Option<&AdminState>) -> admin::ReloadResult {
    let old = current(live);
    let outcome = Config::load(path).map_err(|e| e.to_string()).and_then(|config| {
        if let Some(admin) = admin {
            admin.reload_tokens(config.admin.token_file.as_deref()).map_err(|e| format!("admin.token_file: {e}"))?;
        }
        // What is bound or connected at start-up cannot follow: the reload is refused, saying so.
        let mut restart = Vec::new();
        if config.server.listen != old.config.server.listen
            || config.server.starttls_listen != old.config.server.starttls_listen
            || config.admin.listen != old.config.admin.listen
            || config.server.shared_listen != old.config.server.shared_listen
        {
            restart.push("listen and admin addresses");
        }
        if config.state != old.config.state || config.memory != old.config.memory {
            restart.push("[state]");
        }
        if !restart.is_empty() {
            return Err(format!("{} changed: they need a restart (or an upgrade, SIGUSR2)", restart.join(", ")));
        }
        let mut notes = Vec::new();
        let mut lasting = Lasting::of(&old);
        if config.audit != old.config.audit {
            // A new file (or none): the sessions already running write to the old one until they end.
            lasting.audit = match &config.audit {
                Some(audit) => Some(Arc::new(
                    AuditLog::open(audit.clone(), old.metrics.audit_dropped.clone())
                        .map_err(|e| format!("[audit]: {e}"))?,
                )),
                None => None,
            };
            notes.push("[audit] moved");
        }
        let defence = (config.defence != old.config.defence).then(|| config.defence.clone());
        if let Some(defence) = &defence {
            old.defence.check_reconfigure(defence).map_err(str::to_owned)?;
        }
        let audit = lasting.audit.clone();
        let fresh = build_shared(config, lasting).map_err(|e| e.to_string())?;
        if let Some(defence) = defence {
            old.defence.reconfigure(defence).map_err(str::to_owned)?;
            notes.push("[defence] applied to new decisions");
        }
        if fresh.config.audit != old.config.audit {
            match audit {
                Some(audit) => old.defence.set_event_sink(move |event| audit.record(&defence_audit_event(event))),
                None => old.defence.set_event_sink(|_| {}),
            }
        }
        *live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(notes)
    });
    let (result, reason) = match &outcome {
        Ok(notes) if notes.is_empty() => ("success", String::new()),
        Ok(notes) => ("success", notes.join(", ")),
        Err(e) => ("failure", e.clone()),
    };
    match &outcome {
        Ok(_) => tracing::info!(event = "config_reload", result, reason, "configuration reloaded"),
        Err(e) => {
            tracing::error!(event = "config_reload", result, error = %e, "configuration reload failed; keeping the old one")
        }
    }
    old.metrics.config_reloads.with_label_values(&[result]).inc();
    old.audit(&AuditEvent {
        event: "config_reload",
        result: Some(result),
        reason: (!reason.is_empty()).then_some(reason),
        ..AuditEvent::default()
    });
    outcome
}
