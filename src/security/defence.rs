//! The failed-login defence and connection admission.
//!
//! Per client prefix (IPv4 /32, IPv6 /64 and a coarser IPv6 /48 bucket): a failure budget (governor, GCRA)
//! whose exhaustion bans the prefix, bans that double on repeat, a tarpit that delays each failure's answer,
//! a cap on logins in flight, and admission limits (concurrent connections, connection rate) checked before
//! TLS. Per account (case-folded, NFC): consecutive failures from anywhere delay further logins, and past a
//! threshold block the account for prefixes that never logged into it. A repeated identical wrong
//! (user, password) pair counts once; only a keyed hash of it is kept.
//!
//! Memory is bounded: every table holds at most `max_tracked` entries, idle ones are dropped first, and the
//! governor limiters are pruned with `retain_recent` and rebuilt if a flood outgrows them.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use ipnet::IpNet;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use unicode_normalization::UnicodeNormalization;

use super::prefix::{self, PrefixPolicy};
use crate::config::DefenceConfig;
use crate::imap::credentials::{Password, Username};

/// governor's clock on tokio's time, so that tests with paused time drive the limiters too.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

type Limiter = RateLimiter<IpNet, DefaultKeyedStateStore<IpNet>, TokioClock, NoOpMiddleware<std::time::Instant>>;

/// Why a connection or a login was refused without asking a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The address is on the deny list.
    Denied,
    /// The prefix (or its IPv6 bucket) is banned.
    Banned { remaining: Duration },
    /// Too many concurrent connections from the prefix.
    PrefixConnections,
    /// Connections from the prefix arrive too fast.
    ConnectionRate,
    /// The account is under attack and this prefix never logged into it.
    AccountBlocked,
    /// No login slot for the prefix became free in time, or the tables are full of live entries.
    Busy,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Denied => "deny_list",
            Refusal::Banned { .. } => "banned",
            Refusal::PrefixConnections => "prefix_connections",
            Refusal::ConnectionRate => "connection_rate",
            Refusal::AccountBlocked => "account_blocked",
            Refusal::Busy => "busy",
        }
    }
}

/// Figures for monitoring and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DefenceStats {
    pub tracked_prefixes: usize,
    pub tracked_accounts: usize,
    pub ban_entries: usize,
    pub active_bans: usize,
    /// Keys held by the governor limiters together.
    pub limiter_keys: usize,
    /// The most logins one prefix had in flight at once since start.
    pub max_in_flight: u64,
}

type Fingerprint = [u8; 16];

/// Identical wrong pairs remembered per account.
const RECENT_PAIRS: usize = 8;
/// Prefixes remembered per account as having logged in successfully.
const KNOWN_PREFIXES: usize = 16;

#[derive(Debug)]
struct PrefixState {
    connections: u32,
    slots: Arc<Semaphore>,
    /// Counted failures in the current window: the tarpit level.
    failures: u32,
    last_failure: Option<Instant>,
    last_seen: Instant,
}

#[derive(Debug)]
struct Ban {
    until: Instant,
    /// Bans so far, for doubling; forgotten `ban_max` after the last one.
    count: u32,
    last: Instant,
    active: bool,
}

#[derive(Debug, Default)]
struct AccountState {
    consecutive: u32,
    /// Logins of this account under way from prefixes that never logged into it: they count towards the
    /// delay and the block before their outcome is known, so a burst of parallel guesses cannot slip past
    /// the threshold. Logins from known prefixes (the user's own devices) are not counted.
    pending: u32,
    last_failure: Option<Instant>,
    recent: VecDeque<(Fingerprint, Instant)>,
    known: Vec<IpNet>,
    last_seen: Option<Instant>,
}

struct Tables {
    prefixes: HashMap<IpNet, PrefixState>,
    bans: HashMap<IpNet, Ban>,
    accounts: HashMap<String, AccountState>,
    failure_budget: Limiter,
    wide_budget: Limiter,
    connection_rate: Limiter,
}

/// Bans and unbans, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefenceEvent {
    Banned { prefix: IpNet, reason: &'static str, user: String, duration: Duration },
    Unbanned { prefix: IpNet },
}

type EventSink = Box<dyn Fn(&DefenceEvent) + Send + Sync>;

/// The defence, shared by all sessions.
pub struct Defence {
    events: std::sync::OnceLock<EventSink>,
    config: DefenceConfig,
    policy: PrefixPolicy,
    tables: Mutex<Tables>,
    hash_key: aws_lc_rs::hmac::Key,
    max_in_flight: AtomicU64,
}

/// Held for the life of an admitted connection; frees its place on drop.
pub struct ConnectionGuard {
    defence: Arc<Defence>,
    key: Option<IpNet>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let mut tables = self.defence.lock();
            if let Some(state) = tables.prefixes.get_mut(&key) {
                state.connections = state.connections.saturating_sub(1);
            }
        }
    }
}

/// A login allowed to go to a backend: holds the prefix's in-flight slot until the outcome is reported.
pub struct LoginPermit {
    defence: Arc<Defence>,
    key: IpNet,
    wide: Option<IpNet>,
    trusted: bool,
    account: String,
    /// Whether this login is counted in the account's `pending`.
    counted: bool,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Drop for LoginPermit {
    fn drop(&mut self) {
        let mut tables = self.defence.lock();
        if !self.counted {
            return;
        }
        if let Some(state) = tables.accounts.get_mut(&self.account) {
            state.pending = state.pending.saturating_sub(1);
        }
    }
}

fn quota(count: u32, per: Duration) -> Quota {
    let burst = NonZeroU32::new(count.max(1)).unwrap_or(NonZeroU32::MIN);
    let period = (per / burst.get()).max(Duration::from_nanos(1));
    Quota::with_period(period).unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN)).allow_burst(burst)
}

/// Case-folded, NFC form of a username, for per-account counting.
pub fn canonical_account(user: &Username) -> String {
    user.as_str().nfc().collect::<String>().to_lowercase().nfc().collect()
}

impl Defence {
    pub fn new(config: DefenceConfig) -> Arc<Defence> {
        let policy =
            PrefixPolicy { ipv4: config.ipv4_prefix, ipv6: config.ipv6_prefix, ipv6_wide: config.ipv6_wide_prefix };
        let tables = Mutex::new(Self::fresh_tables(&config));
        let key_bytes: [u8; 32] = rand::random();
        Arc::new(Defence {
            events: std::sync::OnceLock::new(),
            hash_key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key_bytes),
            policy,
            tables,
            config,
            max_in_flight: AtomicU64::new(0),
        })
    }

    fn fresh_tables(config: &DefenceConfig) -> Tables {
        Tables {
            prefixes: HashMap::new(),
            bans: HashMap::new(),
            accounts: HashMap::new(),
            failure_budget: Self::limiter(config.failures, config.window),
            wide_budget: Self::limiter(config.wide_failures, config.window),
            connection_rate: Self::rate_limiter(config.connection_rate_per_minute, config.connection_burst),
        }
    }

    /// `count` events per `window`, all of them at once if they like.
    fn limiter(count: u32, window: Duration) -> Limiter {
        RateLimiter::new(quota(count, window), DefaultKeyedStateStore::default(), TokioClock)
    }

    /// `per_minute` sustained, `burst` at once.
    fn rate_limiter(per_minute: u32, burst: u32) -> Limiter {
        let per = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
        RateLimiter::new(Quota::per_minute(per).allow_burst(burst), DefaultKeyedStateStore::default(), TokioClock)
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // A panic while holding the lock cannot leave the tables inconsistent beyond a counter; go on.
        self.tables.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Where bans and unbans are reported besides the diagnostic log (set once, at start-up).
    pub fn set_event_sink(&self, sink: impl Fn(&DefenceEvent) + Send + Sync + 'static) {
        let _ = self.events.set(Box::new(sink));
    }

    fn emit(&self, event: DefenceEvent) {
        if let Some(sink) = self.events.get() {
            sink(&event);
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        prefix::contains(&self.config.trusted, ip)
    }

    /// Connection admission, before the TLS handshake.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionGuard, Refusal> {
        if prefix::contains(&self.config.deny, ip) {
            return Err(self.refused(ip, Refusal::Denied, None));
        }
        if self.is_trusted(ip) {
            return Ok(ConnectionGuard { defence: Arc::clone(self), key: None });
        }
        let key = self.policy.key(ip);
        let now = Instant::now();
        let mut tables = self.lock();
        if let Some(remaining) = tables.banned(key, self.policy.wide_key(ip), now) {
            drop(tables);
            return Err(self.refused(ip, Refusal::Banned { remaining }, None));
        }
        let max_tracked = self.config.max_tracked;
        let limit = self.config.connections_per_prefix;
        let Some(state) = tables.prefix(key, now, max_tracked, self.config.auth_in_flight) else {
            drop(tables);
            return Err(self.refused(ip, Refusal::Busy, None));
        };
        if state.connections >= limit {
            drop(tables);
            return Err(self.refused(ip, Refusal::PrefixConnections, None));
        }
        state.connections += 1;
        if tables.connection_rate.check_key(&key).is_err() {
            if let Some(state) = tables.prefixes.get_mut(&key) {
                state.connections -= 1;
            }
            drop(tables);
            return Err(self.refused(ip, Refusal::ConnectionRate, None));
        }
        Ok(ConnectionGuard { defence: Arc::clone(self), key: Some(key) })
    }

    /// Before a login goes to a backend: refuses banned prefixes and blocked accounts, waits for one of the
    /// prefix's in-flight slots, and applies the account's progressive delay.
    pub async fn begin_login(self: &Arc<Self>, ip: IpAddr, user: &Username) -> Result<LoginPermit, Refusal> {
        let trusted = self.is_trusted(ip);
        let key = self.policy.key(ip);
        let wide = self.policy.wide_key(ip);
        let account = canonical_account(user);
        let now = Instant::now();
        let (slots, delay, mut permit) = {
            let mut tables = self.lock();
            if !trusted {
                if let Some(remaining) = tables.banned(key, wide, now) {
                    drop(tables);
                    return Err(self.refused(ip, Refusal::Banned { remaining }, Some(user)));
                }
            }
            let Some(state) = tables.account(&account, self.config.max_tracked) else {
                drop(tables);
                return Err(self.refused(ip, Refusal::Busy, Some(user)));
            };
            state.expire(now, self.config.account_reset);
            let known = state.known.contains(&key);
            let load = state.consecutive + if known { 0 } else { state.pending };
            if load >= self.config.account_block_after && !known {
                drop(tables);
                return Err(self.refused(ip, Refusal::AccountBlocked, Some(user)));
            }
            if !known {
                state.pending += 1;
            }
            state.last_seen = Some(now);
            // From here on, dropping the permit undoes `pending`.
            let permit = LoginPermit {
                defence: Arc::clone(self),
                key,
                wide,
                trusted,
                account: account.clone(),
                counted: !known,
                _slot: None,
            };
            let delay = match load.checked_sub(self.config.account_delay_after) {
                Some(over) => self.tarpit(over + 1),
                None => Duration::ZERO,
            };
            let slots = if trusted {
                None
            } else {
                match tables.prefix(key, now, self.config.max_tracked, self.config.auth_in_flight) {
                    Some(state) => Some(Arc::clone(&state.slots)),
                    None => {
                        drop(tables);
                        drop(permit);
                        return Err(self.refused(ip, Refusal::Busy, Some(user)));
                    }
                }
            };
            (slots, delay, permit)
        };
        if let Some(slots) = slots {
            let acquired = tokio::time::timeout(self.config.auth_queue_timeout, slots.clone().acquire_owned()).await;
            let Ok(Ok(slot)) = acquired else {
                drop(permit);
                return Err(self.refused(ip, Refusal::Busy, Some(user)));
            };
            let in_flight = u64::from(self.config.auth_in_flight) - slots.available_permits() as u64;
            self.max_in_flight.fetch_max(in_flight, Ordering::Relaxed);
            permit._slot = Some(slot);
        }
        if !delay.is_zero() {
            tracing::info!(
                event = "account_delay",
                prefix = %key,
                user = %user,
                delay_ms = delay.as_millis() as u64,
                "login delayed: account has recent failures"
            );
            tokio::time::sleep(delay).await;
        }
        Ok(permit)
    }

    /// The backend accepted the login: the account's failure count resets and the prefix becomes known.
    pub fn login_succeeded(&self, permit: LoginPermit) {
        let now = Instant::now();
        let mut tables = self.lock();
        let max_tracked = self.config.max_tracked;
        if let Some(state) = tables.account(&permit.account, max_tracked) {
            state.consecutive = 0;
            state.recent.clear();
            state.last_seen = Some(now);
            if !state.known.contains(&permit.key) {
                if state.known.len() == KNOWN_PREFIXES {
                    state.known.remove(0);
                }
                state.known.push(permit.key);
            }
        }
    }

    /// The backend rejected the credentials. Counts the failure (once per distinct wrong pair), bans the
    /// prefix when its budget is spent, and returns how long to wait before answering (the tarpit).
    pub fn login_failed(&self, permit: LoginPermit, user: &Username, password: &Password) -> Duration {
        let now = Instant::now();
        let fingerprint = self.fingerprint(&permit.account, password);
        let mut tables = self.lock();
        let max_tracked = self.config.max_tracked;
        let mut duplicate = false;
        if let Some(state) = tables.account(&permit.account, max_tracked) {
            state.expire(now, self.config.account_reset);
            state.recent.retain(|(_, at)| now.duration_since(*at) < self.config.window);
            duplicate = state.recent.iter().any(|(fp, _)| *fp == fingerprint);
            if !duplicate {
                state.consecutive += 1;
                if state.recent.len() == RECENT_PAIRS {
                    state.recent.pop_front();
                }
                state.recent.push_back((fingerprint, now));
            }
            state.last_failure = Some(now);
            state.last_seen = Some(now);
            if state.consecutive == self.config.account_block_after && !duplicate {
                tracing::warn!(
                    event = "account_blocked",
                    user = %user,
                    failures = state.consecutive,
                    "account blocked for prefixes that never logged into it"
                );
            }
        }
        if permit.trusted {
            return Duration::ZERO;
        }
        let window = self.config.window;
        let Some(state) = tables.prefix(permit.key, now, max_tracked, self.config.auth_in_flight) else {
            return self.tarpit(1);
        };
        if state.last_failure.is_some_and(|at| now.duration_since(at) >= window) {
            state.failures = 0;
        }
        state.last_failure = Some(now);
        if !duplicate {
            state.failures += 1;
        }
        let level = state.failures.max(1);
        let mut banned = Vec::new();
        if !duplicate {
            if tables.failure_budget.check_key(&permit.key).is_err() {
                banned.push((permit.key, "failure_budget"));
            }
            if let Some(wide) = permit.wide {
                if tables.wide_budget.check_key(&wide).is_err() {
                    banned.push((wide, "wide_failure_budget"));
                }
            }
        }
        let mut events = Vec::new();
        for (key, reason) in banned {
            let duration = tables.ban(key, now, &self.config);
            tracing::warn!(
                event = "banned",
                prefix = %key,
                reason,
                user = %user,
                duration_secs = duration.as_secs(),
                "prefix banned"
            );
            events.push(DefenceEvent::Banned { prefix: key, reason, user: user.to_string(), duration });
        }
        let delay = self.tarpit(level);
        tracing::info!(
            event = "tarpit",
            prefix = %permit.key,
            user = %user,
            repeated_pair = duplicate,
            failures = level,
            delay_ms = delay.as_millis() as u64,
            "failed login tarpitted"
        );
        drop(tables);
        for event in events {
            self.emit(event);
        }
        delay
    }

    /// Housekeeping, every few seconds: lift expired bans (logged), forget idle entries, prune limiters.
    pub fn sweep(&self) {
        let now = Instant::now();
        let config = &self.config;
        let mut tables = self.lock();
        let mut lifted = Vec::new();
        for (key, ban) in tables.bans.iter_mut() {
            if ban.active && ban.until <= now {
                ban.active = false;
                tracing::info!(event = "unbanned", prefix = %key, "ban lifted");
                lifted.push(*key);
            }
        }
        tables.bans.retain(|_, ban| ban.active || now.duration_since(ban.last) < config.ban_max);
        tables.prefixes.retain(|_, state| !state.idle(now, config.window, config.auth_in_flight));
        tables.accounts.retain(|_, state| {
            state.expire(now, config.account_reset);
            state.consecutive > 0 || state.pending > 0 || !state.known.is_empty()
        });
        let limiters = [&tables.failure_budget, &tables.wide_budget, &tables.connection_rate];
        for limiter in limiters {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        let keys: usize = limiters.iter().map(|l| l.len()).sum();
        if keys > 2 * config.max_tracked {
            // A flood of distinct prefixes outgrew the limiters: start them afresh. Bans stay.
            tracing::warn!(event = "limiters_reset", keys, "rate limiter tables reset after a flood");
            let fresh = Self::fresh_tables(config);
            tables.failure_budget = fresh.failure_budget;
            tables.wide_budget = fresh.wide_budget;
            tables.connection_rate = fresh.connection_rate;
        }
        drop(tables);
        for prefix in lifted {
            self.emit(DefenceEvent::Unbanned { prefix });
        }
    }

    pub fn stats(&self) -> DefenceStats {
        let now = Instant::now();
        let tables = self.lock();
        DefenceStats {
            tracked_prefixes: tables.prefixes.len(),
            tracked_accounts: tables.accounts.len(),
            ban_entries: tables.bans.len(),
            active_bans: tables.bans.values().filter(|b| b.active && b.until > now).count(),
            limiter_keys: tables.failure_budget.len() + tables.wide_budget.len() + tables.connection_rate.len(),
            max_in_flight: self.max_in_flight.load(Ordering::Relaxed),
        }
    }

    /// Whether the address's prefix is banned right now.
    pub fn is_banned(&self, ip: IpAddr) -> bool {
        let mut tables = self.lock();
        tables.banned(self.policy.key(ip), self.policy.wide_key(ip), Instant::now()).is_some()
    }

    /// How long a refused login waits for its answer: the longest tarpit step, except when the wait for a
    /// login slot already took its time.
    pub fn refusal_delay(&self, refusal: Refusal) -> Duration {
        match refusal {
            Refusal::Busy => Duration::ZERO,
            _ => self.config.tarpit.iter().copied().max().unwrap_or_default(),
        }
    }

    /// The n-th (1-based) tarpit delay; the last configured value repeats.
    fn tarpit(&self, level: u32) -> Duration {
        let table = &self.config.tarpit;
        let index = (level.max(1) as usize - 1).min(table.len().saturating_sub(1));
        table.get(index).copied().unwrap_or_default()
    }

    fn fingerprint(&self, account: &str, password: &Password) -> Fingerprint {
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&self.hash_key);
        ctx.update(account.as_bytes());
        ctx.update(&[0]);
        ctx.update(password.expose());
        let tag = ctx.sign();
        let mut out = [0u8; 16];
        out.copy_from_slice(&tag.as_ref()[..16]);
        out
    }

    fn refused(&self, ip: IpAddr, refusal: Refusal, user: Option<&Username>) -> Refusal {
        let prefix = self.policy.key(ip);
        let remaining_secs = match refusal {
            Refusal::Banned { remaining } => remaining.as_secs(),
            _ => 0,
        };
        match user {
            Some(user) => tracing::info!(
                event = "refused",
                prefix = %prefix,
                reason = refusal.reason(),
                user = %user,
                ban_remaining_secs = remaining_secs,
                "login refused without backend contact"
            ),
            None => tracing::info!(
                event = "refused",
                prefix = %prefix,
                reason = refusal.reason(),
                ban_remaining_secs = remaining_secs,
                "connection refused before TLS"
            ),
        }
        refusal
    }
}

impl PrefixState {
    fn idle(&self, now: Instant, window: Duration, slots: u32) -> bool {
        self.connections == 0
            && self.slots.available_permits() == slots as usize
            && now.duration_since(self.last_seen) >= window
    }
}

impl AccountState {
    fn expire(&mut self, now: Instant, reset: Duration) {
        if self.last_failure.is_some_and(|at| now.duration_since(at) >= reset) {
            self.consecutive = 0;
            self.recent.clear();
            self.last_failure = None;
        }
    }
}

impl Tables {
    fn banned(&mut self, key: IpNet, wide: Option<IpNet>, now: Instant) -> Option<Duration> {
        [Some(key), wide]
            .into_iter()
            .flatten()
            .filter_map(|k| self.bans.get(&k))
            .filter(|b| b.active && b.until > now)
            .map(|b| b.until - now)
            .max()
    }

    fn ban(&mut self, key: IpNet, now: Instant, config: &DefenceConfig) -> Duration {
        let ban = self.bans.entry(key).or_insert(Ban { until: now, count: 0, last: now, active: false });
        if ban.count > 0 && now.duration_since(ban.last) >= config.ban_max {
            ban.count = 0;
        }
        ban.count += 1;
        let factor = 1u32.checked_shl(ban.count - 1).unwrap_or(u32::MAX);
        let duration = config.ban.saturating_mul(factor).min(config.ban_max);
        ban.until = now + duration;
        ban.last = now;
        ban.active = true;
        duration
    }

    /// The state of `key`, created if needed. When the table is full, idle entries are dropped (oldest
    /// first, a tenth at a time); `None` if every entry is live.
    fn prefix(&mut self, key: IpNet, now: Instant, max: usize, slots: u32) -> Option<&mut PrefixState> {
        if !self.prefixes.contains_key(&key) && self.prefixes.len() >= max {
            let mut idle: Vec<(Instant, IpNet)> = self
                .prefixes
                .iter()
                .filter(|(_, s)| s.connections == 0 && s.slots.available_permits() == slots as usize)
                .map(|(k, s)| (s.last_seen, *k))
                .collect();
            idle.sort_unstable();
            for (_, old) in idle.into_iter().take((max / 10).max(1)) {
                self.prefixes.remove(&old);
            }
            if self.prefixes.len() >= max {
                return None;
            }
        }
        let state = self.prefixes.entry(key).or_insert_with(|| PrefixState {
            connections: 0,
            slots: Arc::new(Semaphore::new(slots as usize)),
            failures: 0,
            last_failure: None,
            last_seen: now,
        });
        state.last_seen = now;
        Some(state)
    }

    /// The state of an account, created if needed; when full, accounts without failures go first.
    fn account(&mut self, account: &str, max: usize) -> Option<&mut AccountState> {
        if !self.accounts.contains_key(account) && self.accounts.len() >= max {
            // Accounts with logins under way are kept: their permits still refer to them.
            let mut candidates: Vec<(Option<Instant>, u32, String)> = self
                .accounts
                .iter()
                .filter(|(_, s)| s.pending == 0)
                .map(|(k, s)| (s.last_seen, s.consecutive, k.clone()))
                .collect();
            candidates.sort_unstable_by_key(|(seen, failures, _)| (*failures, *seen));
            for (_, _, old) in candidates.into_iter().take((max / 10).max(1)) {
                self.accounts.remove(&old);
            }
            if self.accounts.len() >= max {
                return None;
            }
        }
        Some(self.accounts.entry(account.to_owned()).or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::credentials;

    fn config() -> DefenceConfig {
        DefenceConfig {
            tarpit: vec![
                Duration::from_secs(2),
                Duration::from_secs(4),
                Duration::from_secs(8),
                Duration::from_secs(15),
            ],
            ..DefenceConfig::default()
        }
    }

    fn user(name: &str) -> Username {
        Username::parse(name.as_bytes()).unwrap()
    }

    fn pw(p: &str) -> Password {
        credentials::password(p.as_bytes().to_vec()).unwrap()
    }

    async fn fail(d: &Arc<Defence>, ip: &str, name: &str, password: &str) -> Result<Duration, Refusal> {
        let permit = d.begin_login(ip.parse().unwrap(), &user(name)).await?;
        Ok(d.login_failed(permit, &user(name), &pw(password)))
    }

    #[tokio::test(start_paused = true)]
    async fn budget_then_ban_then_doubling() {
        let d = Defence::new(config());
        let delays: Vec<_> = futures_collect(&d, "192.0.2.1", 6).await;
        assert_eq!(
            delays,
            [2, 4, 8, 15, 15, 15].map(|s| Ok(Duration::from_secs(s))).to_vec(),
            "tarpit grows, the 6th failure spends the budget"
        );
        assert!(d.is_banned("192.0.2.1".parse().unwrap()));
        assert!(matches!(fail(&d, "192.0.2.1", "a", "x").await, Err(Refusal::Banned { .. })));
        assert!(matches!(d.admit("192.0.2.1".parse().unwrap()), Err(Refusal::Banned { .. })));
        // Another address is not affected.
        assert!(fail(&d, "192.0.2.2", "a", "y").await.is_ok());
        // The ban lifts after 10 minutes; the next ban lasts twice as long.
        tokio::time::advance(Duration::from_secs(601)).await;
        d.sweep();
        assert!(!d.is_banned("192.0.2.1".parse().unwrap()));
        tokio::time::advance(Duration::from_secs(600)).await;
        futures_collect(&d, "192.0.2.1", 6).await;
        assert!(d.is_banned("192.0.2.1".parse().unwrap()));
        tokio::time::advance(Duration::from_secs(601)).await;
        assert!(d.is_banned("192.0.2.1".parse().unwrap()), "second ban is 20 minutes");
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(!d.is_banned("192.0.2.1".parse().unwrap()));
    }

    /// `n` failures with distinct passwords from `ip`, each on a fresh account.
    async fn futures_collect(d: &Arc<Defence>, ip: &str, n: usize) -> Vec<Result<Duration, Refusal>> {
        let mut out = Vec::new();
        for i in 0..n {
            out.push(fail(d, ip, &format!("user{i}"), &format!("pw{i}")).await);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn identical_wrong_pair_counts_once() {
        let d = Defence::new(config());
        for _ in 0..20 {
            assert_eq!(fail(&d, "192.0.2.9", "phone@example.org", "old-password").await, Ok(Duration::from_secs(2)));
        }
        assert!(!d.is_banned("192.0.2.9".parse().unwrap()));
        // A different wrong password does count.
        assert_eq!(fail(&d, "192.0.2.9", "phone@example.org", "other").await, Ok(Duration::from_secs(4)));
    }

    #[tokio::test(start_paused = true)]
    async fn trusted_networks_are_never_banned_but_accounts_count() {
        let d = Defence::new(DefenceConfig { trusted: vec!["10.0.0.0/8".parse().unwrap()], ..config() });
        for i in 0..50 {
            assert_eq!(fail(&d, "10.1.1.1", "victim@example.org", &format!("guess{i}")).await.map(|_| ()), Ok(()));
        }
        assert!(!d.is_banned("10.1.1.1".parse().unwrap()));
        // The account is now blocked for prefixes that never logged into it, even the trusted one.
        assert_eq!(fail(&d, "10.1.1.1", "victim@example.org", "again").await, Err(Refusal::AccountBlocked));
    }

    #[tokio::test(start_paused = true)]
    async fn account_block_spares_known_prefixes_and_resets_on_success() {
        let d = Defence::new(DefenceConfig { failures: 1000, wide_failures: 1000, ..config() });
        let home = "198.51.100.7";
        let permit = d.begin_login(home.parse().unwrap(), &user("Ana@Example.org")).await.unwrap();
        d.login_succeeded(permit);
        // 50 failures from 50 addresses.
        for i in 0..50 {
            fail(&d, &format!("203.0.113.{i}"), "ana@example.org", &format!("guess{i}")).await.unwrap();
        }
        assert_eq!(fail(&d, "203.0.113.200", "ana@example.org", "more").await, Err(Refusal::AccountBlocked));
        // Case and normalisation do not escape: "ANA@EXAMPLE.ORG" is the same account.
        assert_eq!(fail(&d, "203.0.113.201", "ANA@EXAMPLE.ORG", "more").await, Err(Refusal::AccountBlocked));
        // The real user, from a prefix that logged in before, still gets through (after the account delay).
        let started = Instant::now();
        let permit = d.begin_login(home.parse().unwrap(), &user("ana@example.org")).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(15), "account delay applies");
        d.login_succeeded(permit);
        assert!(fail(&d, "203.0.113.202", "ana@example.org", "x").await.is_ok(), "a success resets the count");
    }

    #[tokio::test(start_paused = true)]
    async fn a_parallel_burst_cannot_slip_past_the_account_block() {
        let d = Defence::new(DefenceConfig { failures: 1000, ..config() });
        let mut tasks = Vec::new();
        for i in 0..60 {
            let d = Arc::clone(&d);
            tasks.push(tokio::spawn(async move {
                d.begin_login(format!("203.0.113.{i}").parse().unwrap(), &user("target")).await
            }));
        }
        // Permits are held (the logins are "at the backend") until every attempt has its answer.
        let mut held = Vec::new();
        let mut blocked = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(permit) => held.push(permit),
                Err(Refusal::AccountBlocked) => blocked += 1,
                Err(other) => panic!("{other:?}"),
            }
        }
        assert_eq!(held.len(), 50);
        // Pending logins count before their outcome: only 50 are let through at once.
        assert!(blocked >= 10, "{blocked} blocked");
    }

    #[tokio::test(start_paused = true)]
    async fn parallel_logins_from_a_known_prefix_are_not_delayed() {
        let d = Defence::new(DefenceConfig { auth_in_flight: 100, ..config() });
        let home: IpAddr = "198.51.100.9".parse().unwrap();
        let first = d.begin_login(home, &user("shared@example.org")).await.unwrap();
        d.login_succeeded(first);
        // Sixty devices of the same account log in at once from the known prefix: no delay, no block.
        let started = Instant::now();
        let mut held = Vec::new();
        for _ in 0..60 {
            held.push(d.begin_login(home, &user("shared@example.org")).await.unwrap());
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn account_delay_grows_after_threshold() {
        let d = Defence::new(DefenceConfig { failures: 1000, ..config() });
        for i in 0..5 {
            fail(&d, &format!("203.0.113.{i}"), "bob", &format!("g{i}")).await.unwrap();
        }
        let started = Instant::now();
        let permit = d.begin_login("203.0.113.99".parse().unwrap(), &user("bob")).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        drop(permit);
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_rotation_within_a_48_is_caught() {
        let d = Defence::new(DefenceConfig { wide_failures: 10, ..config() });
        for i in 0..11 {
            // A new /64 every time, all inside 2001:db8:7::/48.
            fail(&d, &format!("2001:db8:7:{i:x}::1"), &format!("u{i}"), "pw").await.unwrap();
        }
        assert!(d.is_banned("2001:db8:7:ffff::1".parse().unwrap()), "the /48 is banned");
        assert!(!d.is_banned("2001:db8:8::1".parse().unwrap()));
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_logins_per_prefix_are_capped() {
        let d = Defence::new(config());
        let a = d.begin_login("192.0.2.50".parse().unwrap(), &user("a")).await.unwrap();
        let _b = d.begin_login("192.0.2.50".parse().unwrap(), &user("b")).await.unwrap();
        let c = user("c");
        let third = tokio::time::timeout(Duration::from_secs(1), d.begin_login("192.0.2.50".parse().unwrap(), &c));
        assert!(third.await.is_err(), "a third login waits");
        drop(a);
        assert!(d.begin_login("192.0.2.50".parse().unwrap(), &user("c")).await.is_ok());
        assert_eq!(d.stats().max_in_flight, 2);
        // Waiting longer than the queue timeout is refused.
        let _c = d.begin_login("192.0.2.50".parse().unwrap(), &user("d")).await.unwrap();
        assert_eq!(d.begin_login("192.0.2.50".parse().unwrap(), &user("e")).await.err(), Some(Refusal::Busy));
    }

    #[tokio::test(start_paused = true)]
    async fn admission_caps_and_deny_list() {
        let d = Defence::new(DefenceConfig {
            connections_per_prefix: 3,
            connection_burst: 5,
            connection_rate_per_minute: 60,
            deny: vec!["198.18.0.0/15".parse().unwrap()],
            ..config()
        });
        assert_eq!(d.admit("198.18.1.1".parse().unwrap()).err(), Some(Refusal::Denied));
        let ip: IpAddr = "192.0.2.77".parse().unwrap();
        let guards: Vec<_> = (0..3).map(|_| d.admit(ip).unwrap()).collect();
        assert_eq!(d.admit(ip).err(), Some(Refusal::PrefixConnections));
        drop(guards);
        // Burst of 5 used 3; two more pass, then the rate limit holds until time passes.
        drop(d.admit(ip).unwrap());
        drop(d.admit(ip).unwrap());
        assert_eq!(d.admit(ip).err(), Some(Refusal::ConnectionRate));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(d.admit(ip).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_under_a_flood_of_prefixes() {
        let d = Defence::new(DefenceConfig { max_tracked: 1000, ..config() });
        for i in 0..20_000u32 {
            // A distinct /64 in a distinct /48 each time.
            let ip = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, (i >> 16) as u16, i as u16, 0, 0, 0, 0, 1));
            let permit = d.begin_login(ip, &user(&format!("u{i}"))).await.unwrap();
            d.login_failed(permit, &user(&format!("u{i}")), &pw("x"));
            if i % 1000 == 0 {
                d.sweep();
            }
        }
        d.sweep();
        let stats = d.stats();
        assert!(stats.tracked_prefixes <= 1000, "{stats:?}");
        assert!(stats.tracked_accounts <= 1000, "{stats:?}");
        assert!(stats.limiter_keys <= 3 * 2000, "{stats:?}");
    }
}
