//! A TLS 1.3 client that builds its records itself after a real handshake, to send what no correct peer
//! would: rustls (with secret extraction, on the test's side only) does the handshake, then records are
//! sealed and opened here with AES-128-GCM (RFC 8446 5.2-5.3). For attacking the proxy's stream in tests;
//! the proxy itself never does this.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use rustls::pki_types::ServerName;

pub const APPLICATION_DATA: u8 = 23;
pub const HANDSHAKE: u8 = 22;
pub const ALERT: u8 = 21;
pub const CHANGE_CIPHER_SPEC: u8 = 20;

/// One direction's key, IV and next sequence number.
pub struct Direction {
    key: LessSafeKey,
    iv: [u8; 12],
    pub seq: u64,
}

impl Direction {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Direction {
        let ConnectionTrafficSecrets::Aes128Gcm { key, iv } = secrets else { panic!("AES-128-GCM only") };
        let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, key.as_ref()).unwrap());
        Direction { key, iv: iv.as_ref().try_into().unwrap(), seq }
    }

    fn nonce(&self, seq: u64) -> Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        Nonce::assume_unique_for_key(nonce)
    }
}

/// What the server sent, opened.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    Record {
        typ: u8,
        payload: Vec<u8>,
    },
    /// A record that did not open (or was not a TLS 1.3 record).
    Garbage(Vec<u8>),
    /// The connection closed (FIN or reset).
    Closed,
}

pub struct RawTls {
    pub tcp: TcpStream,
    pub tx: Direction,
    pub rx: Direction,
    pending: Vec<u8>,
}

impl RawTls {
    /// Connects to `addr`, trusting `ca`, with ALPN `imap` and TLS 1.3's AES-128-GCM suite only.
    pub fn connect(addr: SocketAddr, ca: &Path) -> RawTls {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.cipher_suites = vec![rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256];
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots_of(ca))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"imap".to_vec()];
        config.enable_secret_extraction = true;
        config.resumption = rustls::client::Resumption::disabled();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
        let mut tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        while conn.is_handshaking() {
            while conn.wants_write() {
                conn.write_tls(&mut tcp).unwrap();
            }
            if !conn.is_handshaking() {
                break;
            }
            conn.read_tls(&mut tcp).unwrap();
            conn.process_new_packets().unwrap();
        }
        while conn.wants_write() {
            conn.write_tls(&mut tcp).unwrap();
        }
        let secrets = conn.dangerous_extract_secrets().unwrap();
        RawTls {
            tcp,
            tx: Direction::new(secrets.tx.0, secrets.tx.1),
            rx: Direction::new(secrets.rx.0, secrets.rx.1),
            pending: Vec::new(),
        }
    }

    /// A record of `typ` carrying `payload` (plus `padding` zero bytes), sealed with sequence number `seq`.
    pub fn seal_at(&self, seq: u64, typ: u8, payload: &[u8], padding: usize) -> Vec<u8> {
        let mut inner = payload.to_vec();
        inner.push(typ);
        inner.extend(std::iter::repeat_n(0, padding));
        let len = inner.len() + AES_128_GCM.tag_len();
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        self.tx.key.seal_in_place_append_tag(self.tx.nonce(seq), Aad::from(header), &mut inner).unwrap();
        let mut record = header.to_vec();
        record.extend(inner);
        record
    }

    /// The next record, sealed with the next sequence number.
    pub fn seal(&mut self, typ: u8, payload: &[u8]) -> Vec<u8> {
        let record = self.seal_at(self.tx.seq, typ, payload, 0);
        self.tx.seq += 1;
        record
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).unwrap();
    }

    /// Sends application data in one record.
    pub fn send(&mut self, data: &[u8]) {
        let record = self.seal(APPLICATION_DATA, data);
        self.send_raw(&record);
    }

    /// The next record from the server, opened (its inner content type and payload).
    pub fn receive(&mut self) -> Received {
        loop {
            if self.pending.len() >= 5 {
                let len = u16::from_be_bytes([self.pending[3], self.pending[4]]) as usize;
                if self.pending.len() >= 5 + len {
                    let record: Vec<u8> = self.pending.drain(..5 + len).collect();
                    if record[0] != APPLICATION_DATA {
                        return Received::Garbage(record);
                    }
                    let mut body = record[5..].to_vec();
                    let header: [u8; 5] = record[..5].try_into().unwrap();
                    let nonce = self.rx.nonce(self.rx.seq);
                    let Ok(plain) = self.rx.key.open_in_place(nonce, Aad::from(header), &mut body) else {
                        return Received::Garbage(record);
                    };
                    self.rx.seq += 1;
                    let end = plain.iter().rposition(|&b| b != 0).unwrap_or(0);
                    return Received::Record { typ: plain[end], payload: plain[..end].to_vec() };
                }
            }
            let mut buf = [0u8; 32 * 1024];
            match self.tcp.read(&mut buf) {
                Ok(0) | Err(_) => return Received::Closed,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Application data until `until` appears (handshake records, the server's tickets, are skipped).
    pub fn read_until(&mut self, until: &str) -> String {
        let mut text = String::new();
        for _ in 0..10_000 {
            match self.receive() {
                Received::Record { typ: APPLICATION_DATA, payload } => {
                    text.push_str(&String::from_utf8_lossy(&payload));
                    if text.contains(until) {
                        return text;
                    }
                }
                Received::Record { typ: HANDSHAKE, .. } => {}
                other => panic!("waiting for {until:?} after {text:?}: {other:?}"),
            }
        }
        panic!("no {until:?}");
    }

    /// What the server sends after an attack: the alert it closes with (its description), `None` when the
    /// connection closed without one. Application data and tickets on the way are skipped.
    pub fn closing_alert(&mut self) -> Option<u8> {
        for _ in 0..1000 {
            match self.receive() {
                Received::Record { typ: ALERT, payload } => {
                    assert_eq!(payload.len(), 2, "an alert is two bytes: {payload:?}");
                    assert_eq!(payload[0], 2, "a fatal alert");
                    // Nothing after a fatal alert.
                    assert_eq!(self.receive(), Received::Closed, "the connection closes after the alert");
                    return Some(payload[1]);
                }
                Received::Record { .. } => {}
                Received::Garbage(record) => panic!("a record we could not open: {record:?}"),
                Received::Closed => return None,
            }
        }
        panic!("the server went on sending");
    }
}

fn roots_of(ca: &Path) -> rustls::RootCertStore {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}
