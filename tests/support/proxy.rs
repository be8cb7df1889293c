//! imapgate started in-process on a loopback port chosen at run time, stopped by dropping its handle.

use std::net::SocketAddr;

use imapgate::app::Prepared;
use imapgate::config::Config;
use tokio::sync::oneshot;

use super::pki::Pki;

/// A `[[backend]]` section for a Dovecot port on 127.0.0.1, verified as "localhost".
pub fn backend(name: &str, port: u16) -> String {
    format!("[[backend]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\ntls_name = \"localhost\"\n")
}

/// Defence settings for tests that are not about the defence: every test connects from 127.0.0.1, so
/// the per-address limits are wide and the tarpit short.
pub const DEFAULT_TEST_DEFENCE: &str =
    "[defence]\ntarpit_ms = [20]\nconnection_rate_per_minute = 100000\nconnection_burst = 1000\nauth_in_flight = 20\n";

/// A configuration listening on 127.0.0.1:0 with the test PKI; `rest` adds backends, routes, overrides.
pub fn config_text(pki: &Pki, rest: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
handshake_timeout_secs = 5
preauth_idle_timeout_secs = 30
shutdown_grace_secs = 1

[admin]
listen = "127.0.0.1:0"

[tls]
cert = "{cert}"
key = "{key}"

[backend_tls]
ca = "{ca}"
connect_timeout_secs = 3
login_timeout_secs = 10

{rest}
{defence}
{audit}
{state}
"#,
        defence = if rest.contains("[defence]") { "" } else { DEFAULT_TEST_DEFENCE },
        audit = if rest.contains("[audit]") { "" } else { "[audit]\npath = \"off\"\n" },
        // Tests that are not about the defence's memory keep none (the default is under /var/lib).
        state = if rest.contains("[state]") { "" } else { "[state]\npath = \"off\"\n" },
        cert = pki.cert.display(),
        key = pki.key.display(),
        ca = pki.ca.display()
    )
}

/// `text` (a `config_text`) with the admin API on: `tokens` (lines `name role token`) written to a file in
/// `dir`, named by `[admin] token_file`.
pub fn with_admin_tokens(text: &str, dir: &std::path::Path, tokens: &str) -> String {
    let path = dir.join("admin-tokens");
    std::fs::write(&path, tokens).unwrap();
    text.replacen("[admin]\n", &format!("[admin]\ntoken_file = \"{}\"\n", path.display()), 1)
}

pub struct TestProxy {
    pub addr: SocketAddr,
    /// The first `server.starttls_listen` address, when there is one.
    pub starttls: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub defence: std::sync::Arc<imapgate::security::Defence>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestProxy {
    /// Starts the proxy on the current tokio runtime.
    pub async fn start(config_text: &str) -> TestProxy {
        init_logging();
        let config = Config::from_toml(config_text, None).unwrap_or_else(|e| panic!("config: {e}\n{config_text}"));
        Self::serve(Prepared::new(config).expect("prepare")).await
    }

    /// Starts the proxy from a configuration file, which SIGHUP reloads (any SIGHUP to the test process).
    pub async fn start_from_file(path: &std::path::Path) -> TestProxy {
        init_logging();
        let config = Config::load(path).unwrap_or_else(|e| panic!("config {}: {e}", path.display()));
        Self::serve(Prepared::new(config).expect("prepare").with_config_path(path.to_owned())).await
    }

    async fn serve(prepared: Prepared) -> TestProxy {
        let proxy = prepared.bind().await.expect("bind");
        let addr = proxy.local_addrs()[0];
        let starttls = proxy.starttls_addrs().first().copied();
        let defence = proxy.defence();
        let admin = proxy.admin_addr().expect("admin address");
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(proxy.serve(async {
            let _ = stopped.await;
        }));
        TestProxy { addr, starttls, admin, defence, stop: Some(stop), task: Some(task) }
    }

    /// Shuts down gracefully and waits for the drain.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Logs to the test's captured output (shown on failure or with --nocapture).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "imapgate=debug".into()))
        .with_test_writer()
        .try_init();
}

/// A proxy in front of `port` as the default backend "mbox", with the test defaults.
pub async fn in_front_of(pki: &Pki, port: u16, extra: &str) -> TestProxy {
    let rest = format!("{}\n[route]\ndefault = \"mbox\"\n{extra}", backend("mbox", port));
    TestProxy::start(&config_text(pki, &rest)).await
}
