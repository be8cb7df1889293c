//! Backend health: active checks on the login's own path (see `upstream::check`) for every backend in
//! parallel, at the configured interval with jitter, feeding the circuits of `route::health` together with
//! real logins. Circuit states drive `imapgate_backend_up`, the pool gauges and readiness. A backend that
//! turns suspect (found hung by concurrent evidence, see `route::health`) is probed at once, and the
//! attempts still waiting there are told to give up (`net::outliers`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::Backend;
use crate::failure::{Failure, Kind};
use crate::lifecycle::Phase;
use crate::net::Shared;
use crate::net::upstream::{self, Leg};
use crate::route::health::{State, Transition};

/// Counts and logs a circuit transition, and sets the backend's `up` gauge from it.
pub fn record(shared: &Shared, transition: Option<Transition>) {
    let Some(t) = transition else { return };
    let metrics = &shared.metrics;
    metrics.circuit_transitions.with_label_values(&[&t.backend, t.to.as_str()]).inc();
    match t.to {
        State::Open => tracing::warn!(
            event = "circuit_open",
            backend = %t.backend,
            backoff_ms = t.backoff.as_millis() as u64,
            "backend circuit open: not dialled until a probe succeeds"
        ),
        State::Suspect => tracing::warn!(
            event = "circuit_suspect",
            backend = %t.backend,
            "backend circuit suspect: not dialled; probing now"
        ),
        State::HalfOpen => {
            tracing::info!(event = "circuit_half_open", backend = %t.backend, "backend circuit half-open: probing")
        }
        State::Closed => {
            tracing::info!(event = "circuit_closed", backend = %t.backend, "backend circuit closed: in use again")
        }
    }
    update_gauges(shared);
}

/// Feeds what an attempt at a configured backend (a login or a check) ended with to its circuit. A hang
/// counts together with the attempts stuck there now; when the circuit turns suspect or opens, those are
/// told to give up and the backend's ready connections are closed. Wrong credentials and temporary
/// refusals prove the backend works; an attempt that gave up because of others' evidence adds none.
pub fn outcome(shared: &Shared, backend: &Backend, result: Result<(), &Failure>, now: Instant) {
    let transition = match result {
        Ok(()) => shared.circuits.success(backend, now),
        Err(failure) if failure.kind == Kind::Ejected => return,
        Err(failure) if failure.counts_against_backend() => {
            let stuck = if failure.is_hang() { shared.outliers.stuck(backend, now) } else { 0 };
            if failure.is_hang() {
                // Ready connections made before the hang would most likely hang as well.
                shared.pool.forget(backend);
            }
            let transition = shared.circuits.failure(backend, now, stuck);
            if let Some(t) = &transition {
                if matches!(t.to, State::Suspect | State::Open) {
                    if t.to == State::Suspect {
                        tracing::warn!(
                            event = "backend_suspect",
                            backend = %backend.name,
                            kind = failure.kind.as_str(),
                            stuck,
                            "backend hung: a step timed out while other attempts were stuck there; not used until a probe succeeds"
                        );
                    }
                    shared.outliers.eject(backend, t.to == State::Suspect);
                    shared.pool.forget(backend);
                }
            }
            transition
        }
        Err(_) => shared.circuits.success(backend, now),
    };
    record(shared, transition);
}

/// `imapgate_backend_up` (closed and proven) and `imapgate_pool_members_usable`.
fn update_gauges(shared: &Shared) {
    for backend in &shared.config.backends {
        let up = shared.circuits.healthy(backend);
        shared.metrics.backend_up.with_label_values(&[&backend.name]).set(i64::from(up));
    }
    for pool in shared.router.pools() {
        let usable = pool
            .members
            .iter()
            .filter(|m| m.weight > 0)
            .filter_map(|m| shared.router.backend(m.backend))
            .filter(|b| shared.circuits.healthy(b))
            .count();
        shared.metrics.pool_members_usable.with_label_values(&[&pool.name]).set(usable as i64);
    }
}

/// Ready when every pool has a usable member and, without pools, when any backend's circuit is closed.
pub fn ready(shared: &Shared) -> bool {
    let closed = |index: usize| shared.router.backend(index).is_some_and(|b| shared.circuits.healthy(b));
    let pools = shared.router.pools();
    if pools.is_empty() {
        return (0..shared.config.backends.len()).any(closed);
    }
    pools.iter().all(|pool| pool.members.iter().any(|m| m.weight > 0 && closed(m.backend)))
}

/// Checks every backend once (those whose circuit lets a probe through; with `only_suspects`, only
/// suspect ones), all in parallel.
pub async fn check_all(shared: &Arc<Shared>, only_suspects: bool) {
    let mut checks = tokio::task::JoinSet::new();
    for index in 0..shared.config.backends.len() {
        let shared = Arc::clone(shared);
        checks.spawn(async move {
            let Some(backend) = shared.router.backend(index) else { return };
            if only_suspects && shared.circuits.state(backend) != State::Suspect {
                return;
            }
            let name = backend.name.as_str();
            let (allowed, transition) = shared.circuits.allow_check(backend, Instant::now());
            record(&shared, transition);
            if !allowed {
                return;
            }
            let result = upstream::check(&Leg::new(backend, &shared)).await;
            let label = match &result {
                Ok(()) => "success",
                Err(failure) if failure.kind == Kind::Ejected => "abandoned",
                Err(failure) => {
                    tracing::debug!(backend = name, error = %failure, "health check failed");
                    "failure"
                }
            };
            shared.metrics.health_checks.with_label_values(&[name, label]).inc();
            outcome(&shared, backend, result.as_ref().map(|_| ()), Instant::now());
        });
    }
    while checks.join_next().await.is_some() {}
    update_gauges(shared);
}

/// Checks at the configured interval (plus up to 20% jitter, so that a fleet does not check in step)
/// until the proxy stops. `current` gives the configuration in force (a reload may change backends).
pub async fn run(current: impl Fn() -> Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    let (mut only_suspects, mut next) = (false, tokio::time::Instant::now());
    loop {
        let shared = current();
        check_all(&shared, only_suspects).await;
        if !only_suspects {
            let jitter = shared.config.health.interval.mul_f64(rand::random::<f64>() * 0.2);
            next =
                tokio::time::Instant::now() + (shared.config.health.interval + jitter).max(Duration::from_millis(100));
        }
        let outliers = Arc::clone(&shared.outliers);
        drop(shared);
        // A suspect is probed at once, between the rounds.
        tokio::select! {
            () = tokio::time::sleep_until(next) => only_suspects = false,
            () = outliers.probe_wanted() => only_suspects = true,
            () = crate::lifecycle::stopping(&mut phase) => return,
        }
    }
}
