//! Brute-force defence at the front door, with limits that follow evidence (failures), not volume.
//!
//! - [`defence`]: the facade sessions call: admission before TLS, login permits, waiting, reporting.
//! - [`state`]: the interface to the defence's state and its in-process implementation.
//! - [`shared`]: the evidence several instances share and the store interface that holds it (Redis: `fleet`).
//! - [`standing`]: per prefix: unauthenticated connections, connection rate, failure budget, earned capacity.
//! - [`accounts`]: per account: consecutive failures, familiar prefixes, repeated wrong pairs.
//! - [`bans`]: bans that double on repeat.
//! - [`table`]: the bounded LRU table every part keeps its entries in.
//! - [`prefix`]: client addresses reduced to the prefixes that are counted.
//! - [`snapshot`]: what the defence remembers across a restart, as bytes (no I/O).
//!
//! No sockets here; time comes from tokio's clock so that tests can pause and advance it.

pub mod accounts;
pub mod bans;
pub mod defence;
pub mod prefix;
pub mod shared;
pub mod snapshot;
pub mod standing;
pub mod state;
pub mod table;

pub use defence::{ConnectionGuard, Defence, DefenceEvent, LoginPermit};
pub use state::{DefenceStats, Refusal};
