//! After login, "all that is left is the dummy proxying": bytes are copied both ways unchanged.
//!
//! Each direction reads into a small inline buffer while idle or interactive, and into a 16 KiB heap buffer
//! once a read fills the small one (a bulk transfer); the heap buffer is freed as soon as the peer goes
//! quiet, so an idle session costs little memory and a NOOP costs no allocation.
//! A direction that reaches end-of-stream shuts down the other side's write half (half-close). The relay
//! ends when the backend has closed and its last bytes reached the client, on an I/O error, or when
//! nothing moved for the idle timeout.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::imap::inspect::{Completed, Observer};
use crate::telemetry::metrics::Metrics;

const IDLE_BUFFER: usize = 512;
const BURST_BUFFER: usize = 16 * 1024;

/// Why the relay stopped.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both sides closed their sending halves.
    Closed,
    /// Nothing moved in either direction for the idle timeout.
    IdleTimeout,
    /// The proxy is shutting down.
    Shutdown,
    /// A read or write failed on either side.
    Error(io::Error),
}

/// Byte counts and the end reason.
#[derive(Debug)]
pub struct RelayOutcome {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    /// Commands the client sent after login (as far as the observer could tell).
    pub commands: u64,
    pub end: RelayEnd,
}

/// One direction of the copy.
struct Direction {
    idle: [u8; IDLE_BUFFER],
    burst: Option<Box<[u8]>>,
    in_burst: bool,
    pos: usize,
    cap: usize,
    read_done: bool,
    need_flush: bool,
    finished: bool,
    bytes: u64,
}

impl Direction {
    fn new() -> Self {
        Self {
            idle: [0; IDLE_BUFFER],
            burst: None,
            in_burst: false,
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            finished: false,
            bytes: 0,
        }
    }

    fn pending(&self) -> &[u8] {
        match (self.in_burst, self.burst.as_deref()) {
            (true, Some(burst)) => &burst[self.pos..self.cap],
            _ => &self.idle[self.pos..self.cap],
        }
    }

    /// Copies until the reader is exhausted (then shuts the writer down) or would block.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        moved: &mut bool,
        inspect: &mut dyn FnMut(&mut [u8]),
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            while self.pos < self.cap {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, self.pending()))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.bytes += n as u64;
            }
            if self.read_done {
                ready!(Pin::new(&mut *w).poll_flush(cx))?;
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
            self.pos = 0;
            self.cap = 0;
            let in_burst = self.burst.is_some();
            let buffer: &mut [u8] = match self.burst.as_deref_mut() {
                Some(burst) => burst,
                None => &mut self.idle,
            };
            let mut read_buf = ReadBuf::new(buffer);
            match Pin::new(&mut *r).poll_read(cx, &mut read_buf) {
                Poll::Pending => {
                    if self.need_flush {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    // The peer went quiet: give the burst buffer back.
                    self.burst = None;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    inspect(read_buf.filled_mut());
                    let n = read_buf.filled().len();
                    if n == 0 {
                        self.read_done = true;
                        continue;
                    }
                    *moved = true;
                    self.cap = n;
                    self.in_burst = in_burst;
                    self.need_flush = true;
                    if !in_burst && n == IDLE_BUFFER {
                        // The small buffer filled up: a bulk transfer is under way.
                        self.burst = Some(vec![0; BURST_BUFFER].into_boxed_slice());
                    }
                }
            }
        }
    }
}

/// Relays between `client` and `backend` until both close, an error, the idle timeout, or `stop` resolves.
/// The observer sees both directions (and neutralises STARTTLS/COMPRESS); finished commands, bytes and
/// the observer's health go to `metrics` as they happen.
pub async fn relay<C, B>(
    client: &mut C,
    backend: &mut B,
    idle_timeout: Duration,
    mut observer: Observer,
    metrics: &Metrics,
    stop: impl std::future::Future<Output = ()>,
) -> RelayOutcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Direction::new();
    let mut down = Direction::new();
    let started = Instant::now();
    // Milliseconds since `started` of the last byte moved; shared with the copy closure.
    let last_activity = AtomicU64::new(0);
    let up_bytes = metrics.bytes.with_label_values(&["client_to_backend"]);
    let down_bytes = metrics.bytes.with_label_values(&["backend_to_client"]);
    let mut copy = poll_fn(|cx| {
        let mut moved = false;
        let now = std::time::Instant::now();
        let (up_before, down_before) = (up.bytes, down.bytes);
        let up_state = up.poll_copy(cx, client, backend, &mut moved, &mut |b| observer.client(b, now));
        let down_state = down.poll_copy(cx, backend, client, &mut moved, &mut |b| observer.server(b, now));
        if moved {
            last_activity.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            up_bytes.inc_by(up.bytes - up_before);
            down_bytes.inc_by(down.bytes - down_before);
            for completed in observer.drain() {
                record(metrics, completed);
            }
        }
        match (up_state, down_state) {
            (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
            // Once the backend has closed (and what it sent has reached the client), the session is
            // over: nothing the client still sends would be answered.
            (_, Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    });
    tokio::pin!(stop);
    let end = loop {
        let deadline = started + Duration::from_millis(last_activity.load(Ordering::Relaxed)) + idle_timeout;
        tokio::select! {
            result = &mut copy => break match result {
                Ok(()) => RelayEnd::Closed,
                Err(e) => RelayEnd::Error(e),
            },
            () = &mut stop => break RelayEnd::Shutdown,
            () = tokio::time::sleep_until(deadline) => {
                let last = started + Duration::from_millis(last_activity.load(Ordering::Relaxed));
                if last.elapsed() >= idle_timeout {
                    break RelayEnd::IdleTimeout;
                }
            }
        }
    };
    drop(copy);
    for completed in observer.finish(std::time::Instant::now()) {
        record(metrics, completed);
    }
    if observer.desynced() {
        metrics.observer_desync.inc();
    }
    RelayOutcome { client_to_backend: up.bytes, backend_to_client: down.bytes, commands: observer.commands(), end }
}

fn record(metrics: &Metrics, completed: Completed) {
    metrics.commands.with_label_values(&[completed.command, completed.status.as_str()]).inc();
    let seconds = completed.elapsed.as_secs_f64();
    if completed.command == "IDLE" {
        metrics.idle_seconds.observe(seconds);
    } else {
        metrics.command_seconds.with_label_values(&[completed.command]).observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn copies_both_ways_and_half_closes() {
        let (mut client_far, mut client_near) = duplex(1024);
        let (mut backend_near, mut backend_far) = duplex(1024);
        let task = tokio::spawn(async move {
            relay(
                &mut client_near,
                &mut backend_near,
                Duration::from_secs(5),
                Observer::new(),
                &Metrics::new(&[]),
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
        assert!(matches!(outcome.end, RelayEnd::Closed), "{outcome:?}");
        assert_eq!(outcome.client_to_backend, 100_000);
        assert_eq!(outcome.backend_to_client, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_the_relay() {
        let (_client_far, mut client_near) = duplex(64);
        let (mut backend_near, _backend_far) = duplex(64);
        let outcome = relay(
            &mut client_near,
            &mut backend_near,
            Duration::from_secs(1860),
            Observer::new(),
            &Metrics::new(&[]),
            std::future::pending(),
        )
        .await;
        assert!(matches!(outcome.end, RelayEnd::IdleTimeout));
    }
}
