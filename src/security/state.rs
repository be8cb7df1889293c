//! The defence's state behind one small interface: what the facade asks (admit a connection, start and end a
//! login, look up bans) and what it gets back (decisions and their effects). [`LocalState`] keeps it in this
//! process in bounded tables; a shared store (several instances through Redis) implements the same trait.
//!
//! Every call is synchronous and short: the facade does the waiting (login slots, delays) outside.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tokio::time::Instant;

use super::accounts::{Account, AccountCheck, Fingerprint, Lane};
use super::bans::Bans;
use super::shared::Evidence;
use super::snapshot::Snapshot;
use super::standing::{AdmitError, Limits, Standing};
use super::table::Table;
use crate::config::DefenceConfig;

/// Why a connection or a login was refused without asking a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The address is on the deny list.
    Denied,
    /// The prefix (or its IPv6 bucket) is banned.
    Banned { remaining: Duration },
    /// Too many connections from the prefix that have not logged in.
    PrefixConnections,
    /// Connections from the prefix that do not log in arrive too fast.
    ConnectionRate,
    /// The account is under attack and this prefix never logged into it.
    AccountBlocked,
    /// The same wrong (user, password) pair failed moments ago; answered like a wrong password.
    Repeated,
    /// The prefix overflowed its failure budget; it keeps its familiar accounts but no others for now.
    UnfamiliarClosed,
    /// No login slot for the prefix became free in time, or the tables are full of live entries.
    Busy,
    /// The shared state store is unreachable and `[state] on_error = "closed"`.
    StateUnavailable,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Denied => "deny_list",
            Refusal::Banned { .. } => "banned",
            Refusal::PrefixConnections => "prefix_connections",
            Refusal::ConnectionRate => "connection_rate",
            Refusal::AccountBlocked => "account_blocked",
            Refusal::Repeated => "repeated_failure",
            Refusal::UnfamiliarClosed => "unfamiliar_closed",
            Refusal::Busy => "busy",
            Refusal::StateUnavailable => "state_unavailable",
        }
    }
}

/// The keys a client address is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keys {
    pub prefix: IpNet,
    /// The coarse IPv6 bucket.
    pub wide: Option<IpNet>,
    /// Trusted networks have no per-address state; their logins still count per account.
    pub trusted: bool,
}

impl Keys {
    fn all(&self) -> impl Iterator<Item = IpNet> {
        std::iter::once(self.prefix).chain(self.wide)
    }

    /// The keys that carry per-address state: none for trusted networks.
    pub fn counted(&self) -> impl Iterator<Item = IpNet> {
        self.all().filter(|_| !self.trusted)
    }
}

/// A login allowed to go to a backend, as the state sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub keys: Keys,
    pub account: String,
    pub lane: Lane,
    /// Counted as pending for the account.
    counted: bool,
}

/// The answer to "may this login start?".
#[derive(Debug)]
pub enum Begin {
    Go(Ticket),
    /// The account has recent failures: wait the `n`-th tarpit step (holding no place), then ask again.
    Delay(u32),
    /// No room now; ask again when a login ends.
    Wait,
    Refused(Refusal),
}

/// What a failed login changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FailureEffects {
    /// The pair was wrong before: not counted again.
    pub repeated: bool,
    /// The tarpit step for the answer.
    pub level: u32,
    /// The account's consecutive failures, and whether this one blocked it.
    pub consecutive: u32,
    pub account_blocked: bool,
    /// Keys banned now: (key, reason, duration).
    pub banned: Vec<(IpNet, &'static str, Duration)>,
    /// Keys closed to unfamiliar accounts now (they had standing): (key, duration).
    pub closed: Vec<(IpNet, Duration)>,
}

/// Figures for monitoring and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DefenceStats {
    pub tracked_prefixes: usize,
    pub tracked_accounts: usize,
    pub ban_entries: usize,
    pub active_bans: usize,
    /// Entries dropped from full tables (least recently used first) since start.
    pub evicted: u64,
    /// The most logins one prefix had in flight at once since start.
    pub max_in_flight: u64,
}

/// A prefix's standing as the admin API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct StandingView {
    /// Counted failures still in the bucket.
    pub failures: f64,
    /// Failures tolerated before a ban: the budget plus what recent successes earned.
    pub tolerated: f64,
    /// Recent successful logins (decayed).
    pub successes: f64,
    pub unauthenticated: u32,
    pub in_flight: u32,
}

/// Housekeeping results.
#[derive(Debug, Default)]
pub struct Swept {
    pub unbanned: Vec<IpNet>,
    pub reopened: Vec<IpNet>,
}

/// The operations the defence needs from its state.
pub trait DefenceState: Send + Sync {
    /// A new connection, before TLS: bans, unauthenticated-connection caps and connection rates.
    fn admit(&self, keys: &Keys, now: Instant) -> Result<(), Refusal>;
    /// The connection logged in: it stops counting as unauthenticated and its rate token comes back.
    fn logged_in(&self, keys: &Keys, now: Instant);
    /// The connection closed.
    fn closed(&self, keys: &Keys, logged_in: bool);
    /// May this login go to a backend now? `delayed`: the caller has waited out the account's delay.
    fn begin_login(&self, keys: &Keys, account: &str, fingerprint: &Fingerprint, delayed: bool, now: Instant) -> Begin;
    /// The login ended without an outcome (the session went away).
    fn abandon(&self, ticket: &Ticket);
    fn succeeded(&self, ticket: &Ticket, now: Instant);
    fn failed(&self, ticket: &Ticket, fingerprint: Fingerprint, now: Instant) -> FailureEffects;
    /// The longest ban in force on these keys.
    fn banned(&self, keys: &Keys, now: Instant) -> Option<Duration>;
    /// The tarpit step of the prefix now.
    fn level(&self, keys: &Keys, now: Instant) -> u32;
    fn sweep(&self, now: Instant) -> Swept;
    fn stats(&self, now: Instant) -> DefenceStats;
    /// Takes in what the fleet has seen of these keys and this account: failures and standing at least as
    /// high as the fleet's, its bans, the account's failures and familiar prefixes.
    fn absorb(&self, keys: &Keys, account: &str, evidence: &Evidence, now: Instant);
    /// After absorbing a failure's evidence: bans (or closes) the keys whose failures are now over budget and
    /// are not banned or closed yet.
    fn judge(&self, keys: &Keys, now: Instant) -> FailureEffects;
    /// A ban issued by the fleet (by this instance or another): in force for `remaining`, with the fleet's
    /// count for doubling. Returns whether it was news here.
    fn apply_ban(&self, key: IpNet, remaining: Duration, count: u32, now: Instant) -> bool;
    /// The bans in force here (key, time left, count): what an instance brings back to the fleet after
    /// deciding alone.
    fn bans_in_force(&self, now: Instant) -> Vec<(IpNet, Duration, u32)>;
    /// An administrator lifts the ban on `key` and forgives its failures; whether a ban was in force.
    fn lift_ban(&self, key: IpNet, now: Instant) -> bool;
    /// The standing of the keys' prefix, when it is tracked (not for trusted networks).
    fn standing(&self, keys: &Keys, now: Instant) -> Option<StandingView>;
    /// New limits for new decisions (a reload); what was learnt stays.
    fn reconfigure(&self, config: DefenceConfig);
    /// What a restart should remember (see `snapshot`).
    fn export(&self, now: Instant) -> Snapshot;
    /// Takes in a snapshot written by an earlier run; what is known here already stays. Returns how many
    /// bans in force, prefixes and accounts it brought.
    fn import(&self, snapshot: &Snapshot, now: Instant) -> (usize, usize, usize);
}

struct Tables {
    prefixes: Table<IpNet, Standing>,
    accounts: Table<String, Account>,
    bans: Bans,
    /// Prefixes with standing closed to unfamiliar accounts (doubling like bans).
    closures: Bans,
    /// Accounts from a snapshot, by the hash of their name, until a login for one of them comes (then it
    /// moves to `accounts` under its name) or they are old enough to forget.
    restored: Table<String, Account>,
    sweeps: u64,
}

impl Tables {
    /// The account's entry, made from its restored record when there is one.
    fn account(&mut self, account: &str, now: Instant) -> Option<&mut Account> {
        let restored = &mut self.restored;
        let make = || {
            if restored.is_empty() {
                return Account::new(now);
            }
            let hash = super::snapshot::account_hash(account);
            let found = restored.peek_mut(&hash).map(|a| std::mem::replace(a, Account::new(now)));
            if found.is_some() {
                restored.retain(|k, _| *k != hash);
            }
            found.unwrap_or_else(|| Account::new(now))
        };
        self.accounts.entry(&account.to_owned(), make)
    }
}

/// The defence's state in this process.
pub struct LocalState {
    /// Swapped whole by a reload (`reconfigure`); each call works with one version.
    settings: std::sync::RwLock<Arc<Settings>>,
    tables: Mutex<Tables>,
    max_in_flight: AtomicU64,
}

/// The limits a decision is made with.
struct Settings {
    config: DefenceConfig,
    prefix_limits: Limits,
    wide_limits: Limits,
}

impl Settings {
    fn new(config: DefenceConfig) -> Self {
        Settings { prefix_limits: Limits::prefix(&config), wide_limits: Limits::wide(&config), config }
    }

    fn limits(&self, keys: &Keys, key: &IpNet) -> &Limits {
        if keys.wide.as_ref() == Some(key) && *key != keys.prefix { &self.wide_limits } else { &self.prefix_limits }
    }

    /// The per-address keys of a login or connection with their limits (none for trusted networks).
    fn counted<'a>(&'a self, keys: &'a Keys) -> impl Iterator<Item = (IpNet, &'a Limits)> + 'a {
        keys.all().filter(move |_| !keys.trusted).map(move |k| (k, self.limits(keys, &k)))
    }

    /// The limits of a key from a snapshot: the coarse IPv6 bucket's, or a prefix's.
    fn limits_of(&self, key: &IpNet) -> &Limits {
        let wide = matches!(key, IpNet::V6(_))
            && key.prefix_len() == self.config.ipv6_wide_prefix
            && self.config.ipv6_wide_prefix != self.config.ipv6_prefix;
        if wide { &self.wide_limits } else { &self.prefix_limits }
    }
}

impl LocalState {
    pub fn new(config: DefenceConfig) -> Self {
        let max = config.max_tracked;
        let tables = Tables {
            prefixes: Table::new(max),
            accounts: Table::new(max),
            bans: Bans::new(max),
            closures: Bans::new(max),
            restored: Table::new(max),
            sweeps: 0,
        };
        Self {
            settings: std::sync::RwLock::new(Arc::new(Settings::new(config))),
            tables: Mutex::new(tables),
            max_in_flight: AtomicU64::new(0),
        }
    }

    fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        // A panic while holding the lock cannot leave the tables inconsistent beyond a counter; go on.
        self.tables.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A key's failures overflowed its budget: banned, or (with standing) closed to unfamiliar accounts; not
    /// again if that is in force already (a login that was in flight when it happened).
    fn overflowed(
        s: &Settings,
        tables: &mut Tables,
        key: IpNet,
        is_prefix: bool,
        has_standing: bool,
        now: Instant,
        effects: &mut FailureEffects,
    ) {
        let already = tables.bans.remaining([key], now).is_some() || tables.closures.remaining([key], now).is_some();
        if already {
            return;
        }
        if has_standing {
            let duration = tables.closures.ban(key, now, &s.config);
            effects.closed.push((key, duration));
        } else {
            let reason = if is_prefix { "failure_budget" } else { "wide_failure_budget" };
            let duration = tables.bans.ban(key, now, &s.config);
            effects.banned.push((key, reason, duration));
        }
    }
}

impl DefenceState for LocalState {
    fn admit(&self, keys: &Keys, now: Instant) -> Result<(), Refusal> {
        let s = self.settings();
        let mut tables = self.lock();
        if let Some(remaining) = tables.bans.remaining(keys.all(), now) {
            return Err(Refusal::Banned { remaining });
        }
        let mut admitted: Vec<(IpNet, &Limits)> = Vec::new();
        let mut outcome = Ok(());
        for (key, limits) in s.counted(keys) {
            let Some(standing) = tables.prefixes.entry(&key, || Standing::new(now, limits)) else {
                outcome = Err(Refusal::Busy);
                break;
            };
            match standing.admit(now, limits) {
                Ok(()) => admitted.push((key, limits)),
                Err(e) => {
                    outcome = Err(match e {
                        AdmitError::Connections => Refusal::PrefixConnections,
                        AdmitError::Rate => Refusal::ConnectionRate,
                    });
                    break;
                }
            }
        }
        match outcome {
            Ok(()) => admitted.iter().for_each(|(key, _)| tables.prefixes.pin(key)),
            // Undo the keys that did admit: as if the connection logged in at once.
            Err(_) => {
                for (key, limits) in admitted {
                    if let Some(standing) = tables.prefixes.peek_mut(&key) {
                        standing.logged_in(now, limits);
                    }
                }
            }
        }
        outcome
    }

    fn logged_in(&self, keys: &Keys, now: Instant) {
        let s = self.settings();
        let mut tables = self.lock();
        for (key, limits) in s.counted(keys) {
            if let Some(standing) = tables.prefixes.peek_mut(&key) {
                standing.logged_in(now, limits);
            }
        }
    }

    fn closed(&self, keys: &Keys, logged_in: bool) {
        let s = self.settings();
        let mut tables = self.lock();
        for (key, _) in s.counted(keys) {
            if !logged_in {
                if let Some(standing) = tables.prefixes.peek_mut(&key) {
                    standing.closed_unauthenticated();
                }
            }
            tables.prefixes.unpin(&key);
        }
    }

    fn begin_login(&self, keys: &Keys, account: &str, fingerprint: &Fingerprint, delayed: bool, now: Instant) -> Begin {
        let s = self.settings();
        let mut tables = self.lock();
        if !keys.trusted {
            if let Some(remaining) = tables.bans.remaining(keys.all(), now) {
                return Begin::Refused(Refusal::Banned { remaining });
            }
        }
        let account_key = account.to_owned();
        let Some(state) = tables.account(account, now) else {
            return Begin::Refused(Refusal::Busy);
        };
        let (lane, delay_level, counted, known) = match state.check(keys.prefix, fingerprint, now, &s.config) {
            AccountCheck::Blocked => return Begin::Refused(Refusal::AccountBlocked),
            AccountCheck::Repeated => return Begin::Refused(Refusal::Repeated),
            AccountCheck::Go { lane, delay_level, counted, known } => (lane, delay_level, counted, known),
        };
        // A closed prefix keeps the accounts that logged in from it, even one an attacker failed on since (a
        // guess must not lock the real user out), but those go one at a time.
        let closed = !keys.trusted && tables.closures.remaining(keys.all(), now).is_some();
        if closed && !known {
            return Begin::Refused(Refusal::UnfamiliarClosed);
        }
        if delay_level > 0 && !delayed {
            return Begin::Delay(delay_level);
        }
        let familiar = lane == Lane::Familiar;
        for (key, limits) in s.counted(keys) {
            let Some(standing) = tables.prefixes.entry(&key, || Standing::new(now, limits)) else {
                return Begin::Refused(Refusal::Busy);
            };
            if !standing.may_start_login(now, limits, familiar, closed) {
                return Begin::Wait;
            }
        }
        for (key, _) in s.counted(keys) {
            if let Some(standing) = tables.prefixes.get_mut(&key) {
                standing.start_login(now, familiar);
                self.max_in_flight.fetch_max(u64::from(standing.logins()), Ordering::Relaxed);
            }
            tables.prefixes.pin(&key);
        }
        if let Some(state) = tables.accounts.get_mut(&account_key) {
            state.start(counted);
        }
        tables.accounts.pin(&account_key);
        Begin::Go(Ticket { keys: *keys, account: account_key, lane, counted })
    }

    fn abandon(&self, ticket: &Ticket) {
        let s = self.settings();
        let mut tables = self.lock();
        end(&mut tables, s.counted(&ticket.keys).map(|(k, _)| k), ticket);
    }

    fn succeeded(&self, ticket: &Ticket, now: Instant) {
        let s = self.settings();
        let mut tables = self.lock();
        if let Some(state) = tables.accounts.get_mut(&ticket.account) {
            state.succeeded(ticket.keys.prefix, now);
        }
        for (key, limits) in s.counted(&ticket.keys) {
            if let Some(standing) = tables.prefixes.get_mut(&key) {
                standing.succeeded(now, limits);
            }
        }
        end(&mut tables, s.counted(&ticket.keys).map(|(k, _)| k), ticket);
    }

    fn failed(&self, ticket: &Ticket, fingerprint: Fingerprint, now: Instant) -> FailureEffects {
        let s = self.settings();
        let mut tables = self.lock();
        let mut effects = FailureEffects::default();
        if let Some(state) = tables.accounts.get_mut(&ticket.account) {
            let (repeated, blocked) = state.failed(ticket.keys.prefix, fingerprint, now, &s.config);
            effects.repeated = repeated;
            effects.account_blocked = blocked;
            effects.consecutive = state.consecutive();
        }
        let counted = !effects.repeated;
        for (key, limits) in s.counted(&ticket.keys) {
            let Some(standing) = tables.prefixes.get_mut(&key) else { continue };
            let (level, over) = standing.failed(now, limits, counted);
            let has_standing = standing.has_standing(now, limits);
            if key == ticket.keys.prefix {
                effects.level = level;
            }
            if over {
                Self::overflowed(&s, &mut tables, key, key == ticket.keys.prefix, has_standing, now, &mut effects);
            }
        }
        if ticket.keys.trusted {
            effects.level = 0;
        }
        end(&mut tables, s.counted(&ticket.keys).map(|(k, _)| k), ticket);
        effects
    }

    fn banned(&self, keys: &Keys, now: Instant) -> Option<Duration> {
        self.lock().bans.remaining(keys.all(), now)
    }

    fn level(&self, keys: &Keys, now: Instant) -> u32 {
        let s = self.settings();
        let mut tables = self.lock();
        let limits = &s.prefix_limits;
        tables.prefixes.peek_mut(&keys.prefix).map_or(1, |s| s.level(now, limits))
    }

    fn sweep(&self, now: Instant) -> Swept {
        let s = self.settings();
        let config = &s.config;
        let mut tables = self.lock();
        let swept = Swept { unbanned: tables.bans.sweep(now, config), reopened: tables.closures.sweep(now, config) };
        tables.sweeps += 1;
        let (prefix, wide) = (&s.prefix_limits, &s.wide_limits);
        let limits_of = |key: &IpNet| match key {
            IpNet::V6(net) if net.prefix_len() < config.ipv6_prefix => wide,
            _ => prefix,
        };
        if tables.sweeps % 60 == 0 {
            tables.prefixes.retain(|key, s| !s.forgettable(now, limits_of(key)));
            tables.accounts.retain(|_, a| !a.forgettable(now, config));
            tables.restored.retain(|_, a| !a.forgettable(now, config));
        } else {
            tables.prefixes.expire_oldest(|key, s| s.forgettable(now, limits_of(key)));
            tables.accounts.expire_oldest(|_, a| a.forgettable(now, config));
        }
        swept
    }

    fn absorb(&self, keys: &Keys, account: &str, evidence: &Evidence, now: Instant) {
        let s = self.settings();
        let mut tables = self.lock();
        for seen in &evidence.keys {
            if !s.counted(keys).any(|(k, _)| k == seen.key) {
                continue;
            }
            let limits = s.limits(keys, &seen.key);
            if let Some(standing) = tables.prefixes.entry(&seen.key, || Standing::new(now, limits)) {
                standing.absorb(now, limits, seen.failures, seen.successes);
            }
            if let Some((remaining, count)) = seen.ban {
                tables.bans.apply(seen.key, now, remaining, count);
            }
        }
        if let Some(state) = tables.account(account, now) {
            state.absorb(keys.prefix, &evidence.account, now, &s.config);
        }
    }

    fn judge(&self, keys: &Keys, now: Instant) -> FailureEffects {
        let s = self.settings();
        let mut tables = self.lock();
        let mut effects = FailureEffects::default();
        for (key, limits) in s.counted(keys) {
            let Some(standing) = tables.prefixes.peek_mut(&key) else { continue };
            let over = standing.over_budget(now, limits);
            let has_standing = standing.has_standing(now, limits);
            if key == keys.prefix {
                effects.level = standing.level(now, limits);
            }
            if over {
                Self::overflowed(&s, &mut tables, key, key == keys.prefix, has_standing, now, &mut effects);
            }
        }
        effects
    }

    fn apply_ban(&self, key: IpNet, remaining: Duration, count: u32, now: Instant) -> bool {
        self.lock().bans.apply(key, now, remaining, count)
    }

    fn bans_in_force(&self, now: Instant) -> Vec<(IpNet, Duration, u32)> {
        self.lock().bans.in_force(now)
    }

    fn standing(&self, keys: &Keys, now: Instant) -> Option<StandingView> {
        let s = self.settings();
        if keys.trusted {
            return None;
        }
        let limits = s.limits(keys, &keys.prefix);
        let mut tables = self.lock();
        let standing = tables.prefixes.peek_mut(&keys.prefix)?;
        Some(StandingView {
            failures: standing.failures(now, limits),
            tolerated: standing.tolerated(now, limits),
            successes: standing.successes(now, limits),
            unauthenticated: standing.unauthenticated,
            in_flight: standing.in_flight + standing.in_flight_familiar,
        })
    }

    fn lift_ban(&self, key: IpNet, now: Instant) -> bool {
        let mut tables = self.lock();
        if let Some(standing) = tables.prefixes.peek_mut(&key) {
            standing.forgive(now);
        }
        tables.bans.lift(key, now)
    }

    fn reconfigure(&self, config: DefenceConfig) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Settings::new(config));
    }

    fn export(&self, now: Instant) -> Snapshot {
        let s = self.settings();
        let mut tables = self.lock();
        let tables = &mut *tables;
        let mut prefixes = Vec::new();
        for (key, standing) in tables.prefixes.iter_mut() {
            let limits = s.limits_of(key);
            let record = standing.record(*key, now, limits);
            if record.failures >= 0.01 || record.successes >= 0.01 {
                prefixes.push(record);
            }
        }
        let mut accounts: Vec<_> =
            tables.accounts.iter().map(|(name, a)| a.record(super::snapshot::account_hash(name), now)).collect();
        accounts.extend(tables.restored.iter().map(|(hash, a)| a.record(hash.clone(), now)));
        Snapshot {
            bans: tables.bans.export(now),
            closures: tables.closures.export(now),
            prefixes,
            accounts,
            ..Snapshot::default()
        }
    }

    fn import(&self, snapshot: &Snapshot, now: Instant) -> (usize, usize, usize) {
        let s = self.settings();
        let mut tables = self.lock();
        for ban in &snapshot.bans {
            tables.bans.import(ban, now);
        }
        for closure in &snapshot.closures {
            tables.closures.import(closure, now);
        }
        let mut prefixes = 0;
        for record in &snapshot.prefixes {
            let limits = s.limits_of(&record.key);
            if let Some(standing) = tables.prefixes.entry(&record.key, || Standing::new(now, limits)) {
                standing.absorb(now, limits, record.failures, record.successes);
                prefixes += 1;
            }
        }
        let mut accounts = 0;
        for record in &snapshot.accounts {
            let account = Account::from_record(record, now);
            if tables.restored.entry(&record.account, || account).is_some() {
                accounts += 1;
            }
        }
        (tables.bans.active(now), prefixes, accounts)
    }

    fn stats(&self, now: Instant) -> DefenceStats {
        let tables = self.lock();
        DefenceStats {
            tracked_prefixes: tables.prefixes.len(),
            tracked_accounts: tables.accounts.len(),
            ban_entries: tables.bans.entries(),
            active_bans: tables.bans.active(now),
            evicted: tables.prefixes.evicted() + tables.accounts.evicted(),
            max_in_flight: self.max_in_flight.load(Ordering::Relaxed),
        }
    }
}

/// A login's end, whatever its outcome: its places are released and its entries unpinned.
fn end(tables: &mut Tables, keys: impl Iterator<Item = IpNet>, ticket: &Ticket) {
    for key in keys {
        if let Some(standing) = tables.prefixes.peek_mut(&key) {
            standing.end_login(ticket.lane == Lane::Familiar);
        }
        tables.prefixes.unpin(&key);
    }
    if let Some(state) = tables.accounts.peek_mut(&ticket.account) {
        state.end(ticket.counted);
    }
    tables.accounts.unpin(&ticket.account);
}
