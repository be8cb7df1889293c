//! Certificates read from PEM files, and the error every TLS setting reports.

use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// What is wrong with a TLS setting, named by its key.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// rustls refused the configuration built from the key's settings.
    #[error("{key}: {source}")]
    Rustls { key: &'static str, source: rustls::Error },
    /// `backend_tls.ca` is not set and the system's root store is empty.
    #[error("backend_tls.ca: no system root certificates could be loaded")]
    NoSystemRoots,
    /// A certificate or key file cannot be read or does not hold what the key needs.
    #[error("{key}: {path}: {reason}")]
    Certificate { key: String, path: PathBuf, reason: String },
}

/// The certificates in the PEM file at `path` (at least one), for the setting `key`.
pub fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
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
