//! The admin HTTP server (hyper): `GET /metrics` (Prometheus text), `GET /healthz` (process alive),
//! `GET /readyz` (listeners bound, not shutting down, and every pool with a usable member, or without pools
//! a backend whose circuit is closed). Loopback by
//! default. It keeps serving while the proxy drains, so that a balancer sees "not ready" (503) and
//! Prometheus still scrapes the last figures, and stops when what is left is aborted.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::metrics::Metrics;
use crate::lifecycle::Phase;

/// What the admin endpoints report on.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Set once every listener is bound.
    pub listening: AtomicBool,
    /// Whether the backends in force can serve (every pool has a usable member; see `net::health`).
    pub usable: Box<dyn Fn() -> bool + Send + Sync>,
    /// The proxy's phase: anything but running is not ready.
    pub phase: watch::Receiver<Phase>,
}

impl AdminState {
    fn ready(&self) -> bool {
        self.listening.load(Ordering::Relaxed) && *self.phase.borrow() == Phase::Running && (self.usable)()
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

async fn handle(req: Request<Incoming>, state: Arc<AdminState>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            text(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", state.metrics.render())
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/readyz") if state.ready() => text(StatusCode::OK, "text/plain", "ready\n".into()),
        (&Method::GET, "/readyz") => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n".into()),
        (&Method::GET, _) => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n".into()),
    })
}

/// Serves until the proxy aborts what is left of its sessions.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, mut phase: watch::Receiver<Phase>) {
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
            // A bounded life: admin scrapes are short.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), connection).await;
        });
    }
}
