//! Per-account protection, counting failures, not traffic, in the model of smart lockout: consecutive
//! failures of an account from anywhere delay further logins and, past a threshold, block the account for
//! prefixes that never logged into it, while the prefixes it did log in from (familiar ones) keep access.
//! The same wrong (user, password) pair counts once; only a keyed fingerprint of it is kept, and a repeat
//! within a short time is answered at the door without asking a backend.
//!
//! Logins in flight count toward the thresholds only where they could be guesses: the account has failures
//! and the login comes from a prefix that is unfamiliar or has failed for it. Parallel correct logins of a
//! shared mailbox are never delayed.

use std::collections::VecDeque;
use std::time::Duration;

use ipnet::IpNet;
use tokio::time::Instant;

use super::shared::AccountEvidence;
use super::snapshot::AccountRecord;
use crate::config::DefenceConfig;

/// A keyed hash of (account, password).
pub type Fingerprint = [u8; 16];

/// Distinct wrong pairs remembered per account.
const RECENT_PAIRS: usize = 8;
/// Prefixes remembered per account as having logged in successfully.
const KNOWN_PREFIXES: usize = 16;
/// Prefixes remembered per account as having failed for it.
const FAILED_PREFIXES: usize = 8;

/// How a login relates to the account's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// The account logged in from this prefix before and has no failures from it.
    Familiar,
    /// Anything else.
    Unfamiliar,
}

/// Whether a login may go ahead, as far as the account is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountCheck {
    /// Go, after the `delay_level`-th tarpit step; `counted` says whether it counts as pending; `known`
    /// whether the account has logged in from this prefix before (even if it failed from it since).
    Go { lane: Lane, delay_level: u32, counted: bool, known: bool },
    /// Blocked for this prefix (unfamiliar, over the threshold).
    Blocked,
    /// The same wrong pair failed moments ago: answer it at the door.
    Repeated,
}

#[derive(Debug)]
pub struct Account {
    consecutive: u32,
    pending: u32,
    last_failure: Option<Instant>,
    recent: VecDeque<(Fingerprint, Instant)>,
    known: Vec<IpNet>,
    failed_from: Vec<IpNet>,
    pub last_seen: Instant,
}

impl Account {
    /// What a snapshot keeps of the account (under `name`, its hash): no fingerprints.
    pub fn record(&self, name: String, now: Instant) -> AccountRecord {
        AccountRecord {
            account: name,
            consecutive: self.consecutive,
            since_failure_ms: self.last_failure.map(|at| now.saturating_duration_since(at).as_millis() as u64),
            since_seen_ms: now.saturating_duration_since(self.last_seen).as_millis() as u64,
            known: self.known.clone(),
            failed_from: self.failed_from.clone(),
        }
    }

    /// The account as a snapshot left it (bounded as the live one is).
    pub fn from_record(record: &AccountRecord, now: Instant) -> Self {
        let ago = |ms: u64| now.checked_sub(Duration::from_millis(ms)).unwrap_or(now);
        let mut known = record.known.clone();
        known.truncate(KNOWN_PREFIXES);
        let mut failed_from = record.failed_from.clone();
        failed_from.truncate(FAILED_PREFIXES);
        Self {
            consecutive: record.consecutive,
            pending: 0,
            last_failure: record.since_failure_ms.map(ago),
            recent: VecDeque::new(),
            known,
            failed_from,
            last_seen: ago(record.since_seen_ms),
        }
    }

    pub fn new(now: Instant) -> Self {
        Self {
            consecutive: 0,
            pending: 0,
            last_failure: None,
            recent: VecDeque::new(),
            known: Vec::new(),
            failed_from: Vec::new(),
            last_seen: now,
        }
    }

    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }

    pub fn knows(&self, prefix: &IpNet) -> bool {
        self.known.contains(prefix)
    }

    /// Forgets failures after `reset` without any.
    fn expire(&mut self, now: Instant, config: &DefenceConfig) {
        if self.last_failure.is_some_and(|at| now.saturating_duration_since(at) >= config.account_reset) {
            self.consecutive = 0;
            self.recent.clear();
            self.failed_from.clear();
            self.last_failure = None;
        }
        self.recent.retain(|(_, at)| now.saturating_duration_since(*at) < config.window);
    }

    /// Before a login goes to a backend.
    pub fn check(
        &mut self,
        prefix: IpNet,
        fingerprint: &Fingerprint,
        now: Instant,
        config: &DefenceConfig,
    ) -> AccountCheck {
        self.expire(now, config);
        self.last_seen = now;
        let known = self.knows(&prefix);
        let failed_here = self.failed_from.contains(&prefix);
        let lane = if known && !failed_here { Lane::Familiar } else { Lane::Unfamiliar };
        let counted = self.consecutive > 0 && (!known || failed_here);
        let load = self.consecutive + if counted { self.pending } else { 0 };
        if !known && load >= config.account_block_after {
            return AccountCheck::Blocked;
        }
        if self.repeats(fingerprint, now, config.repeat_window) {
            return AccountCheck::Repeated;
        }
        let delay_level = match load.checked_sub(config.account_delay_after) {
            Some(over) => over + 1,
            None => 0,
        };
        AccountCheck::Go { lane, delay_level, counted, known }
    }

    fn repeats(&self, fingerprint: &Fingerprint, now: Instant, within: Duration) -> bool {
        !within.is_zero()
            && self.recent.iter().any(|(fp, at)| fp == fingerprint && now.saturating_duration_since(*at) < within)
    }

    pub fn start(&mut self, counted: bool) {
        if counted {
            self.pending += 1;
        }
    }

    pub fn end(&mut self, counted: bool) {
        if counted {
            self.pending = self.pending.saturating_sub(1);
        }
    }

    /// A success: failures reset, the prefix becomes familiar.
    pub fn succeeded(&mut self, prefix: IpNet, now: Instant) {
        self.consecutive = 0;
        self.recent.clear();
        self.failed_from.clear();
        self.last_failure = None;
        self.last_seen = now;
        if !self.known.contains(&prefix) {
            if self.known.len() == KNOWN_PREFIXES {
                self.known.remove(0);
            }
            self.known.push(prefix);
        }
    }

    /// A wrong pair. Returns whether it repeated one already counted, and whether this failure is the one
    /// that blocks the account.
    pub fn failed(
        &mut self,
        prefix: IpNet,
        fingerprint: Fingerprint,
        now: Instant,
        config: &DefenceConfig,
    ) -> (bool, bool) {
        self.expire(now, config);
        self.last_seen = now;
        self.last_failure = Some(now);
        if let Some(entry) = self.recent.iter_mut().find(|(fp, _)| *fp == fingerprint) {
            // Remembered from its last attempt, so a device that keeps retrying stays answered at the door.
            entry.1 = now;
            return (true, false);
        }
        self.consecutive += 1;
        if self.recent.len() == RECENT_PAIRS {
            self.recent.pop_front();
        }
        self.recent.push_back((fingerprint, now));
        if !self.failed_from.contains(&prefix) {
            if self.failed_from.len() == FAILED_PREFIXES {
                self.failed_from.remove(0);
            }
            self.failed_from.push(prefix);
        }
        (false, self.consecutive == config.account_block_after)
    }

    /// What the fleet has seen of the account from `prefix`. A success there more recent than this
    /// instance's last failure resets what this instance counted; otherwise the higher count stands.
    pub fn absorb(&mut self, prefix: IpNet, seen: &AccountEvidence, now: Instant, config: &DefenceConfig) {
        self.expire(now, config);
        let success_at = seen.since_success.and_then(|d| now.checked_sub(d));
        let failure_at = seen.since_failure.and_then(|d| now.checked_sub(d));
        let reset = match (success_at, self.last_failure) {
            (Some(success), Some(failure)) => success > failure,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if reset {
            self.consecutive = seen.consecutive;
            self.failed_from.clear();
            if seen.consecutive == 0 {
                self.last_failure = None;
            }
        } else {
            self.consecutive = self.consecutive.max(seen.consecutive);
        }
        if let Some(at) = failure_at.filter(|_| seen.consecutive > 0) {
            self.last_failure = Some(self.last_failure.map_or(at, |own| own.max(at)));
        }
        if seen.known && !self.known.contains(&prefix) {
            if self.known.len() == KNOWN_PREFIXES {
                self.known.remove(0);
            }
            self.known.push(prefix);
        }
        if let Some((fingerprint, age)) = seen.repeated.filter(|(_, age)| *age < config.repeat_window) {
            let at = now.checked_sub(age).unwrap_or(now);
            match self.recent.iter_mut().find(|(fp, _)| *fp == fingerprint) {
                Some(entry) => entry.1 = entry.1.max(at),
                None => {
                    if self.recent.len() == RECENT_PAIRS {
                        self.recent.pop_front();
                    }
                    self.recent.push_back((fingerprint, at));
                }
            }
        }
        if seen.failed_here && !self.failed_from.contains(&prefix) {
            if self.failed_from.len() == FAILED_PREFIXES {
                self.failed_from.remove(0);
            }
            self.failed_from.push(prefix);
        }
        self.last_seen = now;
    }

    /// Nothing worth keeping: no failures, nothing pending, and unseen for `forget`.
    pub fn forgettable(&mut self, now: Instant, config: &DefenceConfig) -> bool {
        self.expire(now, config);
        self.pending == 0
            && self.consecutive == 0
            && (self.known.is_empty() || now.saturating_duration_since(self.last_seen) >= config.account_forget)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn parallel_logins_of_a_clean_account_are_not_counted() {
        let config = DefenceConfig::default();
        let now = Instant::now();
        let mut a = Account::new(now);
        for _ in 0..100 {
            let AccountCheck::Go { counted, delay_level, .. } = a.check(net("192.0.2.1/32"), &[0; 16], now, &config)
            else {
                panic!("refused")
            };
            assert!(!counted);
            assert_eq!(delay_level, 0);
            a.start(counted);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeated_pair_is_answered_at_the_door_for_the_repeat_window() {
        let config = DefenceConfig::default();
        let now = Instant::now();
        let mut a = Account::new(now);
        let here = net("192.0.2.1/32");
        assert_eq!(a.failed(here, [1; 16], now, &config), (false, false));
        assert_eq!(a.check(here, &[1; 16], now, &config), AccountCheck::Repeated);
        assert!(
            matches!(a.check(here, &[2; 16], now, &config), AccountCheck::Go { .. }),
            "another password is checked"
        );
        tokio::time::advance(config.repeat_window).await;
        assert!(matches!(a.check(here, &[1; 16], Instant::now(), &config), AccountCheck::Go { .. }));
        assert_eq!(a.failed(here, [1; 16], Instant::now(), &config), (true, false), "still counted once");
    }

    #[tokio::test(start_paused = true)]
    async fn familiar_prefixes_keep_access_when_the_account_is_blocked() {
        let config = DefenceConfig { account_block_after: 3, ..DefenceConfig::default() };
        let now = Instant::now();
        let mut a = Account::new(now);
        let home = net("198.51.100.0/32");
        a.succeeded(home, now);
        for i in 0..3u8 {
            a.failed(net(&format!("203.0.113.{i}/32")), [i; 16], now, &config);
        }
        assert_eq!(a.check(net("203.0.113.9/32"), &[9; 16], now, &config), AccountCheck::Blocked);
        assert!(matches!(a.check(home, &[9; 16], now, &config), AccountCheck::Go { lane: Lane::Familiar, .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn the_fleets_evidence_blocks_and_familiarises_and_a_newer_success_elsewhere_resets() {
        let config = DefenceConfig { account_block_after: 3, ..DefenceConfig::default() };
        let now = Instant::now();
        let (home, away) = (net("198.51.100.0/24"), net("203.0.113.0/24"));
        let mut a = Account::new(now);
        // Failures seen by other instances, and a prefix the account logged in from there.
        let seen = AccountEvidence { consecutive: 3, since_failure: Some(Duration::ZERO), ..Default::default() };
        a.absorb(away, &seen, now, &config);
        assert_eq!(a.check(away, &[1; 16], now, &config), AccountCheck::Blocked);
        a.absorb(home, &AccountEvidence { known: true, ..seen.clone() }, now, &config);
        assert!(matches!(a.check(home, &[1; 16], now, &config), AccountCheck::Go { lane: Lane::Familiar, .. }));
        // A lower count elsewhere does not lower this instance's own.
        a.absorb(away, &AccountEvidence { consecutive: 1, ..seen.clone() }, now, &config);
        assert_eq!(a.consecutive(), 3);
        // A success elsewhere after the last failure here resets it.
        tokio::time::advance(Duration::from_secs(5)).await;
        let later = Instant::now();
        let success = AccountEvidence { since_success: Some(Duration::from_secs(1)), ..Default::default() };
        a.absorb(home, &success, later, &config);
        assert_eq!(a.consecutive(), 0);
        assert!(matches!(a.check(away, &[1; 16], later, &config), AccountCheck::Go { .. }));
    }
}
