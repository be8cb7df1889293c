//! The two legs' configurations: the server side clients reach (implicit TLS, ALPN `imap`) and the client
//! side used towards backends (verified chain and name). Built once, before any port is bound.

use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::certs;
use super::pem::{TlsConfigError, certificates};
use super::provider::provider;
use super::stream::RecordServerName;
use crate::config::{CipherPreference, TlsConfig};

/// The ALPN protocol id for IMAP (RFC 9051 section 11.1 / ALPACA mitigation).
pub const ALPN_IMAP: &[u8] = b"imap";

const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The listener's configuration: TLS 1.2 and 1.3, the certificates chosen by server name (see `certs`),
/// ALPN `imap`, the cipher suite by `tls.cipher_preference` (the proxy's order, AES-128-GCM first, unless
/// set to the client's). A client that offers ALPN without `imap` is refused by rustls with `no_application_protocol`.
/// Returns the certificates' expiry too.
/// Returning clients resume with stateless tickets from `ticketer` (TLS 1.3 and 1.2), which the caller
/// keeps across reloads.
pub fn server_config(
    tls: &TlsConfig,
    ticketer: &Arc<dyn rustls::server::ProducesTickets>,
) -> Result<(Arc<ServerConfig>, Vec<certs::Expiry>), TlsConfigError> {
    let (resolver, expiries) = certs::load(tls)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|source| TlsConfigError::Rustls { key: "tls", source })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(RecordServerName(resolver)));
    config.alpn_protocols = vec![ALPN_IMAP.to_vec()];
    config.ignore_client_order = tls.cipher_preference == CipherPreference::Server;
    config.ticketer = Arc::clone(ticketer);
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
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|source| TlsConfigError::Rustls { key: "backend_tls", source })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::config::UnknownName;
    use crate::net::tls::install_crypto_provider;
    use rustls::CipherSuite;
    use std::path::PathBuf;

    /// A self-signed certificate for `localhost` written as `cert.pem` and `key.pem` into a new directory
    /// (the caller removes it).
    fn self_signed(tag: &str) -> (PathBuf, rcgen::Certificate) {
        let dir = std::env::temp_dir().join(format!("imapgate-tls-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        (dir, cert)
    }

    /// A handshake in memory between the listener's configuration and a stock rustls client, which offers
    /// AES-256-GCM first; returns the suite they agreed on.
    fn negotiated(preference: CipherPreference) -> CipherSuite {
        install_crypto_provider();
        let (dir, cert) = self_signed(&format!("{preference:?}"));
        let tls = TlsConfig {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            certificates: Vec::new(),
            unknown_name: UnknownName::Default,
            cipher_preference: preference,
        };
        let (server, _) = server_config(&tls, &ticketer().unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let mut client = ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        client.alpn_protocols = vec![ALPN_IMAP.to_vec()];
        let mut client = rustls::ClientConnection::new(Arc::new(client), "localhost".try_into().unwrap()).unwrap();
        let mut server = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            let mut flight = Vec::new();
            client.write_tls(&mut flight).unwrap();
            server.read_tls(&mut flight.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            let mut flight = Vec::new();
            server.write_tls(&mut flight).unwrap();
            client.read_tls(&mut flight.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        assert!(!server.is_handshaking());
        server.negotiated_cipher_suite().unwrap().suite()
    }

    #[test]
    fn the_listener_chooses_aes128_unless_told_to_follow_the_client() {
        let stock = rustls::crypto::aws_lc_rs::default_provider();
        assert_eq!(stock.cipher_suites[0].suite(), CipherSuite::TLS13_AES_256_GCM_SHA384, "a client's usual first");
        assert_eq!(negotiated(CipherPreference::Server), CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(negotiated(CipherPreference::Client), CipherSuite::TLS13_AES_256_GCM_SHA384);
    }

    #[test]
    fn the_backend_leg_offers_aes128_first_and_keeps_every_suite() {
        let (dir, _) = self_signed("ca");
        let config = client_config(Some(&dir.join("cert.pem"))).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let suites: Vec<CipherSuite> = config.crypto_provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(suites[0], CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(suites.len(), rustls::crypto::aws_lc_rs::default_provider().cipher_suites.len());
        let tls12_first = suites.iter().position(|s| !format!("{s:?}").starts_with("TLS13")).unwrap();
        assert!(format!("{:?}", suites[tls12_first]).contains("AES_128_GCM"), "{suites:?}");
    }
}
