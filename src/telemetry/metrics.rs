//! Prometheus metrics: typed handles on a registry that is created once and passed down (no globals).
//! Every label has a bounded set of values: command names come from a fixed list, reasons and kinds from
//! enums, backends from the configuration.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// All of imapgate's metrics.
pub struct Metrics {
    registry: Registry,
    pub connections_accepted: IntCounter,
    pub connections_active: IntGauge,
    pub connections_refused: IntCounterVec,
    pub tls_handshake_seconds: Histogram,
    pub tls_failures: IntCounterVec,
    pub proxy_headers: IntCounterVec,
    /// Connections on a port shared with a web server, by where their ClientHello sent them (`SHARED_ROUTES`).
    pub shared_hellos: IntCounterVec,
    /// Connections passed through to a web server, by target (its configured address) and result.
    pub passthrough: IntCounterVec,
    pub passthrough_bytes: IntCounterVec,
    pub tls_sessions: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub auth_attempts: IntCounterVec,
    pub bans_active: IntGauge,
    pub tarpit_seconds: Histogram,
    pub backend_connect_seconds: HistogramVec,
    pub backend_errors: IntCounterVec,
    pub backend_step_seconds: HistogramVec,
    pub backend_up: IntGaugeVec,
    pub backend_sessions: IntGaugeVec,
    pub commands: IntCounterVec,
    pub command_seconds: HistogramVec,
    pub idle_seconds: Histogram,
    pub bytes: IntCounterVec,
    pub session_seconds: Histogram,
    pub observer_desync: IntCounter,
    pub session_ends: IntCounterVec,
    pub circuit_transitions: IntCounterVec,
    pub health_checks: IntCounterVec,
    pub pool_members_usable: IntGaugeVec,
    pub lookups: IntCounterVec,
    pub lookup_seconds: Histogram,
    pub audit_dropped: IntCounter,
    pub tls_certificate_expiry: IntGaugeVec,
    pub state_store_up: IntGaugeVec,
    pub state_store_errors: IntCounterVec,
    pub state_store_seconds: HistogramVec,
    pub state_store_bans_received: IntCounter,
    pub config_reloads: IntCounterVec,
    pub command_responses: IntCounterVec,
    pub select_seconds: HistogramVec,
    pub resync_suspected: IntCounter,
    pub clients: IntCounterVec,
    pub backend_pool_ready: IntGaugeVec,
    pub backend_pool_logins: IntCounterVec,
    pub build_info: IntGaugeVec,
}

/// Label values known in advance (see `Refusal::reason`, `Kind::as_str` and the session's TLS reasons).
const REFUSALS: &[&str] = &[
    "max_connections",
    "deny_list",
    "banned",
    "prefix_connections",
    "connection_rate",
    "account_blocked",
    "repeated_failure",
    "unfamiliar_closed",
    "busy",
    "state_unavailable",
];
/// What a connection's PROXY protocol header said, or why it was closed (see `net::proxy_protocol`).
const PROXY_RESULTS: &[&str] =
    &["v1", "v2", "none", "untrusted", "missing", "oversized", "invalid", "timeout", "local", "io"];
const TLS_FAILURES: &[&str] =
    &["timeout", "alpn", "incompatible", "alert_received", "protocol", "tls_error", "closed", "io"];
const MECHANISMS: &[&str] = &["LOGIN-command", "PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"];
const AUTH_RESULTS: &[&str] = &[
    "success",
    "bad_credentials",
    "backend_error",
    "banned",
    "account_blocked",
    "repeated_failure",
    "unfamiliar_closed",
    "busy",
    "state_unavailable",
];
/// How sessions end, by stage (see `net::session` and `net::relay`).
pub const SESSION_ENDS: &[(&str, &str)] = &[
    ("tls", "handshake_failed"),
    ("preauth", "client_closed"),
    ("preauth", "client_error"),
    ("preauth", "write_timeout"),
    ("preauth", "logout"),
    ("preauth", "bad_commands"),
    ("preauth", "framing"),
    ("preauth", "idle_timeout"),
    ("preauth", "time_limit"),
    ("preauth", "shutdown"),
    ("relay", "client_logout"),
    ("relay", "client_closed"),
    ("relay", "backend_closed"),
    ("relay", "idle_timeout"),
    ("relay", "shutdown"),
    ("relay", "client_write_timeout"),
    ("relay", "backend_write_timeout"),
    ("relay", "client_error"),
    ("relay", "backend_error"),
    ("relay", "guard_lost"),
    ("relay", "kicked"),
    ("relay", "leaving"),
    // A bug of ours: the session's task panicked (`telemetry::panics`), before or after login.
    ("preauth", "internal_error"),
    ("relay", "internal_error"),
];
/// `imapgate_shared_listen_hellos_total`'s routes (`net::shared_port`).
pub const SHARED_ROUTES: &[&str] =
    &["imap", "web", "not_tls", "malformed", "oversized", "timeout", "closed", "refused"];
/// `imapgate_backend_errors_total`'s kinds (`failure::Kind::as_str`): each step's deadline has its own.
const BACKEND_ERRORS: &[&str] = &[
    "connect",
    "connect_timeout",
    "greeting_timeout",
    "tls_timeout",
    "capability_timeout",
    "login_timeout",
    "ejected",
    "tls",
    "starttls",
    "protocol",
    "tempfail",
    "circuit_open",
];
/// Circuit states (see `route::health::State`).
pub const CIRCUIT_STATES: &[&str] = &["closed", "suspect", "open", "half_open"];
/// Steps of a backend login (`imap::backend_login::Step::as_str`).
const BACKEND_STEPS: &[&str] = &["connect", "greeting", "tls", "capability", "credentials"];
/// `imapgate_tls_handshakes_total`'s labels: which connection, and whether a ticket spared the certificate.
const TLS_LEGS: &[&str] = &["client", "backend"];
const HANDSHAKE_KINDS: &[&str] = &["full", "resumed"];

/// Latency buckets from 1 ms to 60 s.
/// Sub-millisecond calls (a store on the local network).
const FAST: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
const LATENCY: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Long durations: IDLE and whole sessions, 1 s to 1 day.
const LONG: &[f64] = &[1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4.0 * 3600.0, 12.0 * 3600.0, 86400.0];

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| unreachable_metric(name, e));
    register(registry, Box::new(c.clone()));
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| unreachable_metric(name, e));
    register(registry, Box::new(c.clone()));
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| unreachable_metric(name, e));
    register(registry, Box::new(g.clone()));
    g
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| unreachable_metric(name, e));
    register(registry, Box::new(g.clone()));
    g
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .unwrap_or_else(|e| unreachable_metric(name, e));
    register(registry, Box::new(h.clone()));
    h
}

fn histogram_vec(registry: &Registry, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
        .unwrap_or_else(|e| unreachable_metric(name, e));
    register(registry, Box::new(h.clone()));
    h
}

fn register(registry: &Registry, collector: Box<dyn prometheus::core::Collector>) {
    // Names are fixed and distinct; a failure here is a programming error caught by the unit test below.
    if let Err(e) = registry.register(collector) {
        tracing::error!(error = %e, "metric registration failed");
    }
}

/// Metric definitions are constants; they are validated by the unit test, so this cannot happen at run time.
fn unreachable_metric<T>(name: &str, e: prometheus::Error) -> T {
    panic!("invalid metric definition {name}: {e}")
}

impl Metrics {
    pub fn new(backends: &[String]) -> Metrics {
        let r = Registry::new();
        let m = Metrics {
            connections_accepted: counter(&r, "imapgate_connections_accepted_total", "Client connections accepted."),
            connections_active: gauge(&r, "imapgate_connections_active", "Client connections open now."),
            connections_refused: counter_vec(
                &r,
                "imapgate_connections_refused_total",
                "Client connections refused before TLS, by reason.",
                &["reason"],
            ),
            tls_handshake_seconds: histogram(
                &r,
                "imapgate_tls_handshake_duration_seconds",
                "Client TLS handshake duration.",
                LATENCY,
            ),
            tls_failures: counter_vec(
                &r,
                "imapgate_tls_handshake_failures_total",
                "Client TLS handshakes that failed, by reason.",
                &["reason"],
            ),
            proxy_headers: counter_vec(
                &r,
                "imapgate_proxy_protocol_total",
                "Connections by what their PROXY protocol header said (none, v1, v2) or why they were closed.",
                &["result"],
            ),
            shared_hellos: counter_vec(
                &r,
                "imapgate_shared_listen_hellos_total",
                "Connections on a port shared with a web server, by route (imap, web) or why they were closed.",
                &["route"],
            ),
            passthrough: counter_vec(
                &r,
                "imapgate_passthrough_connections_total",
                "Connections passed through unterminated to a web server, by target and result.",
                &["target", "result"],
            ),
            passthrough_bytes: counter_vec(
                &r,
                "imapgate_passthrough_bytes_total",
                "Bytes passed through to and from web servers, by target and direction.",
                &["target", "direction"],
            ),
            tls_sessions: counter_vec(
                &r,
                "imapgate_tls_sessions_total",
                "Client TLS sessions established, by protocol version and SNI presence.",
                &["version", "sni"],
            ),
            tls_handshakes: counter_vec(
                &r,
                "imapgate_tls_handshakes_total",
                "TLS handshakes completed, by leg (client, backend) and kind (full, resumed).",
                &["leg", "kind"],
            ),
            auth_attempts: counter_vec(
                &r,
                "imapgate_auth_attempts_total",
                "Login attempts by mechanism and result.",
                &["mechanism", "result"],
            ),
            bans_active: gauge(&r, "imapgate_bans_active", "Prefixes banned now."),
            tarpit_seconds: histogram(
                &r,
                "imapgate_tarpit_delay_seconds",
                "Delays imposed on failed or refused logins.",
                LATENCY,
            ),
            backend_connect_seconds: histogram_vec(
                &r,
                "imapgate_backend_login_duration_seconds",
                "Backend connect, TLS and login duration.",
                &["backend"],
                LATENCY,
            ),
            backend_errors: counter_vec(
                &r,
                "imapgate_backend_errors_total",
                "Backend failures by backend and kind.",
                &["backend", "kind"],
            ),
            backend_step_seconds: histogram_vec(
                &r,
                "imapgate_backend_step_duration_seconds",
                "How long each step of a backend login or check took, when it ended in time (the data behind the step deadlines).",
                &["backend", "step"],
                LATENCY,
            ),
            backend_up: gauge_vec(
                &r,
                "imapgate_backend_up",
                "1 if the last contact with the backend worked, 0 if it failed.",
                &["backend"],
            ),
            backend_sessions: gauge_vec(
                &r,
                "imapgate_backend_sessions_active",
                "Relayed sessions per backend.",
                &["backend"],
            ),
            commands: counter_vec(
                &r,
                "imapgate_commands_total",
                "Commands after login by name and tagged status (none: the session ended first).",
                &["command", "status"],
            ),
            command_seconds: histogram_vec(
                &r,
                "imapgate_command_duration_seconds",
                "Time from a client's command to the backend's tagged response, by command (IDLE excluded).",
                &["command"],
                LATENCY,
            ),
            idle_seconds: histogram(&r, "imapgate_idle_duration_seconds", "Duration of IDLE commands.", LONG),
            bytes: counter_vec(
                &r,
                "imapgate_relayed_bytes_total",
                "Bytes relayed after login, by direction.",
                &["direction"],
            ),
            session_seconds: histogram(&r, "imapgate_session_duration_seconds", "Duration of relayed sessions.", LONG),
            observer_desync: counter(
                &r,
                "imapgate_observer_desync_total",
                "Sessions whose command observer lost track of the stream (the relay went on).",
            ),
            session_ends: counter_vec(
                &r,
                "imapgate_session_ends_total",
                "Client sessions ended, by stage (tls, preauth, relay) and reason.",
                &["stage", "reason"],
            ),
            circuit_transitions: counter_vec(
                &r,
                "imapgate_circuit_transitions_total",
                "Backend circuit breaker transitions, by backend and the state entered.",
                &["backend", "state"],
            ),
            health_checks: counter_vec(
                &r,
                "imapgate_health_checks_total",
                "Active backend health checks (connect, greeting, STARTTLS, verified TLS, CAPABILITY), by result.",
                &["backend", "result"],
            ),
            pool_members_usable: gauge_vec(
                &r,
                "imapgate_pool_members_usable",
                "Members of a pool that take users and whose circuit is closed.",
                &["pool"],
            ),
            lookups: counter_vec(
                &r,
                "imapgate_lookups_total",
                "User lookups over HTTP (route.lookup), by result: ok, refused, error, cache_hit.",
                &["result"],
            ),
            lookup_seconds: histogram(
                &r,
                "imapgate_lookup_duration_seconds",
                "Duration of user lookups over HTTP (cache hits excluded).",
                LATENCY,
            ),
            audit_dropped: counter(
                &r,
                "imapgate_audit_dropped_total",
                "Audit lines dropped because the writer fell behind (its queue was full).",
            ),
            tls_certificate_expiry: gauge_vec(
                &r,
                "imapgate_tls_certificate_expiry_timestamp_seconds",
                "When each served certificate expires (Unix time), by configured name (default: the [tls] certificate).",
                &["name"],
            ),
            state_store_up: gauge_vec(
                &r,
                "imapgate_state_store_up",
                "1 while the shared defence state store ([state] redis) answers, 0 while this instance decides alone.",
                &["store"],
            ),
            state_store_errors: counter_vec(
                &r,
                "imapgate_state_store_errors_total",
                "Calls to the shared state store that failed or timed out, by operation.",
                &["op"],
            ),
            state_store_seconds: histogram_vec(
                &r,
                "imapgate_state_store_duration_seconds",
                "Duration of calls to the shared state store, by operation (view and failure are inside a login).",
                &["op"],
                FAST,
            ),
            state_store_bans_received: counter(
                &r,
                "imapgate_state_store_bans_received_total",
                "Bans issued elsewhere in the fleet that were new to this instance.",
            ),
            config_reloads: counter_vec(
                &r,
                "imapgate_config_reloads_total",
                "Configuration reloads (SIGHUP) by result.",
                &["result"],
            ),
            command_responses: counter_vec(
                &r,
                "imapgate_command_responses_total",
                "Tagged responses after login by command, status and response code (a fixed list, else other; none \
                 without a code).",
                &["command", "status", "code"],
            ),
            select_seconds: histogram_vec(
                &r,
                "imapgate_select_duration_seconds",
                "SELECT and EXAMINE latency by mailbox size class (EXISTS: lt_1k, lt_10k, lt_100k, ge_100k).",
                &["size"],
                LATENCY,
            ),
            resync_suspected: counter(
                &r,
                "imapgate_resync_suspected_total",
                "Mailboxes a client fetched whole (1:* bodies) three times within an hour: a client re-downloading \
                 everything.",
            ),
            clients: counter_vec(
                &r,
                "imapgate_clients_total",
                "Logins by client application family (from the client's ID name; none without ID).",
                &["client"],
            ),
            backend_pool_ready: gauge_vec(
                &r,
                "imapgate_backend_pool_ready",
                "Ready backend connections waiting for a login (greeted, TLS done), by backend.",
                &["backend"],
            ),
            backend_pool_logins: counter_vec(
                &r,
                "imapgate_backend_pool_logins_total",
                "Backend logins by connection: pooled (one round trip) or new (the pool was empty or off).",
                &["backend", "connection"],
            ),
            build_info: gauge_vec(&r, "imapgate_build_info", "Build information.", &["version"]),
            registry: r,
        };
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        // Known label values start at zero, so that rates and alerts work from the first scrape.
        for reason in REFUSALS {
            m.connections_refused.with_label_values(&[reason]).inc_by(0);
        }
        for reason in TLS_FAILURES {
            m.tls_failures.with_label_values(&[reason]).inc_by(0);
        }
        for leg in TLS_LEGS {
            for kind in HANDSHAKE_KINDS {
                m.tls_handshakes.with_label_values(&[leg, kind]).inc_by(0);
            }
        }
        for result in PROXY_RESULTS {
            m.proxy_headers.with_label_values(&[result]).inc_by(0);
        }
        for route in SHARED_ROUTES {
            m.shared_hellos.with_label_values(&[route]).inc_by(0);
        }
        for mechanism in MECHANISMS {
            for result in AUTH_RESULTS {
                m.auth_attempts.with_label_values(&[mechanism, result]).inc_by(0);
            }
        }
        for result in ["ok", "refused", "error", "cache_hit"] {
            m.lookups.with_label_values(&[result]).inc_by(0);
        }
        for (stage, reason) in SESSION_ENDS {
            m.session_ends.with_label_values(&[stage, reason]).inc_by(0);
        }
        for result in ["success", "failure"] {
            m.config_reloads.with_label_values(&[result]).inc_by(0);
        }
        for client in crate::signals::CLIENT_FAMILIES {
            m.clients.with_label_values(&[client]).inc_by(0);
        }
        for size in crate::imap::mailbox::SIZE_CLASSES {
            let _ = m.select_seconds.with_label_values(&[size]);
        }
        // The responses the quota alert watches.
        for command in ["APPEND", "COPY", "MOVE", "UID COPY", "UID MOVE"] {
            m.command_responses.with_label_values(&[command, "NO", "OVERQUOTA"]).inc_by(0);
        }
        for direction in ["client_to_backend", "backend_to_client"] {
            m.bytes.with_label_values(&[direction]).inc_by(0);
        }
        for backend in backends {
            m.backend_pool_ready.with_label_values(&[backend]).set(0);
            for connection in ["pooled", "new"] {
                m.backend_pool_logins.with_label_values(&[backend.as_str(), connection]).inc_by(0);
            }
            m.backend_sessions.with_label_values(&[backend]).set(0);
            m.backend_up.with_label_values(&[backend]).set(0);
            for state in CIRCUIT_STATES {
                m.circuit_transitions.with_label_values(&[backend.as_str(), state]).inc_by(0);
            }
            for result in ["success", "failure", "abandoned"] {
                m.health_checks.with_label_values(&[backend.as_str(), result]).inc_by(0);
            }
            for kind in BACKEND_ERRORS {
                m.backend_errors.with_label_values(&[backend.as_str(), kind]).inc_by(0);
            }
            for step in BACKEND_STEPS {
                let _ = m.backend_step_seconds.with_label_values(&[backend.as_str(), step]);
            }
        }
        m
    }

    /// The Prometheus text exposition.
    /// Every family's current values (what `render` encodes), for in-process readers such as the console.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_metrics_register_and_render() {
        let m = Metrics::new(&["mbox1".into()]);
        m.commands.with_label_values(&["UID FETCH", "OK"]).inc();
        m.connections_refused.with_label_values(&["banned"]).inc();
        m.tls_failures.with_label_values(&["alpn"]).inc();
        m.tls_sessions.with_label_values(&["TLSv1.3", "yes"]).inc();
        m.auth_attempts.with_label_values(&["PLAIN", "success"]).inc();
        m.backend_connect_seconds.with_label_values(&["mbox1"]).observe(0.01);
        m.backend_errors.with_label_values(&["mbox1", "tls"]).inc();
        m.backend_up.with_label_values(&["mbox1"]).set(1);
        m.command_seconds.with_label_values(&["UID FETCH"]).observe(0.01);
        m.bytes.with_label_values(&["client_to_backend"]).inc();
        m.state_store_up.with_label_values(&["redis"]).set(1);
        m.state_store_seconds.with_label_values(&["view"]).observe(0.0002);
        let text = m.render();
        assert!(text.contains("imapgate_build_info{version="), "{text}");
        assert!(text.contains("imapgate_commands_total{command=\"UID FETCH\",status=\"OK\"} 1"), "{text}");
        assert!(text.contains("imapgate_backend_sessions_active{backend=\"mbox1\"} 0"), "{text}");
        // Every metric registered once: each family appears exactly once with its HELP line.
        let families = text.lines().filter(|l| l.starts_with("# HELP imapgate_")).count();
        // imapgate_pool_members_usable appears once a pool is configured (its labels are pool names), the
        // state store's errors once one fails.
        // The passthrough families appear with their first target.
        assert_eq!(families, 40, "{text}");
        assert!(text.contains("imapgate_tls_handshakes_total{kind=\"resumed\",leg=\"backend\"} 0"), "{text}");
    }
}
