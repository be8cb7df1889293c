//! Certificates per server name on one listener: each domain gets its own certificate by SNI (exact and
//! wildcard names), an unknown name gets the default or is refused, clients without SNI get the default;
//! every certificate is checked at start-up (key, names, expiry); the expiry metric; a certificate rotated
//! on disk and reloaded with SIGHUP is served to the next client while an open session carries on;
//! returning clients resume their TLS session, across that reload too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use imapgate::app::Prepared;
use imapgate::config::Config;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use support::client::TlsClient;
use support::proxy::{TestProxy, backend, config_text};

fn env() -> &'static support::Env {
    support::env("certificates", &[])
}

/// Accepts any certificate: the tests look at which one was served.
#[derive(Debug)]
struct AnyCertificate;

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

fn looking_client() -> Arc<rustls::ClientConfig> {
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate))
            .with_no_client_auth();
    config.alpn_protocols = vec![b"imap".to_vec()];
    Arc::new(config)
}

/// The leaf certificate served to a client that asks for `name` (an IP address sends no SNI), or None
/// when the handshake fails.
async fn served(addr: SocketAddr, name: &str) -> Option<Vec<u8>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(looking_client()).connect(server_name, tcp).await.ok()?;
    let leaf = tls.get_ref().1.peer_certificates()?.first()?.to_vec();
    Some(leaf)
}

/// Connects with `config` (which keeps its session tickets), reads the greeting (tickets arrive before it)
/// and says how the handshake went.
async fn handshake_kind(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> rustls::HandshakeKind {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("mail.gamma.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::clone(config)).connect(name, tcp).await.unwrap();
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    let mut c = TlsClient::new(tls);
    assert!(c.line().await.unwrap().starts_with("* OK"));
    kind
}

fn der(path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path).unwrap().to_vec()
}

fn with_certificates(entries: &[(&PathBuf, &PathBuf, &[&str])], unknown: &str) -> String {
    let mut tls = format!("unknown_name = \"{unknown}\"\n");
    for (cert, key, names) in entries {
        let names: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
        tls.push_str(&format!(
            "[[tls.certificate]]\ncert = \"{}\"\nkey = \"{}\"\nnames = [{}]\n",
            cert.display(),
            key.display(),
            names.join(", ")
        ));
    }
    let rest = format!("{}\n[route]\ndefault = \"mbox\"\n", backend("mbox", env().dovecot.imap_port));
    // The [[tls.certificate]] tables follow [tls]: put them before [backend_tls].
    config_text(&env().pki, &rest).replacen("[backend_tls]\n", &format!("{tls}\n[backend_tls]\n"), 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_domain_gets_its_certificate_and_unknown_names_get_the_default_or_nothing() {
    let pki = &env().pki;
    let alpha = pki.issue("alpha", &["mail.alpha.test"], -1, 90);
    let beta = pki.issue("beta", &["*.beta.test"], -1, 10);
    let entries: [(&PathBuf, &PathBuf, &[&str]); 2] =
        [(&alpha.0, &alpha.1, &["mail.alpha.test"]), (&beta.0, &beta.1, &["*.beta.test"])];
    let proxy = TestProxy::start(&with_certificates(&entries, "default")).await;
    assert_eq!(served(proxy.addr, "mail.alpha.test").await, Some(der(&alpha.0)));
    assert_eq!(served(proxy.addr, "MAIL.Alpha.test").await, Some(der(&alpha.0)), "names are case-insensitive");
    assert_eq!(served(proxy.addr, "imap.beta.test").await, Some(der(&beta.0)));
    assert_eq!(served(proxy.addr, "a.b.beta.test").await, Some(der(&pki.cert)), "a wildcard is one label");
    assert_eq!(served(proxy.addr, "other.test").await, Some(der(&pki.cert)));
    assert_eq!(served(proxy.addr, "127.0.0.1").await, Some(der(&pki.cert)), "no SNI: the default");
    // The session behind SNI is an ordinary one.
    let config = support::client::tls_config(&pki.ca, &[b"imap"]);
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let name = ServerName::try_from("mail.alpha.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.expect("verified for its name");
    let mut c = TlsClient::new(tls);
    assert!(c.line().await.unwrap().starts_with("* OK"));
    assert!(c.command("a", "LOGIN bob@example.com bob-pw").await.unwrap().tagged.starts_with("a OK"));

    // Expiry per configured name; the 10-day certificate is logged as expiring (and the alert fires).
    let text = support::admin_get(proxy.admin, "/metrics").await.1;
    let expiry = |name: &str| {
        support::sample(&text, &format!("imapgate_tls_certificate_expiry_timestamp_seconds{{name=\"{name}\"}}"))
    };
    let facts = |path: &Path| imapgate::net::tls::certs::facts(&der(path)).unwrap().not_after as f64;
    assert_eq!(expiry("mail.alpha.test"), facts(&alpha.0));
    assert_eq!(expiry("*.beta.test"), facts(&beta.0));
    assert_eq!(expiry("default"), facts(&pki.cert));
    proxy.stop().await;

    let strict = TestProxy::start(&with_certificates(&entries, "refuse")).await;
    assert_eq!(served(strict.addr, "other.test").await, None, "an unknown name is refused");
    assert_eq!(served(strict.addr, "imap.beta.test").await, Some(der(&beta.0)));
    assert_eq!(served(strict.addr, "127.0.0.1").await, Some(der(&pki.cert)), "no SNI: still the default");
    strict.stop().await;
}

#[test]
fn a_certificate_that_does_not_fit_is_a_configuration_error_naming_it() {
    let pki = &env().pki;
    let alpha = pki.issue("alpha-check", &["mail.alpha.test"], -1, 90);
    let expired = pki.issue("expired", &["old.alpha.test"], -30, -1);
    let check = |entries: &[(&PathBuf, &PathBuf, &[&str])]| {
        let config = Config::from_toml(&with_certificates(entries, "default"), None).unwrap();
        Prepared::check(config).err().map(|e| e.to_string())
    };
    let uncovered = check(&[(&alpha.0, &alpha.1, &["imap.alpha.test"])]).expect("names not covered");
    assert!(uncovered.contains("tls.certificate[0]") && uncovered.contains("does not cover"), "{uncovered}");
    let mismatch = check(&[(&alpha.0, &expired.1, &["mail.alpha.test"])]).expect("key of another certificate");
    assert!(mismatch.contains("tls.certificate[0].key") && mismatch.contains("does not belong"), "{mismatch}");
    let old = check(&[(&expired.0, &expired.1, &["old.alpha.test"])]).expect("expired");
    assert!(old.contains("expired"), "{old}");
    assert!(check(&[(&alpha.0, &alpha.1, &["mail.alpha.test"])]).is_none());
    // Names are checked in the configuration itself.
    let text = with_certificates(&[(&alpha.0, &alpha.1, &["mail.alpha.test", "MAIL.alpha.test."])], "default");
    let twice = Config::from_toml(&text, None).unwrap_err().to_string();
    assert!(twice.contains("served twice"), "{twice}");
    let text = with_certificates(&[(&alpha.0, &alpha.1, &["*.*.alpha.test"])], "default");
    assert!(Config::from_toml(&text, None).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_after_sighup_and_an_open_session_carries_on() {
    let pki = &env().pki;
    let dir = support::scratch_dir("imapgate-rotate-");
    let (cert, key) = (dir.join("mail.pem"), dir.join("mail-key.pem"));
    let first = pki.issue("rotate-1", &["mail.gamma.test"], -1, 30);
    std::fs::copy(&first.0, &cert).unwrap();
    std::fs::copy(&first.1, &key).unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(&path, with_certificates(&[(&cert, &key, &["mail.gamma.test"])], "default")).unwrap();
    let proxy = TestProxy::start_from_file(&path).await;
    let (addr, admin) = (proxy.addr, proxy.admin);
    assert_eq!(served(addr, "mail.gamma.test").await, Some(der(&first.0)));
    // A returning client resumes its TLS session (a stateless ticket).
    let returning = looking_client();
    assert_eq!(handshake_kind(addr, &returning).await, rustls::HandshakeKind::Full);
    assert_eq!(handshake_kind(addr, &returning).await, rustls::HandshakeKind::Resumed);
    let (mut open, _) = TlsClient::greeted(addr, &pki.ca).await;
    assert!(open.command("a", "LOGIN bob@example.com bob-pw").await.unwrap().tagged.starts_with("a OK"));

    // Rotated on disk (a new key too), then SIGHUP.
    let second = pki.issue("rotate-2", &["mail.gamma.test"], -1, 365);
    std::fs::copy(&second.0, &cert).unwrap();
    std::fs::copy(&second.1, &key).unwrap();
    let reloads = "imapgate_config_reloads_total{result=\"success\"}";
    let before = support::metric(admin, reloads).await;
    assert!(
        std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().unwrap().success()
    );
    let text = support::scrape_until(admin, reloads, before + 1.0, Duration::from_secs(5)).await;
    assert!(support::sample(&text, reloads) > before, "{text}");
    assert_eq!(served(addr, "mail.gamma.test").await, Some(der(&second.0)), "new handshakes get the new one");
    assert!(open.command("b", "NOOP").await.unwrap().tagged.starts_with("b OK"), "the open session carries on");
    // The ticket keys survive the reload: the returning client still resumes.
    assert_eq!(handshake_kind(addr, &returning).await, rustls::HandshakeKind::Resumed);

    // A broken file: the reload is refused and the running set stays.
    std::fs::write(&key, "not a key").unwrap();
    let failed = "imapgate_config_reloads_total{result=\"failure\"}";
    assert!(
        std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().unwrap().success()
    );
    let text = support::scrape_until(admin, failed, 1.0, Duration::from_secs(5)).await;
    assert!(support::sample(&text, failed) >= 1.0, "{text}");
    assert_eq!(served(addr, "mail.gamma.test").await, Some(der(&second.0)));
    let expiry = "imapgate_tls_certificate_expiry_timestamp_seconds{name=\"mail.gamma.test\"}";
    assert_eq!(
        support::sample(&text, expiry),
        imapgate::net::tls::certs::facts(&der(&second.0)).unwrap().not_after as f64
    );
    proxy.stop().await;
}
