//! The service manager's notification protocol (sd_notify(3)): one datagram such as `READY=1` to the Unix
//! socket that `NOTIFY_SOCKET` names (a path, or `@name` in Linux's abstract namespace). systemd uses it
//! for `Type=notify` (and to learn the new main process after an upgrade); an upgrading imapgate uses the
//! same protocol to hear that its successor is ready. Without `NOTIFY_SOCKET` nothing is sent.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The notify socket this process was given, if any.
pub fn socket_from_env() -> Option<String> {
    std::env::var("NOTIFY_SOCKET").ok().filter(|s| !s.is_empty())
}

/// The address `NOTIFY_SOCKET`'s value names.
pub fn address(name: &str) -> io::Result<SocketAddr> {
    match name.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
        None => SocketAddr::from_pathname(name),
    }
}

/// Sends `state` (newline-separated assignments) to the socket `name`.
pub fn send(name: &str, state: &str) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(state.as_bytes(), &address(name)?)?;
    Ok(())
}

/// Tells the service manager (when there is one) that this process is ready and is the main process.
pub fn ready() {
    if let Some(name) = socket_from_env() {
        if let Err(e) = send(&name, &format!("READY=1\nMAINPID={}", std::process::id())) {
            tracing::warn!(socket = %name, error = %e, "could not notify the service manager");
        }
    }
}

/// Whether a notification says `READY=1` from `pid` (a `MAINPID` naming another process does not count).
pub fn says_ready(message: &[u8], pid: u32) -> bool {
    let Ok(text) = std::str::from_utf8(message) else { return false };
    let mut ready = false;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("READY", "1")) => ready = true,
            Some(("MAINPID", other)) if other.trim().parse::<u32>().ok() != Some(pid) => return false,
            _ => {}
        }
    }
    ready
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_from_the_successor_only() {
        assert!(says_ready(b"READY=1\nMAINPID=42", 42));
        assert!(says_ready(b"READY=1", 42));
        assert!(!says_ready(b"READY=1\nMAINPID=43", 42));
        assert!(!says_ready(b"STATUS=starting", 42));
        assert!(!says_ready(b"\xff\xfe", 42));
    }

    #[test]
    fn a_datagram_reaches_an_abstract_socket() {
        let name = format!("imapgate-notify-test-{}", std::process::id());
        let listener = UnixDatagram::bind_addr(&address(&format!("@{name}")).unwrap()).unwrap();
        send(&format!("@{name}"), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
