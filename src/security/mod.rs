//! Brute-force defence at the front door: which prefix a client belongs to, whether a connection is
//! admitted before TLS, whether a login may go to a backend, and what a failed login costs (tarpit, ban).
//! No sockets here; time comes from tokio's clock so that tests can pause and advance it.

pub mod defence;
pub mod prefix;

pub use defence::{ConnectionGuard, Defence, DefenceEvent, LoginPermit, Refusal};
