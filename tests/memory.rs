//! The defence remembers across a restart of the binary (`[state] path`), in front of a real Dovecot: a
//! ban with its time left, and an account under attack that stays blocked for unfamiliar addresses while
//! its familiar one still logs in. A truncated file is ignored with a warning and the process starts
//! without it (which also shows what the restart would have forgotten).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::IpAddr;
use std::time::Duration;

use support::client::{self, TlsClient};
use support::dovecot::Dovecot;
use support::gate::{BINARY, Gate};
use support::pki::Pki;

const USER: &str = "alice@example.org";
/// A ban when an address's counted failures go over 2; the account blocked for unfamiliar addresses after 3 failures.
const DEFENCE: &str = "[defence]\ntarpit_ms = [20]\nconnection_rate_per_minute = 100000\nconnection_burst = 1000\n\
     auth_in_flight = 20\nfailures = 2\naccount_delay_after = 10\naccount_block_after = 3\nrepeat_secs = 0\n";

/// Connects from `source` and reads the greeting; an error when refused before TLS (banned).
async fn client_from(gate: &Gate, ca: &std::path::Path, source: &str) -> std::io::Result<TlsClient> {
    let ip: IpAddr = source.parse().unwrap();
    let mut c = TlsClient::connect_from(Some(ip), gate.addr, client::tls_config(ca, &[b"imap"])).await?;
    let greeting = c.line().await?;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    Ok(c)
}

async fn login_from(gate: &Gate, ca: &std::path::Path, source: &str, password: &str) -> String {
    let mut c = client_from(gate, ca, source).await.unwrap();
    c.command("l", &format!("LOGIN \"{USER}\" \"{password}\"")).await.unwrap().tagged
}

fn start(dir: &std::path::Path, pki: &Pki, dovecot: &Dovecot) -> Gate {
    // The same name each time: the same configuration, and the same memory file.
    Gate::start_with_env(dir, pki, dovecot, "memory", DEFENCE, &[(BINARY, env!("CARGO_BIN_EXE_imapgate"))])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_and_a_familiar_prefix_survive_a_restart() {
    let dir = support::scratch_dir("imapgate-memory-");
    let pki = Pki::generate(&dir);
    let dovecot = Dovecot::start("memory", &pki, &[]);
    let password = support::dovecot::password(USER);
    let memory = dir.join("memory-defence.json");

    let gate = start(&dir, &pki, &dovecot);
    // The owner logs in from 127.0.0.1: a familiar prefix.
    assert!(login_from(&gate, &pki.ca, "127.0.0.1", password).await.starts_with("l OK"));
    // An attacker at 127.0.0.2 fails three times: over its budget of 2, banned; and the account blocked
    // for unfamiliar prefixes.
    // Three different guesses (a repeated wrong pair counts once).
    for guess in ["guess-1", "guess-2", "guess-3"] {
        let refused = login_from(&gate, &pki.ca, "127.0.0.2", guess).await;
        assert!(refused.starts_with("l NO"), "{refused}");
    }
    assert!(client_from(&gate, &pki.ca, "127.0.0.2").await.is_err(), "banned before the restart");
    let blocked = login_from(&gate, &pki.ca, "127.0.0.3", password).await;
    assert!(blocked.starts_with("l NO"), "unfamiliar 127.0.0.3 let in before the restart: {blocked}");

    let log = gate.terminate();
    let written = std::fs::read_to_string(&memory).unwrap_or_else(|e| panic!("no memory written ({e}):\n{log}"));
    assert!(!written.contains("alice"), "an account name in clear: {written}");
    assert!(!written.contains(password) && !written.contains("guess"), "a password in the memory");

    // After the restart: still banned, still blocked for the unfamiliar, open to the familiar.
    let gate = start(&dir, &pki, &dovecot);
    assert!(client_from(&gate, &pki.ca, "127.0.0.2").await.is_err(), "the ban was forgotten");
    let blocked = login_from(&gate, &pki.ca, "127.0.0.4", password).await;
    assert!(blocked.starts_with("l NO"), "the account's block was forgotten: {blocked}");
    let familiar = login_from(&gate, &pki.ca, "127.0.0.1", password).await;
    assert!(familiar.starts_with("l OK"), "the familiar prefix was forgotten: {familiar}");
    let log = gate.terminate();
    assert!(log.contains("defence_restored"), "{log}");

    // A truncated file: a warning, a start without it (the ban is gone), and a good file at the stop.
    let bytes = std::fs::read(&memory).unwrap();
    std::fs::write(&memory, &bytes[..bytes.len() / 2]).unwrap();
    let gate = start(&dir, &pki, &dovecot);
    let forgotten = client_from(&gate, &pki.ca, "127.0.0.2").await;
    assert!(forgotten.is_ok(), "a truncated memory still banned 127.0.0.2");
    drop(forgotten);
    let log = gate.terminate();
    let warning = log.lines().find(|l| l.contains("defence_memory_ignored")).unwrap_or_else(|| panic!("{log}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        support::wait_until(Duration::from_secs(1), || {
            imapgate::security::snapshot::decode(&std::fs::read(&memory).ok()?).ok()
        })
        .is_some()
    );
}
