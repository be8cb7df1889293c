//! Test support: a real Dovecot on loopback ports chosen at run time, a private PKI, the proxy started
//! in-process, and a small IMAP-over-TLS client. Shared by the integration tests, the benchmark and the
//! demo (which include this file by path).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod client;
pub mod dovecot;
pub mod gate;
pub mod pki;
pub mod proxy;

use std::net::TcpListener;

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `check` every 50 ms until it returns Some or `timeout` passes.
pub fn wait_until<T>(timeout: std::time::Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Removes `path` when this process exits, however it exits: a shell that ignores signals waits for its
/// stdin (held here forever) to close.
pub fn remove_on_exit(path: &std::path::Path) {
    use std::sync::Mutex;
    static KEEPERS: Mutex<Vec<std::process::ChildStdin>> = Mutex::new(Vec::new());
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"trap '' INT TERM HUP; read _ignored; rm -rf "$1""#)
        .arg("sh")
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn();
    if let Ok(mut child) = child {
        if let Some(stdin) = child.stdin.take() {
            KEEPERS.lock().unwrap().push(stdin);
        }
    }
}

/// A directory for this test process's files, removed when the process exits.
pub fn scratch_dir(prefix: &str) -> std::path::PathBuf {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap().keep();
    remove_on_exit(&dir);
    dir
}
