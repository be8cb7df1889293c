//! The logged-in sessions, as the admin API lists and kicks them: one entry per relayed session, added at
//! login and removed when the session ends (its [`Registration`] drops). Bounded: at most `capacity`
//! entries (the proxy's connection limit, which already bounds sessions); a session beyond it is relayed
//! but not listed. An entry is a few hundred bytes; the relay updates its counters with relaxed atomics
//! when bytes move and takes the small lock only when a command starts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::Notify;

/// What is known of a session when it logs in.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: String,
    pub user: String,
    pub client: SocketAddr,
    pub listener: SocketAddr,
    pub sni: Option<String>,
    pub tls_version: Option<String>,
    pub backend: String,
    pub started: SystemTime,
    /// The client's `ID` name and version, when it sent them (bounded).
    pub client_name: Option<String>,
    pub client_version: Option<String>,
}

/// One session: its facts, its live counters, and the administrator's kick.
#[derive(Debug)]
pub struct Session {
    pub info: SessionInfo,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    commands: AtomicU64,
    idling: AtomicBool,
    last: Mutex<Option<(&'static str, SystemTime)>>,
    kick: Notify,
    kicked: AtomicBool,
    /// The kick is the process leaving (after an upgrade), not an administrator's.
    leaving: AtomicBool,
}

/// The counters of a session at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    pub commands: u64,
    pub idling: bool,
    pub last_command: Option<(&'static str, SystemTime)>,
}

impl Session {
    /// The relay's byte counts so far.
    pub fn bytes(&self, from_client: u64, to_client: u64) {
        self.bytes_up.store(from_client, Ordering::Relaxed);
        self.bytes_down.store(to_client, Ordering::Relaxed);
    }

    /// The observer's command count and the command last started (if a new one started), and whether the
    /// session is in IDLE.
    pub fn commands(&self, count: u64, latest: Option<&'static str>, idling: bool) {
        self.idling.store(idling, Ordering::Relaxed);
        if self.commands.swap(count, Ordering::Relaxed) != count {
            if let Some(name) = latest {
                *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((name, SystemTime::now()));
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            bytes_from_client: self.bytes_up.load(Ordering::Relaxed),
            bytes_to_client: self.bytes_down.load(Ordering::Relaxed),
            commands: self.commands.load(Ordering::Relaxed),
            idling: self.idling.load(Ordering::Relaxed),
            last_command: *self.last.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Resolves once an administrator kicked the session (at once if that happened already).
    pub async fn kicked(&self) {
        loop {
            let notified = self.kick.notified();
            if self.kicked.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// Whether the kick is the process leaving (see [`Session::kick_leaving`]).
    pub fn leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    /// The process is leaving (its successor has the listeners): the session says `* BYE` when it is
    /// quiet (no command but IDLE in flight, nothing of a response or a literal half sent) and closes, so
    /// that its client reconnects to the successor. Whether it was not kicked already.
    pub fn kick_leaving(&self) -> bool {
        if self.kicked.load(Ordering::Acquire) {
            return false;
        }
        self.leaving.store(true, Ordering::Release);
        self.kick()
    }

    fn kick(&self) -> bool {
        let first = !self.kicked.swap(true, Ordering::AcqRel);
        self.kick.notify_waiters();
        first
    }
}

/// Which sessions a listing or a kick is about; empty fields match everything.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Case-insensitive, exact.
    pub user: Option<String>,
    pub client_ip: Option<std::net::IpAddr>,
    pub backend: Option<String>,
    pub id: Option<String>,
}

impl Filter {
    fn matches(&self, info: &SessionInfo) -> bool {
        self.user.as_deref().is_none_or(|u| u.eq_ignore_ascii_case(&info.user))
            && self.client_ip.is_none_or(|ip| ip == info.client.ip())
            && self.backend.as_deref().is_none_or(|b| b == info.backend)
            && self.id.as_deref().is_none_or(|id| id == info.id)
    }
}

/// The registry of logged-in sessions.
#[derive(Debug)]
pub struct Registry {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    capacity: usize,
}

impl Registry {
    pub fn new(capacity: usize) -> Arc<Registry> {
        Arc::new(Registry { sessions: Mutex::new(HashMap::new()), capacity })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lists the session until the registration drops; `None` when the registry is full.
    pub fn register(self: &Arc<Self>, info: SessionInfo) -> Option<Registration> {
        let session = Arc::new(Session {
            info,
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            idling: AtomicBool::new(false),
            last: Mutex::new(None),
            kick: Notify::new(),
            kicked: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
        });
        let mut sessions = self.lock();
        if sessions.len() >= self.capacity || sessions.contains_key(&session.info.id) {
            return None;
        }
        sessions.insert(session.info.id.clone(), Arc::clone(&session));
        Some(Registration { registry: Arc::clone(self), session })
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The matching sessions, oldest first (ties by id, so pages are stable).
    pub fn list(&self, filter: &Filter) -> Vec<Arc<Session>> {
        let mut found: Vec<Arc<Session>> = self.lock().values().filter(|s| filter.matches(&s.info)).cloned().collect();
        found.sort_by(|a, b| a.info.started.cmp(&b.info.started).then_with(|| a.info.id.cmp(&b.info.id)));
        found
    }

    /// Kicks the matching sessions (each says `* BYE` at its next response boundary and closes); returns how
    /// many were not kicked already.
    pub fn kick(&self, filter: &Filter) -> usize {
        self.list(filter).iter().filter(|s| s.kick()).count()
    }

    /// Sessions per backend name.
    pub fn per_backend(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for session in self.lock().values() {
            *counts.entry(session.info.backend.clone()).or_insert(0) += 1;
        }
        counts
    }
}

/// A listed session; dropping it removes the entry.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    session: Arc<Session>,
}

impl Registration {
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.session.info.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, user: &str, backend: &str, secs: u64) -> SessionInfo {
        SessionInfo {
            id: id.into(),
            user: user.into(),
            client: "192.0.2.7:40000".parse().unwrap(),
            listener: "127.0.0.1:993".parse().unwrap(),
            sni: None,
            tls_version: Some("TLSv1.3".into()),
            backend: backend.into(),
            started: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs),
            client_name: None,
            client_version: None,
        }
    }

    #[test]
    fn bounded_listed_filtered_and_removed_on_drop() {
        let registry = Registry::new(2);
        let a = registry.register(info("b", "Alice@example.org", "mbox1", 20)).unwrap();
        let b = registry.register(info("a", "bob@example.com", "mbox2", 10)).unwrap();
        assert!(registry.register(info("c", "carol@example.org", "mbox1", 30)).is_none(), "full");
        let ids = |f: &Filter| registry.list(f).iter().map(|s| s.info.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&Filter::default()), ["a", "b"], "oldest first");
        assert_eq!(ids(&Filter { user: Some("alice@EXAMPLE.org".into()), ..Filter::default() }), ["b"]);
        assert_eq!(ids(&Filter { backend: Some("mbox2".into()), ..Filter::default() }), ["a"]);
        assert_eq!(registry.per_backend().get("mbox1"), Some(&1));
        drop(a);
        assert_eq!(ids(&Filter::default()), ["a"]);
        drop(b);
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn a_kick_reaches_the_session_once() {
        let registry = Registry::new(8);
        let r = registry.register(info("s1", "alice@example.org", "mbox1", 1)).unwrap();
        let session = Arc::clone(r.session());
        let waiter = tokio::spawn(async move { session.kicked().await });
        tokio::task::yield_now().await;
        let by_user = Filter { user: Some("alice@example.org".into()), ..Filter::default() };
        assert_eq!(registry.kick(&by_user), 1);
        assert_eq!(registry.kick(&by_user), 0, "already kicked");
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter).await.unwrap().unwrap();
        // A kick before anyone waits is not lost.
        r.session().kicked().await;
    }

    #[test]
    fn an_entry_is_a_few_hundred_bytes() {
        // The entry itself (352 bytes on x86-64); its strings (id, user, names) and the map's key add about
        // 150 bytes more.
        let size = std::mem::size_of::<Session>();
        assert!(size <= 448, "{size} bytes");
    }

    #[test]
    fn counters_and_last_command() {
        let registry = Registry::new(1);
        let r = registry.register(info("s", "u", "b", 1)).unwrap();
        r.session().bytes(10, 2000);
        r.session().commands(1, Some("SELECT"), false);
        r.session().commands(1, Some("FETCH"), true);
        let snap = r.session().snapshot();
        assert_eq!((snap.bytes_from_client, snap.bytes_to_client, snap.commands, snap.idling), (10, 2000, 1, true));
        assert_eq!(snap.last_command.map(|(c, _)| c), Some("SELECT"), "no new command: the last stays");
    }
}
