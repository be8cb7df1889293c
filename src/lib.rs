//! imapgate: a transparent, TLS-terminating IMAP proxy.
//!
//! - [`config`]: `proxy.toml` + environment -> a validated [`config::Config`]; no I/O beyond reading files.
//! - [`imap`]: sans-IO protocol logic (framing, pre-auth state machine, SASL, backend responses).
//! - [`route`]: which backend serves a user.
//! - [`security`]: brute-force defence with limits that follow evidence: standing per prefix, accounts, bans,
//!   bounded tables, behind a state interface; admission before TLS.
//! - [`failure`]: one classification of what went wrong, deciding the client's reply and the log fields.
//! - [`net`]: sockets: PROXY protocol header, TLS listener, per-connection session, backend leg (STARTTLS + ID
//!   + login), relay.
//! - [`app`]: wires listeners and shutdown.
//! - [`telemetry`]: diagnostic logging.

pub mod app;
pub mod config;
pub mod failure;
pub mod imap;
pub mod net;
pub mod route;
pub mod security;
pub mod telemetry;
