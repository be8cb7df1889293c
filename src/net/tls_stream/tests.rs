#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;
use rustls::ContentType;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A server and a client configuration for `localhost` with a self-signed certificate, as the proxy
/// builds them (secret extraction on: TLS 1.3 sessions move to the own record layer).
fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    configs_for(None, &[&rustls::version::TLS13, &rustls::version::TLS12], true)
}

/// Configurations with one cipher suite (or the provider's all), the given versions, and secret
/// extraction on (ours) or off (stock rustls, as tokio-rustls peers use it).
fn configs_for(
    suite: Option<SupportedCipherSuite>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    extract: bool,
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
    server.enable_secret_extraction = extract;
    if extract {
        server.key_log = Arc::new(tls_records::SecretsLog);
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = extract;
    if extract {
        client.key_log = Arc::new(tls_records::SecretsLog);
    }
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
async fn tls13_on_the_own_record_layer_bulk_idle_and_close() {
    let (server, client) = pair().await;
    assert_eq!(client.negotiated().version, Some(rustls::ProtocolVersion::TLSv1_3));
    assert!(server.own_record_layer() && client.own_record_layer());
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
    let ciphertext = 4 * (tls_records::HEADER + RECORD + 1 + 16);
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
async fn tls12_stays_on_rustls_bulk_idle_and_close() {
    let (server, client) = configs_for(None, &[&rustls::version::TLS12], true);
    let (server, client) = pair_with(server, client).await;
    assert_eq!(server.negotiated().version, Some(rustls::ProtocolVersion::TLSv1_2));
    assert!(!server.own_record_layer() && !client.own_record_layer());
    bulk_then_idle_then_close(server, client).await;
}

#[tokio::test]
async fn without_secret_extraction_tls13_stays_on_rustls() {
    let (server, client) = configs_for(None, &[&rustls::version::TLS13], false);
    let (server, client) = pair_with(server, client).await;
    assert!(!server.own_record_layer() && !client.own_record_layer());
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

/// 200 KB each way, three times: plain, after the peer asked for a key update (we must answer before our
/// next record), and after we refreshed our keys (at a confidentiality limit lowered to 4 records).
async fn converse<S: Side, T: AsyncRead + AsyncWrite + Unpin>(
    ours: &mut TlsStream<S>,
    theirs: &mut T,
    refresh_theirs: fn(&mut T),
) {
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    for round in 0..3 {
        match round {
            1 => refresh_theirs(theirs),
            2 => ours.records().unwrap().set_key_limit(4),
            _ => {}
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
        let (tx, rx) = ours.records().unwrap().sequence_numbers();
        match round {
            // The peer's key update reset our receive numbering (13 records of 16 KiB came after it).
            1 => assert!(rx <= 14, "rx {rx}"),
            // Refreshed every 4 records.
            2 => assert!(tx <= 4, "tx {tx}"),
            _ => assert!(tx >= 13 && rx >= 13, "{tx} {rx}"),
        }
    }
}

#[tokio::test]
async fn our_server_and_a_rustls_client_on_every_suite_with_key_updates() {
    for suite in TLS13_SUITES {
        let (server_cfg, client_cfg) = shared_pki(suite);
        let (mut ours, mut theirs) = ours_and_a_stock_client(server_cfg, client_cfg).await;
        assert!(ours.own_record_layer());
        assert!(!ours.records().unwrap().holds_rustls_state(), "the secrets were logged: no rustls state kept");
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

/// A server configuration with extraction on and a stock client configuration (extraction off) that trusts
/// its certificate, for `suite`.
fn shared_pki(suite: SupportedCipherSuite) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let (server, client) = configs_for(Some(suite), &[&rustls::version::TLS13], true);
    let mut stock = (*client).clone();
    stock.enable_secret_extraction = false;
    stock.key_log = Arc::new(rustls::NoKeyLog);
    (server, Arc::new(stock))
}

#[tokio::test]
async fn our_client_and_a_rustls_server_on_every_suite_with_key_updates_and_tickets() {
    for suite in TLS13_SUITES {
        let (server, client) = configs_for(Some(suite), &[&rustls::version::TLS13], true);
        let mut stock = (*server).clone();
        stock.enable_secret_extraction = false;
        stock.key_log = Arc::new(rustls::NoKeyLog);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(stock));
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
        assert!(ours.own_record_layer());
        assert!(ours.records().unwrap().holds_rustls_state(), "kept for the tickets");
        assert_eq!(ours.negotiated().kind, Some(HandshakeKind::Full));
        ours.write_all(b"hello").await.unwrap();
        ours.flush().await.unwrap();
        assert_eq!(read_n(&mut ours, 5).await, b"world");
        assert!(!ours.records().unwrap().holds_rustls_state(), "dropped at the server's first data");
        ours.shutdown().await.unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(ours.read(&mut buf).await.unwrap(), 0);
        // The tickets the own record layer handed to rustls make the next connection a resumption.
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
async fn without_logged_secrets_rustls_state_derives_the_key_updates() {
    let (server_cfg, client_cfg) = shared_pki(TLS13_SUITES[1]);
    let mut server_cfg = (*server_cfg).clone();
    server_cfg.key_log = Arc::new(rustls::NoKeyLog);
    let (mut ours, mut theirs) = ours_and_a_stock_client(Arc::new(server_cfg), client_cfg).await;
    assert!(ours.own_record_layer());
    assert!(ours.records().unwrap().holds_rustls_state());
    converse(&mut ours, &mut theirs, |t| t.get_mut().1.refresh_traffic_keys().unwrap()).await;
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

// The record layer alone, fed records a misbehaving peer would send: sealed by our own client's record layer
// (same keys as the server's), opened by the server's.

/// A connected pair on the own record layer, for their `Records`.
async fn records_pair() -> (TlsStream<Server>, TlsStream<Client>) {
    let (mut server, mut client) = pair().await;
    // A byte each way: the server's last flight (session tickets) reaches the client's record layer, so
    // that both sides' sequence numbers agree when records are then passed by hand.
    client.write_all(b"x").await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(read_n(&mut server, 1).await, b"x");
    server.write_all(b"y").await.unwrap();
    server.flush().await.unwrap();
    assert_eq!(read_n(&mut client, 1).await, b"y");
    (server, client)
}

fn open_all(records: &mut Records<ServerConnectionData>, bytes: &mut [u8]) -> Result<Vec<Opened>, rustls::Error> {
    let mut at = 0;
    let mut seen = Vec::new();
    while at < bytes.len() {
        let opened = records.open(&mut bytes[at..])?;
        match &opened {
            Opened::NeedMore => break,
            Opened::Data { consumed, .. } | Opened::Handled { consumed } | Opened::Closed { consumed } => {
                at += consumed
            }
        }
        seen.push(opened);
    }
    Ok(seen)
}

#[tokio::test]
async fn records_data_split_input_alerts_and_key_updates() {
    let (mut server, mut client) = records_pair().await;
    let (s, c) = (server.records().unwrap(), client.records().unwrap());
    // Data; a record given in two parts needs more, then opens in place.
    let mut record = c.seal_raw(ContentType::ApplicationData, b"a001 NOOP\r\n");
    assert_eq!(s.open(&mut record[..4]).unwrap(), Opened::NeedMore);
    assert_eq!(s.open(&mut record[..10]).unwrap(), Opened::NeedMore);
    let len = record.len();
    let Opened::Data { consumed, plain } = s.open(&mut record).unwrap() else { panic!() };
    assert_eq!((consumed, &record[plain]), (len, &b"a001 NOOP\r\n"[..]));
    // user_canceled is ignored, close_notify ends reading.
    let mut bytes = c.seal_raw(ContentType::Alert, &[1, 90]);
    bytes.extend(c.seal_raw(ContentType::Alert, &[1, 0]));
    let seen = open_all(s, &mut bytes).unwrap();
    assert!(matches!(seen[..], [Opened::Handled { .. }, Opened::Closed { .. }]), "{seen:?}");
    // A key update asked for, split over two records: the receive key changes after the second part, and
    // our answer goes out before anything else we send.
    let (mut server, mut client) = records_pair().await;
    let (s, c) = (server.records().unwrap(), client.records().unwrap());
    let mut bytes = c.seal_raw(ContentType::Handshake, &[24, 0]);
    bytes.extend(c.seal_raw(ContentType::Handshake, &[0, 1, 1]));
    let rx_before = s.sequence_numbers().1;
    let seen = open_all(s, &mut bytes).unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(s.sequence_numbers().1, 0, "new receive key from {rx_before}");
    let mut answer = Vec::new();
    s.seal(b"* OK\r\n", &mut answer).unwrap();
    assert_eq!(s.sequence_numbers().0, 1, "the answer, then the data under the new key");
    // The client's record layer reads our KeyUpdate and then the data.
    let mut client_side: Vec<Opened> = Vec::new();
    let mut at = 0;
    while at < answer.len() {
        let opened = c.open(&mut answer[at..]).unwrap();
        match &opened {
            Opened::Data { consumed, .. } | Opened::Handled { consumed } => at += consumed,
            other => panic!("{other:?}"),
        }
        client_side.push(opened);
    }
    assert!(matches!(client_side[..], [Opened::Handled { .. }, Opened::Data { .. }]), "{client_side:?}");
    // Data from the client under its old key still opens: it has not updated (not asked to).
    let mut data = c.seal_raw(ContentType::ApplicationData, b"a002 NOOP\r\n");
    // ...but the server now expects the client's next key: the client must refresh first.
    assert!(matches!(s.open(&mut data), Err(rustls::Error::DecryptError)));
}

#[tokio::test]
async fn records_refuse_what_a_peer_may_not_send() {
    type Case = (&'static str, fn(&mut Records<ClientConnectionData>) -> Vec<u8>, fn(&rustls::Error) -> bool);
    let cases: [Case; 9] = [
        (
            "a fatal alert",
            |c| c.seal_raw(ContentType::Alert, &[2, 40]),
            |e| *e == rustls::Error::AlertReceived(AlertDescription::HandshakeFailure),
        ),
        (
            "a key update with a bad value",
            |c| c.seal_raw(ContentType::Handshake, &[24, 0, 0, 1, 2]),
            |e| *e == rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidKeyUpdate),
        ),
        (
            "a key update followed by more in its record",
            |c| c.seal_raw(ContentType::Handshake, &[24, 0, 0, 1, 0, 24, 0, 0, 1, 0]),
            |e| *e == rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::KeyEpochWithPendingFragment),
        ),
        (
            "a session ticket sent to a server",
            |c| c.seal_raw(ContentType::Handshake, &[4, 0, 0, 0]),
            |e| matches!(e, rustls::Error::InappropriateHandshakeMessage { .. }),
        ),
        (
            "a post-handshake certificate request",
            |c| c.seal_raw(ContentType::Handshake, &[13, 0, 0, 0]),
            |e| matches!(e, rustls::Error::InappropriateHandshakeMessage { .. }),
        ),
        (
            "an empty handshake record",
            |c| c.seal_raw(ContentType::Handshake, &[]),
            |e| matches!(e, rustls::Error::InvalidMessage(_)),
        ),
        (
            "application data inside a split handshake message",
            |c| {
                let mut bytes = c.seal_raw(ContentType::Handshake, &[24, 0]);
                bytes.extend(c.seal_raw(ContentType::ApplicationData, b"x"));
                bytes
            },
            |e| *e == rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::KeyEpochWithPendingFragment),
        ),
        (
            "too many empty records",
            |c| (0..40).flat_map(|_| c.seal_raw(ContentType::ApplicationData, &[])).collect(),
            |e| *e == rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::TooManyEmptyFragments),
        ),
        (
            "too many key updates without data",
            |c| {
                let mut bytes = Vec::new();
                for _ in 0..40 {
                    // A real key update each time: under the current key, then the client's next key.
                    c.force_key_update();
                    c.seal_owed(&mut bytes).unwrap();
                }
                bytes
            },
            |e| *e == rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::TooManyKeyUpdateRequests),
        ),
    ];
    for (what, records, refused) in cases {
        let (mut server, mut client) = records_pair().await;
        let mut bytes = records(client.records().unwrap());
        let e = open_all(server.records().unwrap(), &mut bytes).unwrap_err();
        assert!(refused(&e), "{what}: {e:?}");
        assert!(tls_records::alert_for(&e).is_some() || matches!(e, rustls::Error::AlertReceived(_)), "{what}");
    }
    // Framing: a plaintext record after the handshake, an oversized one, a damaged one.
    let (mut server, mut client) = records_pair().await;
    let s = server.records().unwrap();
    let mut ccs = [20u8, 3, 3, 0, 1, 1];
    assert!(matches!(s.open(&mut ccs), Err(rustls::Error::InappropriateMessage { .. })));
    let mut huge = vec![23u8, 3, 3, 0x48, 0x01];
    huge.resize(5 + 0x4801, 0);
    assert_eq!(s.open(&mut huge), Err(rustls::Error::PeerSentOversizedRecord));
    let mut damaged = client.records().unwrap().seal_raw(ContentType::ApplicationData, b"abc");
    damaged[7] ^= 0x80;
    assert_eq!(server.records().unwrap().open(&mut damaged), Err(rustls::Error::DecryptError));
}
