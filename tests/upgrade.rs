//! An upgrade in place of the imapgate binary (a separate process, SIGUSR2) in front of a real Dovecot,
//! with a thousand IDLE sessions open, a client connecting in a loop and a large FETCH under way:
//! - no connection is refused or left without a greeting across the hand-over;
//! - every old session ends with `* BYE` (when quiet, never inside a response) spread over
//!   `drain_spread_secs`, none in the first second; its client reconnects to the successor;
//! - Dovecot's logins per second during the window stay under 2.5 times the window's mean (a burst of
//!   every reconnect at once is far above);
//! - every FETCH of the large message arrives whole;
//! - the old process exits after its sessions, and the successor serves on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::client::TlsClient;
use support::dovecot::Dovecot;
use support::gate::{BINARY, Gate};
use support::pki::Pki;
use support::upgrade::{self, Pid, login, next_line};

const IDLERS: usize = 1000;
const SPREAD_SECS: u64 = 20;
const BIG: usize = 8 * 1024 * 1024;

struct Env {
    dir: std::path::PathBuf,
    pki: Pki,
    dovecot: Dovecot,
}

/// One Dovecot for the test binary, for crowds, with a large message for fetcher@example.org.
fn env() -> &'static Env {
    static ENV: std::sync::OnceLock<Env> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let dir = support::scratch_dir("imapgate-upgrade-");
        let pki = Pki::generate(&dir);
        let dovecot = Dovecot::start_for_crowds("upgrade", &pki);
        let line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/\r\n";
        let big = format!("Subject: big\r\n\r\n{}", line.repeat(BIG / 66));
        dovecot.deliver("fetcher@example.org", "big.eml", big.as_bytes());
        Env { dir, pki, dovecot }
    })
}

/// Started as systemd starts a socket-activated service (systemd-socket-activate binds the ports, waits
/// for the first connection, then runs imapgate with LISTEN_FDS): the configured listeners take the
/// sockets by address, and the connection that woke it, queued meanwhile, is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_the_queued_connection() {
    let Env { dir, pki, dovecot } = env();
    let (port, admin) = (support::free_port(), support::free_port());
    let config = dir.join("activated.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[audit]\npath = \"off\"\n\
             [tls]\ncert = \"{}\"\nkey = \"{}\"\n[backend_tls]\nca = \"{}\"\n\
             [[backend]]\nname = \"dovecot\"\naddress = \"127.0.0.1:{}\"\ntls_name = \"localhost\"\n\
             [route]\ndefault = \"dovecot\"\n[log]\nlevel = \"info\"\n{}",
            pki.cert.display(),
            pki.key.display(),
            pki.ca.display(),
            dovecot.imap_port,
            support::proxy::DEFAULT_TEST_DEFENCE
        ),
    )
    .unwrap();
    let log_path = dir.join("activated.log");
    let mut child = std::process::Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{port}"), "-l", &format!("127.0.0.1:{admin}")])
        .arg(env!("CARGO_BIN_EXE_imapgate"))
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("systemd-socket-activate (Debian package 'systemd')");
    let pid = Pid(child.id());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The manager's socket is listening before imapgate runs; this connection starts it.
    let (user, password) = ("alice@example.org", support::dovecot::password("alice@example.org"));
    let mut client = None;
    for _ in 0..100 {
        match TlsClient::connect(addr, &pki.ca).await {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let mut client = client.expect("systemd-socket-activate did not listen");
    assert!(client.line().await.unwrap().starts_with("* OK"));
    let reply = client.command("l", &format!("LOGIN \"{user}\" \"{password}\"")).await.unwrap();
    assert!(reply.tagged.starts_with("l OK"), "{reply:?}");
    assert!(client.command("z", "LOGOUT").await.unwrap().tagged.starts_with("z OK"));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(log.matches("using an inherited socket").count(), 2, "{log}");
    let (status, _) = support::admin_get(format!("127.0.0.1:{admin}").parse().unwrap(), "/healthz").await;
    assert_eq!(status, 200);
    drop(pid);
    let _ = child.wait();
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_refuses_nobody_and_spreads_the_reconnects() {
    let Env { dir, pki, dovecot } = env();
    let extra = format!(
        "{}connections_per_prefix = 5000\nconnections_per_prefix_max = 10000\n",
        support::proxy::DEFAULT_TEST_DEFENCE
    );
    let spread = SPREAD_SECS.to_string();
    let old = Gate::start_with_env(
        dir,
        pki,
        dovecot,
        "old",
        &extra,
        &[(BINARY, env!("CARGO_BIN_EXE_imapgate")), ("IMAPGATE_SERVER__DRAIN_SPREAD_SECS", &spread)],
    );
    let (addr, ca) = (old.addr, pki.ca.clone());
    let (user, password) = ("alice@example.org", support::dovecot::password("alice@example.org"));

    // A thousand IDLE sessions; each records when its BYE came, reconnects and logs in again.
    let idlers = upgrade::idlers(addr, &ca, user, password, IDLERS, 50).await;
    // A client connecting in a loop: every connection must be greeted.
    let stop = Arc::new(AtomicBool::new(false));
    let looping = upgrade::connect_loop(addr, ca.clone(), Arc::clone(&stop));

    // A FETCH of the large message again and again, across the hand-over, until its BYE.
    let fetching = {
        let ca = ca.clone();
        tokio::spawn(async move {
            let mut client =
                login(addr, &ca, "fetcher@example.org", support::dovecot::password("fetcher@example.org")).await;
            client.command("s", "EXAMINE INBOX").await.unwrap();
            let mut whole = 0usize;
            for n in 0.. {
                let tag = format!("f{n}");
                client.send(format!("{tag} UID FETCH 1:* BODY.PEEK[]\r\n").as_bytes()).await.unwrap();
                match client.until_tagged(&tag).await {
                    Ok(reply) => {
                        assert!(reply.tagged.starts_with(&format!("{tag} OK")), "{}", reply.tagged);
                        let longest = reply.literals.iter().map(Vec::len).max().unwrap_or(0);
                        assert!(longest >= BIG, "a FETCH arrived cut: {longest} bytes");
                        whole += 1;
                        if reply.lines.iter().any(|l| l.starts_with("* BYE")) {
                            return whole;
                        }
                    }
                    Err(e) => {
                        // Only between commands: the BYE came after the last tagged OK.
                        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
                        return whole;
                    }
                }
            }
            whole
        })
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    // Dovecot's log from here on is the window's.
    let before = dovecot.log().len();
    let signalled = Instant::now();
    let _ = std::process::Command::new("kill").arg("-USR2").arg(old.pid().to_string()).status();
    let successor = upgrade::successor_from_log(&old.log, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no hand-over:\n{}", std::fs::read_to_string(&old.log).unwrap_or_default()));
    let _successor = Pid(successor);

    let mut byes = Vec::new();
    for idler in idlers {
        byes.push(idler.await.unwrap().duration_since(signalled));
    }
    byes.sort();
    let whole = fetching.await.unwrap();
    assert!(whole >= 2, "the FETCH loop ran {whole} times");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let (greeted, failed) = looping.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {:?}",
        failed.len(),
        greeted + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(greeted > 50, "{greeted}");

    let (first, last) = (byes[0], byes[byes.len() - 1]);
    assert!(first >= Duration::from_secs(1), "a BYE {first:?} after the upgrade signal");
    assert!(last <= Duration::from_secs(SPREAD_SECS + 5), "the last BYE {last:?} after the upgrade signal");
    // Spread, not bunched: each quarter of the window has a fair share.
    for quarter in 0..4u32 {
        let from = Duration::from_secs(1) + Duration::from_secs(SPREAD_SECS - 1) * quarter / 4;
        let to = Duration::from_secs(1) + Duration::from_secs(SPREAD_SECS - 1) * (quarter + 1) / 4;
        let n = byes.iter().filter(|b| **b >= from && **b < to + Duration::from_secs(2)).count();
        assert!(n >= IDLERS / 8, "{n} BYEs in quarter {quarter} ({from:?}..{to:?})");
    }

    // Dovecot's login rate over the window: the reconnects (and the loop's none: it does not log in).
    let per_second = upgrade::logins_per_second(&dovecot.log()[before..]);
    let busiest = per_second.values().copied().max().unwrap_or(0);
    let mean = IDLERS as f64 / (SPREAD_SECS - 1) as f64;
    eprintln!(
        "upgrade: {IDLERS} sessions, BYEs from {first:?} to {last:?} after SIGUSR2; loop: {greeted} greeted, {} failed; \
         {whole} whole FETCHes; Dovecot logins per second: busiest {busiest}, window mean {mean:.0}",
        failed.len()
    );
    assert!((busiest as f64) < 2.5 * mean + 10.0, "{busiest} logins in one second (mean {mean:.0}/s): {per_second:?}");

    // The old process leaves once its sessions are gone; the successor serves.
    let mut old = old;
    let exited = support::wait_until(Duration::from_secs(15), || old.try_wait());
    assert!(exited.is_some(), "the old process did not exit");
    let mut client = login(addr, &ca, user, password).await;
    assert!(client.command("z", "LOGOUT").await.unwrap().tagged.starts_with("z OK"));
}

/// `imapgate leave` (the Kubernetes preStop hook) without a successor: the process stops accepting, its
/// sessions get `* BYE` within the spread, and the command returns once the process has exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_without_a_successor() {
    let Env { dir, pki, dovecot } = env();
    let spread = ("IMAPGATE_SERVER__DRAIN_SPREAD_SECS", "3");
    let mut gate = Gate::start_with_env(
        dir,
        pki,
        dovecot,
        "leaving",
        support::proxy::DEFAULT_TEST_DEFENCE,
        &[(BINARY, env!("CARGO_BIN_EXE_imapgate")), spread],
    );
    let (user, password) = ("alice@example.org", support::dovecot::password("alice@example.org"));
    let mut client = login(gate.addr, &pki.ca, user, password).await;
    client.command("s", "SELECT INBOX").await.unwrap();
    client.send(b"i IDLE\r\n").await.unwrap();
    assert!(next_line(&mut client).await.unwrap().starts_with("+ "));
    let started = Instant::now();
    let leave = std::process::Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["leave", "--pid", &gate.pid().to_string(), "--config"])
        .arg(dir.join("leaving.toml"))
        .env(spread.0, spread.1)
        .spawn()
        .unwrap();
    let bye = next_line(&mut client).await.unwrap();
    assert!(bye.starts_with("* BYE") && bye.contains("reconnect"), "{bye}");
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(1) && took <= Duration::from_secs(5), "BYE after {took:?}");
    let status = tokio::task::spawn_blocking(move || leave.wait_with_output().unwrap().status).await.unwrap();
    assert!(status.success(), "imapgate leave: {status}");
    assert!(gate.try_wait().is_some(), "imapgate leave returned before the process exited");
}
