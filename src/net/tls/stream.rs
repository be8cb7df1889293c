//! TLS streams for both legs over rustls's unbuffered API. rustls seals and opens every record; the
//! ciphertext and plaintext buffers are this module's, sized to what is in flight, and released when a
//! connection goes quiet, so an idle session holds no TLS buffer at all (rustls's buffered connection keeps
//! a 4 KiB read buffer per connection for its whole life). Bulk reads take up to 64 KiB of ciphertext per
//! system call, and one `poll_write` encrypts all it is given (several records) into one write.
//!
//! What the stream owes the peer is bounded: handshake messages and alerts are what rustls queues (it keeps
//! at most one `KeyUpdate` reply and sends it ahead of the next record), application data stops being taken
//! once `HIGH_WATER` bytes are unsent, and a peer that never reads meets the caller's write deadline.
//!
//! rustls's unbuffered contract: bytes it did not `discard` stay in front of the next call's input (it may
//! hold part of a handshake message there). Every call here, including the one that collects the alert
//! after an error, hands it the unprocessed bytes.
//!
//! Behaves as tokio-rustls does where the rest of the proxy can tell: a clean close (`close_notify`) reads
//! as end of stream, a TCP close without it as `UnexpectedEof`; TLS errors are `InvalidData` errors
//! carrying the `rustls::Error` (with the alert sent to the peer where one is due); `poll_shutdown` sends
//! `close_notify` and closes the TCP write half.

use std::cell::RefCell;
use std::fmt;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConnectionData, UnbufferedServerConnection};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedConnectionCommon, UnbufferedStatus,
};
use rustls::{ClientConfig, HandshakeKind, ProtocolVersion, ServerConfig, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The most plaintext one TLS record carries (RFC 8446 5.1).
const MAX_PLAINTEXT: usize = 16 * 1024;
/// Ciphertext asked of the kernel per read: enough for a handshake flight or a few commands, and up to
/// 64 KiB once a read filled what it was given (a bulk transfer), until the peer goes quiet.
const READ_SMALL: usize = 8 * 1024;
const READ_BULK: usize = 64 * 1024;
/// The most ciphertext held unprocessed: a handshake message (rustls accepts up to 64 KiB) and a record.
const MAX_INCOMING: usize = 64 * 1024 + 2 * MAX_RECORD;
/// The largest TLS record on the wire (TLS 1.2's limit, above TLS 1.3's).
const MAX_RECORD: usize = 16 * 1024 + 2048 + 5;
/// Plaintext taken by one `poll_write`.
const WRITE_CHUNK: usize = 64 * 1024;
/// A `poll_write` waits for the socket once this much ciphertext is unsent.
const HIGH_WATER: usize = 64 * 1024;
/// Rounds of reading and processing in one poll before yielding to other tasks.
const ROUNDS_PER_POLL: usize = 64;

/// One side of rustls's unbuffered connection (client or server), as this stream drives it.
pub trait Side: Send + Unpin + Sized {
    type Data: Send + Unpin;
    fn common(&self) -> &UnbufferedConnectionCommon<Self::Data>;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    /// Called after each `process`; the server side picks up the name the client asked for.
    fn after_process(&mut self) {}
    /// The server name the client asked for (server side), taken when the handshake ends.
    fn take_server_name(&mut self) -> Option<String> {
        None
    }
    /// The handshake's last flight may wait for the first write (see `poll_handshake`).
    const DEFERS_LAST_FLIGHT: bool = false;
}

/// The listener's side of a client connection, with the server name the client sent (SNI).
pub struct Server {
    conn: UnbufferedServerConnection,
    sni: Option<String>,
}

impl Side for Server {
    type Data = ServerConnectionData;
    const DEFERS_LAST_FLIGHT: bool = true;
    fn common(&self) -> &UnbufferedConnectionCommon<ServerConnectionData> {
        &self.conn
    }
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        CHOSEN_NAME.with(|n| n.borrow_mut().take());
        self.conn.process_tls_records(incoming)
    }
    fn after_process(&mut self) {
        if let Some(name) = CHOSEN_NAME.with(|n| n.borrow_mut().take()) {
            self.sni = name;
        }
    }
    fn take_server_name(&mut self) -> Option<String> {
        self.sni.take()
    }
}

/// The backend leg's client connection.
pub struct Client(UnbufferedClientConnection);

impl Side for Client {
    type Data = ClientConnectionData;
    fn common(&self) -> &UnbufferedConnectionCommon<ClientConnectionData> {
        &self.0
    }
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.0.process_tls_records(incoming)
    }
}

thread_local! {
    /// The server name the certificate resolver saw during the `process` call running on this thread
    /// (`Some(None)`: the client sent none). rustls's unbuffered server connection does not expose it, and
    /// the resolver runs synchronously inside `process_tls_records`, so it is handed over here.
    static CHOSEN_NAME: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

/// Wraps the listener's certificate resolver to record the name each handshake asked for.
#[derive(Debug)]
pub struct RecordServerName(pub Arc<dyn ResolvesServerCert>);

impl ResolvesServerCert for RecordServerName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().map(str::to_owned);
        CHOSEN_NAME.with(|n| *n.borrow_mut() = Some(name));
        self.0.resolve(hello)
    }
    fn only_raw_public_keys(&self) -> bool {
        self.0.only_raw_public_keys()
    }
}

/// Accepts TLS connections with the listener's configuration.
#[derive(Clone)]
pub struct Acceptor(Arc<ServerConfig>);

impl Acceptor {
    pub fn new(config: Arc<ServerConfig>) -> Self {
        Self(config)
    }

    /// The server handshake on `tcp`; the caller bounds it in time.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<TlsStream<Server>> {
        let conn = UnbufferedServerConnection::new(Arc::clone(&self.0)).map_err(tls_error)?;
        let mut stream = TlsStream::new(tcp, Server { conn, sni: None });
        poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }
}

/// The client handshake towards `name` on `tcp`; the caller bounds it in time.
pub async fn connect(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    tcp: TcpStream,
) -> io::Result<TlsStream<Client>> {
    let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    let mut stream = TlsStream::new(tcp, Client(conn));
    poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

/// What the caller of [`TlsStream::process`] wants besides reading.
enum Outbound<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// Where processing stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// No complete record is left: more ciphertext is needed.
    NeedInput,
    /// The caller's read buffer has no room for the next record (which rustls keeps until the next read).
    ReadFull,
    /// Both sides have closed.
    Closed,
    /// Many records in one call: the caller returns what it has (or yields) and comes back.
    Yield,
}

/// What the handshake agreed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Negotiated {
    pub version: Option<ProtocolVersion>,
    pub suite: Option<SupportedCipherSuite>,
    pub kind: Option<HandshakeKind>,
}

impl Negotiated {
    /// `resumed` (a session ticket or id spared the certificate and its signature) or `full`: the
    /// `kind` label of `imapgate_tls_handshakes_total`.
    pub fn kind_label(&self) -> &'static str {
        if self.kind == Some(HandshakeKind::Resumed) { "resumed" } else { "full" }
    }
}

/// A TLS connection over TCP with buffers of its own.
pub struct TlsStream<S: Side> {
    tcp: TcpStream,
    /// rustls's connection: it protects every record, in the handshake and after it.
    side: S,
    negotiated: Negotiated,
    /// The server name the client asked for (server side).
    sni: Option<String>,
    /// Ciphertext received; `in_start..incoming.len()` is not processed yet.
    incoming: Vec<u8>,
    in_start: usize,
    /// Ciphertext to send.
    out: Outgoing,
    /// Plaintext decrypted but not yet read; `plain_start..plain.len()` is unread.
    plain: Vec<u8>,
    plain_start: usize,
    /// The peer's `close_notify` arrived.
    peer_closed: bool,
    /// The TCP stream ended.
    tcp_eof: bool,
    /// The last read filled its buffer: read in bulk until the peer goes quiet.
    bulk: bool,
    close_notify_queued: bool,
    /// The first TLS error, returned again by every later operation.
    failed: Option<rustls::Error>,
}

impl<S: Side> fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("incoming", &(self.incoming.len() - self.in_start))
            .field("outgoing", &self.out.unsent().len())
            .field("plain", &(self.plain.len() - self.plain_start))
            .finish_non_exhaustive()
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<S: Side> TlsStream<S> {
    fn new(tcp: TcpStream, side: S) -> Self {
        Self {
            tcp,
            side,
            negotiated: Negotiated::default(),
            sni: None,
            incoming: Vec::new(),
            in_start: 0,
            out: Outgoing::default(),
            plain: Vec::new(),
            plain_start: 0,
            peer_closed: false,
            tcp_eof: false,
            bulk: false,
            close_notify_queued: false,
            failed: None,
        }
    }

    /// What the handshake agreed (version, cipher suite, handshake kind).
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    fn is_handshaking(&self) -> bool {
        self.side.common().is_handshaking()
    }

    /// Notes what the handshake agreed.
    fn finish_handshake(&mut self) {
        let common = self.side.common();
        self.negotiated = Negotiated {
            version: common.protocol_version(),
            suite: common.negotiated_cipher_suite(),
            kind: common.handshake_kind(),
        };
        self.sni = self.side.take_server_name();
    }

    /// Bytes held in this stream's buffers (allocated capacity), for tests of the idle footprint.
    #[cfg(test)]
    fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.out.buf.capacity() + self.plain.capacity()
    }

    /// Runs rustls over the unprocessed ciphertext: decrypted records go to `read_into` while each fits
    /// whole (a record that does not stays with rustls for the next read; without a reader they go to
    /// `plain`), handshake messages and alerts to `out`, and `outbound` is encrypted once the connection
    /// may send. Returns where it stopped and how much of `outbound` was taken.
    fn process(
        &mut self,
        mut read_into: Option<&mut ReadBuf<'_>>,
        mut outbound: Outbound<'_>,
    ) -> io::Result<(Stop, usize)> {
        if let Some(e) = &self.failed {
            return Err(tls_error(e.clone()));
        }
        let mut taken = 0;
        let mut delivered = false;
        // Each round consumes a record or encodes a message, or stops; the count bounds one call's work.
        for _ in 0..4 * ROUNDS_PER_POLL {
            let UnbufferedStatus { discard, state } = self.side.process(&mut self.incoming[self.in_start..]);
            let mut discard = discard;
            let stop = match state {
                Err(e) => {
                    self.in_start += discard;
                    self.side.after_process();
                    return Err(self.fail(e));
                }
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    let mut stop = None;
                    while let Some(len) = traffic.peek_len() {
                        // A record that does not fit whole waits in rustls for the next read, unless it is
                        // the first of this call (the reader gets what fits, `plain` the rest).
                        if read_into.as_deref().is_some_and(|buf| buf.remaining() < len.get() && delivered) {
                            stop = Some(Stop::ReadFull);
                            break;
                        }
                        let Some(record) = traffic.next_record() else { break };
                        let record = match record {
                            Ok(record) => record,
                            Err(e) => {
                                self.failed = Some(e.clone());
                                return Err(tls_error(e));
                            }
                        };
                        discard += record.discard;
                        deliver(read_into.as_deref_mut(), &mut self.plain, self.plain_start, record.payload);
                        delivered = true;
                        if read_into
                            .as_deref()
                            .is_some_and(|buf| buf.remaining() == 0 || self.plain_start < self.plain.len())
                        {
                            stop = Some(Stop::ReadFull);
                            break;
                        }
                    }
                    stop
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    self.out
                        .append(1024, |b| encode.encode(b), encode_needs)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    None
                }
                // What was encoded sits in `out`, which every caller flushes before waiting for input.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    None
                }
                Ok(ConnectionState::BlockedHandshake) => Some(Stop::NeedInput),
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    None
                }
                Ok(ConnectionState::Closed) => {
                    self.peer_closed = true;
                    Some(Stop::Closed)
                }
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    match std::mem::replace(&mut outbound, Outbound::Nothing) {
                        Outbound::Data(data) if !data.is_empty() && !self.close_notify_queued => {
                            let data = &data[..data.len().min(WRITE_CHUNK)];
                            // Records' overhead, and a queued key update reply that goes out first.
                            let room = data.len() + data.len().div_ceil(MAX_PLAINTEXT) * 64 + 64;
                            self.out
                                .append(room, |b| traffic.encrypt(data, b), encrypt_needs)
                                .map_err(|e| io::Error::other(e.to_string()))?;
                            taken = data.len();
                        }
                        Outbound::CloseNotify if !self.close_notify_queued => {
                            self.out
                                .append(128, |b| traffic.queue_close_notify(b), encrypt_needs)
                                .map_err(|e| io::Error::other(e.to_string()))?;
                            self.close_notify_queued = true;
                        }
                        _ => {}
                    }
                    Some(Stop::NeedInput)
                }
                Ok(ConnectionState::ReadEarlyData(_)) => {
                    // Early data is never enabled; rustls refuses it before this state.
                    return Err(self.fail(rustls::Error::General("unexpected early data".into())));
                }
                Ok(_) => return Err(self.fail(rustls::Error::General("unexpected TLS state".into()))),
            };
            self.in_start += discard;
            self.side.after_process();
            if let Some(stop) = stop {
                return Ok((stop, taken));
            }
        }
        Ok((Stop::Yield, taken))
    }

    /// Records a TLS error and sends the alert rustls queued for the peer (best effort). rustls is handed
    /// the unprocessed bytes as on every call: it may still hold part of a handshake message in them (an
    /// empty buffer there made rustls index past its end). Only what rustls has queued is taken: a call
    /// with nothing queued would process the records after the failure (and raise a second alert).
    fn fail(&mut self, e: rustls::Error) -> io::Error {
        self.failed = Some(e.clone());
        for _ in 0..8 {
            if !self.side.common().wants_write() {
                break;
            }
            let status = self.side.process(&mut self.incoming[self.in_start..]);
            match status.state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    if self.out.append(64, |b| encode.encode(b), encode_needs).is_err() {
                        break;
                    }
                }
                // Plaintext rustls holds comes before its queue; it is of no use any more.
                Ok(ConnectionState::ReadTraffic(mut traffic)) => while traffic.next_record().is_some() {},
                _ => break,
            }
        }
        self.side.after_process();
        // The alert goes out if the socket takes it now; the connection is over either way.
        while !self.out.unsent().is_empty() {
            match self.tcp.try_write(self.out.unsent()) {
                Ok(n) if n > 0 => self.out.sent(n),
                _ => break,
            }
        }
        tls_error(e)
    }

    /// Writes unsent ciphertext until none is left.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.unsent().is_empty() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, self.out.unsent()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.sent(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Sends all unsent ciphertext and gives the buffer back: a flushed connection keeps none.
    fn poll_send_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        self.out.buf = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Reads more ciphertext. `Ready(Ok(false))`: the TCP stream ended.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.tcp_eof {
            return Poll::Ready(Ok(false));
        }
        loop {
            if self.in_start == self.incoming.len() {
                // Nothing unprocessed: while the peer is quiet there is no buffer to keep.
                self.in_start = 0;
                self.incoming.clear();
                if self.tcp.poll_read_ready(cx)?.is_pending() {
                    self.incoming = Vec::new();
                    self.bulk = false;
                    return Poll::Pending;
                }
            } else {
                ready!(self.tcp.poll_read_ready(cx))?;
            }
            let pending = self.incoming.len() - self.in_start;
            if pending >= MAX_INCOMING {
                return Poll::Ready(Err(self.fail(rustls::Error::General("TLS message too large".into()))));
            }
            if self.in_start > 0 {
                self.incoming.drain(..self.in_start);
                self.in_start = 0;
            }
            let want = if self.bulk { READ_BULK } else { READ_SMALL };
            self.incoming.reserve(want.min(MAX_INCOMING - pending));
            let spare = self.incoming.capacity() - self.incoming.len();
            match self.tcp.try_read_buf(&mut self.incoming) {
                Ok(0) => {
                    self.tcp_eof = true;
                    return Poll::Ready(Ok(false));
                }
                Ok(n) => {
                    self.bulk |= n == spare;
                    return Poll::Ready(Ok(true));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Drives the handshake to its end. A server leaves its last flight (the session tickets, which the
    /// client does not wait for) in the write buffer: it goes out with the greeting, one system call and
    /// one wake-up of the client fewer; a read or a flush sends it too. A client sends its `Finished` at
    /// once: the server waits for it.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        for _ in 0..ROUNDS_PER_POLL {
            let (stop, _) = self.process(None, Outbound::Nothing)?;
            if !self.is_handshaking() && S::DEFERS_LAST_FLIGHT {
                self.finish_handshake();
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_send_all(cx))?;
            if !self.is_handshaking() {
                self.finish_handshake();
                return Poll::Ready(Ok(()));
            }
            if stop == Stop::Yield {
                continue;
            }
            if stop == Stop::Closed || !ready!(self.poll_receive(cx))? {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls handshake eof: the peer closed the connection",
                )));
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Copies unread plaintext into `buf`.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) {
        let unread = &self.plain[self.plain_start..];
        let n = unread.len().min(buf.remaining());
        buf.put_slice(&unread[..n]);
        self.plain_start += n;
        if self.plain_start == self.plain.len() {
            self.plain = Vec::new();
            self.plain_start = 0;
        }
    }
}

impl<S: Side> AsyncRead for TlsStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.plain_start < this.plain.len() {
            this.take_plain(buf);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        for _ in 0..ROUNDS_PER_POLL {
            let (stop, _) = this.process(Some(buf), Outbound::Nothing)?;
            // Replies rustls owes the peer (a key update) go out when the socket takes them.
            if !this.out.unsent().is_empty() {
                let _ = this.poll_send(cx)?;
            }
            if buf.filled().len() > before || stop == Stop::ReadFull {
                return Poll::Ready(Ok(()));
            }
            if stop == Stop::Yield {
                break;
            }
            if this.peer_closed || stop == Stop::Closed {
                return Poll::Ready(Ok(()));
            }
            if !ready!(this.poll_receive(cx))? {
                // Processed everything that arrived before the end.
                let (_, _) = this.process(Some(buf), Outbound::Nothing)?;
                if buf.filled().len() > before || this.peer_closed {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<S: Side> AsyncWrite for TlsStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.out.unsent().len() >= HIGH_WATER {
            ready!(this.poll_send(cx))?;
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.close_notify_queued {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let (stop, taken) = this.process(None, Outbound::Data(data))?;
        if taken == 0 && stop == Stop::Yield {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if taken == 0 {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, "TLS connection cannot send")));
        }
        // Write through as far as the socket takes it; the rest goes with the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_send_all(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_notify_queued && this.failed.is_none() && !this.is_handshaking() {
            this.process(None, Outbound::CloseNotify)?;
        }
        ready!(this.poll_send_all(cx))?;
        match ready!(Pin::new(&mut this.tcp).poll_shutdown(cx)) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// Ciphertext waiting to be sent: `start..end` of `buf` is unsent. The buffer is allocated (zeroed once)
/// for a burst and kept until a flush completes, so that a bulk transfer does not clear a new buffer for
/// every write.
#[derive(Default)]
struct Outgoing {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Outgoing {
    fn unsent(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn sent(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Appends what `write` puts into the buffer's free space (at least `room` bytes), growing it as often
    /// as `needs` reads a larger size from `write`'s error (rustls says how much it needs).
    fn append<E>(
        &mut self,
        mut room: usize,
        mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
        needs: fn(&E) -> Option<usize>,
    ) -> Result<(), E> {
        loop {
            if self.buf.len() - self.end < room {
                // Unsent bytes to the front, then grow if that was not enough.
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if self.buf.len() - self.end < room {
                    self.buf.resize(self.end + room, 0);
                }
            }
            match write(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) => room = needs(&e).ok_or(e)?,
            }
        }
    }
}

fn encode_needs(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => Some(*required_size),
        _ => None,
    }
}

fn encrypt_needs(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => Some(*required_size),
        _ => None,
    }
}

/// Hands decrypted `payload` to the reader while it has room and nothing is queued before it, the rest to
/// `plain` (whose unread part starts at `plain_start`).
fn deliver(read_into: Option<&mut ReadBuf<'_>>, plain: &mut Vec<u8>, plain_start: usize, payload: &[u8]) {
    let direct = match read_into {
        Some(buf) if plain_start == plain.len() => {
            let n = buf.remaining().min(payload.len());
            buf.put_slice(&payload[..n]);
            n
        }
        _ => 0,
    };
    plain.extend_from_slice(&payload[direct..]);
}

impl TlsStream<Server> {
    /// The server name the client asked for (SNI), if any.
    pub fn server_name(&self) -> Option<&str> {
        self.sni.as_deref()
    }
}

#[cfg(test)]
mod tests;
