//! Sockets: the PROXY protocol header, the TLS listener's configuration, one task per client connection,
//! the backend leg, its health checks, the relay, and what sessions report to the mailbox signals. Knows sockets, not IMAP grammar (that lives in `imap`).

pub mod certs;
pub mod health;
pub mod lookup;
pub mod pool;
pub mod proxy_protocol;
pub mod relay;
pub mod report;
pub mod session;
pub mod shared;
pub mod tls;
pub mod tls_records;
pub mod tls_stream;
pub mod upstream;

pub use shared::Shared;
