//! Test support: a real Dovecot on loopback ports chosen at run time, a private PKI, the proxy started
//! in-process, and a small IMAP-over-TLS client. Shared by the integration tests, the benchmark and the
//! demo (which include this file by path).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod browser;
pub mod client;
pub mod dovecot;
pub mod faulty;
pub mod gate;
pub mod haproxy;
pub mod hung;
pub mod lookup;
pub mod nginx;
pub mod pki;
pub mod procs;
pub mod proxy;
pub mod raw_tls;
pub mod redis;
pub mod tokens;
pub mod upgrade;

use std::net::TcpListener;

/// A loopback port that was free a moment ago, for a server a test starts (Dovecot, Redis, HAProxy).
/// Taken below Linux's ephemeral range (32768 and up), where the suite's own outgoing connections would
/// otherwise take a port between the choice and the server's bind; never the same one twice per process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..2000 {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
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

/// A test binary's private PKI and Dovecot.
pub struct Env {
    pub pki: pki::Pki,
    pub dovecot: dovecot::Dovecot,
}

/// One Dovecot per test binary (each binary compiles this module, so each gets its own), started on first
/// use with `extra_users` on top of the demo accounts.
pub fn env(name: &str, extra_users: &[(String, String)]) -> &'static Env {
    static ENV: std::sync::OnceLock<Env> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let pki = pki::Pki::generate(&scratch_dir(&format!("imapgate-{name}-")));
        let dovecot = dovecot::Dovecot::start(name, &pki, extra_users);
        Env { pki, dovecot }
    })
}

/// A plain HTTP/1.1 GET against the admin server: (status, body).
pub async fn admin_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    admin_request(addr, "GET", path, None, None).await
}

/// An HTTP/1.1 request to the admin server, with a bearer token and a JSON body when given: (status, body).
pub async fn admin_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n");
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method != "GET" {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    head.push_str(body);
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read_to_string(&mut out)).await.unwrap().unwrap();
    let status = out.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// The value of `series` (name and labels as exposed) in a Prometheus exposition, 0 when absent.
pub fn sample(exposition: &str, series: &str) -> f64 {
    exposition.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

/// One series from the admin server's `/metrics`, 0 when absent.
pub async fn metric(admin: std::net::SocketAddr, series: &str) -> f64 {
    sample(&admin_get(admin, "/metrics").await.1, series)
}

/// Scrapes `/metrics` every 100 ms until `series` reaches `at_least` or `within` passes; returns the last
/// exposition (the caller asserts on it).
pub async fn scrape_until(
    admin: std::net::SocketAddr,
    series: &str,
    at_least: f64,
    within: std::time::Duration,
) -> String {
    let deadline = std::time::Instant::now() + within;
    loop {
        let text = admin_get(admin, "/metrics").await.1;
        if sample(&text, series) >= at_least || std::time::Instant::now() >= deadline {
            return text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Starts `tests/support/<script>` with Debian's python3 on `port` (its `--port`) and `args` (flag, path),
/// and waits until it accepts connections.
pub fn python_service(script: &str, port: u16, args: &[(&str, &std::path::Path)]) -> std::process::Child {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support").join(script);
    let mut command = std::process::Command::new("python3");
    command.arg(&path).args(["--port", &port.to_string()]);
    for (flag, value) in args {
        command.arg(flag).arg(value);
    }
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 (Debian package 'python3'; scripts/test.sh installs it)");
    let up = wait_until(std::time::Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
    assert!(up.is_some(), "{script} did not start");
    assert!(child.try_wait().ok().flatten().is_none(), "{script} exited");
    child
}

/// Everything a `tracing` subscriber writes, for tests that prove what never reaches the log.
#[derive(Clone, Default)]
pub struct Capture(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// Installs a trace-level JSON subscriber for the whole test process writing here.
    pub fn install() -> Capture {
        let capture = Capture::default();
        let writer = capture.clone();
        tracing_subscriber::fmt().with_env_filter("trace").with_writer(move || writer.clone()).json().init();
        capture
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
