//! TLS configuration for both sides: the server side clients reach (implicit TLS, ALPN `imap`) and the
//! client side used towards backends (verified chain and name). Built once, before any port is bound.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::TlsConfig;

/// The ALPN protocol id for IMAP (RFC 9051 section 11.1 / ALPACA mitigation).
pub const ALPN_IMAP: &[u8] = b"imap";

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("{key}: {source}")]
    Rustls { key: &'static str, source: rustls::Error },
    #[error("backend_tls.ca: no system root certificates could be loaded")]
    NoSystemRoots,
    #[error("{key}: {path}: {reason}")]
    Certificate { key: String, path: PathBuf, reason: String },
}

/// Installs aws-lc-rs as the process-wide crypto provider. Call first thing; a second call is harmless.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub(super) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

pub(super) fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = |source| TlsConfigError::Certificate {
        key: key.to_owned(),
        path: path.to_owned(),
        reason: format!("cannot read: {source}"),
    };
    let certs = CertificateDer::pem_file_iter(path).map_err(pem)?.collect::<Result<Vec<_>, _>>().map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsConfigError::Certificate {
            key: key.to_owned(),
            path: path.to_owned(),
            reason: "holds no certificate".into(),
        });
    }
    Ok(certs)
}

/// The listener's configuration: TLS 1.2 and 1.3, the certificates chosen by server name (see `certs`),
/// ALPN `imap`. A client that offers ALPN without `imap` is refused by rustls with `no_application_protocol`.
/// Returns the certificates' expiry too.
/// Returning clients resume with stateless tickets from `ticketer` (TLS 1.3 and 1.2), which the caller
/// keeps across reloads.
pub fn server_config(
    tls: &TlsConfig,
    ticketer: &Arc<dyn rustls::server::ProducesTickets>,
) -> Result<(Arc<ServerConfig>, Vec<super::certs::Expiry>), TlsConfigError> {
    let (resolver, expiries) = super::certs::load(tls)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|source| TlsConfigError::Rustls { key: "tls", source })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(super::tls_stream::RecordServerName(resolver)));
    config.alpn_protocols = vec![ALPN_IMAP.to_vec()];
    config.ticketer = Arc::clone(ticketer);
    // TLS 1.3 sessions leave rustls's connection for the own record layer after the handshake
    // (`tls_stream`, `tls_records`); the secrets never leave the process.
    config.enable_secret_extraction = true;
    config.key_log = Arc::new(super::tls_records::SecretsLog);
    Ok((Arc::new(config), expiries))
}

/// Session tickets for the listener: aws-lc-rs's ticketer, whose keys rotate every few hours (the previous
/// key still accepted). One per process, kept across reloads.
pub fn ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, TlsConfigError> {
    rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|source| TlsConfigError::Rustls { key: "tls", source })
}

/// The backend side: verify the chain against `ca` (or the system roots) and the name.
pub fn client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in certificates("backend_tls.ca", path)? {
                roots.add(cert).map_err(|source| TlsConfigError::Rustls { key: "backend_tls.ca", source })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(TlsConfigError::NoSystemRoots);
            }
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|source| TlsConfigError::Rustls { key: "backend_tls", source })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // As on the listener: TLS 1.3 records are this crate's after the handshake.
    config.enable_secret_extraction = true;
    config.key_log = Arc::new(super::tls_records::SecretsLog);
    Ok(Arc::new(config))
}
