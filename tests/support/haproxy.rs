//! A real HAProxy (Debian's `haproxy`) in TCP mode on a loopback port chosen at run time, in front of one
//! or more imapgate listeners with `send-proxy-v2`, as a load balancer would be. Its own configuration in a
//! private directory; the process ends when the test process does (a keeper shell, as for Dovecot).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use super::{free_port, scratch_dir, wait_until};

pub struct Haproxy {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    keeper: Child,
    keeper_stdin: Option<ChildStdin>,
}

fn haproxy_binary() -> PathBuf {
    for candidate in ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    panic!("haproxy not found: install Debian's haproxy (scripts/test.sh does)");
}

impl Haproxy {
    /// Balances TCP connections over `backends` (round robin), each sent a PROXY v2 header.
    pub fn start(backends: &[SocketAddr]) -> Haproxy {
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("  server gate{i} {b} send-proxy-v2 check check-send-proxy inter 500ms\n"))
            .collect();
        Self::run("global\n  maxconn 4000\n", &servers)
    }

    /// A plain TCP passthrough to `backend` (no TLS, no PROXY header, no checks): the benchmark's
    /// comparison for an extra hop that only copies bytes.
    pub fn passthrough(backend: SocketAddr) -> Haproxy {
        Self::run("global\n  maxconn 9000\n", &format!("  server direct {backend}\n"))
    }

    /// A TCP passthrough to `backend` that sends it a PROXY v2 header (as imapgate's shared listener
    /// does toward a web server): the benchmark's comparison for passed-through TLS.
    pub fn passthrough_proxied(backend: SocketAddr) -> Haproxy {
        Self::run("global\n  maxconn 9000\n", &format!("  server web {backend} send-proxy-v2\n"))
    }

    fn run(global: &str, servers: &str) -> Haproxy {
        let dir = scratch_dir("imapgate-haproxy-");
        let port = free_port();
        let config = format!(
            "{global}\
             defaults\n  mode tcp\n  retries 3\n  option redispatch\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n\
             frontend imaps\n  bind 127.0.0.1:{port}\n  default_backend gates\n\
             backend gates\n  balance roundrobin\n{servers}"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let mut keeper = Command::new("sh")
            .arg("-c")
            .arg(r#"trap '' INT TERM HUP; "$1" -db -f "$2" </dev/null >>"$3" 2>&1 & pid=$!; read _ignored; kill -KILL "$pid" 2>/dev/null; wait "$pid""#)
            .arg("sh")
            .arg(haproxy_binary())
            .arg(&path)
            .arg(dir.join("haproxy.log"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn haproxy");
        let keeper_stdin = keeper.stdin.take();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let haproxy = Haproxy { addr, dir, keeper, keeper_stdin };
        if wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(addr).ok()).is_none() {
            panic!("haproxy did not start: {}", haproxy.log());
        }
        haproxy
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }

    /// The keeper shell's process id (HAProxy runs below it).
    pub fn keeper_pid(&self) -> u32 {
        self.keeper.id()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        drop(self.keeper_stdin.take());
        let _ = self.keeper.wait();
    }
}
