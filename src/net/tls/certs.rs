//! The listener's certificates: each loaded and checked (the chain parses, the key matches the leaf, the
//! configured names are covered by the leaf's, it has not expired; a warning when it expires within 14
//! days), chosen per server name (SNI) by a rustls resolver, and their expiry for monitoring.
//!
//! A reload builds a new set and swaps it in whole: new handshakes get the new certificates, open sessions
//! keep theirs, and a broken file leaves the running set as it was.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::pem::{TlsConfigError, certificates};
use super::provider::provider;
use crate::config::{TlsConfig, UnknownName};

/// A certificate this close to its end is reported at start-up and reload.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// What the leaf certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// DNS names of the subject alternative names, lower case (wildcards as `*.example.org`).
    pub dns_names: Vec<String>,
    /// Validity, in seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

/// Reads a DER certificate's names and validity.
pub fn facts(der: &[u8]) -> Result<Facts, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                dns_names.push(dns.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    let validity = cert.validity();
    Ok(Facts { dns_names, not_before: validity.not_before.timestamp(), not_after: validity.not_after.timestamp() })
}

/// Whether a certificate for `dns_names` may be served for the configured `name` (an exact name, or a
/// `*.domain` wildcard): an exact match, or a wildcard one label deep.
pub fn covers(dns_names: &[String], name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    dns_names.iter().any(|san| {
        san == &name
            || san.strip_prefix("*.").is_some_and(|domain| {
                !name.starts_with("*.")
                    && name.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == domain)
            })
    })
}

/// One certificate's expiry, for `imapgate_tls_certificate_expiry_timestamp_seconds{name}`: one series per
/// configured name, `default` for the default certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    pub name: String,
    pub not_after: i64,
}

/// Chooses a certificate by the name the client asked for.
#[derive(Debug)]
pub struct SniResolver {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the domain under the wildcard (`example.org` for `*.example.org`).
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    unknown: UnknownName,
}

impl SniResolver {
    /// The certificate for `name` (None: refuse the handshake).
    pub fn choose(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = name else { return Some(Arc::clone(&self.default)) };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return Some(Arc::clone(key));
        }
        if let Some(key) = name.split_once('.').and_then(|(_, domain)| self.wildcard.get(domain)) {
            return Some(Arc::clone(key));
        }
        match self.unknown {
            UnknownName::Default => Some(Arc::clone(&self.default)),
            UnknownName::Refuse => None,
        }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(client_hello.server_name())
    }
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Loads one certificate chain and key and checks them; `names` (if any) must be covered.
/// `keys` name the two settings (`tls.cert`, `tls.key`) in errors.
fn load_one(
    keys: (&str, &str),
    cert: &Path,
    key: &Path,
    names: &[String],
) -> Result<(Arc<CertifiedKey>, i64), TlsConfigError> {
    let (cert_key, key_key) = keys;
    let bad = |reason: String| TlsConfigError::Certificate { key: cert_key.to_owned(), path: cert.to_owned(), reason };
    let bad_key =
        |reason: String| TlsConfigError::Certificate { key: key_key.to_owned(), path: key.to_owned(), reason };
    let chain = certificates(cert_key, cert)?;
    let private_key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| bad_key(format!("cannot read the private key: {e}")))?;
    let facts = facts(chain[0].as_ref()).map_err(bad)?;
    let certified = CertifiedKey::from_der(chain, private_key, &provider())
        .map_err(|e| bad_key(format!("the key does not belong to {}: {e}", cert.display())))?;
    let now = now_unix();
    if facts.not_after <= now {
        return Err(bad(format!("expired {} days ago", (now - facts.not_after) / 86_400)));
    }
    if facts.not_before > now {
        return Err(bad("not valid yet".into()));
    }
    for name in names {
        if !covers(&facts.dns_names, name) {
            return Err(bad(format!("does not cover {name:?} (it names {:?})", facts.dns_names)));
        }
    }
    let left = facts.not_after - now;
    if left < EXPIRY_WARNING.as_secs() as i64 {
        tracing::warn!(
            event = "certificate_expiring",
            key = cert_key,
            path = %cert.display(),
            days_left = left / 86_400,
            "certificate expires within 14 days"
        );
    }
    Ok((Arc::new(certified), facts.not_after))
}

/// Every configured certificate, checked, behind one resolver.
pub fn load(tls: &TlsConfig) -> Result<(Arc<SniResolver>, Vec<Expiry>), TlsConfigError> {
    let (default, not_after) = load_one(("tls.cert", "tls.key"), &tls.cert, &tls.key, &[])?;
    let mut expiries = vec![Expiry { name: "default".into(), not_after }];
    let (mut exact, mut wildcard) = (HashMap::new(), HashMap::new());
    for (i, entry) in tls.certificates.iter().enumerate() {
        let keys = (format!("tls.certificate[{i}].cert"), format!("tls.certificate[{i}].key"));
        let (key, not_after) = load_one((&keys.0, &keys.1), &entry.cert, &entry.key, &entry.names)?;
        for name in &entry.names {
            expiries.push(Expiry { name: name.clone(), not_after });
            match name.strip_prefix("*.") {
                Some(domain) => wildcard.insert(domain.to_owned(), Arc::clone(&key)),
                None => exact.insert(name.clone(), Arc::clone(&key)),
            };
        }
    }
    Ok((Arc::new(SniResolver { default, exact, wildcard, unknown: tls.unknown_name }), expiries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn coverage_follows_wildcard_rules() {
        let sans = names(&["mail.example.org", "*.example.net"]);
        assert!(covers(&sans, "mail.example.org"));
        assert!(covers(&sans, "MAIL.example.org"));
        assert!(!covers(&sans, "imap.example.org"));
        assert!(covers(&sans, "imap.example.net"));
        assert!(!covers(&sans, "a.b.example.net"), "a wildcard is one label deep");
        assert!(!covers(&sans, "example.net"));
        assert!(covers(&sans, "*.example.net"));
        assert!(!covers(&sans, "*.example.org"));
    }

    #[test]
    fn facts_of_a_generated_certificate() {
        let mut params =
            rcgen::CertificateParams::new(vec!["Mail.Example.org".into(), "*.example.net".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 1, 2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let f = facts(cert.der()).unwrap();
        assert_eq!(f.dns_names, names(&["mail.example.org", "*.example.net"]));
        assert_eq!(f.not_after, 1_925_078_400);
        assert!(facts(b"not a certificate").is_err());
    }
}
