//! What a client prefix has shown: its recent successful logins (standing) and its counted failures, and the
//! capacity that follows from them.
//!
//! Limits follow evidence, not volume. Only connections that have not (yet) logged in count toward the
//! concurrent-connection cap and the connection rate (a successful login gives its rate token back); each
//! recent successful login earns one more unauthenticated connection, one more token of burst and one more
//! login in flight, up to ceilings; failures fill a leaky bucket whose overflow bans the prefix (or, for a
//! prefix with standing, closes it to accounts it has never logged into). Logins for accounts that never
//! logged in from the prefix reserve room in the failure budget while they are at the backend, so a prefix
//! without standing can never have more wrong guesses reach a backend than its budget plus one.
//!
//! Pure state and arithmetic on tokio's clock: no locks, no I/O.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::DefenceConfig;

/// The limits of one kind of key (a prefix, or the coarse IPv6 bucket).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Counted failures tolerated per `window` without standing.
    pub failures: u32,
    pub window: Duration,
    /// Unauthenticated connections at once: base and ceiling.
    pub connections: u32,
    pub connections_max: u32,
    /// Connection-rate bucket: base burst, ceiling, and refill per minute at base size.
    pub burst: u32,
    pub burst_max: u32,
    pub rate_per_minute: u32,
    /// Logins in flight at once, whatever the standing.
    pub in_flight_max: u32,
    /// Recent successes that earn tolerance for one more failure.
    pub successes_per_failure: u32,
    /// The most failures standing can add to the budget.
    pub earned_failures_max: u32,
    /// Standing halves after this long without successes.
    pub standing_half_life: Duration,
}

impl Limits {
    /// Limits for a prefix (IPv4 /32, IPv6 /64 by default).
    pub fn prefix(config: &DefenceConfig) -> Limits {
        Limits {
            failures: config.failures,
            window: config.window,
            connections: config.connections_per_prefix,
            connections_max: config.connections_per_prefix_max,
            burst: config.connection_burst,
            burst_max: config.connection_burst_max,
            rate_per_minute: config.connection_rate_per_minute,
            in_flight_max: config.auth_in_flight,
            successes_per_failure: config.successes_per_failure,
            earned_failures_max: config.earned_failures_max,
            standing_half_life: config.standing_half_life,
        }
    }

    /// Limits for the coarse IPv6 bucket: the wide failure budget, and base admission limits scaled by the
    /// same factor (a /48 holds many /64s).
    pub fn wide(config: &DefenceConfig) -> Limits {
        let factor = (config.wide_failures / config.failures.max(1)).max(1);
        let base = Limits::prefix(config);
        Limits {
            failures: config.wide_failures,
            connections: base.connections.saturating_mul(factor).min(base.connections_max),
            burst: base.burst.saturating_mul(factor).min(base.burst_max),
            rate_per_minute: base.rate_per_minute.saturating_mul(factor),
            in_flight_max: base.in_flight_max.saturating_mul(factor),
            earned_failures_max: base.earned_failures_max.saturating_mul(factor),
            ..base
        }
    }
}

/// Why admission failed for this key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmitError {
    Connections,
    Rate,
}

/// One prefix's (or bucket's) record.
#[derive(Debug, Clone)]
pub struct Standing {
    /// Connections admitted that have not logged in.
    pub unauthenticated: u32,
    /// Logins at a backend now: of accounts familiar with the prefix, and the others. Kept apart, so that
    /// guesses can never take the places of the prefix's own users.
    pub in_flight: u32,
    pub in_flight_familiar: u32,
    /// Connection-rate tokens.
    tokens: f64,
    tokens_at: Instant,
    /// Counted failures, leaking at `failures / window`.
    failures: f64,
    failures_at: Instant,
    /// Recent successes, decaying exponentially.
    successes: f64,
    successes_at: Instant,
    pub last_seen: Instant,
}

impl Standing {
    pub fn new(now: Instant, limits: &Limits) -> Self {
        Self {
            unauthenticated: 0,
            in_flight: 0,
            in_flight_familiar: 0,
            tokens: f64::from(limits.burst),
            tokens_at: now,
            failures: 0.0,
            failures_at: now,
            successes: 0.0,
            successes_at: now,
            last_seen: now,
        }
    }

    /// Recent successful logins (decayed).
    pub fn successes(&mut self, now: Instant, limits: &Limits) -> f64 {
        let elapsed = now.saturating_duration_since(self.successes_at).as_secs_f64();
        let half_life = limits.standing_half_life.as_secs_f64().max(1.0);
        self.successes *= 0.5f64.powf(elapsed / half_life);
        self.successes_at = now;
        self.successes
    }

    /// Counted failures still in the bucket.
    pub fn failures(&mut self, now: Instant, limits: &Limits) -> f64 {
        let elapsed = now.saturating_duration_since(self.failures_at).as_secs_f64();
        let leak = f64::from(limits.failures.max(1)) / limits.window.as_secs_f64().max(1.0);
        self.failures = (self.failures - elapsed * leak).max(0.0);
        self.failures_at = now;
        self.failures
    }

    /// Capacity earned by recent successes (one unit per success).
    pub fn earned(&mut self, now: Instant, limits: &Limits) -> u32 {
        self.successes(now, limits).floor().min(f64::from(u32::MAX)) as u32
    }

    /// Failures tolerated before a ban (or closing): the base budget plus what standing earns.
    pub fn tolerated(&mut self, now: Instant, limits: &Limits) -> f64 {
        let per = f64::from(limits.successes_per_failure.max(1));
        let earned = (self.successes(now, limits) / per).floor().min(f64::from(limits.earned_failures_max));
        f64::from(limits.failures) + earned
    }

    /// Whether the prefix has logged in successfully recently (at least once, decayed).
    pub fn has_standing(&mut self, now: Instant, limits: &Limits) -> bool {
        self.successes(now, limits) >= 1.0
    }

    /// A new connection, before TLS: within the unauthenticated-connection cap and the rate bucket.
    pub fn admit(&mut self, now: Instant, limits: &Limits) -> Result<(), AdmitError> {
        self.last_seen = now;
        let earned = self.earned(now, limits);
        let cap = limits.connections.saturating_add(earned).min(limits.connections_max.max(limits.connections));
        if self.unauthenticated >= cap {
            return Err(AdmitError::Connections);
        }
        self.refill(now, limits, earned);
        if self.tokens < 1.0 {
            return Err(AdmitError::Rate);
        }
        self.tokens -= 1.0;
        self.unauthenticated += 1;
        Ok(())
    }

    /// Tops the rate bucket up to now; returns its capacity.
    fn refill(&mut self, now: Instant, limits: &Limits, earned: u32) -> f64 {
        let base = f64::from(limits.burst.max(1));
        let capacity = f64::from(limits.burst.saturating_add(earned).min(limits.burst_max.max(limits.burst)));
        // A bucket that has grown refills proportionally faster, so it takes as long to refill as the base one.
        let per_second = f64::from(limits.rate_per_minute) / 60.0 * capacity / base;
        let elapsed = now.saturating_duration_since(self.tokens_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(capacity);
        self.tokens_at = now;
        capacity
    }

    /// A connection logged in: it no longer counts as unauthenticated and its rate token comes back.
    pub fn logged_in(&mut self, now: Instant, limits: &Limits) {
        self.unauthenticated = self.unauthenticated.saturating_sub(1);
        let earned = self.earned(now, limits);
        let capacity = self.refill(now, limits, earned);
        self.tokens = (self.tokens + 1.0).min(capacity);
    }

    /// A connection that never logged in closed.
    pub fn closed_unauthenticated(&mut self) {
        self.unauthenticated = self.unauthenticated.saturating_sub(1);
    }

    /// Whether one more login may go to a backend now. Familiar logins (an account that logged in from
    /// here before and has no failures from here) need only room under the ceiling; others also reserve
    /// room in the failure budget. The two are counted apart.
    /// A `squeezed` prefix (closed to unfamiliar accounts after overflowing its budget) gets one such login
    /// at a time, whatever its standing: guesses at the crowd's own accounts queue behind one another.
    pub fn may_start_login(&mut self, now: Instant, limits: &Limits, familiar: bool, squeezed: bool) -> bool {
        if familiar {
            return self.in_flight_familiar < limits.in_flight_max;
        }
        if self.in_flight >= limits.in_flight_max {
            return false;
        }
        if squeezed {
            return self.in_flight == 0;
        }
        // The failures still tolerated, plus the one that would spend the budget. A prefix over its budget
        // whose ban has lifted gets one login at a time: its next failure bans it again, for twice as long.
        let slack = self.tolerated(now, limits) - self.failures(now, limits);
        let room = if slack < 0.0 { 1 } else { slack.floor() as u32 + 1 };
        let earned = self.earned(now, limits);
        self.in_flight < room.saturating_add(earned)
    }

    pub fn start_login(&mut self, now: Instant, familiar: bool) {
        if familiar {
            self.in_flight_familiar += 1;
        } else {
            self.in_flight += 1;
        }
        self.last_seen = now;
    }

    pub fn end_login(&mut self, familiar: bool) {
        if familiar {
            self.in_flight_familiar = self.in_flight_familiar.saturating_sub(1);
        } else {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
    }

    /// Logins of both kinds at a backend now.
    pub fn logins(&self) -> u32 {
        self.in_flight + self.in_flight_familiar
    }

    /// A successful login: one more unit of standing, and one more token in the (now larger) rate bucket.
    pub fn succeeded(&mut self, now: Instant, limits: &Limits) {
        self.successes(now, limits);
        self.successes += 1.0;
        let earned = self.earned(now, limits);
        let capacity = self.refill(now, limits, earned);
        self.tokens = (self.tokens + 1.0).min(capacity);
        self.last_seen = now;
    }

    /// Counts a failure; returns the tarpit level (failures in the bucket, at least 1) and whether the
    /// budget overflowed.
    pub fn failed(&mut self, now: Instant, limits: &Limits, counted: bool) -> (u32, bool) {
        self.failures(now, limits);
        if counted {
            self.failures += 1.0;
        }
        self.last_seen = now;
        let over = counted && self.over_budget(now, limits);
        (self.level(now, limits), over)
    }

    /// Whether the counted failures are over what the prefix tolerates now.
    pub fn over_budget(&mut self, now: Instant, limits: &Limits) -> bool {
        self.failures(now, limits) > self.tolerated(now, limits)
    }

    /// An administrator let the prefix back in: its failures are forgotten.
    pub fn forgive(&mut self, now: Instant) {
        self.failures = 0.0;
        self.failures_at = now;
    }

    /// What the fleet has seen: failures and standing at least as high as its figures (which include this
    /// instance's own, when it could report them).
    /// What a snapshot keeps: the failure budget used and the standing, decayed to `now`.
    pub fn record(&mut self, key: ipnet::IpNet, now: Instant, limits: &Limits) -> super::snapshot::PrefixRecord {
        super::snapshot::PrefixRecord {
            key,
            failures: self.failures(now, limits),
            successes: self.successes(now, limits),
            since_seen_ms: now.saturating_duration_since(self.last_seen).as_millis() as u64,
        }
    }

    pub fn absorb(&mut self, now: Instant, limits: &Limits, failures: f64, successes: f64) {
        let (own_failures, own_successes) = (self.failures(now, limits), self.successes(now, limits));
        if failures.is_finite() {
            self.failures = own_failures.max(failures.clamp(0.0, 1e9));
        }
        if successes.is_finite() {
            self.successes = own_successes.max(successes.clamp(0.0, 1e9));
        }
        self.last_seen = now;
    }

    /// The tarpit level right now: counted failures beyond what standing excuses, at least 1. A prefix with no
    /// record climbs the steps with each failure; a crowd's typos stay on the first step until its failures
    /// outgrow its standing.
    pub fn level(&mut self, now: Instant, limits: &Limits) -> u32 {
        let excused = self.tolerated(now, limits) - f64::from(limits.failures);
        (self.failures(now, limits) - excused).ceil().max(1.0) as u32
    }

    /// Nothing left to remember: no connection, no login, no failures, no standing, not closed.
    pub fn forgettable(&mut self, now: Instant, limits: &Limits) -> bool {
        self.unauthenticated == 0
            && self.logins() == 0
            && self.failures(now, limits) < 0.01
            && self.successes(now, limits) < 0.01
            && now.saturating_duration_since(self.last_seen) >= limits.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::prefix(&DefenceConfig::default())
    }

    #[tokio::test(start_paused = true)]
    async fn unauthenticated_connections_count_and_logins_give_their_token_back() {
        let l = Limits { connections: 3, burst: 4, ..limits() };
        let now = Instant::now();
        let mut s = Standing::new(now, &l);
        for _ in 0..3 {
            s.admit(now, &l).unwrap();
        }
        assert_eq!(s.admit(now, &l), Err(AdmitError::Connections));
        // Logged-in connections no longer count, and return their rate token.
        for _ in 0..3 {
            s.logged_in(now, &l);
        }
        for _ in 0..3 {
            s.admit(now, &l).unwrap();
            s.logged_in(now, &l);
        }
        assert_eq!(s.unauthenticated, 0);
        // Connections that never log in drain the bucket.
        for _ in 0..4 {
            s.admit(now, &l).unwrap();
            s.closed_unauthenticated();
        }
        assert_eq!(s.admit(now, &l), Err(AdmitError::Rate));
    }

    #[tokio::test(start_paused = true)]
    async fn standing_earns_capacity_up_to_the_ceiling_and_decays() {
        let l = Limits { connections: 2, connections_max: 10, ..limits() };
        let now = Instant::now();
        let mut s = Standing::new(now, &l);
        for _ in 0..100 {
            s.succeeded(now, &l);
        }
        for _ in 0..10 {
            s.admit(now, &l).unwrap();
        }
        assert_eq!(s.admit(now, &l), Err(AdmitError::Connections), "ceiling");
        tokio::time::advance(l.standing_half_life * 20).await;
        assert!(!s.has_standing(Instant::now(), &l), "standing decays");
    }

    #[tokio::test(start_paused = true)]
    async fn a_prefix_without_standing_never_has_more_than_budget_plus_one_guesses_out() {
        let l = limits();
        let now = Instant::now();
        let mut s = Standing::new(now, &l);
        let mut started = 0;
        while s.may_start_login(now, &l, false, false) {
            s.start_login(now, false);
            started += 1;
        }
        assert_eq!(started, l.failures + 1);
        let mut over = false;
        for _ in 0..started {
            s.end_login(false);
            over |= s.failed(now, &l, true).1;
        }
        assert!(over, "the last one overflows the budget");
        assert!(s.may_start_login(now, &l, false, false), "once over budget (and the ban lifted): one at a time");
        s.start_login(now, false);
        assert!(!s.may_start_login(now, &l, false, false));
        assert!(s.may_start_login(now, &l, true, false), "familiar logins have places of their own");
    }

    #[tokio::test(start_paused = true)]
    async fn successes_earn_failure_tolerance() {
        let l = Limits { successes_per_failure: 10, earned_failures_max: 3, ..limits() };
        let now = Instant::now();
        let mut s = Standing::new(now, &l);
        for _ in 0..20 {
            s.succeeded(now, &l);
        }
        assert_eq!(s.tolerated(now, &l), f64::from(l.failures) + 2.0);
        for _ in 0..1000 {
            s.succeeded(now, &l);
        }
        assert_eq!(s.tolerated(now, &l), f64::from(l.failures) + 3.0, "capped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_crowds_typos_stay_on_the_first_tarpit_step() {
        let l = limits();
        let now = Instant::now();
        let mut crowd = Standing::new(now, &l);
        for _ in 0..100 {
            crowd.succeeded(now, &l);
        }
        // 100 successes excuse 10 failures: the first ten typos are answered after the first step.
        let levels: Vec<u32> = (0..12).map(|_| crowd.failed(now, &l, true).0).collect();
        assert_eq!(levels, [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]);
        let mut stranger = Standing::new(now, &l);
        let levels: Vec<u32> = (0..3).map(|_| stranger.failed(now, &l, true).0).collect();
        assert_eq!(levels, [1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_leak_out_over_the_window() {
        let l = limits();
        let now = Instant::now();
        let mut s = Standing::new(now, &l);
        for _ in 0..5 {
            s.failed(now, &l, true);
        }
        assert_eq!(s.level(now, &l), 5);
        tokio::time::advance(l.window).await;
        assert_eq!(s.failures(Instant::now(), &l), 0.0);
    }
}
