//! What every session shares: configuration, routes, TLS contexts, the defence, metrics and the audit log,
//! built once by the application before binding (and again on reload).

use std::sync::Arc;

use crate::config::Config;
use crate::route::Router;
use crate::route::health::Circuits;
use crate::security::Defence;
use crate::telemetry::audit::{AuditEvent, AuditLog};
use crate::telemetry::metrics::Metrics;

/// A session's view of the proxy; a reload builds a new one, sessions keep the one they started with.
pub struct Shared {
    pub config: Config,
    pub router: Router,
    pub acceptor: crate::net::tls::stream::Acceptor,
    pub backend_tls: Arc<rustls::ClientConfig>,
    pub defence: Arc<Defence>,
    /// The user lookup over HTTP, when `[route.lookup]` is set.
    pub lookup: Option<crate::net::lookup::Lookup>,
    /// Backend circuits; kept across reloads.
    pub circuits: Arc<Circuits>,
    pub metrics: Arc<Metrics>,
    /// The audit log, unless switched off.
    pub audit: Option<Arc<AuditLog>>,
    /// TLS session tickets (keys rotate by themselves); kept across reloads, so that clients resume.
    pub ticketer: Arc<dyn rustls::server::ProducesTickets>,
    /// The logged-in sessions (the admin API's); kept across reloads.
    pub sessions: Arc<crate::registry::Registry>,
    /// The mailbox problems seen (stale passwords, quota, resyncs, slow mailboxes); kept across reloads.
    pub signals: Arc<crate::signals::Signals>,
    /// Ready backend connections; kept across reloads.
    pub pool: Arc<crate::net::pool::Pool>,
    /// The attempts waiting at each backend (evidence of a hang); kept across reloads.
    pub outliers: Arc<crate::net::outliers::Outliers>,
}

impl Shared {
    /// Records an audit event when the audit log is on.
    pub fn audit(&self, event: &AuditEvent) {
        if let Some(audit) = &self.audit {
            audit.record(event);
        }
    }
}
