//! The binary's command line: `check` validates and prints routes; bad configuration exits 64 naming the key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use support::pki::Pki;

fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn valid(pki: &Pki) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[backend_tls]\nca = \"{}\"\n\
         [[backend]]\nname = \"mbox1\"\naddress = \"mail.internal:143\"\n\
         [[backend]]\nname = \"mbox2\"\naddress = \"[::1]:143\"\ntls_name = \"localhost\"\n\
         [route]\ndefault = \"mbox1\"\n[[route.rule]]\ndomain = \"example.org\"\nbackend = \"mbox2\"\n",
        pki.cert.display(),
        pki.key.display(),
        pki.ca.display()
    )
}

#[test]
fn check_prints_effective_routes() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let config = write_config(dir.path(), &valid(&pki));
    let out = Command::new(env!("CARGO_BIN_EXE_imapgate")).arg("check").arg("--config").arg(&config).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("domain @example.org -> mbox2"), "{stdout}");
    assert!(stdout.contains("default -> mbox1"), "{stdout}");
    assert!(stdout.contains("backend mbox2 = ::1:143 (tls name localhost)"), "{stdout}");
}

#[test]
fn bad_configuration_exits_64_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    for (broken, key) in [
        (valid(&pki).replace("default = \"mbox1\"", "default = \"mbox9\""), "route.default"),
        (valid(&pki).replace(&pki.key.display().to_string(), "/nonexistent/key.pem"), "tls.key"),
        (valid(&pki).replace("127.0.0.1:0", "localhost"), "server.listen[0]"),
    ] {
        let config = write_config(dir.path(), &broken);
        for args in [&["check", "--config"][..], &["--config"][..]] {
            let out = Command::new(env!("CARGO_BIN_EXE_imapgate")).args(args).arg(&config).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{args:?} {key}: {stderr}");
            assert!(stderr.contains(key), "{args:?}: {stderr} should name {key}");
        }
    }
}

#[test]
fn plaintext_backends_are_warned_about_at_start_up() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let text = valid(&pki).replace("[backend_tls]\n", "[backend_tls]\nmode = \"plain\"\nallow_plaintext = true\n")
        + "[admin]\nlisten = \"127.0.0.1:0\"\n[audit]\npath = \"off\"\n";
    let config = write_config(dir.path(), &text);
    let mut child = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let warned = rx.recv_timeout(std::time::Duration::from_secs(10));
    let _ = child.kill();
    let _ = child.wait();
    let line = warned.expect("a warning line");
    assert!(line.contains("unencrypted"), "{line}");
}

/// Runs the binary with `config` and the given RUST_LOG (none: the configured level), lets `client` talk
/// to its listener, then stops it (SIGTERM) and returns its stderr.
fn stderr_around(config: &std::path::Path, port: u16, rust_log: Option<&str>, client: impl FnOnce()) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_imapgate"));
    command.arg("--config").arg(config).env_remove("RUST_LOG").stderr(std::process::Stdio::piped());
    if let Some(filter) = rust_log {
        command.env("RUST_LOG", filter);
    }
    /// Stops the child however the test ends, so that no process outlives it.
    struct Stop(Option<std::process::Child>);
    impl Drop for Stop {
        fn drop(&mut self) {
            if let Some(child) = &mut self.0 {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let mut child = Stop(Some(command.spawn().unwrap()));
    let up = support::wait_until(std::time::Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    });
    assert!(up.is_some(), "imapgate did not listen");
    client();
    let running = child.0.take().unwrap();
    let _ = Command::new("kill").arg("-TERM").arg(running.id().to_string()).status();
    let out = running.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_ip_address_as_sni_is_not_a_warning_at_the_default_level() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let port = support::free_port();
    let text = valid(&pki).replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
        + "[admin]\nlisten = \"127.0.0.1:0\"\n[audit]\npath = \"off\"\n";
    let config = write_config(dir.path(), &text);
    // openssl sends an IP literal as SNI when asked to (rustls clients never do).
    let ip_sni = || {
        use std::io::Write;
        let mut openssl = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", "127.0.0.1"])
            .args(["-crlf", "-ign_eof", "-quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl");
        // LOGOUT: the proxy says BYE and closes, and openssl ends.
        openssl.stdin.take().unwrap().write_all(b"a LOGOUT\n").unwrap();
        let out = openssl.wait_with_output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("a OK Logout"), "{out:?}");
    };
    let noisy = stderr_around(&config, port, Some("info"), ip_sni);
    assert!(noisy.contains("Illegal SNI"), "the dependency does warn (the test can fail): {noisy}");
    let quiet = stderr_around(&config, port, None, ip_sni);
    assert!(!quiet.contains("Illegal SNI"), "{quiet}");
    assert!(quiet.contains("session end"), "the session was logged: {quiet}");
}

/// `deploy/systemd/imapgate.service` with ExecStart pointing at this build.
fn unit_for_this_build(dir: &std::path::Path) -> (String, std::path::PathBuf) {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/imapgate.service"),
    )
    .unwrap();
    let path = dir.join("imapgate.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/imapgate", env!("CARGO_BIN_EXE_imapgate"))).unwrap();
    (unit, path)
}

#[test]
fn the_systemd_unit_verifies_is_hardened_and_matches_the_shipped_config() {
    let dir = tempfile::tempdir().unwrap();
    let (unit, path) = unit_for_this_build(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package 'systemd'; scripts/test.sh installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
    // systemd-analyze security: exposure 1.6 of 10 today; the threshold is in tenths.
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(security.status.success(), "{}", String::from_utf8_lossy(&security.stdout));
    // The shipped configuration's paths are the ones the unit provides.
    let shipped = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml")).unwrap();
    assert!(shipped.contains("path = \"/var/log/imapgate/audit.log\"") && unit.contains("LogsDirectory=imapgate"));
    assert!(unit.contains("--config /etc/imapgate/proxy.toml") && unit.contains("ReadOnlyPaths=/etc/imapgate"));
    assert!(shipped.contains("cert = \"/etc/imapgate/") && shipped.contains("key = \"/etc/imapgate/"));
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    // Readiness and the upgrade's MAINPID= from the successor's predecessor.
    assert!(unit.contains("Type=notify") && unit.contains("NotifyAccess=all"));
    // The socket unit: its ListenStream addresses are the shipped configuration's listeners (matched by
    // address at start-up), and it verifies with the service beside it.
    let socket = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/imapgate.socket"),
    )
    .unwrap();
    let config = imapgate::config::Config::from_toml(&shipped, None).unwrap();
    for addr in config.server.listen.iter().chain(std::iter::once(&config.admin.listen)) {
        assert!(socket.contains(&format!("\nListenStream={addr}\n")), "{addr} not in imapgate.socket");
    }
    let socket_path = dir.path().join("imapgate.socket");
    std::fs::write(&socket_path, &socket).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&socket_path).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify imapgate.socket: {stderr}");
}

#[test]
fn check_never_opens_the_audit_file() {
    // As ExecStartPre runs it: the shipped proxy.toml (certificates swapped for test ones), its audit path in
    // a directory that does not exist and cannot be made.
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let shipped = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml")).unwrap();
    let audit = "/proc/imapgate-no-such-dir/audit.log";
    let text = shipped
        .replace("/etc/imapgate/fullchain.pem", &pki.cert.display().to_string())
        .replace("/etc/imapgate/privkey.pem", &pki.key.display().to_string())
        .replace("/etc/imapgate/backend-ca.pem", &pki.ca.display().to_string())
        .replace("/var/log/imapgate/audit.log", audit);
    let config = write_config(dir.path(), &text);
    let out = Command::new(env!("CARGO_BIN_EXE_imapgate")).arg("check").arg("--config").arg(&config).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Starting for real does open it, and says so.
    let out = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .arg("--config")
        .arg(&config)
        .env("IMAPGATE_SERVER__LISTEN", "[\"127.0.0.1:0\"]")
        .env("IMAPGATE_ADMIN__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("audit.path"), "{}", String::from_utf8_lossy(&out.stderr));
}
