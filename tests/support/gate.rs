//! The release `imapgate` binary as a separate process in front of a test Dovecot, for benchmarks that
//! measure its own memory and CPU.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::dovecot::Dovecot;
use super::pki::Pki;

/// The imapgate binary next to this example's directory (target/release/imapgate).
pub fn imapgate_binary() -> PathBuf {
    std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("imapgate")
}

/// Not an environment variable: in `start_with_env`'s list it names the binary to run instead of this
/// build's.
pub const BINARY: &str = "=binary";

pub struct Gate {
    child: Child,
    pub addr: SocketAddr,
    /// The admin server (/metrics).
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Gate {
    /// Starts imapgate on a free loopback port; `extra` adds sections such as `[defence]`.
    pub fn start(dir: &Path, pki: &Pki, dovecot: &Dovecot, name: &str, extra: &str) -> Gate {
        Self::start_with_env(dir, pki, dovecot, name, extra, &[])
    }

    /// As `start`, with `IMAPGATE_...` overrides in the environment (`IMAPGATE_BACKEND_TLS__POOL_SIZE`).
    pub fn start_with_env(
        dir: &Path,
        pki: &Pki,
        dovecot: &Dovecot,
        name: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Gate {
        let port = super::free_port();
        let admin_port = super::free_port();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = [\"127.0.0.1:{port}\"]\nmax_connections = 5000\n\
                 [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[audit]\npath = \"off\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[backend_tls]\nca = \"{}\"\n\
                 [[backend]]\nname = \"dovecot\"\naddress = \"127.0.0.1:{}\"\ntls_name = \"localhost\"\n\
                 [route]\ndefault = \"dovecot\"\n[log]\nformat = \"json\"\nlevel = \"warn,imapgate::app=info,imapgate::memory=info\"\n{extra}{state}",
                pki.cert.display(),
                pki.key.display(),
                pki.ca.display(),
                dovecot.imap_port,
                state = if extra.contains("[state]") {
                    String::new()
                } else {
                    format!("\n[state]\npath = \"{}\"\n", dir.join(format!("{name}-defence.json")).display())
                }
            ),
        )
        .unwrap();
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        // A baseline build to compare with in the same run (the benchmark's IMAPGATE_BENCH_BASELINE).
        let binary = env.iter().find(|(k, _)| *k == BINARY).map_or_else(imapgate_binary, |(_, v)| PathBuf::from(v));
        let env: Vec<(&str, &str)> = env.iter().copied().filter(|(k, _)| *k != BINARY).collect();
        let mut command = Command::new(binary);
        // The configured [log] level, not the harness's own RUST_LOG (the log is read back).
        command.env_remove("RUST_LOG").envs(env.iter().copied());
        // Lets a run compare runtime sizes of the proxy alone: IMAPGATE_BENCH_WORKERS=1.
        if let Ok(workers) = std::env::var("IMAPGATE_BENCH_WORKERS") {
            command.env("TOKIO_WORKER_THREADS", workers);
        }
        let child = command
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run target/release/imapgate (scripts/bench.sh builds it)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        if super::wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(addr).ok()).is_none() {
            let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
            panic!("imapgate did not start:\n{log}");
        }
        let admin = format!("127.0.0.1:{admin_port}").parse().unwrap();
        Gate { child, addr, admin, log: log_path }
    }

    /// CPU time the process used so far (user + system), in milliseconds, from /proc.
    pub fn cpu_ms(&self) -> f64 {
        super::procs::cpu_ms(&[self.child.id()])
    }

    /// Resident memory, from /proc.
    pub fn rss_kib(&self) -> u64 {
        super::procs::rss_kib(self.child.id())
    }

    /// Proportional set size, from /proc (what the benchmark compares with nginx and HAProxy).
    pub fn pss_kib(&self) -> u64 {
        super::procs::pss_kib(&[self.child.id()])
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, once the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Gate {
    /// SIGTERM (graceful drain), then waits up to 30 s; returns the log.
    pub fn terminate(mut self) -> String {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = super::wait_until(Duration::from_secs(30), || self.child.try_wait().ok().flatten());
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
