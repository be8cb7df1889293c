//! Backend health: active checks on the login's own path (see `upstream::check`) for every backend in
//! parallel, at the configured interval with jitter, feeding the circuits of `route::health` together with
//! real logins. Circuit states drive `imapgate_backend_up`, the pool gauges and readiness.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

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
        State::HalfOpen => {
            tracing::info!(event = "circuit_half_open", backend = %t.backend, "backend circuit half-open: probing")
        }
        State::Closed => {
            tracing::info!(event = "circuit_closed", backend = %t.backend, "backend circuit closed: in use again")
        }
    }
    update_gauges(shared);
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

/// Checks every backend once (those whose circuit lets a probe through), all in parallel.
pub async fn check_all(shared: &Arc<Shared>) {
    let mut checks = tokio::task::JoinSet::new();
    for index in 0..shared.config.backends.len() {
        let shared = Arc::clone(shared);
        checks.spawn(async move {
            let Some(backend) = shared.router.backend(index) else { return };
            let name = backend.name.as_str();
            let (allowed, transition) = shared.circuits.allow(backend, Instant::now());
            record(&shared, transition);
            if !allowed {
                return;
            }
            let result = upstream::check(&Leg::new(backend, &shared)).await;
            let now = Instant::now();
            let (label, transition) = match &result {
                Ok(()) => ("success", shared.circuits.success(backend, now)),
                Err(failure) => {
                    tracing::debug!(backend = name, error = %failure, "health check failed");
                    ("failure", shared.circuits.failure(backend, now))
                }
            };
            shared.metrics.health_checks.with_label_values(&[name, label]).inc();
            record(&shared, transition);
        });
    }
    while checks.join_next().await.is_some() {}
    update_gauges(shared);
}

/// Checks at the configured interval (plus up to 20% jitter, so that a fleet does not check in step)
/// until the proxy stops. `current` gives the configuration in force (a reload may change backends).
pub async fn run(current: impl Fn() -> Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    loop {
        let shared = current();
        check_all(&shared).await;
        let jitter = shared.config.health.interval.mul_f64(rand::random::<f64>() * 0.2);
        let wait = shared.config.health.interval + jitter;
        drop(shared);
        tokio::select! {
            () = tokio::time::sleep(wait.max(Duration::from_millis(100))) => {}
            () = crate::lifecycle::stopping(&mut phase) => return,
        }
    }
}
