//! The admin HTTP server (hyper): `GET /metrics` (Prometheus text), `GET /healthz` (process alive),
//! `GET /readyz` (listeners bound, not shutting down, and every pool with a usable member, or without pools
//! a backend whose circuit is closed). With `[admin] token_file`, also the JSON API under `/api/v1/`
//! ([`api`]) and the live console at `/` ([`console`]), each request carrying `Authorization: Bearer`
//! with a token of the file ([`auth`]). Loopback by default. It keeps serving while the proxy drains, so
//! that a balancer sees "not ready" (503) and Prometheus still scrapes the last figures, and stops when
//! what is left is aborted.

pub mod api;
pub mod auth;
pub mod console;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::lifecycle::Phase;
use crate::net::Shared;
use crate::telemetry::metrics::Metrics;

/// Largest request body the API reads.
const MAX_BODY: usize = 4096;

/// What a reload answered: notes (settings that wait for a restart) or the error.
pub type ReloadResult = Result<Vec<&'static str>, String>;

/// Reloads the configuration file for the API (the state passed is the admin server's own).
pub type Reloader = Box<dyn Fn(&AdminState) -> ReloadResult + Send + Sync>;

/// What the admin endpoints report on and act through.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Set once every listener is bound.
    pub listening: AtomicBool,
    /// Whether the backends in force can serve (every pool has a usable member; see `net::health`).
    pub usable: Box<dyn Fn() -> bool + Send + Sync>,
    /// The proxy's phase: anything but running is not ready.
    pub phase: watch::Receiver<Phase>,
    /// The API's tokens; `None`: the API and the console are off.
    pub tokens: RwLock<Option<Arc<auth::Tokens>>>,
    /// The shared state in force (sessions, defence, backends, audit).
    pub current: Box<dyn Fn() -> Arc<Shared> + Send + Sync>,
    /// Reloads the configuration file, as SIGHUP does; `None` without one.
    pub reload: Option<Reloader>,
    /// The console's samples.
    pub history: console::History,
}

impl AdminState {
    fn ready(&self) -> bool {
        self.listening.load(Ordering::Relaxed) && *self.phase.borrow() == Phase::Running && (self.usable)()
    }

    fn tokens(&self) -> Option<Arc<auth::Tokens>> {
        self.tokens.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Loads the token file again (a reload); a broken file keeps the tokens in force.
    pub fn reload_tokens(&self, path: Option<&std::path::Path>) -> Result<(), auth::TokenError> {
        let fresh = path.map(auth::Tokens::load).transpose()?;
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = fresh.map(Arc::new);
        Ok(())
    }
}

pub(crate) fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

async fn handle(req: Request<Incoming>, state: Arc<AdminState>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    Ok(match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => {
            text(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", state.metrics.render())
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") if state.ready() => text(StatusCode::OK, "text/plain", "ready\n"),
        (&Method::GET, "/readyz") => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        (_, p) if p == "/" || p.starts_with("/console") || p.starts_with("/api/") => match state.tokens() {
            None => text(StatusCode::NOT_FOUND, "text/plain", "not found (set [admin] token_file for the API)\n"),
            // The page itself holds nothing: it asks for a token and sends it with every API call.
            Some(_) if !p.starts_with("/api/") => console::page(req.method(), p),
            Some(tokens) => {
                let caller = tokens.check(req.headers().get(hyper::header::AUTHORIZATION).map(|v| v.as_bytes()));
                match caller {
                    None => api::unauthorized(),
                    Some(caller) => {
                        let method = req.method().clone();
                        let query = req.uri().query().unwrap_or("").to_owned();
                        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                            Ok(body) => body.to_bytes(),
                            Err(_) => return Ok(api::error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")),
                        };
                        let call = api::Call { method: &method, path: &path, query: &query, body: &body };
                        api::handle(&state, &caller, call).await
                    }
                }
            }
        },
        (&Method::GET, _) => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n"),
    })
}

/// Serves until the proxy aborts what is left of its sessions; samples the console's history meanwhile.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, mut phase: watch::Receiver<Phase>) {
    tokio::spawn(console::sample(Arc::clone(&state), phase.clone()));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = crate::lifecycle::phase_reached(&mut phase, |p| *p == Phase::Aborted) => return,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, Arc::clone(&state)));
            let connection = http1::Builder::new().serve_connection(TokioIo::new(tcp), service);
            // A bounded life: admin calls are short.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), connection).await;
        });
    }
}
