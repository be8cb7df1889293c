//! The defence's facade: what sessions and the accept loop call. It turns client addresses into keys,
//! passwords into keyed fingerprints, asks the state ([`DefenceState`]) for decisions, does the waiting
//! (a login slot, the account delay) and reports what happened (log events, bans for the audit log).
//!
//! The parts below it — standing per prefix, accounts, bans, the bounded tables — know nothing of this
//! facade; the guards it hands out hold the state they release into, not the facade.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::Notify;
use tokio::time::Instant;
use unicode_normalization::UnicodeNormalization;

use super::accounts::Fingerprint;
use super::prefix::{self, PrefixPolicy};
use super::shared::{SharedBan, SharedStore};
use super::state::{Begin, DefenceState, DefenceStats, FailureEffects, Keys, LocalState, Refusal, Ticket};
use crate::config::DefenceConfig;
use crate::imap::credentials::{Password, Username};

/// Bans, unbans and closures, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefenceEvent {
    Banned {
        prefix: IpNet,
        reason: &'static str,
        user: String,
        duration: Duration,
    },
    Unbanned {
        prefix: IpNet,
    },
    /// A prefix with standing overflowed its failure budget: only its familiar accounts may log in.
    Closed {
        prefix: IpNet,
        user: String,
        duration: Duration,
    },
    Reopened {
        prefix: IpNet,
    },
}

type EventSink = Arc<dyn Fn(&DefenceEvent) + Send + Sync>;

/// The defence, shared by all sessions.
pub struct Defence {
    events: std::sync::RwLock<Option<EventSink>>,
    /// Swapped by a reload (`reconfigure`).
    config: std::sync::RwLock<Arc<DefenceConfig>>,
    policy: PrefixPolicy,
    state: Arc<dyn DefenceState>,
    /// The fleet's evidence, when instances share it (set once, at start-up).
    store: std::sync::OnceLock<Arc<dyn SharedStore>>,
    /// Woken whenever a login ends, for logins waiting for room.
    ended: Arc<Notify>,
    hash_key: aws_lc_rs::hmac::Key,
    /// The key is the fleet's (`[state] fingerprint_key_file`): fingerprints mean the same on every
    /// instance and are shared.
    shared_fingerprints: bool,
}

/// Held for the life of an admitted connection; frees its place on drop.
pub struct ConnectionGuard {
    state: Arc<dyn DefenceState>,
    keys: Option<Keys>,
    logged_in: bool,
}

impl ConnectionGuard {
    /// The connection logged in: from now on it no longer counts against its prefix's admission limits.
    pub fn logged_in(&mut self) {
        if let (Some(keys), false) = (&self.keys, self.logged_in) {
            self.state.logged_in(keys, Instant::now());
            self.logged_in = true;
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some(keys) = &self.keys {
            self.state.closed(keys, self.logged_in);
        }
    }
}

/// A login allowed to go to a backend: holds its places until the outcome is reported (or it is dropped).
pub struct LoginPermit {
    state: Arc<dyn DefenceState>,
    ended: Arc<Notify>,
    ticket: Option<Ticket>,
}

impl LoginPermit {
    fn take(mut self) -> Option<Ticket> {
        self.ticket.take()
    }
}

impl Drop for LoginPermit {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.state.abandon(&ticket);
        }
        self.ended.notify_waiters();
    }
}

/// Case-folded, NFC form of a username, for per-account counting.
pub fn canonical_account(user: &Username) -> String {
    user.as_str().nfc().collect::<String>().to_lowercase().nfc().collect()
}

impl Defence {
    pub fn new(config: DefenceConfig) -> Arc<Defence> {
        Self::with_fingerprint_secret(config, None)
    }

    /// With `secret`, password fingerprints are keyed by it (the same file on every instance of a fleet)
    /// rather than by a key of this process's own, so that a wrong pair repeated through several instances
    /// counts once.
    pub fn with_fingerprint_secret(config: DefenceConfig, secret: Option<&[u8]>) -> Arc<Defence> {
        let state: Arc<dyn DefenceState> = Arc::new(LocalState::new(config.clone()));
        Self::build(config, state, secret)
    }

    /// A defence over a given state store.
    pub fn with_state(config: DefenceConfig, state: Arc<dyn DefenceState>) -> Arc<Defence> {
        Self::build(config, state, None)
    }

    fn build(config: DefenceConfig, state: Arc<dyn DefenceState>, secret: Option<&[u8]>) -> Arc<Defence> {
        let policy =
            PrefixPolicy { ipv4: config.ipv4_prefix, ipv6: config.ipv6_prefix, ipv6_wide: config.ipv6_wide_prefix };
        let own: [u8; 32] = rand::random();
        Arc::new(Defence {
            events: std::sync::RwLock::new(None),
            hash_key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret.unwrap_or(&own)),
            shared_fingerprints: secret.is_some(),
            policy,
            state,
            store: std::sync::OnceLock::new(),
            ended: Arc::new(Notify::new()),
            config: std::sync::RwLock::new(Arc::new(config)),
        })
    }

    /// Where bans and unbans are reported besides the diagnostic log (at start-up, and again when a reload
    /// moves the audit log).
    pub fn set_event_sink(&self, sink: impl Fn(&DefenceEvent) + Send + Sync + 'static) {
        *self.events.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(sink));
    }

    /// Shares evidence with other instances through `store` from now on (set once, at start-up).
    pub fn attach_store(&self, store: Arc<dyn SharedStore>) {
        let _ = self.store.set(store);
    }

    /// The state decisions are made on, for a store that brings in the fleet's bans.
    pub fn state(&self) -> Arc<dyn DefenceState> {
        Arc::clone(&self.state)
    }

    fn emit(&self, event: DefenceEvent) {
        let sink = self.events.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(sink) = sink {
            sink(&event);
        }
    }

    fn keys(&self, ip: IpAddr) -> Keys {
        let prefix = self.policy.key(ip);
        let wide = self.policy.wide_key(ip).filter(|w| *w != prefix);
        Keys { prefix, wide, trusted: prefix::contains(&self.config().trusted, ip) }
    }

    /// Connection admission, before the TLS handshake.
    /// The prefix an address is counted under (`/24`, `/64` by default): for logs and audit summaries.
    pub fn prefix_of(&self, ip: IpAddr) -> ipnet::IpNet {
        self.policy.key(ip)
    }

    pub fn admit(&self, ip: IpAddr) -> Result<ConnectionGuard, Refusal> {
        let state = Arc::clone(&self.state);
        if !self.config().enabled {
            return Ok(ConnectionGuard { state, keys: None, logged_in: false });
        }
        if prefix::contains(&self.config().deny, ip) {
            return Err(self.refused(ip, Refusal::Denied, None));
        }
        let keys = self.keys(ip);
        if keys.trusted {
            return Ok(ConnectionGuard { state, keys: None, logged_in: false });
        }
        match self.state.admit(&keys, Instant::now()) {
            Ok(()) => Ok(ConnectionGuard { state, keys: Some(keys), logged_in: false }),
            Err(refusal) => Err(self.refused(ip, refusal, None)),
        }
    }

    /// Before a login goes to a backend: refuses banned prefixes, blocked accounts and a wrong pair repeated
    /// moments ago, waits for room among the prefix's logins in flight, and applies the account's delay.
    pub async fn begin_login(&self, ip: IpAddr, user: &Username, password: &Password) -> Result<LoginPermit, Refusal> {
        let permit = |ticket| LoginPermit { state: Arc::clone(&self.state), ended: Arc::clone(&self.ended), ticket };
        if !self.config().enabled {
            return Ok(permit(None));
        }
        let keys = self.keys(ip);
        let account = canonical_account(user);
        let fingerprint = self.fingerprint(&account, password);
        let deadline = Instant::now() + self.config().auth_queue_timeout;
        if let Some(store) = self.store.get() {
            // What the fleet has seen first: bans, failures and standing elsewhere, the account's history.
            match store.view(keys, account.clone(), self.shared_fingerprints.then_some(fingerprint)).await {
                Ok(evidence) => self.state.absorb(&keys, &account, &evidence, Instant::now()),
                Err(_) if store.closed_on_error() => {
                    return Err(self.refused(ip, Refusal::StateUnavailable, Some(user)));
                }
                Err(_) => {}
            }
        }
        let mut delayed = false;
        let ticket = loop {
            // Registered before asking, so that a login ending in between is not missed.
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            match self.state.begin_login(&keys, &account, &fingerprint, delayed, Instant::now()) {
                Begin::Go(ticket) => break ticket,
                Begin::Refused(refusal) => return Err(self.refused(ip, refusal, Some(user))),
                Begin::Delay(level) => {
                    // The account's delay holds no place of the prefix's: guesses waiting here cannot keep
                    // the prefix's other users out.
                    let delay = self.tarpit(level);
                    tracing::info!(
                        event = "account_delay",
                        prefix = %keys.prefix,
                        user = %user,
                        delay_ms = delay.as_millis() as u64,
                        "login delayed: account has recent failures"
                    );
                    tokio::time::sleep(delay).await;
                    delayed = true;
                }
                Begin::Wait => {
                    if tokio::time::timeout_at(deadline, ended).await.is_err() {
                        return Err(self.refused(ip, Refusal::Busy, Some(user)));
                    }
                }
            }
        };
        let permit = permit(Some(ticket));
        Ok(permit)
    }

    /// The backend accepted the login: the account's failures reset, the prefix becomes familiar to it and
    /// earns standing.
    pub fn login_succeeded(&self, permit: LoginPermit) {
        if let Some(ticket) = permit.take() {
            self.state.succeeded(&ticket, Instant::now());
            if let Some(store) = self.store.get() {
                // The session need not wait for the fleet to hear of it (the store bounds the call).
                tokio::spawn(store.succeeded(ticket.keys, ticket.account.clone()));
            }
        }
    }

    /// The credentials were wrong (or the user unknown). Counts the failure (once per distinct wrong pair),
    /// bans or closes the prefix when its budget is spent, and returns how long to wait before answering.
    pub async fn login_failed(&self, permit: LoginPermit, user: &Username, password: &Password) -> Duration {
        let Some(ticket) = permit.take() else { return Duration::ZERO };
        let fingerprint = self.fingerprint(&ticket.account, password);
        let mut effects = self.state.failed(&ticket, fingerprint, Instant::now());
        if let Some(store) = self.store.get() {
            let shared = self.shared_fingerprints.then_some(fingerprint);
            self.share_failure(store.as_ref(), &ticket, shared, &mut effects).await;
        }
        self.report(&ticket, user, &effects);
        if ticket.keys.trusted { Duration::ZERO } else { self.tarpit(effects.level) }
    }

    /// Adds a counted failure to the fleet's evidence, judges the keys on the fleet's figures, and makes every
    /// ban a fleet ban (its duration the fleet's, doubling on the fleet's history).
    async fn share_failure(
        &self,
        store: &dyn SharedStore,
        ticket: &Ticket,
        fingerprint: Option<Fingerprint>,
        effects: &mut FailureEffects,
    ) {
        if !effects.repeated {
            if let Ok(evidence) = store.failed(ticket.keys, ticket.account.clone(), fingerprint).await {
                let now = Instant::now();
                self.state.absorb(&ticket.keys, &ticket.account, &evidence, now);
                let judged = self.state.judge(&ticket.keys, now);
                effects.level = effects.level.max(judged.level);
                effects.banned.extend(judged.banned);
                effects.closed.extend(judged.closed);
            }
        }
        for (key, _, duration) in &mut effects.banned {
            if let Ok(SharedBan { remaining, count, .. }) = store.ban(*key).await {
                self.state.apply_ban(*key, remaining, count, Instant::now());
                *duration = remaining;
            }
        }
    }

    fn report(&self, ticket: &Ticket, user: &Username, effects: &FailureEffects) {
        if effects.account_blocked {
            tracing::warn!(
                event = "account_blocked",
                user = %user,
                failures = effects.consecutive,
                "account blocked for prefixes that never logged into it"
            );
        }
        for (key, reason, duration) in &effects.banned {
            tracing::warn!(
                event = "banned",
                prefix = %key,
                reason,
                user = %user,
                duration_secs = duration.as_secs(),
                "prefix banned"
            );
            self.emit(DefenceEvent::Banned { prefix: *key, reason, user: user.to_string(), duration: *duration });
        }
        for (key, duration) in &effects.closed {
            tracing::warn!(
                event = "unfamiliar_closed",
                prefix = %key,
                user = %user,
                duration_secs = duration.as_secs(),
                "prefix with standing over its failure budget: only accounts familiar with it may log in"
            );
            self.emit(DefenceEvent::Closed { prefix: *key, user: user.to_string(), duration: *duration });
        }
        // The session's "login failed" line carries the delay: one line per failed login.
        tracing::debug!(
            event = "tarpit",
            prefix = %ticket.keys.prefix,
            user = %user,
            repeated_pair = effects.repeated,
            failures = effects.level,
            delay_ms = self.tarpit(effects.level).as_millis() as u64,
            "failed login tarpitted"
        );
    }

    /// Housekeeping, every second: lift expired bans and closures (logged), forget what is stale.
    pub fn sweep(&self) {
        let swept = self.state.sweep(Instant::now());
        for prefix in swept.unbanned {
            tracing::info!(event = "unbanned", prefix = %prefix, "ban lifted");
            self.emit(DefenceEvent::Unbanned { prefix });
        }
        for prefix in swept.reopened {
            tracing::info!(event = "reopened", prefix = %prefix, "prefix open to unfamiliar accounts again");
            self.emit(DefenceEvent::Reopened { prefix });
        }
    }

    fn config(&self) -> Arc<DefenceConfig> {
        Arc::clone(&self.config.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// New limits (a reload of `[defence]`): they apply to the next decisions; bans, budgets, standing and
    /// accounts stay as they are. The prefix lengths and the table sizes key and bound what is kept, so
    /// they cannot change without a restart: such a change is refused, and nothing is applied.
    pub fn reconfigure(&self, config: DefenceConfig) -> Result<(), &'static str> {
        self.check_reconfigure(&config)?;
        self.state.reconfigure(config.clone());
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        Ok(())
    }

    /// Whether `reconfigure` would take `config`.
    pub fn check_reconfigure(&self, config: &DefenceConfig) -> Result<(), &'static str> {
        let current = self.config();
        if (config.ipv4_prefix, config.ipv6_prefix, config.ipv6_wide_prefix, config.max_tracked)
            != (current.ipv4_prefix, current.ipv6_prefix, current.ipv6_wide_prefix, current.max_tracked)
        {
            return Err("defence.ipv4_prefix, ipv6_prefix, ipv6_wide_prefix and max_tracked need a restart");
        }
        Ok(())
    }

    /// What a restart should remember (`memory`).
    pub fn snapshot(&self) -> super::snapshot::Snapshot {
        self.state.export(Instant::now())
    }

    /// Takes in a snapshot from an earlier run: (bans in force, prefixes, accounts) brought.
    pub fn restore(&self, snapshot: &super::snapshot::Snapshot) -> (usize, usize, usize) {
        self.state.import(snapshot, Instant::now())
    }

    pub fn stats(&self) -> DefenceStats {
        self.state.stats(Instant::now())
    }

    /// The bans in force: (prefix, time left, how many times it was banned lately), longest first.
    pub fn bans(&self) -> Vec<(ipnet::IpNet, Duration, u32)> {
        let mut bans = self.state.bans_in_force(Instant::now());
        bans.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        bans
    }

    /// An administrator lifts the ban on `prefix` (and forgives its failures): here, and with a shared
    /// store in the whole fleet (every instance hears of it). Whether one was in force here or in the fleet;
    /// a store that cannot be reached leaves the other instances' bans to run out (logged).
    pub async fn unban(&self, prefix: ipnet::IpNet) -> bool {
        let mut lifted = self.state.lift_ban(prefix, Instant::now());
        if let Some(store) = self.store.get() {
            match store.unban(prefix).await {
                Ok(in_fleet) => lifted |= in_fleet,
                Err(e) => {
                    tracing::warn!(prefix = %prefix, error = %e, "ban lifted here only: the shared store did not answer")
                }
            }
        }
        if lifted {
            tracing::info!(event = "unbanned", prefix = %prefix, "ban lifted by an administrator");
            self.emit(DefenceEvent::Unbanned { prefix });
        }
        lifted
    }

    /// The address's prefix, its standing when tracked (not for trusted networks), and the ban in force.
    pub fn standing(&self, ip: IpAddr) -> (ipnet::IpNet, Option<super::state::StandingView>, Option<Duration>) {
        let keys = self.keys(ip);
        let now = Instant::now();
        (keys.prefix, self.state.standing(&keys, now), self.state.banned(&keys, now))
    }

    /// Whether the address's prefix is banned right now.
    pub fn is_banned(&self, ip: IpAddr) -> bool {
        self.state.banned(&self.keys(ip), Instant::now()).is_some()
    }

    /// How long a refused login waits for its answer: a repeated wrong pair waits like a failure at the
    /// prefix's level; other refusals the longest tarpit step, except when the wait for room already took
    /// its time.
    pub fn refusal_delay(&self, ip: IpAddr, refusal: Refusal) -> Duration {
        match refusal {
            Refusal::Busy | Refusal::StateUnavailable => Duration::ZERO,
            Refusal::Repeated => {
                let keys = self.keys(ip);
                if keys.trusted { Duration::ZERO } else { self.tarpit(self.state.level(&keys, Instant::now())) }
            }
            _ => self.config().tarpit.iter().copied().max().unwrap_or_default(),
        }
    }

    /// The n-th (1-based) tarpit delay; the last configured value repeats.
    fn tarpit(&self, level: u32) -> Duration {
        let table = &self.config().tarpit;
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    async fn begin(d: &Defence, from: &str, name: &str, password: &str) -> Result<LoginPermit, Refusal> {
        d.begin_login(ip(from), &user(name), &pw(password)).await
    }

    async fn fail(d: &Defence, from: &str, name: &str, password: &str) -> Result<Duration, Refusal> {
        let permit = begin(d, from, name, password).await?;
        Ok(d.login_failed(permit, &user(name), &pw(password)).await)
    }

    async fn succeed(d: &Defence, from: &str, name: &str) {
        let permit = begin(d, from, name, "right").await.unwrap();
        d.login_succeeded(permit);
    }

    /// `n` failures with distinct passwords from `from`, each on a fresh account.
    async fn failures(d: &Defence, from: &str, n: usize) -> Vec<Result<Duration, Refusal>> {
        let mut out = Vec::new();
        for i in 0..n {
            out.push(fail(d, from, &format!("user{i}"), &format!("pw{i}")).await);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn budget_then_ban_then_doubling() {
        let d = Defence::new(config());
        let delays = failures(&d, "192.0.2.1", 6).await;
        assert_eq!(
            delays,
            [2, 4, 8, 15, 15, 15].map(|s| Ok(Duration::from_secs(s))).to_vec(),
            "tarpit grows, the 6th failure spends the budget"
        );
        assert!(d.is_banned(ip("192.0.2.1")));
        assert!(matches!(fail(&d, "192.0.2.1", "a", "x").await, Err(Refusal::Banned { .. })));
        assert!(matches!(d.admit(ip("192.0.2.1")), Err(Refusal::Banned { .. })));
        // Another address is not affected.
        assert!(fail(&d, "192.0.2.2", "a", "y").await.is_ok());
        // The ban lifts after 10 minutes; the next ban lasts twice as long.
        tokio::time::advance(Duration::from_secs(601)).await;
        d.sweep();
        assert!(!d.is_banned(ip("192.0.2.1")));
        tokio::time::advance(Duration::from_secs(600)).await;
        failures(&d, "192.0.2.1", 6).await;
        assert!(d.is_banned(ip("192.0.2.1")));
        tokio::time::advance(Duration::from_secs(601)).await;
        assert!(d.is_banned(ip("192.0.2.1")), "second ban is 20 minutes");
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(!d.is_banned(ip("192.0.2.1")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeated_wrong_pair_is_answered_at_the_door_and_counts_once() {
        let d = Defence::new(config());
        assert_eq!(fail(&d, "192.0.2.9", "phone@example.org", "old").await, Ok(Duration::from_secs(2)));
        // Repeats within the minute never reach a backend; they wait like the failure they are.
        for _ in 0..20 {
            assert_eq!(begin(&d, "192.0.2.9", "phone@example.org", "old").await.err(), Some(Refusal::Repeated));
            assert_eq!(d.refusal_delay(ip("192.0.2.9"), Refusal::Repeated), Duration::from_secs(2));
        }
        // After the minute one more check goes through; it still counts once.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(fail(&d, "192.0.2.9", "phone@example.org", "old").await.is_ok());
        assert!(!d.is_banned(ip("192.0.2.9")));
        // A different password is always checked, and counts.
        assert_eq!(fail(&d, "192.0.2.9", "phone@example.org", "other").await, Ok(Duration::from_secs(4)));
        // The right password is never answered at the door.
        succeed(&d, "192.0.2.9", "phone@example.org").await;
    }

    #[tokio::test(start_paused = true)]
    async fn trusted_networks_are_never_banned_but_accounts_count() {
        let d = Defence::new(DefenceConfig { trusted: vec!["10.0.0.0/8".parse().unwrap()], ..config() });
        for i in 0..50 {
            assert_eq!(fail(&d, "10.1.1.1", "victim@example.org", &format!("guess{i}")).await.map(|_| ()), Ok(()));
        }
        assert!(!d.is_banned(ip("10.1.1.1")));
        // The account is now blocked for prefixes that never logged into it, even the trusted one.
        assert_eq!(fail(&d, "10.1.1.1", "victim@example.org", "again").await, Err(Refusal::AccountBlocked));
    }

    #[tokio::test(start_paused = true)]
    async fn account_block_spares_known_prefixes_and_resets_on_success() {
        let d = Defence::new(DefenceConfig { failures: 1000, wide_failures: 1000, ..config() });
        let home = "198.51.100.7";
        succeed(&d, home, "Ana@Example.org").await;
        // 50 failures from 50 addresses.
        for i in 0..50 {
            fail(&d, &format!("203.0.113.{i}"), "ana@example.org", &format!("guess{i}")).await.unwrap();
        }
        assert_eq!(fail(&d, "203.0.113.200", "ana@example.org", "more").await, Err(Refusal::AccountBlocked));
        // Case and normalisation do not escape: "ANA@EXAMPLE.ORG" is the same account.
        assert_eq!(fail(&d, "203.0.113.201", "ANA@EXAMPLE.ORG", "more").await, Err(Refusal::AccountBlocked));
        // The real user, from a prefix that logged in before, still gets through (after the account delay).
        let started = Instant::now();
        let permit = begin(&d, home, "ana@example.org", "right").await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(15), "account delay applies");
        d.login_succeeded(permit);
        assert!(fail(&d, "203.0.113.202", "ana@example.org", "x").await.is_ok(), "a success resets the count");
    }

    #[tokio::test(start_paused = true)]
    async fn a_parallel_burst_cannot_slip_past_the_account_block() {
        let d = Defence::new(DefenceConfig { failures: 1000, ..config() });
        // The account is under attack (it has a failure); then a burst of guesses from many prefixes.
        fail(&d, "203.0.113.250", "target", "first").await.unwrap();
        let mut tasks = Vec::new();
        let d = Arc::new(d);
        for i in 0..60 {
            let d = Arc::clone(&d);
            tasks.push(tokio::spawn(async move {
                d.begin_login(ip(&format!("203.0.113.{i}")), &user("target"), &pw(&format!("g{i}"))).await
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
        assert_eq!(held.len(), 49, "1 failure + 49 pending reach the block threshold");
        assert_eq!(blocked, 11);
    }

    #[tokio::test(start_paused = true)]
    async fn parallel_logins_of_a_shared_mailbox_are_never_delayed() {
        let d = Defence::new(config());
        let home = "198.51.100.9";
        succeed(&d, home, "shared@example.org").await;
        // Sixty devices of the same account log in at once from a prefix it knows: no wait.
        let started = Instant::now();
        let mut held = Vec::new();
        for _ in 0..60 {
            held.push(begin(&d, home, "shared@example.org", "right").await.unwrap());
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        // From a prefix with no record, the first logins go at once and the rest follow as they succeed.
        let d = Arc::new(Defence::new(config()));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let d = Arc::clone(&d);
            tasks.push(tokio::spawn(async move {
                let permit = d.begin_login(ip("192.0.2.60"), &user("shared"), &pw("right")).await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
                d.login_succeeded(permit);
                Ok::<_, Refusal>(Instant::now())
            }));
        }
        let started = Instant::now();
        for t in tasks {
            let done = t.await.unwrap().unwrap();
            assert!(done - started <= Duration::from_millis(30), "{:?}", done - started);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_prefix_without_standing_has_at_most_its_budget_plus_one_logins_out() {
        let d = Arc::new(Defence::new(config()));
        let mut held = Vec::new();
        for i in 0..6 {
            held.push(begin(&d, "192.0.2.50", &format!("u{i}"), "x").await.unwrap());
        }
        let seventh = tokio::time::timeout(Duration::from_secs(1), begin(&d, "192.0.2.50", "u7", "x"));
        assert!(seventh.await.is_err(), "a seventh login waits");
        assert_eq!(d.stats().max_in_flight, 6);
        // One ends without an outcome (the client went away): the waiting login goes.
        let waiting = {
            let d = Arc::clone(&d);
            tokio::spawn(async move { d.begin_login(ip("192.0.2.50"), &user("u7"), &pw("x")).await })
        };
        tokio::task::yield_now().await;
        drop(held.pop());
        let seventh = waiting.await.unwrap().unwrap();
        // Waiting longer than the queue timeout is refused.
        assert_eq!(begin(&d, "192.0.2.50", "u9", "x").await.err(), Some(Refusal::Busy));
        // A success earns standing: one more may start.
        d.login_succeeded(seventh);
        let _eighth = begin(&d, "192.0.2.50", "u8", "x").await.unwrap();
        let _ninth = begin(&d, "192.0.2.50", "u10", "x").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn admission_counts_connections_that_have_not_logged_in() {
        let d = Defence::new(DefenceConfig {
            connections_per_prefix: 3,
            connection_burst: 5,
            connection_rate_per_minute: 60,
            deny: vec!["198.18.0.0/15".parse().unwrap()],
            ..config()
        });
        assert_eq!(d.admit(ip("198.18.1.1")).err(), Some(Refusal::Denied));
        let addr = ip("192.0.2.77");
        let mut guards: Vec<_> = (0..3).map(|_| d.admit(addr).unwrap()).collect();
        assert_eq!(d.admit(addr).err(), Some(Refusal::PrefixConnections));
        // Logged-in connections stop counting and give their rate token back.
        for g in &mut guards {
            g.logged_in();
        }
        let mut more: Vec<_> = (0..3).map(|_| d.admit(addr).unwrap()).collect();
        more.iter_mut().for_each(ConnectionGuard::logged_in);
        assert_eq!(guards.len() + more.len(), 6);
        // Connections that never log in drain the bucket (5), then the rate holds until time passes.
        for _ in 0..5 {
            drop(d.admit(addr).unwrap());
        }
        assert_eq!(d.admit(addr).err(), Some(Refusal::ConnectionRate));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(d.admit(addr).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn standing_earns_admission_capacity() {
        let d = Defence::new(DefenceConfig { connections_per_prefix: 5, connection_burst: 5, ..config() });
        let webmail = "192.0.2.80";
        for i in 0..200 {
            succeed(&d, webmail, &format!("user{i}")).await;
        }
        // 200 recent successes: 205 unauthenticated connections at once, where a prefix with no record gets 5.
        let held: Vec<_> = (0..205).map(|_| d.admit(ip(webmail)).unwrap()).collect();
        assert_eq!(d.admit(ip(webmail)).err(), Some(Refusal::PrefixConnections));
        assert_eq!(held.len(), 205);
        let fresh: Vec<_> = (0..5).map(|_| d.admit(ip("192.0.2.81")).unwrap()).collect();
        assert_eq!(d.admit(ip("192.0.2.81")).err(), Some(Refusal::PrefixConnections));
        drop(fresh);
    }

    #[tokio::test(start_paused = true)]
    async fn stuffing_inside_a_crowd_closes_the_prefix_to_unfamiliar_accounts_only() {
        let d = Defence::new(config());
        let webmail = "192.0.2.90";
        for i in 0..100 {
            succeed(&d, webmail, &format!("user{i}")).await;
        }
        // 100 successes tolerate 5 + 10 failures; the 16th counted failure closes the prefix to accounts
        // that never logged in from it, without banning the crowd.
        let mut closed_after = None;
        for i in 0..40 {
            match fail(&d, webmail, &format!("victim{i}"), "guess").await {
                Ok(_) => {}
                Err(Refusal::UnfamiliarClosed) => {
                    closed_after = Some(i);
                    break;
                }
                Err(other) => panic!("{other:?}"),
            }
        }
        assert_eq!(closed_after, Some(16));
        assert!(!d.is_banned(ip(webmail)), "the crowd is not banned");
        assert!(d.admit(ip(webmail)).is_ok());
        // The crowd's users keep logging in; new accounts from there are refused until the closure lifts.
        for i in 0..100 {
            succeed(&d, webmail, &format!("user{i}")).await;
        }
        assert_eq!(begin(&d, webmail, "newcomer", "pw").await.err(), Some(Refusal::UnfamiliarClosed));
        // A guess on a crowd user's account does not lock that user out of the closed prefix.
        fail(&d, webmail, "user7", "guess").await.unwrap();
        succeed(&d, webmail, "user7").await;
        tokio::time::advance(Duration::from_secs(601)).await;
        d.sweep();
        assert!(begin(&d, webmail, "newcomer", "pw").await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn guesses_waiting_out_an_account_delay_hold_no_place_of_the_prefix() {
        let d = Arc::new(Defence::new(DefenceConfig { failures: 1000, auth_in_flight: 2, ..config() }));
        let crowd = "192.0.2.95";
        succeed(&d, crowd, "colleague").await;
        for i in 0..6 {
            fail(&d, &format!("203.0.113.{i}"), "target", &format!("g{i}")).await.unwrap();
        }
        // Ten guesses at the delayed account from the crowd's address sit in the account delay ...
        let waiting: Vec<_> = (0..10)
            .map(|i| {
                let d = Arc::clone(&d);
                tokio::spawn(async move { d.begin_login(ip(crowd), &user("target"), &pw(&format!("x{i}"))).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        // ... while the crowd's users log in without waiting.
        let started = Instant::now();
        for _ in 0..5 {
            succeed(&d, crowd, "colleague").await;
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        for w in waiting {
            drop(w.await.unwrap());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_prefix_is_not_closed_again_by_guesses_on_its_own_accounts() {
        let d = Defence::new(config());
        let webmail = "192.0.2.91";
        for i in 0..20 {
            succeed(&d, webmail, &format!("user{i}")).await;
        }
        // 5 + 2 tolerated; the 8th counted failure closes.
        for i in 0..8 {
            fail(&d, webmail, &format!("stranger{i}"), "guess").await.unwrap();
        }
        assert_eq!(begin(&d, webmail, "stranger99", "g").await.err(), Some(Refusal::UnfamiliarClosed));
        // Guesses on the crowd's own accounts still fail at the backend, but do not extend the closure.
        for i in 0..10 {
            fail(&d, webmail, &format!("user{i}"), "guess").await.unwrap();
        }
        // Those go one at a time while closed; the crowd's untouched accounts are not held up.
        let first = begin(&d, webmail, "user0", "guess2").await.unwrap();
        let second = tokio::time::timeout(Duration::from_secs(1), begin(&d, webmail, "user1", "guess2"));
        assert!(second.await.is_err(), "a second guess at a crowd account waits");
        succeed(&d, webmail, "user15").await;
        drop(first);
        tokio::time::advance(Duration::from_secs(601)).await;
        d.sweep();
        assert!(begin(&d, webmail, "stranger99", "g").await.is_ok(), "the first closure (10 min) has lifted");
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_rotation_within_a_48_is_caught_in_flight_and_after() {
        let d = Defence::new(DefenceConfig { wide_failures: 10, ..config() });
        for i in 0..11 {
            // A new /64 every time, all inside 2001:db8:7::/48.
            fail(&d, &format!("2001:db8:7:{i:x}::1"), &format!("u{i}"), "pw").await.unwrap();
        }
        assert!(d.is_banned(ip("2001:db8:7:ffff::1")), "the /48 is banned");
        assert!(!d.is_banned(ip("2001:db8:8::1")));
        // Logins in flight count against the /48 too: 11 parallel guesses from 11 fresh /64s at most.
        let d = Defence::new(DefenceConfig { wide_failures: 10, ..config() });
        let mut held = Vec::new();
        for i in 0..20 {
            let (from, name) = (format!("2001:db8:9:{i:x}::1"), format!("u{i}"));
            let attempt = begin(&d, &from, &name, "pw");
            if let Ok(Ok(permit)) = tokio::time::timeout(Duration::from_millis(10), attempt).await {
                held.push(permit);
            }
        }
        assert_eq!(held.len(), 11);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_under_a_flood_of_prefixes_and_live_entries_survive() {
        let d = Defence::new(DefenceConfig { max_tracked: 1000, ..config() });
        let victim = ip("192.0.2.200");
        let mut guard = d.admit(victim).unwrap();
        let permit = begin(&d, "192.0.2.200", "held", "x").await.unwrap();
        for i in 0..20_000u32 {
            // A distinct /64 in a distinct /48 each time.
            let addr = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, (i >> 16) as u16, i as u16, 0, 0, 0, 0, 1));
            let name = format!("u{i}");
            let permit = d.begin_login(addr, &user(&name), &pw("x")).await.unwrap();
            d.login_failed(permit, &user(&name), &pw("x")).await;
            if i % 1000 == 0 {
                d.sweep();
            }
        }
        d.sweep();
        let stats = d.stats();
        assert!(stats.tracked_prefixes <= 1000, "{stats:?}");
        assert!(stats.tracked_accounts <= 1000, "{stats:?}");
        assert!(stats.evicted > 0);
        // The pinned prefix kept its in-flight login: it still counts, so only five more may start.
        for i in 0..5 {
            std::mem::forget(begin(&d, "192.0.2.200", &format!("more{i}"), "x").await.unwrap());
        }
        let next = tokio::time::timeout(Duration::from_secs(1), begin(&d, "192.0.2.200", "over", "x"));
        assert!(next.await.is_err());
        d.login_succeeded(permit);
        guard.logged_in();
    }

    #[tokio::test(start_paused = true)]
    async fn switched_off_lets_everything_through() {
        let d = Defence::new(DefenceConfig { enabled: false, ..config() });
        for _ in 0..100 {
            drop(d.admit(ip("192.0.2.1")).unwrap());
        }
        for i in 0..20 {
            assert_eq!(fail(&d, "192.0.2.1", "u", &format!("p{i}")).await, Ok(Duration::ZERO));
        }
        assert!(!d.is_banned(ip("192.0.2.1")));
    }
}
