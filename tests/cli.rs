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
