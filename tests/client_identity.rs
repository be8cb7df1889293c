//! The real client behind a load balancer or a webmail server: a real HAProxy with `send-proxy-v2` in front
//! of imapgate (Dovecot's log shows the client, a ban hits the client and not the balancer), raw PROXY v1
//! and v2 headers (IPv4 and IPv6 sources, TLVs, truncated, oversized, from an untrusted peer, LOCAL), and
//! webmail-style `ID` forwarding accepted from a trusted peer only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::v2::{Builder, Command, Protocol, Type, Version};
use support::client::{self, TlsClient};
use support::haproxy::Haproxy;
use support::proxy::{TestProxy, backend, config_text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USERS: &[&str] = &[
    "pp-v1@example.org",
    "pp-v2@example.org",
    "pp-none@example.org",
    "hx-user@example.org",
    "hx-other@example.org",
    "hx-victim@example.org",
    "wm-user@example.org",
    "wm-other@example.org",
    "wm-victim@example.org",
    "sp-user@example.org",
];
const PASSWORD: &str = "right-pw";

fn env() -> &'static support::Env {
    static EXTRA: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    let extra = EXTRA.get_or_init(|| USERS.iter().map(|u| (u.to_string(), PASSWORD.to_string())).collect());
    support::env("identity", extra)
}

async fn proxy(server: &str, defence: &str) -> TestProxy {
    let env = env();
    let text = config_text(
        &env.pki,
        &format!(
            "{}\n[route]\ndefault = \"mbox\"\n[defence]\ntarpit_ms = [20]\n{defence}\n",
            backend("mbox", env.dovecot.imap_port)
        ),
    );
    // The server section comes first in the generated text; add keys to it.
    let text = text.replacen("[server]\n", &format!("[server]\n{server}\n"), 1);
    TestProxy::start(&text).await
}

fn tls() -> std::sync::Arc<rustls::ClientConfig> {
    client::tls_config(&env().pki.ca, &[b"imap"])
}

async fn greeted(mut c: TlsClient) -> TlsClient {
    let greeting = c.line().await.unwrap();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    c
}

async fn login(c: &mut TlsClient, user: &str, password: &str) -> String {
    c.command("l", &format!("LOGIN {user} \"{password}\"")).await.unwrap().tagged
}

/// Dovecot's login line for `user` that names `rip`.
fn dovecot_saw(user: &str, rip: &str) -> Option<String> {
    let found = env().dovecot.wait_for_log_line(&["Login: ", &format!("user=<{user}>"), &format!("rip={rip},")]);
    if found.is_none() {
        let needle = format!("user=<{user}>");
        let lines: Vec<String> =
            env().dovecot.log().lines().filter(|l| l.contains(&needle)).map(String::from).collect();
        eprintln!("Dovecot's lines for {user}:\n{}", lines.join("\n"));
    }
    found
}

/// Writes `bytes` from `source` and says whether imapgate closed the connection without TLS.
async fn closed_before_tls(proxy: &TestProxy, source: &str, bytes: &[u8], then_close: bool) -> bool {
    let mut tcp = client::tcp_from(Some(source.parse().unwrap()), proxy.addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    if then_close {
        tcp.shutdown().await.unwrap();
    }
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

fn v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (source, destination))
        .write_tlv(Type::Authority, b"imap.example.org")
        .unwrap()
        .write_tlv(Type::UniqueId, b"conn-42")
        .unwrap()
        .build()
        .unwrap()
}

async fn metric(proxy: &TestProxy, line: &str) -> bool {
    let (_, body) = support::admin_get(proxy.admin, "/metrics").await;
    body.lines().any(|l| l == line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_passes_the_real_client_and_a_ban_hits_the_client_not_the_balancer() {
    let gate = proxy(
        "proxy_protocol = \"required\"\nproxy_protocol_from = [\"127.0.0.1/32\"]",
        "failures = 2\nban_secs = 60\n",
    )
    .await;
    let haproxy = Haproxy::start(&[gate.addr]);
    let via = |source: &str| {
        let source: IpAddr = source.parse().unwrap();
        TlsClient::connect_from(Some(source), haproxy.addr, tls())
    };

    let mut c = greeted(via("127.0.0.44").await.unwrap()).await;
    assert!(login(&mut c, "hx-user@example.org", PASSWORD).await.starts_with("l OK"));
    let line = dovecot_saw("hx-user@example.org", "127.0.0.44").expect("Dovecot logs the client behind HAProxy");
    assert!(line.contains("lip=127.0.0.1"), "{line}");

    // An attacker behind the same balancer: three wrong passwords ban its own address.
    let mut attacker = greeted(via("127.0.0.45").await.unwrap()).await;
    for i in 0..3 {
        let reply = login(&mut attacker, "hx-victim@example.org", &format!("wrong-{i}")).await;
        assert!(reply.starts_with("l NO [AUTHENTICATIONFAILED]"), "{reply}");
    }
    assert!(gate.defence.is_banned("127.0.0.45".parse().unwrap()));
    assert!(!gate.defence.is_banned("127.0.0.1".parse().unwrap()), "the balancer is not banned");
    assert!(via("127.0.0.45").await.is_err(), "the banned client is refused before TLS, through the balancer");
    // Everyone else behind the balancer carries on.
    let mut other = greeted(via("127.0.0.46").await.unwrap()).await;
    assert!(login(&mut other, "hx-other@example.org", PASSWORD).await.starts_with("l OK"));
    assert!(dovecot_saw("hx-other@example.org", "127.0.0.46").is_some());

    // With "required", a connection that bypasses the balancer is refused.
    assert!(TlsClient::connect_from(Some("127.0.0.47".parse().unwrap()), gate.addr, tls()).await.is_err());
    assert!(metric(&gate, "imapgate_proxy_protocol_total{result=\"missing\"} 1").await);
    // HAProxy's health checks (check-send-proxy) send v2 LOCAL: closed without a session.
    let mut checked = false;
    for _ in 0..50 {
        let (_, body) = support::admin_get(gate.admin, "/metrics").await;
        checked = body
            .lines()
            .any(|l| l.strip_prefix("imapgate_proxy_protocol_total{result=\"local\"} ").is_some_and(|n| n != "0"));
        if checked {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(checked, "HAProxy's health checks arrive as LOCAL\n{}", haproxy.log());
    drop(haproxy);
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_proxy_v2_passes_the_client_to_a_dovecot_listener_that_requires_the_header() {
    // Dovecot's `haproxy = yes` listener drops any connection that does not start with a valid header.
    let env = env();
    let rest = format!(
        "{}\n[route]\ndefault = \"mbox\"\n[health]\ninterval_secs = 1\n",
        backend("mbox", env.dovecot.haproxy_port)
    );
    let text = config_text(&env.pki, &rest).replacen("[backend_tls]\n", "[backend_tls]\nsend_proxy = \"v2\"\n", 1);
    let gate = TestProxy::start(&text).await;
    let mut c =
        greeted(TlsClient::connect_from(Some("127.0.0.48".parse().unwrap()), gate.addr, tls()).await.unwrap()).await;
    assert!(login(&mut c, "sp-user@example.org", PASSWORD).await.starts_with("l OK"));
    assert!(c.command("n", "NOOP").await.unwrap().tagged.starts_with("n OK"), "relayed after login");
    let line = dovecot_saw("sp-user@example.org", "127.0.0.48").expect("the header's client reaches Dovecot");
    assert!(line.contains("lip=127.0.0.1"), "{line}");
    // Health checks send LOCAL: Dovecot accepts them and the backend stays up.
    let checks = "imapgate_health_checks_total{backend=\"mbox\",result=\"success\"}";
    let text = support::scrape_until(gate.admin, checks, 2.0, Duration::from_secs(10)).await;
    assert!(support::sample(&text, checks) >= 2.0, "{text}");
    assert_eq!(support::sample(&text, "imapgate_backend_up{backend=\"mbox\"}"), 1.0);
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_proxy_headers_from_a_trusted_peer_and_everything_else_refused() {
    let gate = proxy("proxy_protocol = \"optional\"\nproxy_protocol_from = [\"127.0.0.40/32\"]", "").await;
    let trusted: IpAddr = "127.0.0.40".parse().unwrap();
    let dest = gate.addr;

    // v1, IPv4 source.
    let v1 = format!("PROXY TCP4 192.0.2.7 {} 40000 {}\r\n", dest.ip(), dest.port());
    let mut c =
        greeted(TlsClient::connect_with_preamble(Some(trusted), gate.addr, tls(), v1.as_bytes()).await.unwrap()).await;
    assert!(login(&mut c, "pp-v1@example.org", PASSWORD).await.starts_with("l OK"));
    let line = dovecot_saw("pp-v1@example.org", "192.0.2.7").expect("v1 source reaches Dovecot");
    assert!(line.contains("rport=40000"), "{line}");

    // v2 with TLVs, IPv6 source.
    let v2 = v2_header("[2001:db8::7]:51000".parse().unwrap(), "[2001:db8::1]:993".parse().unwrap());
    let mut c = greeted(TlsClient::connect_with_preamble(Some(trusted), gate.addr, tls(), &v2).await.unwrap()).await;
    assert!(login(&mut c, "pp-v2@example.org", PASSWORD).await.starts_with("l OK"));
    let line = dovecot_saw("pp-v2@example.org", "2001:db8::7").expect("v2 IPv6 source reaches Dovecot");
    assert!(line.contains("lip=2001:db8::1"), "x-connected-ip is the header's destination: {line}");

    // "optional": a trusted peer may also connect without a header.
    let mut c = greeted(TlsClient::connect_from(Some(trusted), gate.addr, tls()).await.unwrap()).await;
    assert!(login(&mut c, "pp-none@example.org", PASSWORD).await.starts_with("l OK"));
    assert!(dovecot_saw("pp-none@example.org", "127.0.0.40").is_some());

    // A header from a peer that is not trusted is refused: a client cannot choose its own address.
    assert!(
        TlsClient::connect_with_preamble(Some("127.0.0.41".parse().unwrap()), gate.addr, tls(), &v2).await.is_err()
    );
    // Truncated, oversized and malformed headers close the connection before TLS.
    assert!(closed_before_tls(&gate, "127.0.0.40", &v2[..20], true).await, "truncated v2");
    assert!(closed_before_tls(&gate, "127.0.0.40", b"PROXY TCP4 192.0.2.", true).await, "truncated v1");
    assert!(closed_before_tls(&gate, "127.0.0.40", &[b'P'; 200], false).await, "v1 without CRLF in 107 bytes");
    let mut huge = v2.clone();
    huge[14..16].copy_from_slice(&4000u16.to_be_bytes());
    assert!(closed_before_tls(&gate, "127.0.0.40", &huge, false).await, "v2 claiming 4000 bytes");
    assert!(closed_before_tls(&gate, "127.0.0.40", b"PROXY TCP4 300.0.2.7 1.2.3.4 1 2\r\n", false).await, "bad v1");
    // v2 LOCAL: a balancer's health check; no session.
    let local =
        Builder::with_addresses(Version::Two | Command::Local, Protocol::Unspecified, ppp::v2::Addresses::Unspecified)
            .build()
            .unwrap();
    assert!(closed_before_tls(&gate, "127.0.0.40", &local, false).await);

    for (result, count) in
        [("v1", 1), ("v2", 1), ("none", 1), ("untrusted", 1), ("oversized", 2), ("invalid", 1), ("local", 1)]
    {
        let line = format!("imapgate_proxy_protocol_total{{result=\"{result}\"}} {count}");
        assert!(metric(&gate, &line).await, "{line}");
    }
    assert!(metric(&gate, "imapgate_proxy_protocol_total{result=\"io\"} 2").await);
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webmail_id_forwarding_is_honoured_from_trusted_peers_only() {
    let audit = support::scratch_dir("imapgate-identity-audit-").join("audit.log");
    let gate = proxy(
        "id_forwarded_from = [\"127.0.0.42/32\"]",
        &format!("failures = 2\nban_secs = 60\n[audit]\npath = \"{}\"\n", audit.display()),
    )
    .await;
    let id = |ip: &str| {
        format!("ID (\"name\" \"Roundcube Webmail\" \"x-originating-ip\" \"{ip}\" \"x-originating-port\" \"4711\")")
    };
    let from = |source: &str| TlsClient::connect_from(Some(source.parse().unwrap()), gate.addr, tls());

    // From the webmail server: its user's address replaces its own.
    let mut c = greeted(from("127.0.0.42").await.unwrap()).await;
    assert!(c.command("i", &id("192.0.2.99")).await.unwrap().tagged.starts_with("i OK"));
    assert!(login(&mut c, "wm-user@example.org", PASSWORD).await.starts_with("l OK"));
    let line = dovecot_saw("wm-user@example.org", "192.0.2.99").expect("forwarded address reaches Dovecot");
    assert!(line.contains("rport=4711"), "{line}");

    // From anyone else the same fields are ignored.
    let mut c = greeted(from("127.0.0.43").await.unwrap()).await;
    assert!(c.command("i", &id("192.0.2.98")).await.unwrap().tagged.starts_with("i OK"));
    assert!(login(&mut c, "wm-other@example.org", PASSWORD).await.starts_with("l OK"));
    assert!(dovecot_saw("wm-other@example.org", "127.0.0.43").is_some());

    // The defence judges the forwarded user, not the webmail server.
    let mut c = greeted(from("127.0.0.42").await.unwrap()).await;
    assert!(c.command("i", &id("192.0.2.97")).await.unwrap().tagged.starts_with("i OK"));
    for i in 0..3 {
        let reply = login(&mut c, "wm-victim@example.org", &format!("wrong-{i}")).await;
        assert!(reply.starts_with("l NO [AUTHENTICATIONFAILED]"), "{reply}");
    }
    assert!(gate.defence.is_banned("192.0.2.97".parse().unwrap()));
    assert!(!gate.defence.is_banned("127.0.0.42".parse().unwrap()), "the webmail server is not banned");

    // Audited with both addresses.
    let text = support::wait_until(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&audit).ok()?;
        text.contains("\"client_forwarded\"").then_some(text)
    })
    .expect("client_forwarded audit event");
    let event = text.lines().find(|l| l.contains("\"client_forwarded\"") && l.contains("192.0.2.99")).unwrap();
    assert!(event.contains("\"peer_ip\":\"127.0.0.42\""), "{event}");
    assert!(event.contains("\"client_port\":4711"), "{event}");
    gate.stop().await;
}
