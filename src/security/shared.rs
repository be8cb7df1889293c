//! What several instances share: the evidence a store (Redis, in `fleet`) holds for the whole fleet, and the
//! interface the defence's facade uses to read and add to it.
//!
//! The store is a mirror of evidence, not the decision maker: each instance keeps deciding with its own
//! [`DefenceState`](super::state::DefenceState), after absorbing what the fleet has seen (failures and
//! standing per prefix, an account's failures and familiar prefixes, bans). Its own state keeps counting, so
//! an instance that loses the store falls back to what it has seen itself, never to nothing.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use ipnet::IpNet;

use super::accounts::Fingerprint;
use super::state::Keys;

/// What the fleet has seen of one key (a prefix, or the coarse IPv6 bucket), as of the store's now.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyEvidence {
    pub key: IpNet,
    /// Counted failures still in the leaky bucket.
    pub failures: f64,
    /// Recent successful logins (decayed).
    pub successes: f64,
    /// A ban in force: how long it still runs, and the ban count for doubling.
    pub ban: Option<(Duration, u32)>,
}

/// What the fleet has seen of one account, from one prefix's point of view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountEvidence {
    /// Consecutive failures since the last success.
    pub consecutive: u32,
    pub since_failure: Option<Duration>,
    pub since_success: Option<Duration>,
    /// The account logged in from this prefix before.
    pub known: bool,
    /// The account failed from this prefix since its last success.
    pub failed_here: bool,
    /// The login's wrong (user, password) pair failed anywhere in the fleet this long ago (fleet-wide
    /// fingerprints only: `[state] fingerprint_key_file`).
    pub repeated: Option<(Fingerprint, Duration)>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evidence {
    pub keys: Vec<KeyEvidence>,
    pub account: AccountEvidence,
}

/// A ban as the fleet holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedBan {
    pub key: IpNet,
    pub remaining: Duration,
    pub count: u32,
}

/// The store could not answer in time (or at all); logged and counted by the store.
#[derive(Debug, Clone, thiserror::Error)]
#[error("shared state store: {0}")]
pub struct StoreError(pub String);

pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// A fleet-wide store of evidence. Every call is bounded by the store's own timeout.
pub trait SharedStore: Send + Sync {
    /// The fleet's evidence on a login's keys and account, before it goes to a backend. With a fleet-wide
    /// `fingerprint` of the pair, whether it failed anywhere lately.
    fn view(&self, keys: Keys, account: String, fingerprint: Option<Fingerprint>) -> StoreFuture<Evidence>;
    /// A counted failure (a repeated wrong pair is not sent); returns the evidence after it.
    fn failed(&self, keys: Keys, account: String, fingerprint: Option<Fingerprint>) -> StoreFuture<Evidence>;
    /// A successful login: standing for the keys, the account's failures reset, the prefix familiar to it.
    fn succeeded(&self, keys: Keys, account: String) -> StoreFuture<()>;
    /// Bans `key` for the fleet (doubling on repeats, as one instance does); a ban already in force is
    /// returned as it is. Every instance hears of it.
    fn ban(&self, key: IpNet) -> StoreFuture<SharedBan>;
    /// An administrator lifts the ban on `key` fleet-wide (and forgives its failures); whether one was in
    /// force. Every instance hears of it.
    fn unban(&self, key: IpNet) -> StoreFuture<bool>;
    /// Whether logins should be refused rather than decided locally while the store is unreachable.
    fn closed_on_error(&self) -> bool;
}
