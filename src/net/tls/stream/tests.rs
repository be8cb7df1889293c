#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;
use rustls::AlertDescription;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A server and a client configuration for `localhost` with a self-signed certificate.
fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    configs_for(None, &[&rustls::version::TLS13, &rustls::version::TLS12])
}

/// Configurations with one cipher suite (or the provider's all) and the given versions.
fn configs_for(
    suite: Option<SupportedCipherSuite>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    crate::net::tls::install_crypto_provider();
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(suite) = suite {
        provider.cipher_suites = vec![suite];
    }
    let provider = Arc::new(provider);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
    let der = CertificateDer::from(cert.der().to_vec());
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], private)
        .unwrap();
    server.cert_resolver = Arc::new(RecordServerName(Arc::clone(&server.cert_resolver)));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

async fn pair() -> (TlsStream<Server>, TlsStream<Client>) {
    let (server, client) = configs();
    pair_with(server, client).await
}

async fn pair_with(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> (TlsStream<Server>, TlsStream<Client>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut server = Acceptor::new(server).accept(tcp).await.unwrap();
        // The last flight is left for the greeting; a TLS 1.2 client waits for it (its Finished).
        server.flush().await.unwrap();
        server
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client = connect(client, ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    (accept.await.unwrap(), client)
}

/// 3 MB one way in odd-sized writes and mixed reads, a reply the other way, both sides quiet holding no
/// buffer, and close_notify read as the end of the stream.
async fn bulk_then_idle_then_close(mut server: TlsStream<Server>, mut client: TlsStream<Client>) {
    assert_eq!(server.server_name(), Some("localhost"));
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(70_001) {
            client.write_all(chunk).await.unwrap();
        }
        client.flush().await.unwrap();
        client
    });
    let mut received = Vec::with_capacity(data.len());
    let mut small = [0u8; 512];
    let mut large = vec![0u8; 64 * 1024];
    while received.len() < data.len() {
        let n = if received.len() % 2 == 0 {
            server.read(&mut small).await.unwrap()
        } else {
            server.read(&mut large).await.unwrap()
        };
        assert!(n > 0);
        received.extend_from_slice(if received.len() % 2 == 0 { &small[..n] } else { &large[..n] });
    }
    assert!(received == data, "the stream arrived changed");
    let mut client = writer.await.unwrap();
    // A reply the other way, then both sides quiet: neither keeps a buffer.
    server.write_all(b"* OK done\r\n").await.unwrap();
    server.flush().await.unwrap();
    let mut reply = [0u8; 64];
    let n = client.read(&mut reply).await.unwrap();
    assert_eq!(&reply[..n], b"* OK done\r\n");
    let idle = tokio::time::timeout(Duration::from_millis(20), client.read(&mut reply)).await;
    assert!(idle.is_err(), "nothing more to read");
    assert_eq!(client.buffered_capacity(), 0);
    let idle = tokio::time::timeout(Duration::from_millis(20), server.read(&mut reply)).await;
    assert!(idle.is_err());
    assert_eq!(server.buffered_capacity(), 0);
    // close_notify reads as the end of the stream.
    client.shutdown().await.unwrap();
    assert_eq!(server.read(&mut reply).await.unwrap(), 0);
}

#[tokio::test]
async fn tls13_bulk_idle_and_close() {
    let (server, client) = pair().await;
    assert_eq!(client.negotiated().version, Some(rustls::ProtocolVersion::TLSv1_3));
    bulk_then_idle_then_close(server, client).await;
}

/// A peer that sends small records (Dovecot's are a few KiB) must not cost one relay write per record: a
/// read takes every record already received that fits whole. Before, a read into less than 16 KiB stopped
/// after the first record, and a FETCH went out in as many writes (and client wake-ups) as Dovecot made
/// records.
#[tokio::test]
async fn one_read_takes_every_received_record_that_fits() {
    let (mut server, mut client) = pair().await;
    const RECORD: usize = 2000;
    for i in 0..4u8 {
        client.write_all(&[b'a' + i; RECORD]).await.unwrap();
        client.flush().await.unwrap();
    }
    // Wait until all four records (header, data, content type, tag) sit in the server's socket; they fit
    // its first 8 KiB read.
    let ciphertext = 4 * (5 + RECORD + 1 + 16);
    let mut peek = vec![0u8; 2 * ciphertext];
    for _ in 0..200 {
        if server.tcp.peek(&mut peek).await.unwrap() >= ciphertext {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut buf = vec![0u8; 7000];
    let n = server.read(&mut buf).await.unwrap();
    assert_eq!(n, 3 * RECORD, "three whole records fit; the fourth would not");
    assert!(buf[..n].chunks(RECORD).enumerate().all(|(i, c)| c.iter().all(|&b| b == b'a' + i as u8)));
    let n = server.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], &[b'd'; RECORD], "the fourth in the next read");
}

#[tokio::test]
async fn tls12_bulk_idle_and_close() {
    let (server, client) = configs_for(None, &[&rustls::version::TLS12]);
    let (server, client) = pair_with(server, client).await;
    assert_eq!(server.negotiated().version, Some(rustls::ProtocolVersion::TLSv1_2));
    bulk_then_idle_then_close(server, client).await;
}

#[tokio::test]
async fn a_tcp_close_without_close_notify_is_unexpected_eof() {
    let (mut server, client) = pair().await;
    drop(client);
    let mut buf = [0u8; 16];
    let e = server.read(&mut buf).await.unwrap_err();
    // A FIN, or a reset where the client's socket still held the server's unread session tickets.
    assert!(matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset), "{e}");
}

#[tokio::test]
async fn garbage_instead_of_a_handshake_is_a_tls_error_with_an_alert() {
    let (server, _) = configs();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        Acceptor::new(server).accept(tcp).await
    });
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"a001 LOGIN user pass\r\n").await.unwrap();
    let e = accept.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).is_some(), "{e}");
    // The alert rustls owed the peer was sent: a TLS alert record (content type 21).
    let mut alert = [0u8; 7];
    tcp.read_exact(&mut alert).await.unwrap();
    assert_eq!(alert[0], 21);
}

// Against stock rustls peers (tokio-rustls, its own record layer): every TLS 1.3 suite, key updates asked
// for by the peer and sent by us, keys refreshed at the confidentiality limit, session tickets, close_notify.

const TLS13_SUITES: [SupportedCipherSuite; 3] = [
    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
];

/// Reads exactly `n` bytes.
async fn read_n(stream: &mut (impl AsyncRead + Unpin), n: usize) -> Vec<u8> {
    let mut got = vec![0u8; n];
    stream.read_exact(&mut got).await.unwrap();
    got
}

/// 200 KB each way, three times: plain, after the peer asked for a key update (rustls answers before our
/// next record), and after a second one.
async fn converse<S: Side, T: AsyncRead + AsyncWrite + Unpin>(
    ours: &mut TlsStream<S>,
    theirs: &mut T,
    refresh_theirs: fn(&mut T),
) {
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    for round in 0..3 {
        if round > 0 {
            refresh_theirs(theirs);
        }
        let (_, got) = tokio::join!(
            async {
                theirs.write_all(&data).await.unwrap();
                theirs.flush().await.unwrap();
            },
            read_n(ours, data.len())
        );
        assert!(got == data, "round {round}: what they sent arrived changed");
        let (_, got) = tokio::join!(
            async {
                ours.write_all(&data).await.unwrap();
                ours.flush().await.unwrap();
            },
            read_n(theirs, data.len())
        );
        assert!(got == data, "round {round}: what we sent arrived changed");
    }
}

#[tokio::test]
async fn our_server_and_a_rustls_client_on_every_suite_with_key_updates() {
    for suite in TLS13_SUITES {
        let (server_cfg, client_cfg) = shared_pki(suite);
        let (mut ours, mut theirs) = ours_and_a_stock_client(server_cfg, client_cfg).await;
        assert_eq!(ours.negotiated().suite, Some(suite));
        converse(&mut ours, &mut theirs, |t| t.get_mut().1.refresh_traffic_keys().unwrap()).await;
        // close_notify both ways.
        theirs.shutdown().await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(ours.read(&mut buf).await.unwrap(), 0);
        ours.shutdown().await.unwrap();
        assert_eq!(theirs.read(&mut buf).await.unwrap(), 0);
    }
}

/// Our server and a stock rustls (tokio-rustls) client connected to it on loopback.
async fn ours_and_a_stock_client(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (TlsStream<Server>, tokio_rustls::client::TlsStream<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        Acceptor::new(server).accept(tcp).await.unwrap()
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let theirs = tokio_rustls::TlsConnector::from(client)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    (accept.await.unwrap(), theirs)
}

/// A server and a client configuration that trusts its certificate, for `suite`.
fn shared_pki(suite: SupportedCipherSuite) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    configs_for(Some(suite), &[&rustls::version::TLS13])
}

#[tokio::test]
async fn our_client_and_a_rustls_server_on_every_suite_with_key_updates_and_tickets() {
    for suite in TLS13_SUITES {
        let (server, client) = configs_for(Some(suite), &[&rustls::version::TLS13]);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serve = tokio::spawn(async move {
            let mut kinds = Vec::new();
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut theirs = acceptor.accept(tcp).await.unwrap();
                kinds.push(theirs.get_ref().1.handshake_kind());
                let mut hello = [0u8; 5];
                theirs.read_exact(&mut hello).await.unwrap();
                // Tickets went out after the handshake; this reply follows them.
                theirs.write_all(b"world").await.unwrap();
                theirs.flush().await.unwrap();
                if kinds.len() == 1 {
                    let mut buf = [0u8; 1];
                    assert_eq!(theirs.read(&mut buf).await.unwrap(), 0, "close_notify");
                    theirs.shutdown().await.unwrap();
                } else {
                    return (kinds, theirs);
                }
            }
            unreachable!()
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut ours = connect(Arc::clone(&client), ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
        assert_eq!(ours.negotiated().kind, Some(HandshakeKind::Full));
        ours.write_all(b"hello").await.unwrap();
        ours.flush().await.unwrap();
        assert_eq!(read_n(&mut ours, 5).await, b"world");
        ours.shutdown().await.unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(ours.read(&mut buf).await.unwrap(), 0);
        // The tickets that came with the server's first data make the next connection a resumption.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut ours = connect(client, ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
        assert_eq!(ours.negotiated().kind, Some(HandshakeKind::Resumed), "{suite:?}");
        ours.write_all(b"hello").await.unwrap();
        ours.flush().await.unwrap();
        assert_eq!(read_n(&mut ours, 5).await, b"world");
        let (kinds, mut theirs) = serve.await.unwrap();
        assert_eq!(kinds, [Some(HandshakeKind::Full), Some(HandshakeKind::Resumed)]);
        converse(&mut ours, &mut theirs, |t| t.get_mut().1.refresh_traffic_keys().unwrap()).await;
    }
}

#[tokio::test]
async fn a_corrupted_record_is_a_decrypt_error_and_the_peer_gets_bad_record_mac() {
    let (server_cfg, client_cfg) = shared_pki(TLS13_SUITES[0]);
    let (mut ours, mut theirs) = ours_and_a_stock_client(server_cfg, client_cfg).await;
    // One record written by the peer's rustls, one bit flipped in its ciphertext, sent raw.
    let (tcp, conn) = theirs.get_mut();
    std::io::Write::write_all(&mut conn.writer(), b"a001 NOOP\r\n").unwrap();
    let mut record = Vec::new();
    conn.write_tls(&mut record).unwrap();
    let last = record.len() - 1;
    record[last] ^= 1;
    tcp.write_all(&record).await.unwrap();
    let mut buf = [0u8; 64];
    let e = ours.read(&mut buf).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(matches!(e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()), Some(rustls::Error::DecryptError)));
    // Every later operation fails the same way.
    assert_eq!(ours.write(b"x").await.unwrap_err().kind(), io::ErrorKind::InvalidData);
    let e = theirs.read(&mut buf).await.unwrap_err();
    let alert = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()).cloned();
    assert_eq!(alert, Some(rustls::Error::AlertReceived(AlertDescription::BadRecordMac)), "{e}");
}

// What an attacker sends: regressions for the review of issue 24.

/// tlsfuzzer's `test-tls13-zero-length-data.py`: a ClientHello split over two handshake records with a
/// zero-length application-data record between them. rustls holds the first half in our buffer when it
/// refuses the record; collecting its alert with an empty buffer made rustls index past it (a panic).
/// Now: an error with the alert, no panic, for each place the empty record can stand.
#[tokio::test]
async fn zero_length_application_data_inside_a_split_client_hello_is_an_alert_not_a_panic() {
    let (server, client_cfg) = configs();
    let mut hello = Vec::new();
    let mut client = rustls::ClientConnection::new(client_cfg, ServerName::try_from("localhost").unwrap()).unwrap();
    client.write_tls(&mut hello).unwrap();
    let body = &hello[5..];
    let record = |typ: u8, payload: &[u8]| {
        let mut r = vec![typ, 3, 3];
        r.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        r.extend_from_slice(payload);
        r
    };
    for split in [1, 4, body.len() / 2, body.len() - 1] {
        let mut wire = record(22, &body[..split]);
        wire.extend(record(23, &[]));
        wire.extend(record(22, &body[split..]));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::clone(&server);
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            Acceptor::new(server).accept(tcp).await
        });
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&wire).await.unwrap();
        let e = accept.await.expect("no panic").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "split at {split}: {e}");
        let e = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).cloned();
        assert_eq!(
            e,
            Some(rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::MessageInterleavedWithHandshakeMessage)),
            "split at {split}"
        );
        // rustls raises this one while deframing and queues no alert for it: the peer sees the close.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await.expect("closed");
        assert!(rest.is_empty() || rest[0] == 21, "split at {split}: nothing but an alert: {rest:?}");
    }
}

/// A peer that asks for a key update before every byte it sends and never reads: rustls keeps one reply,
/// sent ahead of our next record, so what we owe the peer stays bounded however often it asks (the own
/// record layer sealed one reply per read: 4.4 MB in 28 s from one client).
#[tokio::test]
async fn key_update_requests_from_a_peer_that_never_reads_owe_it_one_reply() {
    let (server_cfg, client_cfg) = shared_pki(TLS13_SUITES[0]);
    let (mut ours, mut theirs) = ours_and_a_stock_client(server_cfg, client_cfg).await;
    let rounds = 3000;
    let sender = tokio::spawn(async move {
        for _ in 0..rounds {
            theirs.get_mut().1.refresh_traffic_keys().unwrap();
            theirs.write_all(b"x").await.unwrap();
        }
        theirs.flush().await.unwrap();
        theirs
    });
    let mut got = 0;
    let mut buf = [0u8; 256];
    let mut most_owed = 0;
    while got < rounds {
        let n = ours.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got += n;
        most_owed = most_owed.max(ours.out.unsent().len()).max(ours.out.buf.capacity());
    }
    assert!(most_owed <= 1024, "we owed the peer {most_owed} bytes while it only asked for key updates");
    let mut theirs = sender.await.unwrap();
    // The reply goes ahead of our first record: the peer reads it under the new keys.
    ours.write_all(b"* OK still here\r\n").await.unwrap();
    ours.flush().await.unwrap();
    assert_eq!(read_n(&mut theirs, 17).await, b"* OK still here\r\n");
}

/// A client may ask for a key update in the flight of its Finished. rustls queues the reply during the
/// handshake; it must reach the client ahead of the greeting (the own record layer dropped it, and the
/// client failed with bad_record_mac).
#[tokio::test]
async fn a_key_update_request_in_the_finished_flight_is_answered_before_the_greeting() {
    let (server_cfg, client_cfg) = shared_pki(TLS13_SUITES[0]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ours = Acceptor::new(server_cfg).accept(tcp).await.unwrap();
        ours.write_all(b"* OK ready\r\n").await.unwrap();
        ours.flush().await.unwrap();
        let mut command = [0u8; 11];
        ours.read_exact(&mut command).await.unwrap();
        assert_eq!(&command, b"a NOOP\r\nxyz");
        ours.write_all(b"a OK NOOP\r\n").await.unwrap();
        ours.flush().await.unwrap();
        ours
    });
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut client = rustls::ClientConnection::new(client_cfg, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut pending = Vec::new();
    let mut asked = false;
    let mut sent = false;
    let mut plain = Vec::new();
    for _ in 0..200 {
        if !client.is_handshaking() && !asked {
            // Finished is queued but not sent yet: the request joins it in one flight.
            client.refresh_traffic_keys().unwrap();
            asked = true;
        }
        let mut flight = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut flight).unwrap();
        }
        if !flight.is_empty() {
            tcp.write_all(&flight).await.unwrap();
        }
        if plain.len() >= 23 {
            break;
        }
        if plain.len() == 12 && !sent {
            std::io::Write::write_all(&mut client.writer(), b"a NOOP\r\nxyz").unwrap();
            sent = true;
            continue;
        }
        let mut buf = vec![0u8; 16 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "the proxy closed the connection");
        pending.extend_from_slice(&buf[..n]);
        let mut slice = pending.as_slice();
        client.read_tls(&mut slice).unwrap();
        pending = slice.to_vec();
        client.process_new_packets().expect("every record decrypts");
        let mut chunk = [0u8; 64];
        while let Ok(n) = std::io::Read::read(&mut client.reader(), &mut chunk) {
            if n == 0 {
                break;
            }
            plain.extend_from_slice(&chunk[..n]);
        }
    }
    assert!(asked);
    assert_eq!(plain, b"* OK ready\r\na OK NOOP\r\n");
    accept.await.unwrap();
}

/// A peer that stops reading while we write: `poll_write` stops taking data once `HIGH_WATER` bytes are
/// unsent, so the caller's write deadline, not our memory, ends it.
#[tokio::test]
async fn what_we_owe_a_peer_that_never_reads_stops_at_the_high_water_mark() {
    let (mut server, _client) = pair().await;
    let data = vec![7u8; 16 * 1024];
    let mut written = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_millis(300), server.write(&data)).await {
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => break,
        }
        assert!(written < 64 * 1024 * 1024, "never blocked");
    }
    assert!(server.out.unsent().len() <= HIGH_WATER + WRITE_CHUNK + 4096, "{}", server.out.unsent().len());
}
