//! The TLS stream on both legs fed arbitrary bytes after a completed handshake: the first byte picks the
//! leg (even: our listener's stream and a rustls client; odd: our backend-leg stream and a rustls server),
//! the rest arrives raw on our side's socket, in pieces whose sizes come from the input. However the bytes
//! look, the stream ends with data, a clean end or an error: never a panic, and never more than a bounded
//! amount owed to the peer. Loopback sockets inside one current-thread runtime per fuzzing process.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use imapgate::net::tls::stream::{Acceptor, connect};
use libfuzzer_sys::fuzz_target;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Setup {
    runtime: tokio::runtime::Runtime,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        imapgate::net::tls::install_crypto_provider();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        let der = CertificateDer::from(cert.der().to_vec());
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let server =
            rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(vec![der.clone()], private).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Setup { runtime, server: Arc::new(server), client: Arc::new(client) }
    })
}

/// Writes `bytes` raw to `tcp` in pieces sized by `sizes`, then closes the write half.
async fn feed(mut tcp: TcpStream, bytes: Vec<u8>, sizes: Vec<u8>) -> TcpStream {
    let mut rest = bytes.as_slice();
    let mut i = 0;
    while !rest.is_empty() {
        let n = (sizes.get(i).copied().unwrap_or(255) as usize).clamp(1, rest.len());
        if tcp.write_all(&rest[..n]).await.is_err() {
            break;
        }
        rest = &rest[n..];
        i += 1;
        tokio::task::yield_now().await;
    }
    let _ = tcp.shutdown().await;
    tcp
}

/// Reads from our stream until it ends (or 2 s pass), writing a little after each read.
async fn drain(mut ours: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin) {
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match ours.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if ours.write_all(b"* OK\r\n").await.is_err() {
                        break;
                    }
                }
            }
        }
    })
    .await;
}

fuzz_target!(|data: &[u8]| {
    let Some((&leg, rest)) = data.split_first() else { return };
    let split = rest.len() / 8;
    let (sizes, bytes) = (rest[..split].to_vec(), rest[split..].to_vec());
    let s = setup();
    s.runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        if leg % 2 == 0 {
            let acceptor = Acceptor::new(Arc::clone(&s.server));
            let ours = tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut ours = acceptor.accept(tcp).await.ok()?;
                ours.flush().await.ok()?;
                Some(ours)
            });
            let tcp = TcpStream::connect(addr).await.unwrap();
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&s.client));
            let Ok(theirs) = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await else { return };
            let Some(ours) = ours.await.unwrap() else { return };
            let (tcp, _) = theirs.into_inner();
            let feeder = tokio::spawn(feed(tcp, bytes, sizes));
            drain(ours).await;
            let _ = feeder.await;
        } else {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&s.server));
            let theirs = tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                acceptor.accept(tcp).await.ok()
            });
            let tcp = TcpStream::connect(addr).await.unwrap();
            let Ok(ours) = connect(Arc::clone(&s.client), ServerName::try_from("localhost").unwrap(), tcp).await else {
                return;
            };
            let Some(mut theirs) = theirs.await.unwrap() else { return };
            // The server's tickets go out before the raw bytes.
            let _ = theirs.flush().await;
            let (tcp, _) = theirs.into_inner();
            let feeder = tokio::spawn(feed(tcp, bytes, sizes));
            drain(ours).await;
            let _ = feeder.await;
        }
    });
});
