//! The audit log: one JSON object per line, separate from the diagnostic log, to a file or stdout. The file
//! is reopened on SIGHUP or SIGUSR1 so that logrotate can move it. Never a password, a token or message
//! content: events carry only the fields below.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use crate::config::AuditTarget;

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

/// The audit log writer.
pub struct AuditLog {
    target: AuditTarget,
    sink: Mutex<Sink>,
}

#[derive(Debug, thiserror::Error)]
#[error("audit.path: cannot open {path}: {source}")]
pub struct AuditError {
    path: PathBuf,
    source: std::io::Error,
}

fn open(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new().create(true).append(true).open(path).map_err(|source| AuditError { path: path.into(), source })
}

impl AuditLog {
    pub fn open(target: AuditTarget) -> Result<AuditLog, AuditError> {
        let sink = match &target {
            AuditTarget::Stdout => Sink::Stdout,
            AuditTarget::File(path) => Sink::File(open(path)?),
        };
        Ok(AuditLog { target, sink: Mutex::new(sink) })
    }

    /// Reopens the file (after logrotate moved it). Errors keep the old file and are logged.
    pub fn reopen(&self) {
        if let AuditTarget::File(path) = &self.target {
            match open(path) {
                Ok(file) => {
                    *self.sink.lock().unwrap_or_else(|p| p.into_inner()) = Sink::File(file);
                    tracing::info!(path = %path.display(), "audit log reopened");
                }
                Err(e) => tracing::error!(error = %e, "audit log reopen failed; still writing to the old file"),
            }
        }
    }

    /// Writes one event as a JSON line with an RFC 3339 UTC timestamp.
    pub fn record(&self, event: &AuditEvent) {
        let mut line = match serde_json::to_value(event) {
            Ok(serde_json::Value::Object(fields)) => {
                let mut object = serde_json::Map::new();
                object.insert("timestamp".into(), serde_json::Value::String(rfc3339(SystemTime::now())));
                object.extend(fields);
                serde_json::Value::Object(object).to_string()
            }
            _ => return,
        };
        line.push('\n');
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        let written = match &mut *sink {
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
    fn events_are_json_lines_with_only_set_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(AuditTarget::File(path.clone())).unwrap();
        let facts = SessionFacts { session: "abc".into(), client: "192.0.2.1:5555".parse().ok(), ..Default::default() };
        log.record(&AuditEvent { user: Some("alice".into()), result: Some("success"), ..facts.event("auth_success") });
        std::fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
        log.reopen();
        log.record(&facts.event("session_end"));
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
