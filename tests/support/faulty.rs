//! A mailbox server that misbehaves on demand: a loopback front that relays to a real Dovecot while it is
//! [`Fault::None`], and answers every new connection with one scripted fault otherwise (scripted, because
//! no real server greets with PREAUTH or resets on purpose). Switched at run time, so that one proxy sees
//! a member turn faulty and recover; connections it is already relaying are left alone, except by
//! [`Fault::Freeze`].

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// What a new connection gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Relayed to the real server.
    None,
    /// `* PREAUTH`: the server claims the connection is already authenticated.
    Preauth,
    /// `* BYE`: the server refuses the connection.
    Bye,
    /// Bytes that are not IMAP.
    Garbage,
    /// A TCP reset as soon as the connection is accepted.
    Reset,
    /// Accepts and never writes (the greeting's deadline runs out).
    Silent,
    /// As `Silent` for new connections, and every connection being relayed stops forwarding in both
    /// directions, open and silent for good (a server whose storage stalled under its open connections,
    /// the proxy's ready ones among them).
    Freeze,
}

impl Fault {
    pub const ALL: [Fault; 5] = [Fault::Preauth, Fault::Bye, Fault::Garbage, Fault::Reset, Fault::Silent];
}

/// A switchable member in front of `127.0.0.1:<target>`; stops when dropped.
pub struct FaultyServer {
    pub port: u16,
    fault: Arc<Mutex<Fault>>,
    frozen: watch::Sender<bool>,
    _stop: oneshot::Sender<()>,
}

impl FaultyServer {
    pub async fn start(target: u16) -> FaultyServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let fault = Arc::new(Mutex::new(Fault::None));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let current = Arc::clone(&fault);
        let frozen = watch::Sender::new(false);
        let freeze = frozen.subscribe();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { continue };
                        let fault = *current.lock().unwrap();
                        held.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
                        held.push(tokio::spawn(serve(tcp, fault, target, freeze.clone())));
                    }
                    _ = &mut stopped => break,
                }
            }
            for task in held {
                task.abort();
            }
        });
        FaultyServer { port, fault, frozen, _stop: stop }
    }

    /// New connections get `fault` from now on.
    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
        if fault == Fault::Freeze {
            self.frozen.send_replace(true);
        }
    }
}

async fn serve(mut tcp: TcpStream, fault: Fault, target: u16, frozen: watch::Receiver<bool>) {
    let hold = || std::future::pending::<()>();
    match fault {
        Fault::None => {
            let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)).await else { return };
            let ((client_read, client_write), (server_read, server_write)) = (tcp.into_split(), upstream.into_split());
            tokio::join!(pipe(client_read, server_write, frozen.clone()), pipe(server_read, client_write, frozen));
        }
        Fault::Preauth => {
            let _ = tcp.write_all(b"* PREAUTH [CAPABILITY IMAP4rev1] already logged in\r\n").await;
            hold().await
        }
        Fault::Bye => {
            let _ = tcp.write_all(b"* BYE Too many connections, try again later\r\n").await;
            let _ = tcp.shutdown().await;
        }
        Fault::Garbage => {
            let _ =
                tcp.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n\x16\x03\x01\x00\xff\r\n").await;
            hold().await
        }
        Fault::Reset => {
            // SO_LINGER 0: close sends RST instead of FIN.
            let std = tcp.into_std().unwrap();
            socket2::SockRef::from(&std).set_linger(Some(std::time::Duration::ZERO)).unwrap();
            drop(std);
        }
        Fault::Silent | Fault::Freeze => {
            let _tcp = tcp;
            hold().await
        }
    }
}

/// Forwards `from` to `to` until either ends, or for good stops forwarding (holding both open) once frozen.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            _ = async { frozen.wait_for(|f| *f).await.map(|_| ()) } => break,
        };
        if *frozen.borrow() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if *frozen.borrow() {
        let _held = (from, to);
        std::future::pending::<()>().await
    }
}
