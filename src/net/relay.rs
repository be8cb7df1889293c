//! After login, "all that is left is the dummy proxying": bytes are copied both ways unchanged (but for the
//! names the observer neutralises).
//!
//! Each direction reads a small read (up to 512 bytes) onto the stack and keeps a heap copy of just the bytes
//! that came until they are written; once a read fills the 512 bytes (a bulk transfer) it reads into a
//! 64 KiB heap buffer instead, which takes several TLS records per read and writes them on in one go (one
//! system call and one wake-up of the peer where a record each would take four). Whatever the direction
//! holds is freed as soon as its peer goes quiet, so an idle direction holds no buffer at all.
//! Client bytes behind a command that waits for the backend's continuation stay in the buffer until the
//! backend has answered (see [`Observer::client`]); the client direction reads nothing more meanwhile.
//! The client's end-of-stream shuts down the backend's write half (half-close). The relay ends when the
//! backend has closed and its last bytes reached the client (the session then decides about a closing
//! `BYE`), on an I/O error, when a write makes no progress for the write timeout, when nothing moved for
//! the idle timeout, on shutdown, or — after an administrator's kick — at the backend stream's next
//! response boundary (a message on its way arrives whole; [`KICK_DRAIN`] bounds the wait). The session's
//! registry entry gets its byte and command counts as they move.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::imap::inspect::{Completed, Detail, Observer, Status as InspectStatus};
use crate::registry::Session;
use crate::telemetry::metrics::Metrics;

/// After a kick, the longest the relay waits for a response boundary; then it closes without a `BYE`.
pub const KICK_DRAIN: Duration = Duration::from_secs(30);

const IDLE_BUFFER: usize = 512;
const BURST_BUFFER: usize = 64 * 1024;
/// No write is blocked (milliseconds-since-start marker).
const NOT_BLOCKED: u64 = u64::MAX;

/// Where the relay reports what moves: the metrics, the session's registry entry (whose kick it obeys), and
/// each finished command (for the mailbox signals).
#[derive(Clone, Copy)]
pub struct Report<'a> {
    pub metrics: &'a Metrics,
    pub session: Option<&'a Session>,
    pub completed: Option<&'a (dyn Fn(&Completed) + Sync)>,
}

/// Why the relay stopped.
#[derive(Debug)]
pub enum RelayEnd {
    /// The backend closed after the client's LOGOUT.
    ClientLogout,
    /// The client closed its side first; the backend followed.
    ClientClosed,
    /// The backend closed on its own (shut down, crashed, timed the client out).
    BackendClosed,
    /// Nothing moved in either direction for the idle timeout.
    IdleTimeout,
    /// The proxy is shutting down.
    Shutdown,
    /// The client did not read what the backend sent for the write timeout.
    ClientWriteTimeout,
    /// The backend did not read what the client sent for the write timeout.
    BackendWriteTimeout,
    /// A read from or a write to the client failed.
    ClientError(io::Error),
    /// A read from or a write to the backend failed.
    BackendError(io::Error),
    /// The guard could no longer follow the client's stream (see `Observer::guard_lost`).
    GuardLost,
    /// An administrator kicked the session.
    Kicked,
    /// The process is leaving (its successor serves new connections): the session ended when quiet.
    Leaving,
}

impl RelayEnd {
    /// The metric and audit label (one of `SESSION_ENDS`' relay reasons).
    pub fn label(&self) -> &'static str {
        match self {
            RelayEnd::ClientLogout => "client_logout",
            RelayEnd::ClientClosed => "client_closed",
            RelayEnd::BackendClosed => "backend_closed",
            RelayEnd::IdleTimeout => "idle_timeout",
            RelayEnd::Shutdown => "shutdown",
            RelayEnd::ClientWriteTimeout => "client_write_timeout",
            RelayEnd::BackendWriteTimeout => "backend_write_timeout",
            RelayEnd::ClientError(_) => "client_error",
            RelayEnd::BackendError(_) => "backend_error",
            RelayEnd::GuardLost => "guard_lost",
            RelayEnd::Kicked => "kicked",
            RelayEnd::Leaving => "leaving",
        }
    }
}

/// Byte counts, the end reason and what the session needs to close politely.
#[derive(Debug)]
pub struct RelayOutcome {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    /// Commands the client sent after login (as far as the observer could tell).
    pub commands: u64,
    pub end: RelayEnd,
    /// Everything the backend sent reached the client and ended at a response boundary: a `* BYE` of the
    /// proxy's own would not land inside a response.
    pub client_at_boundary: bool,
    /// The backend said `* BYE` itself (or the client logged out): no second one is needed.
    pub bye_sent: bool,
}

/// The relay's settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Nothing moved either way for this long: the session ends.
    pub idle: Duration,
    /// A write that makes no progress this long: the session ends.
    pub write: Duration,
}

/// Which end of a direction failed.
enum Failed {
    Reader(io::Error),
    Writer(io::Error),
}

/// One direction of the copy.
struct Direction {
    /// The bytes being moved: a copy of a small read (made from a buffer on the stack), or the burst
    /// buffer read into directly; `None` once everything was written, so an idle direction holds nothing.
    buf: Option<Box<[u8]>>,
    /// The last small read filled its buffer: a bulk transfer is under way, read into a burst buffer.
    bulk: bool,
    /// Written up to here.
    pos: usize,
    /// Released (inspected and allowed) up to here.
    cap: usize,
    /// Read up to here; `cap..filled` is held.
    filled: usize,
    read_done: bool,
    need_flush: bool,
    finished: bool,
    /// Shut the writer down at the reader's end of stream (the client direction half-closes the backend;
    /// the backend direction leaves the client to the session).
    shutdown_writer: bool,
    bytes: u64,
    /// Milliseconds since the relay started at which the writer blocked, or `NOT_BLOCKED`.
    blocked_since: u64,
}

impl Direction {
    fn new(shutdown_writer: bool) -> Self {
        Self {
            buf: None,
            bulk: false,
            pos: 0,
            cap: 0,
            filled: 0,
            read_done: false,
            need_flush: false,
            finished: false,
            shutdown_writer,
            bytes: 0,
            blocked_since: NOT_BLOCKED,
        }
    }

    /// Starts with bytes already read (the client's commands pipelined behind its login), not yet inspected.
    fn preloaded(shutdown_writer: bool, bytes: &[u8]) -> Self {
        let mut direction = Self::new(shutdown_writer);
        if !bytes.is_empty() {
            direction.buf = Some(bytes.into());
            direction.filled = bytes.len();
        }
        direction
    }

    fn data(&mut self) -> &mut [u8] {
        self.buf.as_deref_mut().unwrap_or_default()
    }

    /// Bytes read but not yet released by the inspector.
    fn holding(&self) -> bool {
        self.cap < self.filled
    }

    /// Everything read was written.
    fn drained(&self) -> bool {
        self.pos == self.filled
    }

    fn blocked(&mut self, started: Instant) {
        if self.blocked_since == NOT_BLOCKED {
            self.blocked_since = started.elapsed().as_millis() as u64;
        }
    }

    fn unblocked(&mut self) {
        self.blocked_since = NOT_BLOCKED;
    }

    /// Copies until the reader is exhausted (then maybe shuts the writer down), would block, or the
    /// inspector holds bytes back. `inspect` returns how many of the bytes it was given may be written.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        moved: &mut bool,
        started: Instant,
        inspect: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Poll<Result<(), Failed>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            while self.pos < self.cap {
                let (pos, cap) = (self.pos, self.cap);
                let written = match Pin::new(&mut *w).poll_write(cx, &self.data()[pos..cap]) {
                    Poll::Pending => {
                        self.blocked(started);
                        return Poll::Pending;
                    }
                    Poll::Ready(result) => result.map_err(Failed::Writer)?,
                };
                if written == 0 {
                    return Poll::Ready(Err(Failed::Writer(io::ErrorKind::WriteZero.into())));
                }
                self.unblocked();
                self.pos += written;
                self.bytes += written as u64;
            }
            if self.holding() {
                let (cap, filled) = (self.cap, self.filled);
                let released = inspect(&mut self.data()[cap..filled]);
                self.cap += released.min(filled - cap);
                if released > 0 {
                    continue;
                }
                // Held until the other direction brings the backend's answer; the relay polls again then.
                ready!(self.poll_flush(cx, w, started))?;
                return Poll::Pending;
            }
            if self.read_done {
                ready!(self.poll_flush(cx, w, started))?;
                if self.shutdown_writer {
                    ready!(Pin::new(&mut *w).poll_shutdown(cx)).map_err(Failed::Writer)?;
                }
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
            self.pos = 0;
            self.cap = 0;
            self.filled = 0;
            let read = if self.bulk {
                if self.buf.as_ref().is_none_or(|b| b.len() < BURST_BUFFER) {
                    self.buf = Some(vec![0; BURST_BUFFER].into_boxed_slice());
                }
                let mut read_buf = ReadBuf::new(self.data());
                match Pin::new(&mut *r).poll_read(cx, &mut read_buf) {
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(read_buf.filled().len())),
                    other => other.map(|r| r.map(|()| 0)),
                }
            } else {
                // Everything in the last small copy was written: read the next into the stack, and copy
                // only what came.
                self.buf = None;
                let mut small = [0u8; IDLE_BUFFER];
                let mut read_buf = ReadBuf::new(&mut small);
                match Pin::new(&mut *r).poll_read(cx, &mut read_buf) {
                    Poll::Ready(Ok(())) => {
                        let n = read_buf.filled().len();
                        if n > 0 {
                            self.buf = Some(read_buf.filled().into());
                        }
                        // The small buffer filled up: a bulk transfer is under way.
                        self.bulk = n == IDLE_BUFFER;
                        Poll::Ready(Ok(n))
                    }
                    other => other.map(|r| r.map(|()| 0)),
                }
            };
            match read {
                Poll::Pending => {
                    ready!(self.poll_flush(cx, w, started))?;
                    // The peer went quiet: give the buffer back.
                    self.buf = None;
                    self.bulk = false;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Failed::Reader(e))),
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(n)) => {
                    *moved = true;
                    self.filled = n;
                    self.need_flush = true;
                }
            }
        }
    }

    fn poll_flush<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
        started: Instant,
    ) -> Poll<Result<(), Failed>> {
        if self.need_flush {
            match Pin::new(&mut *w).poll_flush(cx) {
                Poll::Pending => {
                    self.blocked(started);
                    return Poll::Pending;
                }
                Poll::Ready(result) => result.map_err(Failed::Writer)?,
            }
            self.unblocked();
            self.need_flush = false;
        }
        Poll::Ready(Ok(()))
    }
}

/// Relays between `client` and `backend` until the backend closes, an error, a stalled write, the idle
/// timeout, or `stop` resolves. `pipelined` are client bytes read before the relay began (behind the login).
/// The observer sees both directions (and neutralises what must not pass); finished commands, bytes and
/// the observer's health go to `metrics` as they happen, and counts to the registry's `session`, whose kick
/// ends the relay at the next response boundary.
///
/// Not an `async fn`: the arguments are the future's own state, not copied into a second place in it (the
/// relay's future is part of every relayed session's memory). `stop` is pinned by the caller for the same
/// reason.
#[allow(clippy::manual_async_fn, reason = "an async fn would store its arguments twice in the future")]
pub fn relay<'a, C, B, S>(
    client: &'a mut C,
    backend: &'a mut B,
    limits: Limits,
    pipelined: Vec<u8>,
    mut observer: Observer,
    report: Report<'a>,
    mut stop: S,
) -> impl std::future::Future<Output = RelayOutcome> + 'a
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    S: std::future::Future<Output = ()> + Unpin + 'a,
{
    async move {
        let Report { metrics, session, completed: on_completed } = report;
        let mut up = Direction::preloaded(true, &pipelined);
        drop(pipelined);
        let mut down = Direction::new(false);
        let started = Instant::now();
        // Milliseconds since `started` of the last byte moved; shared with the copy closure.
        let last_activity = AtomicU64::new(0);
        let up_bytes = metrics.bytes.with_label_values(&["client_to_backend"]);
        let down_bytes = metrics.bytes.with_label_values(&["backend_to_client"]);
        // The write-stall markers, read by the loop below while the copy owns the directions.
        let stalls = Stalls::default();
        // Kicked: end at the next response boundary.
        let draining = std::sync::atomic::AtomicBool::new(false);
        // The process is leaving: end once quiet, however long that takes (the drain's end bounds it).
        let leaving = std::sync::atomic::AtomicBool::new(false);
        let mut copy = poll_fn(|cx| {
            let mut moved = false;
            let now = std::time::Instant::now();
            let (up_before, down_before) = (up.bytes, down.bytes);
            let mut up_state = up.poll_copy(cx, client, backend, &mut moved, started, &mut |b| observer.client(b, now));
            let down_state = down.poll_copy(cx, backend, client, &mut moved, started, &mut |b| {
                observer.server(b, now);
                b.len()
            });
            if up.holding() && !observer.holding() {
                // The backend's answer just arrived: the held bytes can be read as it reads them.
                up_state = up.poll_copy(cx, client, backend, &mut moved, started, &mut |b| observer.client(b, now));
            }
            let before = stalls.earliest();
            stalls.up.store(up.blocked_since, Ordering::Relaxed);
            stalls.down.store(down.blocked_since, Ordering::Relaxed);
            // A write that just blocked moves the deadline: the loop below re-arms its timer.
            let rearm = stalls.earliest() != before;
            if moved {
                last_activity.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                up_bytes.inc_by(up.bytes - up_before);
                down_bytes.inc_by(down.bytes - down_before);
                let mut finished = None;
                for completed in observer.drain() {
                    finished = Some(completed.command);
                    record(metrics, on_completed, completed);
                }
                if let Some(session) = session {
                    session.bytes(up.bytes, down.bytes);
                    session.commands(observer.commands(), observer.latest().or(finished), observer.idling());
                }
            }
            if moved && up_state.is_pending() && down_state.is_pending() {
                // Both directions wait for their peer: what the observer grew for the last commands goes back.
                observer.release_idle();
            }
            if draining.load(Ordering::Relaxed) && down.drained() && observer.at_response_boundary() {
                return Poll::Ready(Step::Done(Err(RelayEnd::Kicked)));
            }
            if leaving.load(Ordering::Relaxed) && down.drained() && !up.holding() && observer.quiet() {
                return Poll::Ready(Step::Done(Err(RelayEnd::Leaving)));
            }
            if observer.guard_lost() {
                return Poll::Ready(Step::Done(Err(RelayEnd::GuardLost)));
            }
            match (up_state, down_state) {
                (Poll::Ready(Err(Failed::Reader(e))), _) | (_, Poll::Ready(Err(Failed::Writer(e)))) => {
                    Poll::Ready(Step::Done(Err(RelayEnd::ClientError(e))))
                }
                (Poll::Ready(Err(Failed::Writer(e))), _) | (_, Poll::Ready(Err(Failed::Reader(e)))) => {
                    Poll::Ready(Step::Done(Err(RelayEnd::BackendError(e))))
                }
                // Once the backend has closed (and what it sent has reached the client), the session is
                // over: nothing the client still sends would be answered.
                (_, Poll::Ready(Ok(()))) => Poll::Ready(Step::Done(Ok(up.read_done))),
                _ if rearm => Poll::Ready(Step::Rearm),
                _ => Poll::Pending,
            }
        });
        let kick = async {
            match session {
                Some(session) => session.kicked().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(kick);
        let mut kick_deadline = None;
        let end = loop {
            let at = |ms: u64| started + Duration::from_millis(ms);
            let idle_deadline = at(last_activity.load(Ordering::Relaxed)) + limits.idle;
            let stall = stalls.earliest().map(|(ms, _)| at(ms) + limits.write);
            let deadline = stall.map_or(idle_deadline, |s| s.min(idle_deadline));
            let deadline = kick_deadline.map_or(deadline, |k: Instant| k.min(deadline));
            tokio::select! {
                step = &mut copy => match step {
                    Step::Done(Ok(true)) => break RelayEnd::ClientClosed,
                    Step::Done(Ok(false)) => break RelayEnd::BackendClosed,
                    Step::Done(Err(end)) => break end,
                    Step::Rearm => {}
                },
                () = &mut stop => break RelayEnd::Shutdown,
                // The copy is polled again right away (a new select), and ends at the next boundary.
                () = &mut kick, if kick_deadline.is_none() && !leaving.load(Ordering::Relaxed) => {
                    if session.is_some_and(|s| s.leaving()) {
                        leaving.store(true, Ordering::Relaxed);
                    } else {
                        draining.store(true, Ordering::Relaxed);
                        kick_deadline = Some(Instant::now() + KICK_DRAIN);
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    if kick_deadline.is_some_and(|k| k <= Instant::now()) {
                        break RelayEnd::Kicked;
                    }
                    if let Some((ms, up_side)) = stalls.earliest() {
                        if at(ms).elapsed() >= limits.write {
                            break if up_side { RelayEnd::BackendWriteTimeout } else { RelayEnd::ClientWriteTimeout };
                        }
                    }
                    if at(last_activity.load(Ordering::Relaxed)).elapsed() >= limits.idle {
                        break RelayEnd::IdleTimeout;
                    }
                }
            }
        };
        drop(copy);
        let end = match end {
            RelayEnd::BackendClosed | RelayEnd::ClientClosed if observer.logout_sent() => RelayEnd::ClientLogout,
            end => end,
        };
        for completed in observer.finish(std::time::Instant::now()) {
            record(metrics, on_completed, completed);
        }
        if observer.desynced() {
            metrics.observer_desync.inc();
        }
        RelayOutcome {
            client_to_backend: up.bytes,
            backend_to_client: down.bytes,
            commands: observer.commands(),
            client_at_boundary: down.drained() && observer.at_response_boundary(),
            bye_sent: observer.bye_seen() || observer.logout_sent(),
            end,
        }
    }
}

/// What one poll of the copy came to.
enum Step {
    /// The copy is over: `Ok(client closed first)` or why it failed.
    Done(Result<bool, RelayEnd>),
    /// A write started blocking: the deadline changed. Poll again.
    Rearm,
}

/// The write-stall markers of both directions, copied out of the copy future on every poll.
struct Stalls {
    up: AtomicU64,
    down: AtomicU64,
}

impl Default for Stalls {
    fn default() -> Self {
        Self { up: AtomicU64::new(NOT_BLOCKED), down: AtomicU64::new(NOT_BLOCKED) }
    }
}

impl Stalls {
    /// The earliest blocked write: milliseconds since the start, and whether it is the backend's (client
    /// bytes waiting to be written to it).
    fn earliest(&self) -> Option<(u64, bool)> {
        let (up, down) = (self.up.load(Ordering::Relaxed), self.down.load(Ordering::Relaxed));
        match (up, down) {
            (NOT_BLOCKED, NOT_BLOCKED) => None,
            (up, down) if up <= down => Some((up, true)),
            (_, down) => Some((down, false)),
        }
    }
}

fn record(metrics: &Metrics, hook: Option<&(dyn Fn(&Completed) + Sync)>, completed: Completed) {
    let status = completed.status.as_str();
    metrics.commands.with_label_values(&[completed.command, status]).inc();
    if completed.status != InspectStatus::None {
        let code = completed.code.unwrap_or("none");
        metrics.command_responses.with_label_values(&[completed.command, status, code]).inc();
    }
    let seconds = completed.elapsed.as_secs_f64();
    if completed.command == "IDLE" {
        metrics.idle_seconds.observe(seconds);
    } else {
        metrics.command_seconds.with_label_values(&[completed.command]).observe(seconds);
    }
    if let (Detail::Selected { exists: Some(exists), .. }, InspectStatus::Ok) = (&completed.detail, completed.status) {
        metrics.select_seconds.with_label_values(&[crate::imap::mailbox::size_class(*exists)]).observe(seconds);
    }
    if let Some(hook) = hook {
        hook(&completed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    const LIMITS: Limits = Limits { idle: Duration::from_secs(5), write: Duration::from_secs(5) };

    #[tokio::test]
    async fn copies_both_ways_and_half_closes() {
        let (mut client_far, mut client_near) = duplex(1024);
        let (mut backend_near, mut backend_far) = duplex(1024);
        let task = tokio::spawn(async move {
            relay(
                &mut client_near,
                &mut backend_near,
                LIMITS,
                Vec::new(),
                Observer::new(),
                Report { metrics: &Metrics::new(&[]), session: None, completed: None },
                std::future::pending(),
            )
            .await
        });
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let expected = big.clone();
        let writer = tokio::spawn(async move {
            client_far.write_all(&big).await.unwrap();
            client_far.shutdown().await.unwrap();
            let mut back = Vec::new();
            client_far.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        backend_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expected);
        backend_far.write_all(b"* BYE\r\n").await.unwrap();
        backend_far.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"* BYE\r\n");
        let outcome = task.await.unwrap();
        assert!(matches!(outcome.end, RelayEnd::ClientClosed), "{outcome:?}");
        assert_eq!(outcome.client_to_backend, 100_000);
        assert_eq!(outcome.backend_to_client, 7);
    }

    /// Polls one direction until it would block, as the relay does.
    async fn copy_until_quiet(d: &mut Direction, r: &mut tokio::io::DuplexStream, w: &mut tokio::io::DuplexStream) {
        let started = Instant::now();
        poll_fn(|cx| {
            let mut moved = false;
            match d.poll_copy(cx, r, w, &mut moved, started, &mut |b| b.len()) {
                Poll::Pending => Poll::Ready(()),
                Poll::Ready(_) => panic!("the direction ended"),
            }
        })
        .await;
    }

    #[tokio::test]
    async fn a_quiet_direction_holds_no_buffer() {
        let (mut from, mut r) = duplex(64 * 1024);
        let (mut w, mut to) = duplex(64 * 1024);
        let mut d = Direction::new(false);
        // An interactive command: copied through the stack, nothing kept once written.
        from.write_all(b"a NOOP\r\n").await.unwrap();
        copy_until_quiet(&mut d, &mut r, &mut w).await;
        assert!(d.buf.is_none() && !d.bulk, "held {:?}", d.buf.as_ref().map(|b| b.len()));
        // A bulk transfer reads into a burst buffer, given back when the peer goes quiet.
        let big: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        from.write_all(&big).await.unwrap();
        copy_until_quiet(&mut d, &mut r, &mut w).await;
        assert!(d.buf.is_none() && !d.bulk, "held {:?}", d.buf.as_ref().map(|b| b.len()));
        assert_eq!(d.bytes, 8 + 40_000);
        let mut got = vec![0; 8 + 40_000];
        to.read_exact(&mut got).await.unwrap();
        assert_eq!((&got[..8], &got[8..]), (&b"a NOOP\r\n"[..], &big[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_the_relay() {
        let (_client_far, mut client_near) = duplex(64);
        let (mut backend_near, _backend_far) = duplex(64);
        let outcome = relay(
            &mut client_near,
            &mut backend_near,
            Limits { idle: Duration::from_secs(1860), write: Duration::from_secs(60) },
            Vec::new(),
            Observer::new(),
            Report { metrics: &Metrics::new(&[]), session: None, completed: None },
            std::future::pending(),
        )
        .await;
        assert!(matches!(outcome.end, RelayEnd::IdleTimeout));
    }
}
