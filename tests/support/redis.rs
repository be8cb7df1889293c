//! A real Redis (Debian's `redis-server`) on a loopback port chosen at run time: no persistence, its own
//! directory, ended with the test process (a keeper shell, as for Dovecot). It can be stopped and started
//! again on the same port, as an outage would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use super::{free_port, scratch_dir, wait_until};

pub struct Redis {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    /// `requirepass`, when set.
    password: Option<String>,
    keeper: Option<(Child, Option<ChildStdin>)>,
}

fn redis_binary() -> PathBuf {
    for candidate in ["/usr/bin/redis-server", "/usr/local/bin/redis-server"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    panic!("redis-server not found: install Debian's redis-server (scripts/test.sh does)");
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with_password(None)
    }

    /// A server that requires `password` (AUTH) from every client.
    pub fn start_with_password(password: Option<&str>) -> Redis {
        let dir = scratch_dir("imapgate-redis-");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut redis = Redis { addr, dir, password: password.map(str::to_owned), keeper: None };
        redis.resume();
        redis
    }

    /// `redis://` URL of database 0.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Starts the server (again) on its port and waits until it answers PING.
    pub fn resume(&mut self) {
        assert!(self.keeper.is_none(), "already running");
        let conf = self.dir.join("redis.conf");
        let requirepass = self.password.as_deref().map(|p| format!("requirepass {p}\n")).unwrap_or_default();
        std::fs::write(&conf, requirepass).unwrap();
        let mut keeper = Command::new("sh")
            .arg("-c")
            .arg(r#"trap '' INT TERM HUP; "$1" "$3/redis.conf" --port "$2" --bind 127.0.0.1 --save '' --appendonly no --enable-debug-command yes --dir "$3" --protected-mode no </dev/null >>"$3/redis.log" 2>&1 & pid=$!; read _ignored; kill -KILL "$pid" 2>/dev/null; wait "$pid""#)
            .arg("sh")
            .arg(redis_binary())
            .arg(self.addr.port().to_string())
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let stdin = keeper.stdin.take();
        self.keeper = Some((keeper, stdin));
        let answers = |r: &String| r.starts_with("+PONG") || r.starts_with("-NOAUTH");
        if wait_until(Duration::from_secs(10), || self.command("PING").filter(answers)).is_none() {
            panic!("redis-server did not start: {}", self.log());
        }
    }

    /// Kills the server (an outage: nothing is saved) and waits until the port is closed.
    pub fn stop(&mut self) {
        if let Some((mut keeper, stdin)) = self.keeper.take() {
            drop(stdin);
            let _ = keeper.wait();
        }
        let closed = wait_until(Duration::from_secs(10), || TcpStream::connect(self.addr).is_err().then_some(()));
        assert!(closed.is_some(), "redis-server still listening after stop");
    }

    /// One inline command, its raw reply (None when the server does not answer).
    pub fn command(&self, line: &str) -> Option<String> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(format!("{line}\r\n").as_bytes()).ok()?;
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).ok()?;
        (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some((mut keeper, stdin)) = self.keeper.take() {
            drop(stdin);
            let _ = keeper.wait();
        }
    }
}
