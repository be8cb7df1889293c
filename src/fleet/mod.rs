//! Several instances acting as one: the defence's evidence shared through Redis.
//!
//! - [`scripts`]: key layout, the Lua scripts that update the evidence atomically, reply parsing (no I/O).
//! - [`redis`]: the store over a connection manager, its health, pub/sub of bans, the probe.

pub mod redis;
pub mod scripts;

pub use self::redis::{RedisSetup, RedisStore, SetupError, fingerprint_secret};
