//! Sockets: the PROXY protocol header, TLS (`tls`: configurations, certificates, the stream over rustls), one task per client connection,
//! the backend leg (with the attempts waiting at each backend), its health checks, the relay, and what sessions report to the mailbox signals. Knows sockets, not IMAP grammar (that lives in `imap`).

pub mod health;
pub mod inherit;
pub mod leave;
pub mod lookup;
pub mod notify;
pub mod outliers;
pub mod pool;
pub mod proxy_protocol;
pub mod relay;
pub mod report;
pub mod session;
pub mod shared;
pub mod shared_port;
pub mod successor;
pub mod tls;
pub mod upstream;

pub use shared::Shared;
