//! TLS, all of it rustls's: the crypto provider and its suite order, certificates read from PEM files, the
//! listener's certificate set chosen by server name, the two legs' configurations, and the stream that
//! drives rustls's unbuffered connection over a socket with buffers of its own.
//!
//! Imports run one way, top to bottom: `config` -> `certs` -> `pem`, `provider`; `config` -> `stream`.
//! Nothing here parses, seals or opens a TLS record: rustls does.

pub mod certs;
pub mod config;
pub mod pem;
pub mod provider;
pub mod stream;

pub use config::{ALPN_IMAP, client_config, server_config, ticketer};
pub use pem::TlsConfigError;
pub use provider::install_crypto_provider;
