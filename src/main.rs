//! The `imapgate` binary: parse the command line, load and validate the configuration, start.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use imapgate::app::{Prepared, Upgrade};
use imapgate::config::Config;
use imapgate::net::inherit::Inherited;
use imapgate::route::Router;

/// Exit status for configuration errors (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(version, about = "A transparent, TLS-terminating IMAP proxy")]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, default_value = "/etc/imapgate/proxy.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration (including certificates) and print the effective routes.
    Check,
    /// Ask a running imapgate to leave slowly (SIGQUIT: stop accepting, sessions asked to reconnect over
    /// server.drain_spread_secs) and wait until it has exited: a Kubernetes preStop hook.
    Leave {
        /// The process (in a container, imapgate is process 1).
        #[arg(long, default_value_t = 1)]
        pid: i32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("imapgate: invalid configuration {}:\n{errors}", cli.config.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Command::Leave { pid }) = cli.command {
        return leave(
            pid,
            config.server.drain_spread + config.server.shutdown_grace + std::time::Duration::from_secs(2),
        );
    }
    let router = Router::new(&config);
    let checking = matches!(cli.command, Some(Command::Check));
    // Logging first, so that start-up warnings (e.g. plaintext backends) are seen; `check` only prints.
    let telemetry = if checking {
        None
    } else {
        match imapgate::telemetry::init(&config.log, config.otel.as_ref()) {
            Ok(guard) => Some(guard),
            Err(e) => {
                eprintln!("imapgate: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    };
    if checking {
        // Validates without opening the audit file: the check must not need the service's directories.
        if let Err(e) = Prepared::check(config) {
            eprintln!("imapgate: invalid configuration {}:\n{e}", cli.config.display());
            return ExitCode::from(EXIT_CONFIG);
        }
        println!("configuration {} is valid", cli.config.display());
        for line in router.describe() {
            println!("  {line}");
        }
        return ExitCode::SUCCESS;
    }
    // The path as it is now: an upgrade starts whatever binary is installed there by then.
    let upgrade = std::env::current_exe().ok().map(|exe| Upgrade { exe, args: std::env::args_os().skip(1).collect() });
    let prepared = match Prepared::new(config) {
        Ok(prepared) => {
            let prepared = prepared.with_config_path(cli.config.clone()).with_inherited(Inherited::from_env());
            match upgrade {
                Some(upgrade) => prepared.with_upgrade(upgrade),
                None => prepared,
            }
        }
        Err(e) => {
            eprintln!("imapgate: invalid configuration {}:\n{e}", cli.config.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = run(prepared);
    // Flushes the last spans before exit.
    drop(telemetry);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imapgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(prepared: Prepared) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(async {
        let proxy = prepared.bind().await?;
        proxy.serve(shutdown_signal()).await;
        Ok(())
    });
    // Sessions are gone by now; nothing left may hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// Sends SIGQUIT to `pid` and waits (at most `within`) until it has exited.
fn leave(pid: i32, within: std::time::Duration) -> ExitCode {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let target = Pid::from_raw(pid);
    if let Err(e) = kill(target, Signal::SIGQUIT) {
        eprintln!("imapgate leave: cannot signal process {pid}: {e}");
        return ExitCode::FAILURE;
    }
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if kill(target, None).is_err() || zombie(pid) {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    eprintln!("imapgate leave: process {pid} still running after {}s", within.as_secs());
    ExitCode::FAILURE
}

/// Whether `pid` has exited and only waits to be reaped (state `Z` in /proc/<pid>/stat).
fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}
