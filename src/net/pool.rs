//! Ready backend connections: per configured backend up to `[backend_tls] pool_size` connections that are
//! connected, greeted, through STARTTLS and a verified TLS handshake, with their capabilities known
//! (`upstream::prepare`), so that a login sends its `ID` and credentials at once and waits one round trip.
//! A background task refills the pool (one preparation at a time per backend, only while the backend's
//! circuit is closed) and closes connections older than `pool_max_age` (before the backend's own pre-login
//! timeout); a login never waits for it: an empty pool means a new connection, as without one. A login
//! takes a ready connection only while the backend's circuit is closed, and a circuit that turns suspect or
//! opens closes the backend's ready connections (`forget`). Off with
//! `pool_size = 0` and with `send_proxy` (a PROXY header must name the client, which a connection made in
//! advance cannot).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::config::{Backend, SendProxy};
use crate::lifecycle::Phase;
use crate::net::Shared;
use crate::net::upstream::{self, Leg, Ready};

/// How often the pool is looked at when nothing wakes it.
const TICK: Duration = Duration::from_millis(500);

struct Entry {
    ready: Ready,
    made: Instant,
}

/// The pool, kept across reloads (entries of a backend that changed or went are closed as they age).
#[derive(Default)]
pub struct Pool {
    ready: Mutex<HashMap<Key, VecDeque<Entry>>>,
    /// Backends with a preparation under way.
    preparing: Mutex<Vec<Key>>,
    wake: Notify,
}

/// The pool's key for a backend: its whole definition, so that a reload that moves it uses none of the old.
type Key = (String, String, u16, String);

fn key(backend: &Backend) -> Key {
    (backend.name.clone(), backend.host.clone(), backend.port, backend.tls_name.clone())
}

/// Whether logins in `shared` may use pooled connections.
pub fn enabled(shared: &Shared) -> bool {
    let tls = &shared.config.backend_tls;
    tls.pool_size > 0 && tls.send_proxy == SendProxy::Off
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, VecDeque<Entry>>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ready connection to `backend` younger than `max_age`, if there is one (the refill is woken).
    pub fn take(&self, backend: &Backend, max_age: Duration) -> Option<Ready> {
        let taken = {
            let mut ready = self.lock();
            let queue = ready.get_mut(&key(backend))?;
            queue.retain(|e| e.made.elapsed() < max_age);
            queue.pop_back()
        };
        self.wake.notify_one();
        taken.map(|e| e.ready)
    }

    /// Closes `backend`'s ready connections (its circuit turned suspect or opened: they may be as hung as it).
    pub fn forget(&self, backend: &Backend) {
        self.lock().remove(&key(backend));
    }

    /// Ready connections per backend name now.
    pub fn counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for ((name, ..), queue) in self.lock().iter() {
            *counts.entry(name.clone()).or_insert(0) += queue.len();
        }
        counts
    }

    fn add(&self, backend: &Backend, ready: Ready, size: usize) {
        let mut pool = self.lock();
        let queue = pool.entry(key(backend)).or_default();
        if queue.len() < size {
            queue.push_back(Entry { ready, made: Instant::now() });
        }
    }

    fn len(&self, backend: &Backend) -> usize {
        self.lock().get(&key(backend)).map_or(0, VecDeque::len)
    }

    /// Closes what aged and what no configured backend uses any more.
    fn expire(&self, configured: &[Backend], max_age: Duration) {
        let keep: Vec<Key> = configured.iter().map(key).collect();
        self.lock().retain(|k, queue| {
            queue.retain(|e| e.made.elapsed() < max_age);
            keep.contains(k) && !queue.is_empty()
        });
    }

    fn start_preparing(&self, backend: &Backend) -> bool {
        let mut preparing = self.preparing.lock().unwrap_or_else(|p| p.into_inner());
        let k = key(backend);
        if preparing.contains(&k) {
            return false;
        }
        preparing.push(k);
        true
    }

    fn done_preparing(&self, backend: &Backend) {
        let k = key(backend);
        self.preparing.lock().unwrap_or_else(|p| p.into_inner()).retain(|p| *p != k);
    }
}

/// Keeps every backend's pool filled until shutdown; `current` is the configuration in force.
pub async fn run(current: impl Fn() -> Arc<Shared> + Send + Sync + 'static, mut phase: watch::Receiver<Phase>) {
    loop {
        let shared = current();
        let pool = Arc::clone(&shared.pool);
        let tls = &shared.config.backend_tls;
        pool.expire(&shared.config.backends, tls.pool_max_age);
        if enabled(&shared) {
            for backend in &shared.config.backends {
                // Only backends known good: a pool must not hammer one that is down (the health checks and
                // the circuit decide when it is back).
                if pool.len(backend) >= tls.pool_size
                    || !shared.circuits.healthy(backend)
                    || !pool.start_preparing(backend)
                {
                    continue;
                }
                let (shared, backend) = (Arc::clone(&shared), backend.clone());
                let pool = Arc::clone(&pool);
                tokio::spawn(async move {
                    let leg = Leg::new(&backend, &shared);
                    match upstream::prepare(&leg).await {
                        Ok(ready) => {
                            pool.add(&backend, ready, shared.config.backend_tls.pool_size);
                            // Straight on to the next one while the pool is short.
                            pool.wake.notify_one();
                        }
                        Err(failure) => {
                            tracing::debug!(backend = %backend.name, detail = %failure.detail, "pool: preparing a connection failed");
                        }
                    }
                    pool.done_preparing(&backend);
                    record(&shared);
                });
            }
        }
        record(&shared);
        drop(shared);
        tokio::select! {
            () = pool.wake.notified() => {}
            () = tokio::time::sleep(TICK) => {}
            () = crate::lifecycle::phase_reached(&mut phase, |p| *p != Phase::Running) => {
                pool.lock().clear();
                return;
            }
        }
    }
}

/// `imapgate_backend_pool_ready{backend}`.
fn record(shared: &Shared) {
    let counts = shared.pool.counts();
    for backend in &shared.config.backends {
        let n = counts.get(&backend.name).copied().unwrap_or(0);
        shared.metrics.backend_pool_ready.with_label_values(&[&backend.name]).set(n as i64);
    }
}
