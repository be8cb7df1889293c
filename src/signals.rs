//! The mailbox problems users phone the helpdesk about, made visible (no I/O): a device retrying an old
//! password, an account over its quota, a client re-downloading a whole mailbox again and again, the
//! slowest mailboxes to open, and which client applications are in use. Each is a bounded table
//! ([`CAPACITY`] entries, the least recently seen forgotten first) that the admin API and the console list
//! ("attention"); each method says when an audit event is due (at most one per subject per
//! [`AUDIT_EVERY`]). User and mailbox names stay here and in the audit log, never in metric labels.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// Entries per table.
pub const CAPACITY: usize = 1000;
/// What counts as recent: an attention entry older than this is dropped from the lists.
pub const WINDOW: Duration = Duration::from_secs(3600);
/// Audit events per subject, at most one per this.
pub const AUDIT_EVERY: Duration = Duration::from_secs(600);
/// Whole-mailbox body fetches of one mailbox within [`WINDOW`] that make a resync suspected.
pub const RESYNC_FETCHES: u32 = 3;
/// Slowest `SELECT`s kept.
pub const SLOWEST: usize = 20;

/// Client families of `imapgate_clients_total{client}`.
pub const CLIENT_FAMILIES: &[&str] = &[
    "thunderbird",
    "outlook",
    "apple_mail",
    "ios_mail",
    "gmail",
    "k9",
    "evolution",
    "roundcube",
    "fairemail",
    "mutt",
    "sogo",
    "horde",
    "other",
    "none",
];

/// The family of a client by its `ID` name.
pub fn client_family(name: Option<&str>) -> &'static str {
    let Some(name) = name else { return "none" };
    let n = name.to_ascii_lowercase();
    let has = |s: &str| n.contains(s);
    if has("k-9") || has("k9") {
        "k9"
    } else if has("thunderbird") {
        "thunderbird"
    } else if has("outlook") || has("microsoft") {
        "outlook"
    } else if has("iphone") || has("ipad") || has("ios") {
        "ios_mail"
    } else if has("mac os") || has("macos") || has("apple") {
        "apple_mail"
    } else if has("gmail") || has("com.google.android.gm") {
        "gmail"
    } else if has("evolution") {
        "evolution"
    } else if has("roundcube") {
        "roundcube"
    } else if has("fairemail") {
        "fairemail"
    } else if has("mutt") {
        "mutt"
    } else if has("sogo") {
        "sogo"
    } else if has("horde") {
        "horde"
    } else {
        "other"
    }
}

/// A device retrying a password that no longer works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StalePassword {
    pub user: String,
    pub address: IpAddr,
    pub client: Option<String>,
    /// Tries of the same wrong password, the first (counted) failure included.
    pub count: u64,
    pub first: SystemTime,
    pub last: SystemTime,
}

/// An account whose mailbox refused a write for its quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverQuota {
    pub user: String,
    pub command: &'static str,
    pub count: u64,
    pub first: SystemTime,
    pub last: SystemTime,
}

/// A client fetching a whole mailbox's bodies again and again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resync {
    pub user: String,
    pub mailbox: String,
    pub client: Option<String>,
    /// Whole-mailbox body fetches in the window.
    pub fetches: u32,
    /// Body bytes those fetches brought.
    pub bytes: u64,
    /// Messages in the mailbox when last seen.
    pub exists: Option<u64>,
    pub first: SystemTime,
    pub last: SystemTime,
}

/// A slow `SELECT`/`EXAMINE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlowMailbox {
    pub user: String,
    pub mailbox: String,
    pub exists: Option<u64>,
    pub elapsed: Duration,
    pub at: SystemTime,
}

/// What needs an administrator's attention now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attention {
    pub stale_passwords: Vec<StalePassword>,
    pub over_quota: Vec<OverQuota>,
    pub resyncs: Vec<Resync>,
    pub slow_mailboxes: Vec<SlowMailbox>,
}

#[derive(Debug)]
struct Tracked<T> {
    value: T,
    seen: Instant,
    audited: Option<Instant>,
    /// Resyncs: when each whole-mailbox fetch of the window came.
    times: Vec<Instant>,
}

/// A bounded map: when full, the entry seen longest ago goes.
#[derive(Debug)]
struct Bounded<K, T> {
    map: HashMap<K, Tracked<T>>,
}

impl<K: Hash + Eq + Clone, T> Default for Bounded<K, T> {
    fn default() -> Self {
        Self { map: HashMap::new() }
    }
}

impl<K: Hash + Eq + Clone, T> Bounded<K, T> {
    fn entry(&mut self, key: K, now: Instant, make: impl FnOnce() -> T) -> &mut Tracked<T> {
        if !self.map.contains_key(&key) && self.map.len() >= CAPACITY {
            if let Some(oldest) = self.map.iter().min_by_key(|(_, t)| t.seen).map(|(k, _)| k.clone()) {
                self.map.remove(&oldest);
            }
        }
        let tracked = self.map.entry(key).or_insert_with(|| Tracked {
            value: make(),
            seen: now,
            audited: None,
            times: Vec::new(),
        });
        tracked.seen = now;
        tracked
    }

    fn recent(&self, now: Instant) -> impl Iterator<Item = &Tracked<T>> {
        self.map.values().filter(move |t| now.saturating_duration_since(t.seen) < WINDOW)
    }
}

/// Whether an audit event for this entry is due, and if so marks it.
fn audit_due<T>(tracked: &mut Tracked<T>, now: Instant) -> bool {
    let due = tracked.audited.is_none_or(|at| now.saturating_duration_since(at) >= AUDIT_EVERY);
    if due {
        tracked.audited = Some(now);
    }
    due
}

#[derive(Debug, Default)]
struct Tables {
    stale: Bounded<String, StalePassword>,
    quota: Bounded<String, OverQuota>,
    resync: Bounded<(String, String), Resync>,
    slow: Vec<SlowMailbox>,
}

/// The signals of one proxy (kept across reloads).
#[derive(Debug, Default)]
pub struct Signals {
    tables: Mutex<Tables>,
}

impl Signals {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A login refused because the same wrong password was tried lately (the defence's repeated pair):
    /// the entry for the account, when an audit event is due.
    pub fn stale_password(&self, user: &str, address: IpAddr, client: Option<&str>) -> Option<StalePassword> {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut tables = self.lock();
        let key = user.to_lowercase();
        let tracked = tables.stale.entry(key, now, || StalePassword {
            user: user.to_owned(),
            address,
            client: None,
            count: 1,
            first: wall,
            last: wall,
        });
        let entry = &mut tracked.value;
        entry.count += 1;
        entry.last = wall;
        entry.address = address;
        if client.is_some() {
            entry.client = client.map(str::to_owned);
        }
        let snapshot = entry.clone();
        audit_due(tracked, now).then_some(snapshot)
    }

    /// A command refused with `OVERQUOTA`.
    pub fn over_quota(&self, user: &str, command: &'static str) -> Option<OverQuota> {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut tables = self.lock();
        let tracked = tables.quota.entry(user.to_lowercase(), now, || OverQuota {
            user: user.to_owned(),
            command,
            count: 0,
            first: wall,
            last: wall,
        });
        tracked.value.count += 1;
        tracked.value.last = wall;
        tracked.value.command = command;
        let snapshot = tracked.value.clone();
        audit_due(tracked, now).then_some(snapshot)
    }

    /// A whole-body FETCH of the whole selected mailbox (`1:*`): a resync is suspected at the
    /// [`RESYNC_FETCHES`]th within [`WINDOW`]; returns it when that happens (and an audit is due).
    pub fn full_fetch(
        &self,
        user: &str,
        mailbox: &str,
        client: Option<&str>,
        bytes: u64,
        exists: Option<u64>,
    ) -> Option<Resync> {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut tables = self.lock();
        let key = (user.to_lowercase(), mailbox.to_owned());
        let tracked = tables.resync.entry(key, now, || Resync {
            user: user.to_owned(),
            mailbox: mailbox.to_owned(),
            client: None,
            fetches: 0,
            bytes: 0,
            exists: None,
            first: wall,
            last: wall,
        });
        tracked.times.retain(|t| now.saturating_duration_since(*t) < WINDOW);
        tracked.times.push(now);
        // Bounded: only the window's count matters beyond the threshold.
        if tracked.times.len() > RESYNC_FETCHES as usize * 4 {
            tracked.times.remove(0);
        }
        let entry = &mut tracked.value;
        entry.fetches = tracked.times.len() as u32;
        entry.bytes = entry.bytes.saturating_add(bytes);
        entry.exists = exists.or(entry.exists);
        entry.last = wall;
        if client.is_some() {
            entry.client = client.map(str::to_owned);
        }
        let suspected = entry.fetches >= RESYNC_FETCHES;
        let snapshot = entry.clone();
        (suspected && audit_due(tracked, now)).then_some(snapshot)
    }

    /// A `SELECT`/`EXAMINE` took `elapsed`: kept when among the slowest.
    pub fn selected(&self, user: &str, mailbox: &str, exists: Option<u64>, elapsed: Duration) {
        let mut tables = self.lock();
        let slow = &mut tables.slow;
        // One entry per mailbox, its slowest opening.
        if let Some(i) = slow.iter().position(|s| s.user.eq_ignore_ascii_case(user) && s.mailbox == mailbox) {
            if slow[i].elapsed >= elapsed {
                return;
            }
            slow.remove(i);
        }
        if slow.len() >= SLOWEST && slow.last().is_some_and(|s| s.elapsed >= elapsed) {
            return;
        }
        let entry =
            SlowMailbox { user: user.to_owned(), mailbox: mailbox.to_owned(), exists, elapsed, at: SystemTime::now() };
        let at = slow.partition_point(|s| s.elapsed >= elapsed);
        slow.insert(at, entry);
        slow.truncate(SLOWEST);
    }

    /// The lists, most recent (or slowest) first; resyncs only once suspected.
    pub fn attention(&self) -> Attention {
        let now = Instant::now();
        let tables = self.lock();
        let mut stale_passwords: Vec<StalePassword> = tables.stale.recent(now).map(|t| t.value.clone()).collect();
        stale_passwords.sort_by_key(|e| std::cmp::Reverse(e.last));
        let mut over_quota: Vec<OverQuota> = tables.quota.recent(now).map(|t| t.value.clone()).collect();
        over_quota.sort_by_key(|e| std::cmp::Reverse(e.last));
        let mut resyncs: Vec<Resync> = tables
            .resync
            .recent(now)
            .filter(|t| {
                t.times.iter().filter(|at| now.saturating_duration_since(**at) < WINDOW).count()
                    >= RESYNC_FETCHES as usize
            })
            .map(|t| t.value.clone())
            .collect();
        resyncs.sort_by_key(|e| std::cmp::Reverse(e.last));
        Attention { stale_passwords, over_quota, resyncs, slow_mailboxes: tables.slow.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phone_with_an_old_password() {
        let signals = Signals::default();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let first = signals.stale_password("Alice@example.org", ip, Some("iPhone Mail")).unwrap();
        assert_eq!((first.count, first.client.as_deref()), (2, Some("iPhone Mail")));
        // The next tries are counted, not audited again within AUDIT_EVERY.
        assert!(signals.stale_password("alice@example.org", ip, None).is_none());
        let listed = signals.attention().stale_passwords;
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].count, listed[0].client.as_deref()), (3, Some("iPhone Mail")));
    }

    #[test]
    fn quota_and_resync() {
        let signals = Signals::default();
        assert!(signals.over_quota("bob@example.com", "APPEND").is_some());
        assert!(signals.over_quota("bob@example.com", "APPEND").is_none());
        assert_eq!(signals.attention().over_quota[0].count, 2);
        assert!(signals.full_fetch("bob@example.com", "INBOX", Some("Outlook"), 100, Some(3)).is_none());
        assert!(signals.full_fetch("bob@example.com", "INBOX", None, 100, Some(3)).is_none());
        assert!(signals.attention().resyncs.is_empty(), "not suspected before the third");
        let resync = signals.full_fetch("bob@example.com", "INBOX", None, 100, Some(3)).unwrap();
        assert_eq!((resync.fetches, resync.bytes, resync.client.as_deref()), (3, 300, Some("Outlook")));
        assert!(signals.full_fetch("bob@example.com", "INBOX", None, 100, Some(3)).is_none(), "audited once");
        assert_eq!(signals.attention().resyncs[0].fetches, 4);
        assert!(signals.full_fetch("bob@example.com", "Archive", None, 100, None).is_none(), "per mailbox");
    }

    #[test]
    fn slowest_mailboxes_and_bounds() {
        let signals = Signals::default();
        for i in 0..(SLOWEST as u64 + 5) {
            signals.selected("u", &format!("box{i}"), Some(i), Duration::from_millis(i));
        }
        let slow = signals.attention().slow_mailboxes;
        assert_eq!(slow.len(), SLOWEST);
        assert_eq!(slow[0].mailbox, format!("box{}", SLOWEST + 4));
        signals.selected("u", "box24", Some(1), Duration::from_millis(500));
        let slow = signals.attention().slow_mailboxes;
        assert_eq!((slow[0].mailbox.as_str(), slow[0].elapsed), ("box24", Duration::from_millis(500)));
        assert_eq!(slow.iter().filter(|s| s.mailbox == "box24").count(), 1, "one entry per mailbox");
        for i in 0..(CAPACITY + 10) {
            signals.over_quota(&format!("user{i}"), "APPEND");
        }
        assert_eq!(signals.attention().over_quota.len(), CAPACITY);
    }

    #[test]
    fn client_families() {
        for (name, family) in [
            (Some("Thunderbird"), "thunderbird"),
            (Some("K-9 Mail"), "k9"),
            (Some("Microsoft Outlook"), "outlook"),
            (Some("iPhone Mail"), "ios_mail"),
            (Some("Mac OS X Mail"), "apple_mail"),
            (Some("com.google.android.gm"), "gmail"),
            (Some("Roundcube Webmail"), "roundcube"),
            (Some("my script"), "other"),
            (None, "none"),
        ] {
            assert_eq!(client_family(name), family, "{name:?}");
        }
        assert!(CLIENT_FAMILIES.iter().all(|f| *f == client_family(None) || CLIENT_FAMILIES.contains(f)));
    }
}
