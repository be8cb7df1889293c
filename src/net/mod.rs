//! Sockets: the TLS listener's configuration, one task per client connection, the backend leg and the
//! relay. Knows sockets, not IMAP grammar (that lives in `imap`).

pub mod proxy_protocol;
pub mod relay;
pub mod session;
pub mod tls;
pub mod upstream;

use std::sync::Arc;

use crate::config::Config;
use crate::route::Router;

/// What every session shares: configuration, routes and TLS contexts, built once before binding.
pub struct Shared {
    pub config: Config,
    pub router: Router,
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub backend_tls: Arc<rustls::ClientConfig>,
    pub defence: Arc<crate::security::Defence>,
    pub metrics: Arc<crate::telemetry::metrics::Metrics>,
    /// The audit log, unless switched off.
    pub audit: Option<Arc<crate::telemetry::audit::AuditLog>>,
}

impl Shared {
    /// Records an audit event when the audit log is on.
    pub fn audit(&self, event: &crate::telemetry::audit::AuditEvent) {
        if let Some(audit) = &self.audit {
            audit.record(event);
        }
    }
}

/// The proxy's life cycle as sessions see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving.
    Running,
    /// Shutting down gracefully: no new connections; sessions before login say BYE and close, relayed
    /// sessions carry on for the grace period.
    Draining,
    /// Grace period over: every session closes now.
    Closing,
}

/// Resolves once the phase satisfies `reached` (or the sender is gone). Returns no guard, so it can sit in
/// a `select!` of a `Send` future.
pub async fn phase_reached(phase: &mut tokio::sync::watch::Receiver<Phase>, reached: impl FnMut(&Phase) -> bool) {
    let _ = phase.wait_for(reached).await;
}
