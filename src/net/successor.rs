//! An upgrade in place (SIGUSR2, as nginx's binary upgrade): the running process starts the binary now
//! installed at its path, with its own arguments, hands it every listening socket (`LISTEN_FDS`, named in
//! `LISTEN_FDNAMES`, see `net::inherit`), and waits until the successor says it is ready over a notify
//! socket of the old process's own (`READY=1`, the sd_notify protocol). The sockets are the same kernel
//! sockets, with their accept queues: while both processes hold them nothing is refused, and once the old
//! one stops accepting the new one takes every connection. Under systemd the old process then tells the
//! manager the successor's PID (`MAINPID=`), so the unit follows it.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram as StdDatagram;
use std::path::Path;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};

use crate::net::notify;

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("notify socket: {0}")]
    Notify(std::io::Error),
    #[error("descriptors for the successor: {0}")]
    Mapping(#[from] command_fds::FdMappingCollision),
    #[error("starting {path}: {source}")]
    Spawn { path: String, source: std::io::Error },
    #[error("the successor exited before it was ready ({0})")]
    Exited(std::process::ExitStatus),
    #[error("the successor was not ready within {0:?}; stopped it")]
    Timeout(Duration),
}

/// Starts `exe` with `args` and the listening `sockets` (name, descriptor), and waits up to `within` for
/// it to be ready. Returns its process id; on an error the successor is stopped (if it ran) and this
/// process carries on as before.
pub async fn start(
    exe: &Path,
    args: &[OsString],
    sockets: Vec<(String, OwnedFd)>,
    within: Duration,
) -> Result<u32, UpgradeError> {
    let name = format!("imapgate-upgrade-{}-{:016x}", std::process::id(), rand::random::<u64>());
    let listener = StdDatagram::bind_addr(&notify::address(&format!("@{name}")).map_err(UpgradeError::Notify)?)
        .map_err(UpgradeError::Notify)?;
    listener.set_nonblocking(true).map_err(UpgradeError::Notify)?;
    let listener = tokio::net::UnixDatagram::from_std(listener).map_err(UpgradeError::Notify)?;
    let names: Vec<String> = sockets.iter().map(|(n, _)| n.clone()).collect();
    let mut command = std::process::Command::new(exe);
    command
        .args(args)
        .env("LISTEN_FDS", sockets.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        // The successor's PID is not known before it starts; listenfd accepts the sockets without it.
        .env_remove("LISTEN_PID")
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .stdin(std::process::Stdio::null());
    let mappings = sockets
        .into_iter()
        .enumerate()
        .map(|(i, (_, fd))| FdMapping { parent_fd: fd, child_fd: 3 + i as i32 })
        .collect();
    command.fd_mappings(mappings)?;
    let mut child = tokio::process::Command::from(command)
        .spawn()
        .map_err(|source| UpgradeError::Spawn { path: exe.display().to_string(), source })?;
    let pid = child.id().unwrap_or(0);
    tracing::info!(successor = pid, path = %exe.display(), "upgrade: successor started");
    let deadline = tokio::time::sleep(within);
    tokio::pin!(deadline);
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            received = listener.recv(&mut buf) => {
                if let Ok(n) = received {
                    if notify::says_ready(&buf[..n], pid) {
                        break;
                    }
                }
            }
            status = child.wait() => {
                return Err(match status {
                    Ok(status) => UpgradeError::Exited(status),
                    Err(e) => UpgradeError::Spawn { path: exe.display().to_string(), source: e },
                });
            }
            () = &mut deadline => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(UpgradeError::Timeout(within));
            }
        }
    }
    if let Some(manager) = notify::socket_from_env() {
        if let Err(e) = notify::send(&manager, &format!("MAINPID={pid}\nREADY=1")) {
            tracing::warn!(error = %e, "could not tell the service manager the successor's PID");
        }
    }
    Ok(pid)
}
