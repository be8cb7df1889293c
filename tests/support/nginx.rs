//! A real nginx mail proxy (Debian's `nginx-light` with `libnginx-mod-mail`) for the benchmark's
//! comparison: IMAPS on a loopback port chosen at run time (one TLS leg, as nginx deploys it), the backend
//! reached in plaintext, users routed by a small `auth_http` service of the benchmark's own. Its own
//! configuration in a private directory; the process ends when the benchmark does (a keeper shell).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use super::pki::Pki;
use super::{free_port, scratch_dir, wait_until};

const MODULE: &str = "/usr/lib/nginx/modules/ngx_mail_module.so";

pub struct Nginx {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    keeper: Child,
    keeper_stdin: Option<ChildStdin>,
}

/// Whether Debian's nginx and its mail module are installed (`scripts/bench.sh` installs them).
pub fn available() -> bool {
    Path::new("/usr/sbin/nginx").exists() && Path::new(MODULE).exists()
}

/// An `auth_http` service that sends every user to `backend` (nginx's protocol: `Auth-Status`,
/// `Auth-Server`, `Auth-Port` headers), on a thread of its own; one request per connection.
fn auth_service(backend: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = Vec::new();
            let mut buf = [0u8; 2048];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let reply = format!(
                "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: {}\r\nAuth-Port: {}\r\n\r\n",
                backend.ip(),
                backend.port()
            );
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    addr
}

impl Nginx {
    /// IMAPS in front of `backend` (plaintext IMAP), with the certificate of `pki`, TLS session resumption
    /// on (a shared session cache, as a production configuration has it) and `workers` worker processes.
    pub fn start(pki: &Pki, backend: SocketAddr, workers: usize) -> Nginx {
        let dir = scratch_dir("imapgate-nginx-");
        let port = free_port();
        let auth = auth_service(backend);
        let d = dir.display();
        let config = format!(
            "load_module {MODULE};\n\
             daemon off;\nworker_processes {workers};\nworker_rlimit_nofile 30000;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{\n  worker_connections 12000;\n}}\n\
             mail {{\n  server_name localhost;\n  auth_http 127.0.0.1:{}/auth;\n  proxy_pass_error_message on;\n\
               imap_capabilities IMAP4rev1 LITERAL+ SASL-IR ID IDLE ENABLE;\n\
               ssl_certificate {};\n  ssl_certificate_key {};\n  ssl_session_cache shared:MAIL:10m;\n\
               server {{\n    listen 127.0.0.1:{port} ssl;\n    protocol imap;\n  }}\n}}\n",
            auth.port(),
            pki.cert.display(),
            pki.key.display(),
        );
        Self::run(dir, port, &config)
    }

    /// nginx as the organisation's web server: HTTPS with its own certificate (`cert`, `key`) on a
    /// loopback port, reading a PROXY protocol header first (`listen ... ssl proxy_protocol`), serving one
    /// page, and logging `$proxy_protocol_addr` (the client imapgate passed the connection for).
    pub fn start_web(cert: &Path, key: &Path) -> Nginx {
        let dir = scratch_dir("imapgate-nginx-web-");
        let port = free_port();
        let d = dir.display();
        std::fs::write(dir.join("index.html"), "hello from nginx\n").unwrap();
        let config = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{\n  worker_connections 1024;\n}}\n\
             http {{\n  log_format proxied '$proxy_protocol_addr $remote_addr \"$request\" $status';\n\
               access_log {d}/access.log proxied;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               server {{\n    listen 127.0.0.1:{port} ssl proxy_protocol;\n    server_name web.test;\n\
                 ssl_certificate {};\n    ssl_certificate_key {};\n    root {d};\n  }}\n}}\n",
            cert.display(),
            key.display(),
        );
        Self::run(dir, port, &config)
    }

    /// Runs nginx with `config` from `dir` under a keeper shell (stopped with it), and waits until `port`
    /// accepts connections.
    fn run(dir: PathBuf, port: u16, config: &str) -> Nginx {
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config).unwrap();
        let mut keeper = Command::new("sh")
            .arg("-c")
            .arg(r#"trap '' INT TERM HUP; "$1" -p "$2" -c "$3" </dev/null >>"$2/nginx.log" 2>&1 & pid=$!; read _ignored; kill -QUIT "$pid" 2>/dev/null; sleep 1; kill -KILL "$pid" 2>/dev/null; wait "$pid""#)
            .arg("sh")
            .arg("/usr/sbin/nginx")
            .arg(&dir)
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let keeper_stdin = keeper.stdin.take();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let nginx = Nginx { addr, dir, keeper, keeper_stdin };
        if wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(addr).ok()).is_none() {
            panic!("nginx did not start: {}", nginx.log());
        }
        nginx
    }

    /// The web server's access log (`$proxy_protocol_addr $remote_addr "$request" $status`).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// The master's process id (from its pid file).
    pub fn pid(&self) -> u32 {
        std::fs::read_to_string(self.dir.join("nginx.pid")).unwrap().trim().parse().unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
            + &std::fs::read_to_string(self.dir.join("nginx.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        drop(self.keeper_stdin.take());
        let _ = self.keeper.wait();
    }
}
