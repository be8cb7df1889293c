//! One classification of what went wrong with a login attempt: which side failed and how. The same value
//! decides the client's reply, the log fields and (later) the metric label.

use std::fmt;

use crate::imap::backend_login::Step;
use crate::imap::reply::Rejection;

/// Which side a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client (downstream): e.g. wrong credentials.
    Client,
    /// The backend (upstream): unreachable, bad TLS, protocol violations.
    Backend,
    /// The proxy itself: configuration, routing, internal errors.
    Proxy,
}

/// What kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The backend could not be reached (DNS, TCP connect).
    Connect,
    /// A step of the backend login took longer than its deadline (`[backend_tls]`).
    Timeout(Step),
    /// Given up on while waiting at a backend that other attempts had just found hung (its circuit turned
    /// suspect): not evidence of its own, so not counted again.
    Ejected,
    /// The TLS handshake with the backend failed (untrusted chain, wrong name, ...).
    Tls,
    /// The backend did not offer STARTTLS, refused it, or sent bytes after its OK.
    Starttls,
    /// The backend broke the protocol (PREAUTH greeting, BYE, malformed or unexpected responses).
    Protocol,
    /// The backend rejected the credentials.
    AuthFailed,
    /// The backend answered the login with a temporary failure (`[UNAVAILABLE]`, `[SERVERBUG]`, ...).
    TempFail,
    /// No backend is routed for this user.
    NoRoute,
    /// The backend's circuit is open: it was not dialled.
    CircuitOpen,
    /// The user lookup failed (service down or slow, or an answer naming a server not allowed).
    Lookup,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Connect => "connect",
            Kind::Timeout(step) => match step {
                Step::Connect => "connect_timeout",
                Step::Greeting => "greeting_timeout",
                Step::Tls => "tls_timeout",
                Step::Capabilities => "capability_timeout",
                Step::Credentials => "login_timeout",
            },
            Kind::Ejected => "ejected",
            Kind::Tls => "tls",
            Kind::Starttls => "starttls",
            Kind::Protocol => "protocol",
            Kind::AuthFailed => "auth_failed",
            Kind::TempFail => "tempfail",
            Kind::NoRoute => "no_route",
            Kind::CircuitOpen => "circuit_open",
            Kind::Lookup => "lookup",
        }
    }
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
            Side::Proxy => "proxy",
        }
    }
}

/// A classified failure with a detail for the proxy's log (never shown to the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub side: Side,
    pub kind: Kind,
    pub detail: String,
    /// A refused OAuth login's error challenge from the backend (base64 JSON), played back to the client.
    pub challenge: Option<String>,
}

impl Failure {
    pub fn backend(kind: Kind, detail: impl Into<String>) -> Self {
        Self { side: Side::Backend, kind, detail: detail.into(), challenge: None }
    }

    /// What the client is told. Wrong credentials and unrouted users look the same, so the reply does not
    /// reveal which accounts exist; everything else is a temporary failure.
    pub fn rejection(&self) -> Rejection {
        match self.kind {
            Kind::AuthFailed | Kind::NoRoute => Rejection::AUTHENTICATION_FAILED,
            _ => Rejection::UNAVAILABLE,
        }
    }

    /// Whether the credentials were wrong or the user unknown: counted by the defence and tarpitted alike,
    /// so that an unknown user is answered no faster than a known one.
    pub fn is_auth_failure(&self) -> bool {
        matches!(self.kind, Kind::AuthFailed | Kind::NoRoute)
    }

    /// A sign that the backend is unusable (its circuit counts it): unreachable, slow, bad TLS, broken
    /// protocol. Wrong credentials and temporary refusals come from a backend that works.
    pub fn counts_against_backend(&self) -> bool {
        self.side == Side::Backend
            && matches!(self.kind, Kind::Connect | Kind::Timeout(_) | Kind::Tls | Kind::Starttls | Kind::Protocol)
    }

    /// A sign that the backend hangs: a step a healthy server answers at once did not end in time. Such
    /// timeouts count together with the other attempts stuck at the same backend (`route::health`).
    pub fn is_hang(&self) -> bool {
        self.side == Side::Backend && matches!(self.kind, Kind::Timeout(step) if step.is_short())
    }

    /// The `result` label of `imapgate_auth_attempts_total` and of the audit log.
    pub fn result(&self) -> &'static str {
        match self.kind {
            Kind::AuthFailed | Kind::NoRoute => "bad_credentials",
            _ => "backend_error",
        }
    }

    /// The audit event: the backend's trouble or the client's failure.
    pub fn audit_event(&self) -> &'static str {
        if self.side == Side::Backend { "backend_error" } else { "auth_failure" }
    }

    /// `side/kind`, the audit log's reason.
    pub fn reason(&self) -> String {
        format!("{}/{}", self.side.as_str(), self.kind.as_str())
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.side.as_str(), self.kind.as_str(), self.detail)
    }
}

impl std::error::Error for Failure {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_decides_the_reply() {
        assert_eq!(Failure::backend(Kind::Connect, "refused").rejection(), Rejection::UNAVAILABLE);
        assert_eq!(Failure::backend(Kind::Tls, "bad cert").rejection(), Rejection::UNAVAILABLE);
        let auth = Failure { side: Side::Client, kind: Kind::AuthFailed, detail: String::new(), challenge: None };
        assert_eq!(auth.rejection(), Rejection::AUTHENTICATION_FAILED);
        let unrouted = Failure { side: Side::Proxy, kind: Kind::NoRoute, detail: String::new(), challenge: None };
        assert_eq!(unrouted.rejection(), Rejection::AUTHENTICATION_FAILED);
        assert_eq!(auth.to_string(), "client auth_failed: ");
        assert_eq!(
            (auth.result(), auth.audit_event(), auth.reason().as_str()),
            ("bad_credentials", "auth_failure", "client/auth_failed")
        );
        let hung = Failure::backend(Kind::Timeout(Step::Greeting), "x");
        assert!(hung.is_hang() && hung.counts_against_backend());
        assert_eq!((hung.rejection(), hung.reason().as_str()), (Rejection::UNAVAILABLE, "backend/greeting_timeout"));
        let slow_auth = Failure::backend(Kind::Timeout(Step::Credentials), "x");
        assert!(!slow_auth.is_hang() && slow_auth.counts_against_backend());
        let ejected = Failure::backend(Kind::Ejected, "x");
        assert!(!ejected.is_hang() && !ejected.counts_against_backend() && !ejected.is_auth_failure());
        assert_eq!(ejected.result(), "backend_error");
        let tls = Failure::backend(Kind::Tls, "x");
        assert_eq!(
            (tls.result(), tls.audit_event(), tls.reason().as_str()),
            ("backend_error", "backend_error", "backend/tls")
        );
    }
}
