//! A circuit per backend, fed by active health checks and by real logins: after `failures` consecutive
//! failures it opens (no dialling: logins routed there fail in milliseconds or fail over), and after a
//! back-off that doubles up to a ceiling it half-opens and lets one probe through (a check or a login);
//! a success closes it. State is keyed by backend name and address: a reload keeps it, unless it moves the
//! backend elsewhere. Sans-IO: the caller passes the time.
//!
//! A hung backend is found sooner than a dead one: a timeout of a step a healthy server answers at once
//! counts together with the other attempts stuck at the same backend at that moment (outlier detection,
//! as Envoy's consecutive gateway failures and linkerd's failure accrual, with the waiting ones as
//! evidence too). When they reach `failures`, the circuit turns suspect: no login is sent there, the
//! caller tells the waiting attempts to give up, and the active checker probes it at once (a suspect
//! circuit lets a check through without waiting out a back-off); the probe closes it or opens it with the
//! first back-off, and half-open probing goes on from there.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{Backend, HealthConfig};

/// The circuit's key: name and address (also the key of `net::outliers`' waiting attempts).
pub fn key(backend: &Backend) -> String {
    format!("{}\0{}:{}", backend.name, backend.host, backend.port)
}

/// A circuit's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Used; counts consecutive failures.
    Closed,
    /// Found hung by concurrent evidence: not dialled by logins; the checker probes it at once.
    Suspect,
    /// Not dialled until the back-off is over.
    Open,
    /// One probe is allowed; its outcome closes or reopens the circuit.
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Suspect => "suspect",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Clone)]
struct Breaker {
    state: State,
    /// A check or a login succeeded since the last failure: known good, not only "not failed yet".
    verified: bool,
    failures: u32,
    backoff: Duration,
    /// Open or suspect: when a login may go as the probe. Half-open: when the probe in flight is given up on.
    until: Instant,
    /// The probe in flight is a suspect's first: its failure opens with the first back-off, not twice it.
    first_probe: bool,
}

/// A change of state, for metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub backend: String,
    pub to: State,
    /// Open: how long until the next probe.
    pub backoff: Duration,
}

/// All backends' circuits.
#[derive(Debug)]
pub struct Circuits {
    config: Mutex<HealthConfig>,
    breakers: Mutex<HashMap<String, Breaker>>,
}

/// How long a half-open probe may take before another is allowed.
const PROBE_LIMIT: Duration = Duration::from_secs(30);

impl Circuits {
    pub fn new(config: HealthConfig) -> Self {
        Self { config: Mutex::new(config), breakers: Mutex::new(HashMap::new()) }
    }

    /// New settings (reload); states stay.
    pub fn reconfigure(&self, config: HealthConfig) {
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = config;
    }

    fn with<T>(&self, backend: &Backend, now: Instant, f: impl FnOnce(&mut Breaker, &HealthConfig) -> T) -> T {
        let config = self.config.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut breakers = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        let breaker = breakers.entry(key(backend)).or_insert_with(|| Breaker {
            state: State::Closed,
            verified: false,
            failures: 0,
            backoff: config.backoff,
            until: now,
            first_probe: false,
        });
        f(breaker, &config)
    }

    /// The state now, without changing it.
    pub fn state(&self, backend: &Backend) -> State {
        let breakers = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        breakers.get(&key(backend)).map_or(State::Closed, |b| b.state)
    }

    /// Closed and proven by a success since the last failure: what readiness and `imapgate_backend_up`
    /// report (a backend never reached yet is not up, though logins may still try it).
    pub fn healthy(&self, backend: &Backend) -> bool {
        let breakers = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        breakers.get(&key(backend)).is_some_and(|b| b.state == State::Closed && b.verified)
    }

    /// Whether a login may dial `backend` now. An open (or suspect) circuit whose back-off is over
    /// half-opens and lets this one attempt through as its probe.
    pub fn allow(&self, backend: &Backend, now: Instant) -> (bool, Option<Transition>) {
        self.admit(backend, now, false)
    }

    /// Whether a health check may dial `backend` now: as a login, and a suspect circuit at once.
    pub fn allow_check(&self, backend: &Backend, now: Instant) -> (bool, Option<Transition>) {
        self.admit(backend, now, true)
    }

    fn admit(&self, backend: &Backend, now: Instant, check: bool) -> (bool, Option<Transition>) {
        self.with(backend, now, |b, _| match b.state {
            State::Closed => (true, None),
            State::Suspect | State::Open | State::HalfOpen
                if now >= b.until || (check && b.state == State::Suspect) =>
            {
                b.first_probe = b.state == State::Suspect;
                let changed = b.state != State::HalfOpen;
                b.state = State::HalfOpen;
                b.until = now + PROBE_LIMIT;
                let transition = changed.then(|| Transition {
                    backend: backend.name.clone(),
                    to: State::HalfOpen,
                    backoff: Duration::ZERO,
                });
                (true, transition)
            }
            State::Suspect | State::Open | State::HalfOpen => (false, None),
        })
    }

    /// A login or a check reached the backend and it behaved.
    pub fn success(&self, backend: &Backend, now: Instant) -> Option<Transition> {
        self.with(backend, now, |b, config| {
            let changed = b.state != State::Closed;
            *b = Breaker {
                state: State::Closed,
                verified: true,
                failures: 0,
                backoff: config.backoff,
                until: now,
                first_probe: false,
            };
            changed.then(|| Transition { backend: backend.name.clone(), to: State::Closed, backoff: Duration::ZERO })
        })
    }

    /// A connect, TLS, timeout or protocol failure of a login or a check. `stuck`: for a hang (a short
    /// step's timeout), the other attempts waiting at `backend` long enough to count as evidence too (0
    /// otherwise). A closed circuit opens after `failures` consecutive failures, and turns suspect at once
    /// when this failure and the stuck attempts together reach that number.
    pub fn failure(&self, backend: &Backend, now: Instant, stuck: u32) -> Option<Transition> {
        self.with(backend, now, |b, config| {
            b.failures = b.failures.saturating_add(1);
            b.verified = false;
            let to = match b.state {
                State::Closed if stuck > 0 && b.failures.saturating_add(stuck) >= config.failures => State::Suspect,
                State::Closed if b.failures >= config.failures => State::Open,
                State::Closed => return None,
                // The probe failed: open again, waiting twice as long (a suspect's first probe: the first
                // back-off).
                State::HalfOpen => {
                    if !std::mem::take(&mut b.first_probe) {
                        b.backoff = (b.backoff * 2).min(config.backoff_max);
                    }
                    State::Open
                }
                State::Suspect | State::Open => return None,
            };
            b.state = to;
            b.until = now + b.backoff;
            Some(Transition { backend: backend.name.clone(), to, backoff: b.backoff })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str) -> Backend {
        Backend { name: name.into(), host: "10.0.0.1".into(), port: 143, tls_name: "x".into() }
    }

    fn circuits() -> Circuits {
        Circuits::new(HealthConfig {
            interval: Duration::from_secs(5),
            failures: 3,
            backoff: Duration::from_secs(5),
            backoff_max: Duration::from_secs(20),
        })
    }

    #[test]
    fn opens_after_consecutive_failures_and_half_opens_after_the_backoff() {
        let c = circuits();
        let t = Instant::now();
        assert!(!c.healthy(&b("a")), "not proven yet");
        assert_eq!(c.failure(&b("a"), t, 0), None);
        assert_eq!(c.success(&b("a"), t), None, "a success resets the count");
        assert!(c.healthy(&b("a")));
        assert_eq!(c.failure(&b("a"), t, 0), None);
        assert_eq!(c.failure(&b("a"), t, 0), None);
        let opened = c.failure(&b("a"), t, 0).unwrap();
        assert_eq!((opened.to, opened.backoff), (State::Open, Duration::from_secs(5)));
        assert_eq!(c.allow(&b("a"), t + Duration::from_secs(4)), (false, None));
        assert!(c.allow(&b("b"), t).0, "other backends are not affected");
        // The back-off is over: one probe goes, the next waits for its outcome.
        let (allowed, transition) = c.allow(&b("a"), t + Duration::from_secs(5));
        assert!(allowed);
        assert_eq!(transition.unwrap().to, State::HalfOpen);
        assert!(!c.allow(&b("a"), t + Duration::from_secs(6)).0);
        // The probe fails: open for twice as long, then up to the ceiling.
        let t2 = t + Duration::from_secs(6);
        assert_eq!(c.failure(&b("a"), t2, 0).unwrap().backoff, Duration::from_secs(10));
        assert!(!c.allow(&b("a"), t2 + Duration::from_secs(9)).0);
        assert!(c.allow(&b("a"), t2 + Duration::from_secs(10)).0);
        assert_eq!(c.failure(&b("a"), t2 + Duration::from_secs(10), 0).unwrap().backoff, Duration::from_secs(20));
        assert!(c.allow(&b("a"), t2 + Duration::from_secs(30)).0);
        assert_eq!(c.failure(&b("a"), t2 + Duration::from_secs(30), 0).unwrap().backoff, Duration::from_secs(20));
        // A success closes it and resets the back-off.
        assert!(c.allow(&b("a"), t2 + Duration::from_secs(50)).0);
        assert_eq!(c.success(&b("a"), t2 + Duration::from_secs(50)).unwrap().to, State::Closed);
        assert_eq!(c.state(&b("a")), State::Closed);
        // The same name at another address (a reload moved it) starts afresh.
        let moved = Backend { host: "10.0.0.2".into(), ..b("a") };
        assert!(!c.healthy(&moved));
        for _ in 0..2 {
            c.failure(&b("a"), t2 + Duration::from_secs(51), 0);
        }
        assert_eq!(c.failure(&b("a"), t2 + Duration::from_secs(51), 0).unwrap().backoff, Duration::from_secs(5));
    }

    #[test]
    fn concurrent_timeouts_make_a_backend_suspect_at_once() {
        let c = circuits();
        let t = Instant::now();
        c.success(&b("a"), t);
        // A lone timeout is one failure of three.
        assert_eq!(c.failure(&b("a"), t, 0), None);
        c.success(&b("a"), t);
        // A timeout while two others are stuck there: three pieces of evidence, suspect at once.
        let suspect = c.failure(&b("a"), t, 2).unwrap();
        assert_eq!((suspect.to, c.state(&b("a"))), (State::Suspect, State::Suspect));
        assert!(!c.healthy(&b("a")));
        // Logins are not sent there; the checker probes at once; further evidence changes nothing.
        assert_eq!(c.allow(&b("a"), t), (false, None));
        assert_eq!(c.failure(&b("a"), t, 5), None);
        let (allowed, probing) = c.allow_check(&b("a"), t);
        assert!(allowed);
        assert_eq!(probing.unwrap().to, State::HalfOpen);
        assert!(!c.allow_check(&b("a"), t).0, "one probe at a time");
        // The probe failed: open with the first back-off (not doubled), half-open probing as before.
        let opened = c.failure(&b("a"), t, 0).unwrap();
        assert_eq!((opened.to, opened.backoff), (State::Open, Duration::from_secs(5)));
        assert!(!c.allow_check(&b("a"), t + Duration::from_secs(4)).0);
        assert!(c.allow_check(&b("a"), t + Duration::from_secs(5)).0);
        assert_eq!(c.failure(&b("a"), t + Duration::from_secs(5), 0).unwrap().backoff, Duration::from_secs(10));
        // A suspect whose probe succeeds is closed again.
        let other = b("b");
        c.failure(&other, t, 4);
        assert!(c.allow_check(&other, t).0);
        assert_eq!(c.success(&other, t).unwrap().to, State::Closed);
        // Without a checker, a login may probe a suspect after the first back-off.
        let third = b("c");
        c.failure(&third, t, 3);
        assert!(!c.allow(&third, t + Duration::from_secs(4)).0);
        assert!(c.allow(&third, t + Duration::from_secs(5)).0);
    }
}
