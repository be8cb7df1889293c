//! TLS 1.3 records once the handshake is over, without rustls's connection object. rustls hands over the
//! traffic keys with their sequence numbers (`dangerous_into_kernel_connection`); records are sealed and
//! opened in place in the stream's own buffers with the negotiated AEAD from aws-lc-rs (the provider rustls
//! uses here): no allocation or copy per record. The traffic secrets, from which a `KeyUpdate` derives the
//! next keys (RFC 8446 7.2), come from rustls's key log hook during the handshake ([`SecretsLog`]) and are
//! checked against the keys rustls handed over, so rustls's handshake state (its key schedule with an HMAC
//! context, about 1 KB) goes too; the client leg keeps it only until the server's first data, to store the
//! session tickets that come before it (a later one is ignored). Where the secrets do not match (rustls
//! processed a key update already, or another connection's secrets were logged on the thread), rustls's
//! state stays and derives the keys.
//!
//! (rustls's own aws-lc record encrypter is not used: aws-lc's TLS 1.3 sealing mode takes the first
//! sequence number it sees as zero, and a server's first record here is number 2, after its tickets.)
//!
//! This module does what rustls's record layer and its post-handshake state machine do for TLS 1.3
//! (RFC 8446 sections 4.6 and 5): framing and sequence numbers; `KeyUpdate` both ways (a requested update
//! is answered before the next record we send, keys are refreshed before the suite's confidentiality
//! limit); `NewSessionTicket` handed to rustls on the client side; `close_notify`, `user_canceled` and
//! fatal alerts; and the limits rustls applies to a misbehaving peer (record and message sizes, empty
//! records, key-update floods). Sans-IO: it takes ciphertext and gives plaintext, takes plaintext and
//! appends records to a caller's buffer.

use std::cell::RefCell;
use std::ops::Range;

use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use rustls::client::ClientConnectionData;
use rustls::crypto::tls13::OkmBlock;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{
    AlertDescription, ConnectionTrafficSecrets, ContentType, Error, ExtractedSecrets, HandshakeType, InvalidMessage,
    KeyLog, PeerMisbehaved, SupportedCipherSuite, Tls13CipherSuite,
};

/// A record header: content type, legacy version, length.
pub const HEADER: usize = 5;
/// The largest plaintext of one record.
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// The largest TLS 1.3 ciphertext (RFC 8446 5.2: 2^14 + 256).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// The AEAD tag of every TLS 1.3 suite.
const TAG: usize = 16;
/// The largest post-handshake message accepted (rustls's bound on handshake messages).
const MAX_HANDSHAKE_MESSAGE: usize = 0xffff + 4;
/// Consecutive empty application-data records, and consecutive key updates without application data in
/// between, accepted before the peer counts as misbehaving (rustls's limits).
const MAX_EMPTY_RECORDS: u32 = 32;
const MAX_KEY_UPDATES: u32 = 32;
/// rustls's soft and hard limits on sequence numbers.
const SEQ_SOFT_LIMIT: u64 = 0xffff_ffff_ffff_0000;
const SEQ_HARD_LIMIT: u64 = 0xffff_ffff_ffff_fffe;
/// A `KeyUpdate` message: type, 24-bit length 1, `update_not_requested` (0) or `update_requested` (1).
const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [24, 0, 0, 1, 0];

/// What the side of a connection does with the post-handshake messages only one side may receive.
pub trait Peer: Sized {
    /// The client side: it sends with the client's traffic secret, and receives tickets.
    const CLIENT: bool;
    /// A `NewSessionTicket` (its body): the client keeps it for resumption while it still has rustls's
    /// state; a server refuses it.
    fn new_session_ticket(conn: Option<&mut KernelConnection<Self>>, body: &[u8]) -> Result<(), Error>;
}

impl Peer for ClientConnectionData {
    const CLIENT: bool = true;
    fn new_session_ticket(conn: Option<&mut KernelConnection<Self>>, body: &[u8]) -> Result<(), Error> {
        // A ticket after the server's first data finds no state: a client may ignore a ticket.
        conn.map_or(Ok(()), |conn| conn.handle_new_session_ticket(body))
    }
}

impl Peer for ServerConnectionData {
    const CLIENT: bool = false;
    fn new_session_ticket(_: Option<&mut KernelConnection<Self>>, _: &[u8]) -> Result<(), Error> {
        Err(unexpected_handshake(HandshakeType::NewSessionTicket))
    }
}

/// The first application traffic secrets of a handshake, as rustls's key log reported them.
#[derive(Default)]
pub struct TrafficSecrets {
    client: Option<OkmBlock>,
    server: Option<OkmBlock>,
}

thread_local! {
    /// The secrets logged during the rustls `process` call running on this thread (rustls calls the key
    /// log synchronously inside it); the stream collects them right after each call.
    static LOGGED: RefCell<Option<Box<TrafficSecrets>>> = const { RefCell::new(None) };
}

/// rustls's key log hook, here only to hand the first application traffic secrets to the own record
/// layer: they stay in the process, nothing is written anywhere.
#[derive(Debug)]
pub struct SecretsLog;

impl KeyLog for SecretsLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        LOGGED.with(|logged| {
            let mut logged = logged.borrow_mut();
            let secrets = logged.get_or_insert_with(Box::default);
            match label {
                "CLIENT_TRAFFIC_SECRET_0" => secrets.client = Some(OkmBlock::new(secret)),
                "SERVER_TRAFFIC_SECRET_0" => secrets.server = Some(OkmBlock::new(secret)),
                _ => {}
            }
        });
    }
    fn will_log(&self, label: &str) -> bool {
        matches!(label, "CLIENT_TRAFFIC_SECRET_0" | "SERVER_TRAFFIC_SECRET_0")
    }
}

/// Moves what the key log captured on this thread since the last call into `secrets`.
pub fn collect_logged(secrets: &mut Option<Box<TrafficSecrets>>) {
    let Some(logged) = LOGGED.with(|logged| logged.borrow_mut().take()) else {
        return;
    };
    let secrets = secrets.get_or_insert_with(Box::default);
    if logged.client.is_some() {
        secrets.client = logged.client;
    }
    if logged.server.is_some() {
        secrets.server = logged.server;
    }
}

/// This side's sending and receiving traffic secrets.
struct Secrets {
    tx: OkmBlock,
    rx: OkmBlock,
}

/// What one record was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// No complete record at the start of the input.
    NeedMore,
    /// Application data at `plain` of the input; the record took `consumed` bytes.
    Data { consumed: usize, plain: Range<usize> },
    /// A record handled here (a post-handshake message, an empty record, `user_canceled`).
    Handled { consumed: usize },
    /// The peer's `close_notify`: nothing after it is read.
    Closed { consumed: usize },
}

/// The most application data the next record at the start of `input` can carry, from its header alone
/// (0 while the header has not arrived): a reader with at least this much room takes the record whole.
pub fn next_payload_bound(input: &[u8]) -> usize {
    match input.get(..HEADER) {
        Some(header) => usize::from(u16::from_be_bytes([header[3], header[4]])).saturating_sub(TAG + 1),
        None => 0,
    }
}

/// The record layer of one TLS 1.3 connection after its handshake.
pub struct Records<D> {
    /// rustls's handshake state: for tickets (client, until the server's first data), and for key updates
    /// where `secrets` is `None`.
    kernel: Option<Box<KernelConnection<D>>>,
    secrets: Option<Secrets>,
    suite: &'static Tls13CipherSuite,
    algorithm: &'static aws_lc_rs::aead::Algorithm,
    /// Records sent under one key before it is refreshed.
    limit: u64,
    tx: Key,
    tx_seq: u64,
    rx: Key,
    rx_seq: u64,
    /// A post-handshake message split over records, until it is whole (empty, unallocated, otherwise).
    handshake: Vec<u8>,
    /// The peer asked for a key update: ours is sent before our next record.
    owe_key_update: bool,
    empty_records: u32,
    key_updates: u32,
}

impl<D: Peer> Records<D> {
    /// Takes over a TLS 1.3 connection whose handshake is complete; `logged` are the traffic secrets its
    /// key log reported.
    pub fn new(
        extracted: ExtractedSecrets,
        kernel: KernelConnection<D>,
        logged: Option<Box<TrafficSecrets>>,
    ) -> Result<Self, Error> {
        let SupportedCipherSuite::Tls13(suite) = kernel.negotiated_cipher_suite() else {
            return Err(Error::General("own record layer: not a TLS 1.3 connection".into()));
        };
        let limit = SEQ_SOFT_LIMIT.min(suite.common.confidentiality_limit);
        let (tx_seq, tx) = extracted.tx;
        let (rx_seq, rx) = extracted.rx;
        let algorithm = algorithm(&tx)?;
        let secrets = logged.and_then(|logged| {
            let (tx_secret, rx_secret) =
                if D::CLIENT { (logged.client?, logged.server?) } else { (logged.server?, logged.client?) };
            // Only the secrets of the keys in use (rustls may have processed a key update already).
            let matches = |secret: &OkmBlock, keys: &ConnectionTrafficSecrets| {
                derive_key_iv(suite, secret).is_ok_and(|(key, len, iv)| {
                    let (k, i) = key_iv(keys);
                    k == &key[..len] && i == &iv[..]
                })
            };
            (matches(&tx_secret, &tx) && matches(&rx_secret, &rx)).then_some(Secrets { tx: tx_secret, rx: rx_secret })
        });
        let kernel = (D::CLIENT || secrets.is_none()).then(|| Box::new(kernel));
        Ok(Self {
            tx: Key::new(algorithm, &tx)?,
            rx: Key::new(algorithm, &rx)?,
            kernel,
            secrets,
            suite,
            algorithm,
            limit,
            tx_seq,
            rx_seq,
            handshake: Vec::new(),
            owe_key_update: false,
            empty_records: 0,
            key_updates: 0,
        })
    }

    /// Protects `data` as application-data records (at most 16 KiB of plaintext each), written by `push`
    /// (see [`Push`]), after the key update this side owes or needs.
    pub fn seal(&mut self, data: &[u8], push: &mut impl Push) -> Result<(), Error> {
        for chunk in data.chunks(MAX_PLAINTEXT) {
            self.seal_record(ContentType::ApplicationData, chunk, push)?;
        }
        Ok(())
    }

    /// Sends the key update the peer asked for, if it is still owed.
    pub fn seal_owed(&mut self, push: &mut impl Push) -> Result<(), Error> {
        if self.owe_key_update {
            self.refresh_tx(push)?;
        }
        Ok(())
    }

    /// Protects an alert: `close_notify` (a warning) or a fatal one.
    pub fn seal_alert(&mut self, alert: AlertDescription, push: &mut impl Push) -> Result<(), Error> {
        let level = if alert == AlertDescription::CloseNotify { 1 } else { 2 };
        self.seal_record(ContentType::Alert, &[level, u8::from(alert)], push)
    }

    fn seal_record(&mut self, typ: ContentType, data: &[u8], push: &mut impl Push) -> Result<(), Error> {
        if self.owe_key_update || self.tx_seq >= self.limit {
            self.refresh_tx(push)?;
        }
        self.seal_one(typ, data, push)
    }

    fn seal_one(&mut self, typ: ContentType, data: &[u8], push: &mut impl Push) -> Result<(), Error> {
        if self.tx_seq >= SEQ_HARD_LIMIT || data.len() > MAX_PLAINTEXT {
            return Err(Error::EncryptError);
        }
        let len = data.len() + 1 + TAG;
        let (tx, seq) = (&self.tx, self.tx_seq);
        push.record(HEADER + len, &mut |record: &mut [u8]| {
            // The header is the additional data; the inner plaintext is the data and its content type.
            record[..HEADER].copy_from_slice(&header(len));
            let (head, body) = record.split_at_mut(HEADER);
            body[..data.len()].copy_from_slice(data);
            body[data.len()] = u8::from(typ);
            let (inner, tag) = body.split_at_mut(data.len() + 1);
            let sealed = tx
                .key
                .seal_in_place_separate_tag(tx.nonce(seq), Aad::from(&head[..]), inner)
                .map_err(|_| Error::EncryptError)?;
            tag[..TAG].copy_from_slice(sealed.as_ref());
            Ok(())
        })?;
        self.tx_seq += 1;
        Ok(())
    }

    /// Sends `KeyUpdate(update_not_requested)` under the current key, then switches to the next one.
    fn refresh_tx(&mut self, push: &mut impl Push) -> Result<(), Error> {
        self.seal_one(ContentType::Handshake, &KEY_UPDATE_NOT_REQUESTED, push)?;
        let (tx, seq) = next_key(&mut self.secrets, &mut self.kernel, self.suite, self.algorithm, true)?;
        self.tx = tx;
        self.tx_seq = seq;
        self.owe_key_update = false;
        Ok(())
    }

    /// Opens the record at the start of `input` in place.
    pub fn open(&mut self, input: &mut [u8]) -> Result<Opened, Error> {
        let Some(header) = input.get(..HEADER) else {
            return Ok(Opened::NeedMore);
        };
        let (typ, major, len) = (header[0], header[1], usize::from(u16::from_be_bytes([header[3], header[4]])));
        if ContentType::from(typ) != ContentType::ApplicationData {
            // A plaintext record after the handshake: a change_cipher_spec, an alert or garbage.
            return Err(match ContentType::from(typ) {
                ContentType::Unknown(_) => Error::InvalidMessage(InvalidMessage::InvalidContentType),
                got_type => Error::InappropriateMessage { expect_types: vec![ContentType::ApplicationData], got_type },
            });
        }
        if major != 3 {
            return Err(Error::InvalidMessage(InvalidMessage::UnknownProtocolVersion));
        }
        if len > MAX_CIPHERTEXT {
            return Err(Error::PeerSentOversizedRecord);
        }
        let consumed = HEADER + len;
        let Some(record) = input.get_mut(..consumed) else {
            return Ok(Opened::NeedMore);
        };
        if self.rx_seq >= SEQ_SOFT_LIMIT {
            return Err(Error::DecryptError);
        }
        let (head, body) = record.split_at_mut(HEADER);
        let inner = self
            .rx
            .key
            .open_in_place(self.rx.nonce(self.rx_seq), Aad::from(&head[..]), body)
            .map_err(|_| Error::DecryptError)?;
        self.rx_seq += 1;
        if inner.len() > MAX_PLAINTEXT + 1 {
            return Err(Error::PeerSentOversizedRecord);
        }
        // The content type is the last byte that is not zero padding.
        let Some(end) = inner.iter().rposition(|&b| b != 0) else {
            return Err(PeerMisbehaved::IllegalTlsInnerPlaintext.into());
        };
        let (typ, payload) = (ContentType::from(inner[end]), &inner[..end]);
        if payload.len() > MAX_PLAINTEXT {
            return Err(Error::PeerSentOversizedRecord);
        }
        match typ {
            ContentType::ChangeCipherSpec => Err(PeerMisbehaved::IllegalMiddleboxChangeCipherSpec.into()),
            ContentType::ApplicationData => {
                if !self.handshake.is_empty() {
                    return Err(PeerMisbehaved::KeyEpochWithPendingFragment.into());
                }
                self.key_updates = 0;
                // The server's first data: its tickets came before it, rustls's state can go.
                if D::CLIENT && self.secrets.is_some() {
                    self.kernel = None;
                }
                if payload.is_empty() {
                    self.empty_records += 1;
                    if self.empty_records > MAX_EMPTY_RECORDS {
                        return Err(PeerMisbehaved::TooManyEmptyFragments.into());
                    }
                    return Ok(Opened::Handled { consumed });
                }
                self.empty_records = 0;
                Ok(Opened::Data { consumed, plain: HEADER..HEADER + payload.len() })
            }
            ContentType::Alert => {
                if !self.handshake.is_empty() {
                    return Err(PeerMisbehaved::KeyEpochWithPendingFragment.into());
                }
                let &[_level, description] = payload else {
                    return Err(Error::InvalidMessage(InvalidMessage::MessageTooShort));
                };
                match AlertDescription::from(description) {
                    AlertDescription::CloseNotify => Ok(Opened::Closed { consumed }),
                    // A warning in TLS 1.3; rustls ignores it too.
                    AlertDescription::UserCanceled => Ok(Opened::Handled { consumed }),
                    alert => Err(Error::AlertReceived(alert)),
                }
            }
            ContentType::Handshake => {
                if payload.is_empty() {
                    return Err(Error::InvalidMessage(InvalidMessage::InvalidEmptyPayload));
                }
                if self.handshake.len() + payload.len() > MAX_HANDSHAKE_MESSAGE {
                    return Err(Error::InvalidMessage(InvalidMessage::HandshakePayloadTooLarge));
                }
                // The common case, whole messages in one record, needs no copy.
                let whole = self.handshake.is_empty();
                if !whole {
                    self.handshake.extend_from_slice(payload);
                }
                let messages = if whole { payload } else { &self.handshake[..] };
                let keys = Keys {
                    kernel: &mut self.kernel,
                    secrets: &mut self.secrets,
                    suite: self.suite,
                    algorithm: self.algorithm,
                    rx: &mut self.rx,
                    rx_seq: &mut self.rx_seq,
                };
                let used = Self::messages(keys, messages, &mut self.owe_key_update, &mut self.key_updates)?;
                if whole {
                    self.handshake.extend_from_slice(&payload[used..]);
                } else if used == self.handshake.len() {
                    self.handshake = Vec::new();
                } else {
                    self.handshake.drain(..used);
                }
                Ok(Opened::Handled { consumed })
            }
            got_type => Err(Error::InappropriateMessage { expect_types: vec![ContentType::ApplicationData], got_type }),
        }
    }

    /// Handles the whole messages at the start of `bytes`; returns how many bytes they took.
    fn messages(
        keys: Keys<'_, D>,
        bytes: &[u8],
        owe_key_update: &mut bool,
        key_updates: &mut u32,
    ) -> Result<usize, Error> {
        let mut used = 0;
        while let Some(&[typ, a, b, c]) = bytes.get(used..used + 4) {
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            let Some(body) = bytes.get(used + 4..used + 4 + len) else {
                break;
            };
            used += 4 + len;
            match HandshakeType::from(typ) {
                HandshakeType::KeyUpdate => {
                    let &[request] = body else {
                        return Err(Error::InvalidMessage(InvalidMessage::InvalidKeyUpdate));
                    };
                    if request > 1 {
                        return Err(Error::InvalidMessage(InvalidMessage::InvalidKeyUpdate));
                    }
                    // The next record is under the new key: nothing of this one may follow.
                    if used != bytes.len() {
                        return Err(PeerMisbehaved::KeyEpochWithPendingFragment.into());
                    }
                    *key_updates += 1;
                    if *key_updates > MAX_KEY_UPDATES {
                        return Err(PeerMisbehaved::TooManyKeyUpdateRequests.into());
                    }
                    let (rx, seq) = next_key(keys.secrets, keys.kernel, keys.suite, keys.algorithm, false)?;
                    *keys.rx = rx;
                    *keys.rx_seq = seq;
                    *owe_key_update |= request == 1;
                    // Nothing follows in this record (checked above).
                    return Ok(used);
                }
                HandshakeType::NewSessionTicket => D::new_session_ticket(keys.kernel.as_deref_mut(), body)?,
                other => return Err(unexpected_handshake(other)),
            }
        }
        Ok(used)
    }

    /// Whether rustls's handshake state is still held, for tests.
    #[cfg(test)]
    pub(crate) fn holds_rustls_state(&self) -> bool {
        self.kernel.is_some()
    }

    /// The send and receive sequence numbers, for tests.
    #[cfg(test)]
    pub(crate) fn sequence_numbers(&self) -> (u64, u64) {
        (self.tx_seq, self.rx_seq)
    }

    /// Sends a key update before the next record (as the peer's request would), for tests.
    #[cfg(test)]
    pub(crate) fn force_key_update(&mut self) {
        self.owe_key_update = true;
    }

    /// Lowers the records sent under one key, for tests of the refresh.
    #[cfg(test)]
    pub(crate) fn set_key_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// One record of any inner content type, for tests that play a misbehaving peer.
    #[cfg(test)]
    pub(crate) fn seal_raw(&mut self, typ: ContentType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.seal_one(typ, data, &mut out).unwrap();
        out
    }
}

fn unexpected_handshake(got_type: HandshakeType) -> Error {
    Error::InappropriateHandshakeMessage {
        expect_types: vec![HandshakeType::KeyUpdate, HandshakeType::NewSessionTicket],
        got_type,
    }
}

/// Where sealed records go: `record` is given a buffer of exactly `len` bytes to fill, in place.
pub trait Push {
    fn record(&mut self, len: usize, fill: &mut dyn FnMut(&mut [u8]) -> Result<(), Error>) -> Result<(), Error>;
}

impl Push for Vec<u8> {
    fn record(&mut self, len: usize, fill: &mut dyn FnMut(&mut [u8]) -> Result<(), Error>) -> Result<(), Error> {
        let start = self.len();
        self.resize(start + len, 0);
        fill(&mut self[start..])
    }
}

/// A record header for `len` bytes of ciphertext.
fn header(len: usize) -> [u8; HEADER] {
    let [hi, lo] = (len as u16).to_be_bytes();
    [u8::from(ContentType::ApplicationData), 3, 3, hi, lo]
}

/// What a received key update changes.
struct Keys<'a, D> {
    kernel: &'a mut Option<Box<KernelConnection<D>>>,
    secrets: &'a mut Option<Secrets>,
    suite: &'static Tls13CipherSuite,
    algorithm: &'static aws_lc_rs::aead::Algorithm,
    rx: &'a mut Key,
    rx_seq: &'a mut u64,
}

/// The next key for sending (`tx`) or receiving, with its first sequence number: derived from the traffic
/// secret (which moves on), or by rustls's state where the secrets are not known.
fn next_key<D>(
    secrets: &mut Option<Secrets>,
    kernel: &mut Option<Box<KernelConnection<D>>>,
    suite: &'static Tls13CipherSuite,
    algorithm: &'static aws_lc_rs::aead::Algorithm,
    tx: bool,
) -> Result<(Key, u64), Error> {
    if let Some(secrets) = secrets {
        let secret = if tx { &mut secrets.tx } else { &mut secrets.rx };
        *secret = expand_label_block(suite, secret, b"traffic upd");
        let (key, len, iv) = derive_key_iv(suite, secret)?;
        return Ok((Key::from_parts(algorithm, &key[..len], iv)?, 0));
    }
    let Some(kernel) = kernel else {
        return Err(Error::General("own record layer: no key schedule".into()));
    };
    let (seq, keys) = if tx { kernel.update_tx_secret()? } else { kernel.update_rx_secret()? };
    Ok((Key::new(algorithm, &keys)?, seq))
}

/// The `HkdfLabel` of HKDF-Expand-Label (RFC 8446 7.1) with an empty context.
fn hkdf_label<'a>(len: &'a [u8; 2], label_len: &'a [u8; 1], label: &'a [u8]) -> [&'a [u8]; 5] {
    [len, label_len, b"tls13 ", label, &[0]]
}

/// HKDF-Expand-Label to one hash block, with the suite's HKDF from the provider.
fn expand_label_block(suite: &Tls13CipherSuite, secret: &OkmBlock, label: &[u8]) -> OkmBlock {
    let expander = suite.hkdf_provider.expander_for_okm(secret);
    let len = (expander.hash_len() as u16).to_be_bytes();
    let label_len = [(6 + label.len()) as u8];
    expander.expand_block(&hkdf_label(&len, &label_len, label))
}

/// HKDF-Expand-Label into `out`.
fn expand_label(suite: &Tls13CipherSuite, secret: &OkmBlock, label: &[u8], out: &mut [u8]) -> Result<(), Error> {
    let expander = suite.hkdf_provider.expander_for_okm(secret);
    let len = (out.len() as u16).to_be_bytes();
    let label_len = [(6 + label.len()) as u8];
    expander
        .expand_slice(&hkdf_label(&len, &label_len, label), out)
        .map_err(|_| Error::General("HKDF output too long".into()))
}

/// The traffic key (its first `len` bytes) and IV of a traffic secret (RFC 8446 7.3).
fn derive_key_iv(suite: &Tls13CipherSuite, secret: &OkmBlock) -> Result<([u8; 32], usize, [u8; 12]), Error> {
    let len = suite.aead_alg.key_len();
    let (mut key, mut iv) = ([0u8; 32], [0u8; 12]);
    let key_part = key.get_mut(..len).ok_or_else(|| Error::General("traffic key too long".into()))?;
    expand_label(suite, secret, b"key", key_part)?;
    expand_label(suite, secret, b"iv", &mut iv)?;
    Ok((key, len, iv))
}

fn key_iv(keys: &ConnectionTrafficSecrets) -> (&[u8], &[u8]) {
    match keys {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key.as_ref(), iv.as_ref()),
        _ => (&[], &[]),
    }
}

fn algorithm(keys: &ConnectionTrafficSecrets) -> Result<&'static aws_lc_rs::aead::Algorithm, Error> {
    match keys {
        ConnectionTrafficSecrets::Aes128Gcm { .. } => Ok(&AES_128_GCM),
        ConnectionTrafficSecrets::Aes256Gcm { .. } => Ok(&AES_256_GCM),
        ConnectionTrafficSecrets::Chacha20Poly1305 { .. } => Ok(&CHACHA20_POLY1305),
        _ => Err(Error::General("own record layer: unsupported cipher suite".into())),
    }
}

/// One direction's traffic key and IV.
struct Key {
    key: LessSafeKey,
    iv: [u8; 12],
}

impl Key {
    fn new(algorithm: &'static aws_lc_rs::aead::Algorithm, keys: &ConnectionTrafficSecrets) -> Result<Self, Error> {
        let (key, iv) = key_iv(keys);
        let iv = iv.try_into().map_err(|_| Error::General("bad traffic IV".into()))?;
        Self::from_parts(algorithm, key, iv)
    }

    fn from_parts(algorithm: &'static aws_lc_rs::aead::Algorithm, key: &[u8], iv: [u8; 12]) -> Result<Self, Error> {
        let key = UnboundKey::new(algorithm, key).map_err(|_| Error::General("bad traffic key".into()))?;
        Ok(Self { key: LessSafeKey::new(key), iv })
    }

    /// The per-record nonce: the IV with the sequence number XORed into its last 8 bytes (RFC 8446 5.3).
    fn nonce(&self, seq: u64) -> Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        Nonce::assume_unique_for_key(nonce)
    }
}

/// The alert owed to a peer whose record or message caused `e` (none for an alert the peer sent).
pub fn alert_for(e: &Error) -> Option<AlertDescription> {
    Some(match e {
        Error::AlertReceived(_) => return None,
        Error::DecryptError => AlertDescription::BadRecordMac,
        Error::PeerSentOversizedRecord => AlertDescription::RecordOverflow,
        Error::InvalidMessage(InvalidMessage::InvalidKeyUpdate) => AlertDescription::IllegalParameter,
        Error::InvalidMessage(_) => AlertDescription::DecodeError,
        Error::InappropriateMessage { .. } | Error::InappropriateHandshakeMessage { .. } | Error::PeerMisbehaved(_) => {
            AlertDescription::UnexpectedMessage
        }
        _ => AlertDescription::InternalError,
    })
}
