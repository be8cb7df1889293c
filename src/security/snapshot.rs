//! What the defence remembers across a restart of a single instance: bans with their time left and
//! doubling count, closures, each prefix's failure budget and standing, each account's consecutive
//! failures and familiar prefixes. Times are kept as ages ("this long ago", "this long left"), so that a
//! snapshot means the same whatever the clocks of the two processes. No password, token or fingerprint
//! is kept (the repeated-pair memory is not written); accounts are named by the hash the shared store uses
//! for them (SHA-256 of the canonical name, first 16 bytes in hex), never in clear.
//!
//! Sans-IO: [`encode`] and [`decode`] turn a [`Snapshot`] into bytes and back; the file around it (atomic
//! replacement, size bound) is the application's.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The format's name and version, checked on reading: another file or another version is ignored.
pub const FORMAT: &str = "imapgate-defence-state";
pub const VERSION: u32 = 1;
/// A file larger than this is not read (the tables are bounded, so a snapshot of them is far smaller).
pub const MAX_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: String,
    pub version: u32,
    pub bans: Vec<BanRecord>,
    pub closures: Vec<BanRecord>,
    pub prefixes: Vec<PrefixRecord>,
    pub accounts: Vec<AccountRecord>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            format: FORMAT.to_owned(),
            version: VERSION,
            bans: Vec::new(),
            closures: Vec::new(),
            prefixes: Vec::new(),
            accounts: Vec::new(),
        }
    }
}

/// A ban (or a closure to unfamiliar accounts), in force or only remembered for doubling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanRecord {
    pub key: IpNet,
    /// Time left; 0 when not in force.
    pub remaining_ms: u64,
    pub count: u32,
    pub since_last_ms: u64,
}

/// A prefix's failure budget and standing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefixRecord {
    pub key: IpNet,
    /// Counted failures still in the bucket.
    pub failures: f64,
    /// Recent successful logins (decayed).
    pub successes: f64,
    pub since_seen_ms: u64,
}

/// An account, by the hash of its canonical name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub account: String,
    pub consecutive: u32,
    pub since_failure_ms: Option<u64>,
    pub since_seen_ms: u64,
    /// Prefixes it logged in from (familiar).
    pub known: Vec<IpNet>,
    /// Prefixes it failed from since its last success.
    pub failed_from: Vec<IpNet>,
}

/// The name an account is kept under in a snapshot (as in the shared store's keys).
pub fn account_hash(canonical: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
    digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a defence state file: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("a {format:?} file, version {version}: this imapgate reads {FORMAT:?} version {VERSION}")]
    Foreign { format: String, version: u32 },
}

pub fn encode(snapshot: &Snapshot) -> Vec<u8> {
    // Serialising plain data cannot fail.
    serde_json::to_vec(snapshot).unwrap_or_default()
}

pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    #[derive(Deserialize)]
    struct Header {
        format: String,
        version: u32,
    }
    let header: Header = serde_json::from_slice(bytes)?;
    if header.format != FORMAT || header.version != VERSION {
        return Err(SnapshotError::Foreign { format: header.format, version: header.version });
    }
    Ok(serde_json::from_slice(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            bans: vec![BanRecord {
                key: "192.0.2.7/32".parse().unwrap(),
                remaining_ms: 5000,
                count: 2,
                since_last_ms: 10,
            }],
            prefixes: vec![PrefixRecord {
                key: "198.51.100.0/24".parse().unwrap(),
                failures: 1.5,
                successes: 3.0,
                since_seen_ms: 7,
            }],
            accounts: vec![AccountRecord {
                account: account_hash("alice@example.org"),
                consecutive: 3,
                since_failure_ms: Some(100),
                since_seen_ms: 100,
                known: vec!["203.0.113.9/32".parse().unwrap()],
                failed_from: vec![],
            }],
            ..Snapshot::default()
        }
    }

    #[test]
    fn round_trip() {
        let snapshot = sample();
        assert_eq!(decode(&encode(&snapshot)).unwrap(), snapshot);
    }

    #[test]
    fn no_account_name_in_clear() {
        let text = String::from_utf8(encode(&sample())).unwrap();
        assert!(!text.contains("alice"), "{text}");
        assert_eq!(account_hash("alice@example.org").len(), 32);
    }

    #[test]
    fn truncated_garbage_and_foreign_files_are_errors() {
        let bytes = encode(&sample());
        assert!(matches!(decode(&bytes[..bytes.len() / 2]), Err(SnapshotError::Malformed(_))));
        assert!(matches!(decode(b"\x00\xffnot json"), Err(SnapshotError::Malformed(_))));
        assert!(matches!(decode(b""), Err(SnapshotError::Malformed(_))));
        let newer = String::from_utf8(bytes.clone()).unwrap().replace("\"version\":1", "\"version\":2");
        assert!(matches!(decode(newer.as_bytes()), Err(SnapshotError::Foreign { version: 2, .. })));
        let other = r#"{"format":"something-else","version":1}"#;
        assert!(matches!(decode(other.as_bytes()), Err(SnapshotError::Foreign { .. })));
    }
}
