//! Listening sockets this process did not bind: handed to it by systemd's socket activation or by the
//! imapgate it replaces (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`; sd_listen_fds(3)). A socket kept
//! by the manager or passed from the old process keeps its accept queue, so a restart or an upgrade
//! refuses nobody. Which configured listener takes which socket is decided by name (the old process
//! names them `imaps.0`, `imap.0`, `admin`), else by the address the socket is bound to (systemd's
//! `ListenStream=` lines); a socket nobody claims is closed with a warning.

use std::net::SocketAddr;

/// The name under which a listener is handed over: `imaps.<i>` (`server.listen[i]`), `imap.<i>`
/// (`server.starttls_listen[i]`), `admin`.
pub fn name(role: Role, index: usize) -> String {
    match role {
        Role::ImplicitTls => format!("imaps.{index}"),
        Role::StartTls => format!("imap.{index}"),
        Role::Admin => "admin".to_owned(),
        Role::Shared => format!("shared.{index}"),
    }
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    ImplicitTls,
    StartTls,
    Admin,
    /// `server.shared_listen[i]` (a port shared with a web server).
    Shared,
}

/// `LISTEN_FDNAMES` (colon-separated, one per descriptor; systemd's default name is `unknown`) as one
/// optional name per descriptor; missing or empty entries have none.
pub fn parse_names(names: Option<&str>, count: usize) -> Vec<Option<String>> {
    let mut parsed: Vec<Option<String>> = names
        .unwrap_or("")
        .split(':')
        .map(|n| (!n.is_empty() && n != "unknown").then(|| n.to_owned()))
        .take(count)
        .collect();
    parsed.resize(count, None);
    parsed
}

/// Whether a socket named `name` and bound to `bound` serves the listener `wanted` configured at
/// `configured`: the name decides when there is one; else the address must be the configured one (port 0
/// in a configuration matches no inherited socket by address).
pub fn claims(name: Option<&str>, bound: Option<SocketAddr>, wanted: &str, configured: SocketAddr) -> bool {
    match name {
        Some(name) => name == wanted,
        None => configured.port() != 0 && bound.is_some_and(|bound| same_address(bound, configured)),
    }
}

/// The same port, and the same address or both the wildcard (systemd's `ListenStream=993` is bound to
/// `[::]:993`, serving IPv4 too, where a configuration says `0.0.0.0:993`).
fn same_address(bound: SocketAddr, configured: SocketAddr) -> bool {
    bound.port() == configured.port()
        && (bound.ip() == configured.ip() || (bound.ip().is_unspecified() && configured.ip().is_unspecified()))
}

/// The sockets received at start-up, until claimed.
pub struct Inherited {
    sockets: Vec<Option<(Option<String>, std::net::TcpListener)>>,
}

impl Inherited {
    /// Takes what `LISTEN_FDS` names (none when unset or meant for another process). A descriptor that is
    /// not a listening TCP socket is logged and skipped.
    pub fn from_env() -> Self {
        let mut fds = listenfd::ListenFd::from_env();
        let names = parse_names(std::env::var("LISTEN_FDNAMES").ok().as_deref(), fds.len());
        let mut sockets = Vec::new();
        for (index, name) in names.into_iter().enumerate() {
            match fds.take_tcp_listener(index) {
                Ok(Some(listener)) => sockets.push(Some((name, listener))),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(fd = index + 3, error = %e, "inherited descriptor is not a TCP listener; ignored")
                }
            }
        }
        if !sockets.is_empty() {
            tracing::info!(sockets = sockets.len(), "listening sockets inherited");
        }
        Inherited { sockets }
    }

    /// No inherited sockets (in-process use, tests).
    pub fn none() -> Self {
        Inherited { sockets: Vec::new() }
    }

    /// The inherited socket for the listener `role`/`index` configured at `configured`, made ready for
    /// tokio; None when there is none (bind it).
    pub fn take(&mut self, role: Role, index: usize, configured: SocketAddr) -> Option<std::net::TcpListener> {
        let wanted = name(role, index);
        let slot = self.sockets.iter_mut().find(|slot| {
            slot.as_ref().is_some_and(|(n, l)| claims(n.as_deref(), l.local_addr().ok(), &wanted, configured))
        })?;
        let (_, listener) = slot.take()?;
        if let Err(e) = listener.set_nonblocking(true) {
            tracing::warn!(listener = %wanted, error = %e, "inherited socket unusable; binding a new one");
            return None;
        }
        tracing::info!(listener = %wanted, address = ?listener.local_addr().ok(), "using an inherited socket");
        Some(listener)
    }

    /// Closes what no listener claimed (a listener removed from the configuration), saying so.
    pub fn close_unclaimed(self) {
        for (name, listener) in self.sockets.into_iter().flatten() {
            tracing::warn!(name = ?name, address = ?listener.local_addr().ok(), "inherited socket not in the configuration; closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_per_descriptor() {
        assert_eq!(
            parse_names(Some("imaps.0:imap.0:admin"), 3),
            [Some("imaps.0".into()), Some("imap.0".into()), Some("admin".into())]
        );
        assert_eq!(parse_names(Some("unknown:admin"), 3), [None, Some("admin".into()), None]);
        assert_eq!(parse_names(None, 2), [None, None]);
        assert_eq!(parse_names(Some("a:b:c"), 1), [Some("a".into())]);
    }

    #[test]
    fn claimed_by_name_else_by_configured_address() {
        let configured: SocketAddr = "0.0.0.0:993".parse().unwrap();
        assert!(claims(Some("imaps.0"), None, "imaps.0", configured));
        assert!(!claims(Some("imap.0"), Some(configured), "imaps.0", configured));
        assert!(claims(None, Some(configured), "imaps.0", configured));
        assert!(!claims(None, Some("0.0.0.0:143".parse().unwrap()), "imaps.0", configured));
        assert!(claims(None, Some("[::]:993".parse().unwrap()), "imaps.0", configured));
        assert!(!claims(None, Some("127.0.0.1:993".parse().unwrap()), "imaps.0", configured));
        // Port 0 is "any": only a name can claim it.
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(!claims(None, Some("127.0.0.1:4000".parse().unwrap()), "imaps.0", any));
        assert!(claims(Some("imaps.0"), Some("127.0.0.1:4000".parse().unwrap()), "imaps.0", any));
    }
}
