//! The crypto provider both legs use: aws-lc-rs through rustls, with the AES-128-GCM suites first.

use std::sync::Arc;

/// Installs aws-lc-rs as the process-wide crypto provider. Call first thing; a second call is harmless.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// aws-lc-rs with the AES-128-GCM suites first (TLS 1.3's mandatory `TLS_AES_128_GCM_SHA256`, then TLS
/// 1.2's), the rest in the provider's order. AES-128 runs 10 rounds to AES-256's 14, and its SHA-256 key
/// schedule has instructions on current x86 and ARM where SHA-384 does not: on the benchmark machine the
/// SHA-384 of a handshake was 7% of a login's CPU. The backend leg always offers this order; the listener
/// uses it unless `tls.cipher_preference = "client"`.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|suite| !is_aes128_gcm(suite.suite()));
    Arc::new(provider)
}

fn is_aes128_gcm(suite: rustls::CipherSuite) -> bool {
    use rustls::CipherSuite as S;
    matches!(
        suite,
        S::TLS13_AES_128_GCM_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    )
}
