//! Mailbox servers that hang, as a cluster's do when storage stalls: scripted peers, because no real server
//! is broken in these ways on purpose. Each listens on 127.0.0.1 at a port chosen at run time and holds
//! what it accepted until dropped.
//! - [`Hang::Silent`]: accepts TCP and never writes (a kernel that accepts, no process that reads).
//! - [`Hang::AfterStarttls`]: greets with `STARTTLS` offered, answers `STARTTLS` with `OK`, then never
//!   answers the TLS handshake (a login process stuck on its storage after the first round trip).
//! - [`Hang::Blackhole`]: a listening socket that never accepts and whose backlog is full, so that the
//!   kernel drops every further SYN and a connect waits as it would for an address whose packets vanish.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;

/// How a member hangs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hang {
    Silent,
    AfterStarttls,
    Blackhole,
}

impl Hang {
    pub const ALL: [Hang; 3] = [Hang::Silent, Hang::AfterStarttls, Hang::Blackhole];

    pub fn as_str(self) -> &'static str {
        match self {
            Hang::Silent => "accepts, never greets",
            Hang::AfterStarttls => "hangs after STARTTLS",
            Hang::Blackhole => "SYN blackhole",
        }
    }
}

/// A hung member; stops (closing everything it holds) when dropped.
pub struct HungServer {
    pub port: u16,
    _stop: oneshot::Sender<()>,
}

impl HungServer {
    pub async fn start(hang: Hang) -> HungServer {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        let (stop, mut stopped) = oneshot::channel::<()>();
        if hang == Hang::Blackhole {
            // Backlog 0: the accept queue holds one connection; fill it (and keep a second SYN waiting),
            // and every later SYN is dropped by the kernel.
            let listener = socket.listen(0).unwrap();
            // The first connection fills the queue; a second one waits for an accept that never comes.
            let queued = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(("127.0.0.1", port))).await;
            let filler = match queued {
                Ok(Ok(tcp)) => tcp,
                other => panic!("the blackhole's backlog did not take its filler: {other:?}"),
            };
            let fillers = vec![tokio::spawn(TcpStream::connect(("127.0.0.1", port)))];
            tokio::spawn(async move {
                let _held = (listener, filler);
                let _ = stopped.await;
                for waiting in fillers {
                    waiting.abort();
                }
            });
            // A connect now must hang.
            let probe = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(("127.0.0.1", port))).await;
            assert!(probe.is_err(), "a connect to the blackhole completed: the backlog is not full");
            return HungServer { port, _stop: stop };
        }
        let listener = socket.listen(1024).unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { continue };
                        match hang {
                            Hang::Silent | Hang::Blackhole => held.push(tokio::spawn(async move {
                                let _tcp = tcp;
                                std::future::pending::<()>().await
                            })),
                            Hang::AfterStarttls => held.push(tokio::spawn(starttls_then_hang(tcp))),
                        }
                    }
                    _ = &mut stopped => break,
                }
            }
            for task in held {
                task.abort();
            }
        });
        HungServer { port, _stop: stop }
    }
}

/// Greets, answers CAPABILITY and STARTTLS, then holds the connection without a word.
async fn starttls_then_hang(tcp: TcpStream) {
    let (read, mut write) = tcp.into_split();
    let mut lines = BufReader::new(read).lines();
    if write.write_all(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hung member ready\r\n").await.is_err() {
        return;
    }
    while let Ok(Some(line)) = lines.next_line().await {
        let mut words = line.split(' ');
        let (tag, command) = (words.next().unwrap_or("*"), words.next().unwrap_or("").to_ascii_uppercase());
        let reply = match command.as_str() {
            "CAPABILITY" => format!("* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n{tag} OK done\r\n"),
            "STARTTLS" => {
                let _ = write.write_all(format!("{tag} OK Begin TLS negotiation now\r\n").as_bytes()).await;
                // The handshake never gets an answer.
                let _held = (lines, write);
                std::future::pending::<()>().await;
                return;
            }
            _ => format!("{tag} BAD unexpected\r\n"),
        };
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// How one user's login through the proxy ended, as the user saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    LoggedIn,
    /// A tagged `NO` (the line).
    Refused(String),
    /// No answer within the client's own patience (a phone's mail app gives up and retries).
    ClientTimeout,
    /// The connection failed or closed.
    Broken(String),
}

/// One user's login: the outcome and how long it took from connecting to the tagged reply.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: String,
    pub outcome: Outcome,
    pub took: Duration,
}

/// `users` (name, password) log in through `addr`, `at_once` at a time, each giving up after `patience`;
/// logged-in users log out at once.
pub async fn login_round(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    users: &[(String, String)],
    at_once: usize,
    patience: Duration,
) -> Vec<Login> {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(at_once));
    let mut tasks = Vec::new();
    for (user, password) in users {
        let permit = std::sync::Arc::clone(&permits).acquire_owned().await.unwrap();
        let (user, password, ca) = (user.clone(), password.clone(), ca.to_owned());
        tasks.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let attempt = async {
                let mut client = super::client::TlsClient::connect(addr, &ca).await.map_err(|e| e.to_string())?;
                client.line().await.map_err(|e| e.to_string())?;
                let reply =
                    client.command("a", &format!("LOGIN {user} {password}")).await.map_err(|e| e.to_string())?;
                let outcome = if reply.tagged.starts_with("a OK") {
                    let _ = client.command("z", "LOGOUT").await;
                    Outcome::LoggedIn
                } else {
                    Outcome::Refused(reply.tagged)
                };
                Ok::<_, String>(outcome)
            };
            let outcome = match tokio::time::timeout(patience, attempt).await {
                Err(_) => Outcome::ClientTimeout,
                Ok(Err(e)) => Outcome::Broken(e),
                Ok(Ok(outcome)) => outcome,
            };
            drop(permit);
            Login { user, outcome, took: started.elapsed() }
        }));
    }
    let mut logins = Vec::new();
    for task in tasks {
        logins.push(task.await.unwrap());
    }
    logins
}

/// `n` accounts for a round (`hang0@example.org` / `hang-pw-0`, ...), for a Dovecot's `extra_users`.
pub fn users(n: usize) -> Vec<(String, String)> {
    (0..n).map(|i| (format!("hang{i}@example.org"), format!("hang-pw-{i}"))).collect()
}

/// The `p`-quantile (0..=1) of `took` over `logins`.
pub fn quantile(logins: &[&Login], p: f64) -> Duration {
    let mut took: Vec<Duration> = logins.iter().map(|l| l.took).collect();
    if took.is_empty() {
        return Duration::ZERO;
    }
    took.sort();
    took[((took.len() as f64 - 1.0) * p).round() as usize]
}

/// The rounds' pool: m1, m2 and m3 (the hung one, index 2), one weight each.
pub const MEMBERS: [&str; 3] = ["m1", "m2", "m3"];

/// `user`'s members of that pool, best first (the proxy's own rendezvous order).
pub fn order_of(user: &str) -> Vec<usize> {
    let pool = imapgate::config::Pool {
        name: "cluster".into(),
        members: (0..MEMBERS.len()).map(|backend| imapgate::config::Member { backend, weight: 1 }).collect(),
        failover: imapgate::config::Failover::Next,
    };
    imapgate::route::pool::order(&pool, user, |b| MEMBERS[b])
}

/// The rounds' configuration: pool "cluster" of m1, m2, m3 at `ports` (127.0.0.1) with `failover`, the
/// shipped `[backend_tls]` deadlines and `[health]` (the test defaults' shorter connect and login
/// deadlines taken out).
pub fn pool_config(pki: &super::pki::Pki, ports: [u16; 3], failover: &str) -> String {
    let backends: String = MEMBERS.iter().zip(ports).map(|(name, port)| super::proxy::backend(name, port)).collect();
    let rest = format!(
        "{backends}\n[[pool]]\nname = \"cluster\"\nfailover = \"{failover}\"\n\
         members = [{{ backend = \"m1\" }}, {{ backend = \"m2\" }}, {{ backend = \"m3\" }}]\n[route]\ndefault = \"cluster\"\n"
    );
    super::proxy::config_text(pki, &rest)
        .replace("connect_timeout_secs = 3\n", "")
        .replace("login_timeout_secs = 10\n", "")
}
