//! imapgate: a transparent, TLS-terminating IMAP proxy.
//!
//! Modules from the bottom up; each uses only the ones above it in this list.
//! - [`config`]: `proxy.toml` + environment -> a validated [`config::Config`] (audit target included); no I/O
//!   beyond reading files.
//! - [`imap`]: sans-IO protocol logic: framing, pre-auth commands and state machine, the STARTTLS
//!   listener's plaintext machine, SASL (and the OAuth messages), the proxy's rejections, the backend's
//!   login responses and the backend login machine, the post-login observer and guard.
//! - [`lifecycle`]: the proxy's phases (running, draining, closing, aborted) that every task follows.
//! - [`failure`]: one classification of what went wrong, deciding the client's reply and the log fields.
//! - [`route`]: which backends may serve a user: rules, pools (rendezvous hashing), circuits, and the
//!   `auth_http` lookup protocol and cache.
//! - [`security`]: brute-force defence with limits that follow evidence: standing per prefix, accounts, bans,
//!   bounded tables, behind a state interface; admission before TLS.
//! - [`registry`]: the logged-in sessions (bounded): their facts, live counters and the administrator's kick.
//! - [`signals`]: the mailbox problems made visible (stale passwords, quota, resyncs, slow mailboxes, client
//!   families): bounded tables for the admin API, the console and the audit log.
//! - [`telemetry`]: diagnostic logging and traces, metrics, the audit log (written off the async workers).
//! - [`fleet`]: the defence's evidence shared by several instances through Redis (scripts, store, probe).
//! - [`net`]: sockets: PROXY protocol header (read, and written toward backends), TLS listener and its
//!   certificates per server name, what sessions share, the per-connection session
//!   (deadlines on every wait), the backend leg (I/O of the login machine), health checks, the HTTP lookup
//!   client, the relay.
//! - [`memory`]: the defence's memory on disk for a single instance (atomic snapshots, read at start-up).
//! - [`admin`]: the admin HTTP server: metrics and probes, and with a token file the JSON API (sessions and
//!   kicks, bans, backends, reload) and the live console.
//! - [`app`]: builds the shared parts, binds the listeners, accepts, reloads and drains.

pub mod admin;
pub mod app;
pub mod config;
pub mod failure;
pub mod fleet;
pub mod imap;
pub mod lifecycle;
pub mod memory;
pub mod net;
pub mod registry;
pub mod route;
pub mod security;
pub mod signals;
pub mod telemetry;
