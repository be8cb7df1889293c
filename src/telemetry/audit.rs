//! The audit log: one JSON object per line, separate from the diagnostic log, to a file or stdout. The file
//! is reopened on SIGHUP or SIGUSR1 so that logrotate can move it. Never a password, a token or message
//! content: events carry only the fields below.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;
use serde::Serialize;

pub use crate::config::{AuditConfig, AuditTarget};

/// One audit record. Absent fields are left out of the JSON.
#[derive(Debug, Default, Clone, Serialize)]
pub struct AuditEvent {
    /// `session_start`, `auth_success`, `auth_failure`, `rate_limited`, `banned`, `unbanned`,
    /// `backend_error`, `session_end`.
    pub event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_port: Option<u16>,
    /// The address that connected when it is not the client's: a load balancer (PROXY protocol) or a
    /// webmail server that forwarded its user's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cipher: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ban_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_from_client: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_to_client: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commands: Option<u64>,
    /// Signals (`stale_password`, `over_quota`, `resync_suspected`): the mailbox concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mailbox: Option<String>,
    /// The client application (its `ID` name and version).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_app: Option<String>,
    /// Signals: how many times so far (tries of an old password, refusals, whole-mailbox fetches).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// `resync_suspected`: body bytes fetched in the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// `admin_action`: the name of the token that acted (never the token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    /// `admin_action`: `kick`, `unban`, `reload`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'static str>,
    /// `admin_action`: what it acted on (`session:<id>`, `user:<name>`, a prefix).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// A summary line: this many more events like it in the last `window_secs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeated: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_secs: Option<u64>,
}

/// The connection facts every session event repeats.
#[derive(Debug, Default, Clone)]
pub struct SessionFacts {
    pub session: String,
    pub client: Option<SocketAddr>,
    /// The TCP peer, when it is not the client.
    pub peer: Option<SocketAddr>,
    pub listener: Option<SocketAddr>,
    pub sni: Option<String>,
    pub tls_version: Option<String>,
    pub tls_cipher: Option<String>,
}

impl SessionFacts {
    /// An event of this session with the connection fields filled in.
    pub fn event(&self, event: &'static str) -> AuditEvent {
        AuditEvent {
            event,
            session: Some(self.session.clone()),
            client_ip: self.client.map(|a| a.ip().to_string()),
            client_port: self.client.map(|a| a.port()),
            peer_ip: self.peer.map(|a| a.ip().to_string()),
            listener: self.listener.map(|a| a.to_string()),
            sni: self.sni.clone(),
            tls_version: self.tls_version.clone(),
            tls_cipher: self.tls_cipher.clone(),
            ..AuditEvent::default()
        }
    }
}

enum Sink {
    Stdout,
    File(File),
}

/// Refusals before TLS are summed per prefix and reason over this window: the first is written in full,
/// the rest as one line with `repeated` at the window's end (a flood must not write a line each).
const AGGREGATE_WINDOW: Duration = Duration::from_secs(10);
/// Prefix/reason pairs summed at once; refusals beyond are written one by one.
const AGGREGATE_KEYS: usize = 4096;

enum Message {
    Event(Box<AuditEvent>, SystemTime),
    Reopen,
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// The audit log: a bounded queue to a writer thread of its own, so that a slow disk or a full pipe never
/// stalls a session. Lines the queue has no room for are dropped and counted.
pub struct AuditLog {
    queue: std::sync::mpsc::SyncSender<Message>,
    dropped: IntCounter,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit.path: cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("audit: cannot start the writer thread: {0}")]
    Thread(std::io::Error),
}

fn open(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| AuditError::Open { path: path.into(), source })
}

impl AuditLog {
    /// Opens the target and starts the writer; `dropped` counts lines lost to a full queue.
    pub fn open(config: AuditConfig, dropped: IntCounter) -> Result<AuditLog, AuditError> {
        let sink = match &config.target {
            AuditTarget::Stdout => Sink::Stdout,
            AuditTarget::File(path) => Sink::File(open(path)?),
        };
        let (queue, receiver) = std::sync::mpsc::sync_channel(config.queue_lines);
        let writer = Writer { target: config.target, sink, summaries: HashMap::new(), window_start: Instant::now() };
        std::thread::Builder::new()
            .name("imapgate-audit".into())
            .spawn(move || writer.run(&receiver))
            .map_err(AuditError::Thread)?;
        Ok(AuditLog { queue, dropped })
    }

    /// Reopens the file (after logrotate moved it). Errors keep the old file and are logged.
    pub fn reopen(&self) {
        if self.queue.try_send(Message::Reopen).is_err() {
            tracing::warn!("audit log reopen not queued: the writer is behind");
        }
    }

    /// Queues one event, stamped now; never waits. A full queue drops it and counts it.
    pub fn record(&self, event: &AuditEvent) {
        let message = Message::Event(Box::new(event.clone()), SystemTime::now());
        if self.queue.try_send(message).is_err() {
            self.dropped.inc();
        }
    }

    /// Waits up to `limit` for everything queued so far to be written (at shutdown; blocking, so call it
    /// off the async workers). Pending summaries are written too.
    pub fn flush(&self, limit: Duration) -> bool {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        let deadline = Instant::now() + limit;
        let mut message = Message::Flush(ack);
        loop {
            match self.queue.try_send(message) {
                Ok(()) => break,
                Err(std::sync::mpsc::TrySendError::Full(back)) if Instant::now() < deadline => {
                    message = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        done.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok()
    }
}

/// The writer thread's state.
struct Writer {
    target: AuditTarget,
    sink: Sink,
    /// Refusals before TLS in this window, by (prefix, reason): (count beyond the first, last event).
    summaries: HashMap<(String, String), (u64, AuditEvent)>,
    window_start: Instant,
}

impl Writer {
    fn run(mut self, receiver: &std::sync::mpsc::Receiver<Message>) {
        loop {
            let wait = AGGREGATE_WINDOW.saturating_sub(self.window_start.elapsed());
            match receiver.recv_timeout(wait) {
                Ok(Message::Event(event, at)) => self.event(*event, at),
                Ok(Message::Reopen) => self.reopen(),
                Ok(Message::Flush(ack)) => {
                    self.close_window();
                    let _ = ack.try_send(());
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    self.close_window();
                    return;
                }
            }
            if self.window_start.elapsed() >= AGGREGATE_WINDOW {
                self.close_window();
            }
        }
    }

    fn event(&mut self, event: AuditEvent, at: SystemTime) {
        let summed = event.event == "rate_limited" && event.result == Some("refused_before_tls");
        if let (true, Some(prefix), Some(reason)) = (summed, &event.prefix, &event.reason) {
            let key = (prefix.clone(), reason.clone());
            if let Some((count, last)) = self.summaries.get_mut(&key) {
                *count += 1;
                *last = event;
                return;
            }
            if self.summaries.len() < AGGREGATE_KEYS {
                self.summaries.insert(key, (0, event.clone()));
            }
        }
        self.write(&event, at);
    }

    /// Writes one line per prefix and reason refused more than once in the window.
    fn close_window(&mut self) {
        let now = SystemTime::now();
        for (_, (count, last)) in std::mem::take(&mut self.summaries) {
            if count > 0 {
                let summary = AuditEvent {
                    repeated: Some(count),
                    window_secs: Some(AGGREGATE_WINDOW.as_secs()),
                    session: None,
                    client_port: None,
                    ..last
                };
                self.write(&summary, now);
            }
        }
        self.window_start = Instant::now();
    }

    fn reopen(&mut self) {
        if let AuditTarget::File(path) = &self.target {
            match open(path) {
                Ok(file) => {
                    self.sink = Sink::File(file);
                    tracing::info!(path = %path.display(), "audit log reopened");
                }
                Err(e) => tracing::error!(error = %e, "audit log reopen failed; still writing to the old file"),
            }
        }
    }

    /// One JSON line with an RFC 3339 UTC timestamp first.
    fn write(&mut self, event: &AuditEvent, at: SystemTime) {
        let mut line = match serde_json::to_value(event) {
            Ok(serde_json::Value::Object(fields)) => {
                let mut object = serde_json::Map::new();
                object.insert("timestamp".into(), serde_json::Value::String(rfc3339(at)));
                object.extend(fields);
                serde_json::Value::Object(object).to_string()
            }
            _ => return,
        };
        line.push('\n');
        let written = match &mut self.sink {
            Sink::Stdout => std::io::stdout().lock().write_all(line.as_bytes()),
            Sink::File(file) => file.write_all(line.as_bytes()),
        };
        if let Err(e) = written {
            tracing::error!(error = %e, "audit log write failed");
        }
    }
}

/// `2026-11-25T21:58:03.123Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(951_782_400_250)), "2000-02-29T00:00:00.250Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_640_883)), "2026-11-25T21:08:03.000Z");
    }

    #[test]
    fn refusals_before_tls_are_summed_and_a_full_queue_drops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let dropped = IntCounter::new("dropped", "dropped").unwrap();
        let config = AuditConfig { target: AuditTarget::File(path.clone()), queue_lines: 1000 };
        let log = AuditLog::open(config, dropped.clone()).unwrap();
        let refusal = |prefix: &str, reason: &str| AuditEvent {
            event: "rate_limited",
            result: Some("refused_before_tls"),
            prefix: Some(prefix.into()),
            reason: Some(reason.into()),
            ..AuditEvent::default()
        };
        for _ in 0..5 {
            log.record(&refusal("192.0.2.0/24", "connection_rate"));
        }
        log.record(&refusal("198.51.100.0/24", "banned"));
        assert!(log.flush(Duration::from_secs(5)));
        let lines: Vec<serde_json::Value> =
            std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        let summary = lines.iter().find(|l| l.get("repeated").is_some()).unwrap();
        assert_eq!(summary["repeated"], 4);
        assert_eq!(summary["prefix"], "192.0.2.0/24");
        assert_eq!(summary["window_secs"], 10);
        assert_eq!(dropped.get(), 0);
    }

    #[test]
    fn events_are_json_lines_with_only_set_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let config = AuditConfig { target: AuditTarget::File(path.clone()), queue_lines: 100 };
        let log = AuditLog::open(config, IntCounter::new("dropped", "dropped").unwrap()).unwrap();
        let facts = SessionFacts { session: "abc".into(), client: "192.0.2.1:5555".parse().ok(), ..Default::default() };
        log.record(&AuditEvent { user: Some("alice".into()), result: Some("success"), ..facts.event("auth_success") });
        assert!(log.flush(Duration::from_secs(5)));
        std::fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
        log.reopen();
        log.record(&facts.event("session_end"));
        assert!(log.flush(Duration::from_secs(5)));
        let old = std::fs::read_to_string(dir.path().join("audit.log.1")).unwrap();
        assert!(old.starts_with("{\"timestamp\":\""), "timestamp first, then the event: {old}");
        assert!(old.contains("Z\",\"event\":\"auth_success\""), "{old}");
        let line: serde_json::Value = serde_json::from_str(old.trim()).unwrap();
        assert_eq!(line["event"], "auth_success");
        assert_eq!(line["client_ip"], "192.0.2.1");
        assert_eq!(line["client_port"], 5555);
        assert_eq!(line["user"], "alice");
        assert!(line.get("backend").is_none());
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'));
        let new = std::fs::read_to_string(&path).unwrap();
        assert!(new.contains("\"event\":\"session_end\""), "{new}");
    }
}
