//! The attempts waiting at each backend right now (logins, checks, pool preparations), so that a hung
//! backend is found by concurrent evidence: when one attempt's short step times out, the others stuck in
//! a short step for at least half its deadline count with it (`route::health::Circuits::failure`), and
//! when the circuit turns suspect or opens, every attempt still waiting there is told to give up
//! ([`Waiter::ejected`]) and fails over (or answers `NO [UNAVAILABLE]`) at once instead of waiting out its
//! own deadline. Also wakes the checker for a suspect's immediate probe. Bounded: one entry per attempt in
//! flight, removed when the attempt ends; a backend's entry goes with its last attempt.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::config::Backend;
use crate::route::health::key;

/// One attempt's short step: when it began and its deadline; `None` in the credentials step (which may
/// take long without the backend being hung).
type Waiting = Option<(Instant, Duration)>;

struct Member {
    attempts: HashMap<u64, Waiting>,
    /// Bumped when the backend is ejected; every waiter watches it.
    ejections: watch::Sender<u64>,
}

/// All backends' waiting attempts; kept across reloads.
#[derive(Default)]
pub struct Outliers {
    members: Mutex<HashMap<String, Member>>,
    next: AtomicU64,
    /// A backend turned suspect: the checker probes it now.
    probe: Notify,
}

impl Outliers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Member>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an attempt at `backend`; it counts as waiting once it reports a short step.
    pub fn enter(self: &Arc<Self>, backend: &Backend) -> Waiter {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let key = key(backend);
        let mut members = self.lock();
        let member = members
            .entry(key.clone())
            .or_insert_with(|| Member { attempts: HashMap::new(), ejections: watch::Sender::new(0) });
        member.attempts.insert(id, None);
        let ejections = member.ejections.subscribe();
        drop(members);
        Waiter { outliers: Arc::clone(self), key, id, ejections }
    }

    /// The attempts at `backend` stuck in a short step for at least half its deadline at `now`.
    pub fn stuck(&self, backend: &Backend, now: Instant) -> u32 {
        let members = self.lock();
        let Some(member) = members.get(&key(backend)) else { return 0 };
        let stuck = member
            .attempts
            .values()
            .filter(|w| w.is_some_and(|(since, limit)| now.saturating_duration_since(since) >= limit / 2))
            .count();
        u32::try_from(stuck).unwrap_or(u32::MAX)
    }

    /// Tells every attempt waiting at `backend` to give up; with `probe`, the checker probes it at once.
    pub fn eject(&self, backend: &Backend, probe: bool) {
        if let Some(member) = self.lock().get(&key(backend)) {
            member.ejections.send_modify(|n| *n = n.wrapping_add(1));
        }
        if probe {
            self.probe.notify_one();
        }
    }

    /// Resolves when a backend turned suspect (for the checker).
    pub async fn probe_wanted(&self) {
        self.probe.notified().await;
    }

    /// Attempts in flight now (all backends).
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.lock().values().map(|m| m.attempts.len()).sum()
    }
}

/// One attempt at one backend; leaves the table when dropped.
pub struct Waiter {
    outliers: Arc<Outliers>,
    key: String,
    id: u64,
    ejections: watch::Receiver<u64>,
}

impl Waiter {
    /// The attempt is now in a short step begun at `since` with deadline `limit` (`Some`), or in the
    /// credentials step (`None`).
    pub fn step(&self, waiting: Waiting) {
        if let Some(member) = self.outliers.lock().get_mut(&self.key) {
            member.attempts.insert(self.id, waiting);
        }
    }

    /// Resolves when the backend is ejected after this attempt began.
    pub async fn ejected(&self) {
        let mut ejections = self.ejections.clone();
        // The sender lives as long as this attempt's entry: an error cannot happen while we wait.
        if ejections.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut members = self.outliers.lock();
        if let Some(member) = members.get_mut(&self.key) {
            member.attempts.remove(&self.id);
            if member.attempts.is_empty() {
                members.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str) -> Backend {
        Backend { name: name.into(), host: "10.0.0.1".into(), port: 143, tls_name: "x".into() }
    }

    #[tokio::test]
    async fn waiting_attempts_are_evidence_and_are_told_to_give_up() {
        let outliers = Arc::new(Outliers::default());
        let t = Instant::now();
        let limit = Duration::from_secs(2);
        let (one, two, three) = (outliers.enter(&b("a")), outliers.enter(&b("a")), outliers.enter(&b("a")));
        let elsewhere = outliers.enter(&b("b"));
        assert_eq!(outliers.stuck(&b("a"), t), 0, "not in a short step yet");
        one.step(Some((t, limit)));
        two.step(Some((t + Duration::from_millis(1500), limit)));
        three.step(None);
        elsewhere.step(Some((t, limit)));
        // At t + 2 s: `one` waited its whole deadline, `two` less than half, `three` is authenticating.
        assert_eq!(outliers.stuck(&b("a"), t + limit), 1);
        assert_eq!(outliers.stuck(&b("a"), t + Duration::from_secs(3)), 2);
        // An ejection reaches every waiter at that backend, and only there.
        let waiting = tokio::spawn(async move {
            two.ejected().await;
            three.ejected().await;
        });
        tokio::task::yield_now().await;
        outliers.eject(&b("a"), true);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_secs(5), one.ejected()).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(50), elsewhere.ejected()).await.is_err());
        tokio::time::timeout(Duration::from_secs(5), outliers.probe_wanted()).await.unwrap();
        // Entries go with their attempts.
        drop(one);
        drop(elsewhere);
        assert_eq!(outliers.in_flight(), 0);
        assert!(outliers.lock().is_empty());
    }
}
