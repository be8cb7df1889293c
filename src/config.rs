//! Configuration: `proxy.toml` plus `IMAPGATE_` environment overrides (figment), validated as a whole into
//! a [`Config`] before anything is bound. Every error names the key it is about. No sockets, no tokio.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

/// A configuration problem, naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), message: message.into() }
}

/// All the problems found in one configuration.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    tls: RawTls,
    #[serde(default)]
    backend_tls: RawBackendTls,
    #[serde(default)]
    backend: Vec<RawBackend>,
    #[serde(default)]
    pool: Vec<RawPool>,
    #[serde(default)]
    route: RawRoute,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    defence: RawDefence,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    auth: RawAuth,
    otel: Option<OtelConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAuth {
    mechanisms: Vec<AuthMechanism>,
}

impl Default for RawAuth {
    fn default() -> Self {
        Self { mechanisms: vec![AuthMechanism::Plain, AuthMechanism::Login] }
    }
}

/// A SASL mechanism clients may use (`[auth] mechanisms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthMechanism {
    Plain,
    Login,
    /// OAuth 2.0 bearer tokens, Google's and Microsoft's framing; the backend validates the token.
    #[serde(rename = "XOAUTH2")]
    XOAuth2,
    /// OAuth 2.0 bearer tokens, RFC 7628.
    #[serde(rename = "OAUTHBEARER")]
    OAuthBearer,
}

/// `[auth]`: what clients may log in with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Offered, each once; without PLAIN and LOGIN no password is taken (`LOGINDISABLED`).
    pub mechanisms: Vec<AuthMechanism>,
}

impl AuthConfig {
    pub fn offers(&self, mechanism: AuthMechanism) -> bool {
        self.mechanisms.contains(&mechanism)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawState {
    /// The defence's memory on a single instance ("off": none); not used with `redis`.
    path: String,
    redis: Option<String>,
    password_file: Option<PathBuf>,
    fingerprint_key_file: Option<PathBuf>,
    prefix: String,
    timeout_ms: u64,
    on_error: StateOnError,
}

impl Default for RawState {
    fn default() -> Self {
        Self {
            path: "/var/lib/imapgate/defence-state.json".into(),
            redis: None,
            password_file: None,
            fingerprint_key_file: None,
            prefix: "imapgate".into(),
            timeout_ms: 50,
            on_error: StateOnError::Local,
        }
    }
}

/// What logins do while the shared state store cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateOnError {
    /// Decide with this instance's own state (which keeps counting): the fleet's budgets are per instance
    /// until the store is back.
    #[default]
    Local,
    /// Refuse logins (`NO [UNAVAILABLE]`) until the store is back.
    Closed,
}

/// Defence state shared by several instances through Redis (`[state]`); without it, state stays in process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateConfig {
    /// `redis://host:port/db` or `rediss://` (TLS); a password in the URL or in `password_file`.
    pub redis: String,
    pub password_file: Option<PathBuf>,
    /// A secret shared by the fleet's instances (not stored in Redis) that keys password fingerprints, so
    /// that a wrong pair repeated through several instances counts once.
    pub fingerprint_key_file: Option<PathBuf>,
    /// Namespace of every key and channel, so that several clusters can share one Redis.
    pub prefix: String,
    /// The longest a login waits for the store.
    pub timeout: Duration,
    pub on_error: StateOnError,
}

/// OpenTelemetry trace export.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtelConfig {
    /// OTLP/gRPC endpoint of a collector, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    #[serde(default = "OtelConfig::default_service_name")]
    pub service_name: String,
}

impl OtelConfig {
    fn default_service_name() -> String {
        "imapgate".into()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    #[serde(default = "RawAudit::default_path")]
    path: String,
    #[serde(default = "RawAudit::default_queue_lines")]
    queue_lines: usize,
}

impl RawAudit {
    fn default_path() -> String {
        "stdout".into()
    }
    fn default_queue_lines() -> usize {
        10_000
    }
}

impl Default for RawAudit {
    fn default() -> Self {
        Self { path: Self::default_path(), queue_lines: Self::default_queue_lines() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "RawAdmin::default_listen")]
    listen: String,
    #[serde(default)]
    token_file: Option<PathBuf>,
}

impl RawAdmin {
    fn default_listen() -> String {
        "127.0.0.1:9190".into()
    }
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self { listen: Self::default_listen(), token_file: None }
    }
}

/// The admin HTTP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The API's bearer tokens (`name role token` per line); without it only `/metrics`, `/healthz` and
    /// `/readyz` are served.
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDefence {
    enabled: bool,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    ipv6_wide_prefix: u8,
    failures: u32,
    wide_failures: u32,
    window_secs: u64,
    ban_secs: u64,
    ban_max_secs: u64,
    tarpit_ms: Vec<u64>,
    auth_in_flight: u32,
    auth_queue_timeout_secs: u64,
    account_delay_after: u32,
    account_block_after: u32,
    account_reset_secs: u64,
    connections_per_prefix: u32,
    connection_rate_per_minute: u32,
    connection_burst: u32,
    connections_per_prefix_max: u32,
    connection_burst_max: u32,
    successes_per_failure: u32,
    earned_failures_max: u32,
    standing_half_life_secs: u64,
    repeat_secs: u64,
    account_forget_secs: u64,
    trusted: Vec<ipnet::IpNet>,
    deny: Vec<ipnet::IpNet>,
    max_tracked: usize,
}

impl Default for RawDefence {
    fn default() -> Self {
        Self {
            enabled: true,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            ipv6_wide_prefix: 48,
            failures: 5,
            wide_failures: 50,
            window_secs: 600,
            ban_secs: 600,
            ban_max_secs: 86_400,
            tarpit_ms: vec![2_000, 4_000, 8_000, 15_000],
            auth_in_flight: 64,
            auth_queue_timeout_secs: 30,
            account_delay_after: 5,
            account_block_after: 50,
            account_reset_secs: 3_600,
            connections_per_prefix: 100,
            connection_rate_per_minute: 120,
            connection_burst: 100,
            connections_per_prefix_max: 10_000,
            connection_burst_max: 10_000,
            successes_per_failure: 10,
            earned_failures_max: 200,
            standing_half_life_secs: 600,
            repeat_secs: 60,
            account_forget_secs: 30 * 86_400,
            trusted: Vec::new(),
            deny: Vec::new(),
            max_tracked: 100_000,
        }
    }
}

/// Brute-force defence and connection admission, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefenceConfig {
    /// Off: every connection and login is let through (for comparisons and for installations that defend
    /// elsewhere).
    pub enabled: bool,
    /// Prefix lengths that key failures: IPv4, IPv6, and the coarser IPv6 bucket.
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    pub ipv6_wide_prefix: u8,
    /// Failed logins a prefix may have per window before it is banned.
    pub failures: u32,
    /// The same for the coarse IPv6 bucket.
    pub wide_failures: u32,
    pub window: Duration,
    /// First ban; each repeat doubles it, up to `ban_max`.
    pub ban: Duration,
    pub ban_max: Duration,
    /// Delay before answering the n-th failure in a window (the last value repeats).
    pub tarpit: Vec<Duration>,
    /// Logins one prefix may have at a backend at once, whatever its standing; more wait. Logins for
    /// accounts unfamiliar with the prefix are further held to the room left in its failure budget.
    pub auth_in_flight: u32,
    pub auth_queue_timeout: Duration,
    /// Consecutive failures of one account (from anywhere) before its logins are delayed.
    pub account_delay_after: u32,
    /// Consecutive failures after which the account is blocked for prefixes that never logged into it.
    pub account_block_after: u32,
    /// An account's failure count is forgotten after this long without failures.
    pub account_reset: Duration,
    /// Connections from one prefix that have not logged in (base, for a prefix with no record).
    pub connections_per_prefix: u32,
    /// Connections that do not log in: sustained rate and burst (a successful login gives its token back).
    pub connection_rate_per_minute: u32,
    pub connection_burst: u32,
    /// Ceilings of what standing (recent successful logins, one unit each) adds to the two above.
    pub connections_per_prefix_max: u32,
    pub connection_burst_max: u32,
    /// Recent successes that earn the tolerance of one more failure, and the most that can be earned.
    pub successes_per_failure: u32,
    pub earned_failures_max: u32,
    /// Standing halves after this long without successful logins.
    pub standing_half_life: Duration,
    /// A wrong (user, password) pair repeated within this is answered at the door (0: always ask).
    pub repeat_window: Duration,
    /// An account without failures is forgotten after this long unseen (with its familiar prefixes).
    pub account_forget: Duration,
    /// Skip per-address limits (per-account counting stays).
    pub trusted: Vec<ipnet::IpNet>,
    /// Refused before TLS.
    pub deny: Vec<ipnet::IpNet>,
    /// Most prefixes and most accounts tracked; older idle entries are dropped first.
    pub max_tracked: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Vec<String>,
    #[serde(default)]
    starttls_listen: Vec<String>,
    #[serde(default)]
    shared_listen: Vec<RawSharedListen>,
    #[serde(default = "defaults::handshake_timeout")]
    handshake_timeout_secs: u64,
    #[serde(default = "defaults::preauth_idle_timeout")]
    preauth_idle_timeout_secs: u64,
    #[serde(default = "defaults::preauth_total_timeout")]
    preauth_total_timeout_secs: u64,
    #[serde(default = "defaults::relay_idle_timeout")]
    relay_idle_timeout_secs: u64,
    #[serde(default = "defaults::write_timeout")]
    write_timeout_secs: u64,
    #[serde(default = "defaults::shutdown_grace")]
    shutdown_grace_secs: u64,
    #[serde(default = "defaults::drain_spread")]
    drain_spread_secs: u64,
    #[serde(default = "defaults::upgrade_timeout")]
    upgrade_timeout_secs: u64,
    #[serde(default = "defaults::max_connections")]
    max_connections: usize,
    #[serde(default = "defaults::proxy_ttl")]
    proxy_ttl: u32,
    #[serde(default)]
    proxy_protocol: ProxyProtocolMode,
    #[serde(default)]
    proxy_protocol_from: Vec<ipnet::IpNet>,
    #[serde(default)]
    id_forwarded_from: Vec<ipnet::IpNet>,
}

/// Whether listeners read a PROXY protocol header (v1 or v2) from trusted peers before TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocolMode {
    /// No header is read; one that arrives fails the TLS handshake.
    #[default]
    Off,
    /// Peers in `proxy_protocol_from` may send one; connections without one use the peer's address.
    Optional,
    /// Every connection must come from `proxy_protocol_from` with a header.
    Required,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    certificate: Vec<RawCertificate>,
    #[serde(default)]
    unknown_name: UnknownName,
    #[serde(default)]
    cipher_preference: CipherPreference,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: PathBuf,
    key: PathBuf,
    names: Vec<String>,
}

/// What a client asking (SNI) for a name no `[[tls.certificate]]` serves gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownName {
    /// The default certificate (`[tls] cert`).
    #[default]
    Default,
    /// No certificate: the handshake fails. Clients without SNI still get the default.
    Refuse,
}

/// Whose order of cipher suites decides a client's TLS handshake.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CipherPreference {
    /// The proxy's order: AES-128-GCM first (TLS 1.3's mandatory suite, with SHA-256), then AES-256-GCM,
    /// then ChaCha20-Poly1305. Cheapest on servers with AES and SHA instructions.
    #[default]
    Server,
    /// The client's order (most put AES-256-GCM with SHA-384 first; phones without AES instructions
    /// ChaCha20-Poly1305).
    Client,
}

/// A certificate served to clients asking for one of `names`: exact names and `*.example.org` wildcards
/// (one label), lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub names: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendTls {
    #[serde(default)]
    mode: BackendMode,
    ca: Option<PathBuf>,
    #[serde(default)]
    allow_plaintext: bool,
    #[serde(default = "defaults::connect_timeout")]
    connect_timeout_secs: u64,
    #[serde(default = "defaults::greeting_timeout")]
    greeting_timeout_ms: u64,
    #[serde(default = "defaults::tls_timeout")]
    tls_timeout_ms: u64,
    #[serde(default = "defaults::capability_timeout")]
    capability_timeout_ms: u64,
    #[serde(default = "defaults::login_timeout")]
    login_timeout_secs: u64,
    #[serde(default)]
    send_proxy: SendProxy,
    #[serde(default = "defaults::pool_size")]
    pool_size: usize,
    #[serde(default = "defaults::pool_max_age")]
    pool_max_age_secs: u64,
}

/// A PROXY protocol header toward the backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    /// The client's address travels in `ID` (`x-originating-ip`) only.
    #[default]
    Off,
    /// A PROXY v2 header first on every backend connection (Dovecot's `haproxy = yes` listeners and
    /// `haproxy_trusted_networks`): the client's address and port for logins, `LOCAL` for health checks.
    V2,
}

impl Default for RawBackendTls {
    fn default() -> Self {
        Self {
            mode: BackendMode::default(),
            ca: None,
            allow_plaintext: false,
            connect_timeout_secs: defaults::connect_timeout(),
            greeting_timeout_ms: defaults::greeting_timeout(),
            tls_timeout_ms: defaults::tls_timeout(),
            capability_timeout_ms: defaults::capability_timeout(),
            send_proxy: SendProxy::Off,
            login_timeout_secs: defaults::login_timeout(),
            pool_size: defaults::pool_size(),
            pool_max_age_secs: defaults::pool_max_age(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: String,
    address: String,
    tls_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    default: Option<String>,
    #[serde(default)]
    rule: Vec<RawRule>,
    lookup: Option<RawLookup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLookup {
    url: String,
    #[serde(default = "RawLookup::default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "RawLookup::default_cache_secs")]
    cache_secs: u64,
    #[serde(default = "RawLookup::default_negative_cache_secs")]
    negative_cache_secs: u64,
    #[serde(default = "RawLookup::default_max_entries")]
    max_entries: usize,
    #[serde(default)]
    send_password: bool,
    #[serde(default)]
    on_error: OnError,
    #[serde(default)]
    allowed_servers: Vec<ipnet::IpNet>,
}

impl RawLookup {
    fn default_timeout_ms() -> u64 {
        1000
    }
    fn default_cache_secs() -> u64 {
        60
    }
    fn default_negative_cache_secs() -> u64 {
        10
    }
    fn default_max_entries() -> usize {
        100_000
    }
}

/// What a login does when the lookup service fails (down, slow, answering nonsense).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Route by the static rules instead.
    #[default]
    Static,
    /// Answer `NO [UNAVAILABLE]`.
    Fail,
}

/// An HTTP service asked where each user lives (nginx's `auth_http` protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupConfig {
    /// `http://host:port/path`.
    pub url: String,
    pub timeout: Duration,
    /// How long an answer naming a server is reused.
    pub cache: Duration,
    /// How long a refusal is reused.
    pub negative_cache: Duration,
    pub max_entries: usize,
    /// Send the password (`Auth-Pass`); off: imapgate's backends check passwords, and answers are cached.
    pub send_password: bool,
    pub on_error: OnError,
    /// Addresses an answer may name besides the configured backends' (a lookup service must not be able
    /// to send credentials anywhere).
    pub allowed_servers: Vec<ipnet::IpNet>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    domain: Option<String>,
    user: Option<String>,
    backend: Option<String>,
    pool: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: String,
    members: Vec<RawMember>,
    #[serde(default)]
    failover: Failover,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    backend: String,
    #[serde(default = "RawMember::default_weight")]
    weight: u32,
    #[serde(default)]
    drain: bool,
}

impl RawMember {
    fn default_weight() -> u32 {
        1
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHealth {
    interval_secs: u64,
    failures: u32,
    backoff_secs: u64,
    backoff_max_secs: u64,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self { interval_secs: 5, failures: 3, backoff_secs: 5, backoff_max_secs: 60 }
    }
}

/// What a pool does when a user's member is unusable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failover {
    /// Each user's mailbox lives on one member: if it is down, the user gets `NO [UNAVAILABLE]` at once.
    #[default]
    None,
    /// Shared storage: the next member in that user's order.
    Next,
}

/// A group of backends; each user is placed on one by weighted rendezvous hashing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub members: Vec<Member>,
    pub failover: Failover,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Index into [`Config::backends`].
    pub backend: usize,
    /// Share of new users; 0 (or `drain = true`): none, open sessions stay.
    pub weight: u32,
}

/// Where a rule (or the default) sends users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Index into [`Config::backends`].
    Backend(usize),
    /// Index into [`Config::pools`].
    Pool(usize),
}

/// Active health checks and circuit breaking, per backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Between checks (each gets up to 20% jitter).
    pub interval: Duration,
    /// Consecutive failures (checks or logins) that open a backend's circuit.
    pub failures: u32,
    /// First wait before an open circuit lets a probe through; doubles up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
}

mod defaults {
    pub fn handshake_timeout() -> u64 {
        10
    }
    pub fn preauth_idle_timeout() -> u64 {
        60
    }
    pub fn preauth_total_timeout() -> u64 {
        180
    }
    pub fn write_timeout() -> u64 {
        60
    }
    pub fn relay_idle_timeout() -> u64 {
        31 * 60
    }
    pub fn send_proxy_v2() -> String {
        "v2".into()
    }
    pub fn shutdown_grace() -> u64 {
        10
    }
    pub fn drain_spread() -> u64 {
        300
    }
    pub fn upgrade_timeout() -> u64 {
        60
    }
    pub fn max_connections() -> usize {
        20_000
    }
    pub fn proxy_ttl() -> u32 {
        5
    }
    // The backend login's step deadlines. A healthy Dovecot answers each short step in milliseconds (see
    // `imapgate_backend_step_duration_seconds` and README "Backend health"); a deadline of about a second
    // and a half tells a hung server from a busy one, and 2 s for the connect leaves room for one lost
    // SYN (retransmitted after 1 s).
    pub fn connect_timeout() -> u64 {
        2
    }
    pub fn greeting_timeout() -> u64 {
        1500
    }
    pub fn tls_timeout() -> u64 {
        1500
    }
    pub fn capability_timeout() -> u64 {
        1500
    }
    pub fn login_timeout() -> u64 {
        30
    }
    pub fn pool_size() -> usize {
        4
    }
    pub fn pool_max_age() -> u64 {
        30
    }
}

/// How the proxy reaches backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendMode {
    /// Plain connect, then `STARTTLS` (port 143).
    #[default]
    Starttls,
    /// Implicit TLS (port 993).
    Tls,
    /// No encryption: only with `allow_plaintext = true`.
    Plain,
}

/// Diagnostic log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `imapgate=debug`; `RUST_LOG` wins when set.
    #[serde(default = "LogConfig::default_level")]
    pub level: String,
}

impl LogConfig {
    fn default_level() -> String {
        "info".into()
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Text, level: Self::default_level() }
    }
}

/// `[[server.shared_listen]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSharedListen {
    listen: String,
    web: String,
    #[serde(default)]
    imap_names: Vec<String>,
    #[serde(default)]
    imap_without_sni: bool,
    #[serde(default = "defaults::send_proxy_v2")]
    send_proxy: String,
}

/// A listener that shares its port (443) with a web server: each connection's TLS ClientHello is read
/// without terminating it, and ALPN `imap` or a name in `imap_names` is IMAP over TLS (with all of the
/// defence); anything else is passed through, unterminated and unchanged, to `web`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedListen {
    pub listen: SocketAddr,
    pub web: SocketAddr,
    /// Lower-case server names served as IMAP.
    pub imap_names: Vec<String>,
    /// A ClientHello without SNI (and without ALPN `imap`) is IMAP rather than web.
    pub imap_without_sni: bool,
    /// Send the web server a PROXY v2 header with the client's address.
    pub send_proxy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    /// Plain IMAP listeners (port 143) where clients must `STARTTLS` before anything else.
    pub starttls_listen: Vec<SocketAddr>,
    /// Listeners shared with a web server (443).
    pub shared_listen: Vec<SharedListen>,
    pub handshake_timeout: Duration,
    pub preauth_idle_timeout: Duration,
    /// The whole phase before login, however active the client is (Dovecot: about three minutes).
    pub preauth_total_timeout: Duration,
    pub relay_idle_timeout: Duration,
    /// A write to a client (or, in the relay, to a backend) that makes no progress this long ends the session.
    pub write_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Leaving (after an upgrade handed the listeners over, or on SIGQUIT): logged-in sessions end at
    /// random moments over this long, each when quiet, so that their clients reconnect as a trickle.
    pub drain_spread: Duration,
    /// How long an upgrade waits for the successor to say it is ready before it stops it.
    pub upgrade_timeout: Duration,
    pub max_connections: usize,
    pub proxy_ttl: u32,
    pub proxy_protocol: ProxyProtocolMode,
    /// Peers that may send a PROXY header (load balancers).
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// Peers whose pre-login `ID` `x-originating-ip`/`x-originating-port` replace the client address
    /// (webmail servers).
    pub id_forwarded_from: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The default certificate: clients without SNI, or with a name no other certificate serves.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub certificates: Vec<NamedCertificate>,
    pub unknown_name: UnknownName,
    pub cipher_preference: CipherPreference,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTlsConfig {
    pub mode: BackendMode,
    pub ca: Option<PathBuf>,
    /// TCP connect (and a PROXY header).
    pub connect_timeout: Duration,
    /// From connected to the greeting.
    pub greeting_timeout: Duration,
    /// STARTTLS (its reply) and the TLS handshake.
    pub tls_timeout: Duration,
    /// CAPABILITY and `ID` after TLS; a pooled connection's `ID` reply.
    pub capability_timeout: Duration,
    /// The credentials step (authentication may take long).
    pub login_timeout: Duration,
    pub send_proxy: SendProxy,
    /// Ready connections kept per backend (greeted, STARTTLS and TLS done, capabilities known), so that a
    /// login costs one round trip; 0 switches the pool off. Not used with `send_proxy` (the header names
    /// the client).
    pub pool_size: usize,
    /// A ready connection older than this is closed unused (before the backend's own pre-login timeout).
    pub pool_max_age: Duration,
}

/// One backend mail server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub name: String,
    /// Host name or IP literal, without brackets.
    pub host: String,
    pub port: u16,
    /// The name its certificate must carry.
    pub tls_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleMatch {
    /// A whole username, lower-cased.
    User(String),
    /// The part after the last `@`, lower-cased.
    Domain(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    pub matches: RuleMatch,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub default: Option<Target>,
    pub rules: Vec<RouteRule>,
    pub lookup: Option<LookupConfig>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub backend_tls: BackendTlsConfig,
    pub backends: Vec<Backend>,
    pub pools: Vec<Pool>,
    pub route: RouteConfig,
    pub health: HealthConfig,
    pub log: LogConfig,
    pub defence: DefenceConfig,
    pub admin: AdminConfig,
    /// Trace export, when `[otel]` is present.
    pub otel: Option<OtelConfig>,
    /// The audit log: `None` when switched off (`path = "off"`).
    pub audit: Option<AuditConfig>,
    /// Shared defence state, when `[state] redis` is set.
    pub state: Option<StateConfig>,
    /// Where a single instance keeps what its defence learnt across restarts (`[state] path`); None with
    /// `[state] redis` (Redis holds it) or `path = "off"`.
    pub memory: Option<PathBuf>,
    pub auth: AuthConfig,
}

/// The audit log's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    pub target: AuditTarget,
    /// Lines waiting for the writer thread at most; beyond that lines are dropped (and counted), never
    /// waited for.
    pub queue_lines: usize,
}

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
}

impl Config {
    /// `path` plus the `IMAPGATE_` environment (`__` between levels), validated.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let figment = Figment::new()
            .merge(Toml::file_exact(path))
            // Only IMAPGATE_<SECTION>__<KEY> variables are configuration; others with the prefix (such as
            // IMAPGATE_DEMO_PORT) belong to tools around imapgate.
            .merge(Env::prefixed("IMAPGATE_").filter(|key| key.as_str().contains("__")).split("__"));
        Self::from_figment(figment, path.parent())
    }

    /// Parses TOML text alone (no environment); relative paths resolve against `base`.
    pub fn from_toml(text: &str, base: Option<&Path>) -> Result<Config, ConfigErrors> {
        Self::from_figment(Figment::new().merge(Toml::string(text)), base)
    }

    fn from_figment(figment: Figment, base: Option<&Path>) -> Result<Config, ConfigErrors> {
        let raw: RawConfig = figment.extract().map_err(|e| {
            ConfigErrors(
                e.into_iter()
                    .map(|e| {
                        let key = if e.path.is_empty() { "(config)".to_owned() } else { e.path.join(".") };
                        err(key, e.kind.to_string())
                    })
                    .collect(),
            )
        })?;
        validate(raw, base)
    }
}

fn resolve(base: Option<&Path>, path: PathBuf) -> PathBuf {
    match base {
        Some(base) if path.is_relative() && !base.as_os_str().is_empty() => base.join(path),
        _ => path,
    }
}

/// `host:port` or `[v6]:port` -> (host, port).
fn split_address(address: &str) -> Option<(String, u16)> {
    if let Ok(sock) = address.parse::<SocketAddr>() {
        return Some((sock.ip().to_string(), sock.port()));
    }
    let (host, port) = address.rsplit_once(':')?;
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    valid_host.then(|| (host.to_ascii_lowercase(), port))
}

fn validate(raw: RawConfig, base: Option<&Path>) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();

    let mut listen = Vec::new();
    if raw.server.listen.is_empty() {
        errors.push(err("server.listen", "at least one address is required"));
    }
    for (i, addr) in raw.server.listen.iter().enumerate() {
        match addr.parse::<SocketAddr>() {
            Ok(a) => listen.push(a),
            Err(_) => errors.push(err(format!("server.listen[{i}]"), format!("{addr:?} is not an IP:port"))),
        }
    }
    let mut starttls_listen = Vec::new();
    for (i, addr) in raw.server.starttls_listen.iter().enumerate() {
        match addr.parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 && listen.contains(&a) => {
                errors.push(err(format!("server.starttls_listen[{i}]"), format!("{addr:?} is also in server.listen")))
            }
            Ok(a) => starttls_listen.push(a),
            Err(_) => errors.push(err(format!("server.starttls_listen[{i}]"), format!("{addr:?} is not an IP:port"))),
        }
    }
    let mut shared_listen = Vec::new();
    for (i, raw) in raw.server.shared_listen.iter().enumerate() {
        let key = |k: &str| format!("server.shared_listen[{i}].{k}");
        let listen_addr = raw.listen.parse::<SocketAddr>();
        let web = raw.web.parse::<SocketAddr>();
        match &listen_addr {
            Ok(a) if a.port() != 0 && (listen.contains(a) || starttls_listen.contains(a)) => {
                errors.push(err(key("listen"), format!("{:?} is also an IMAP listener", raw.listen)))
            }
            Ok(_) => {}
            Err(_) => errors.push(err(key("listen"), format!("{:?} is not an IP:port", raw.listen))),
        }
        if web.is_err() {
            errors.push(err(key("web"), format!("{:?} is not an IP:port (the web server)", raw.web)));
        }
        let send_proxy = match raw.send_proxy.as_str() {
            "v2" => true,
            "off" => false,
            other => {
                errors.push(err(key("send_proxy"), format!("{other:?}: \"v2\" or \"off\"")));
                false
            }
        };
        if let (Ok(listen), Ok(web)) = (listen_addr, web) {
            shared_listen.push(SharedListen {
                listen,
                web,
                imap_names: raw.imap_names.iter().map(|n| n.trim_end_matches('.').to_ascii_lowercase()).collect(),
                imap_without_sni: raw.imap_without_sni,
                send_proxy,
            });
        }
    }
    let secs = |key: &str, v: u64, errors: &mut Vec<ConfigError>| {
        if v == 0 {
            errors.push(err(key, "must be at least 1 second"));
        }
        Duration::from_secs(v)
    };
    // A short step of the backend login: long enough for one round trip over a slow link, short enough
    // that a hung server costs its users seconds, not the whole login deadline.
    let step_ms = |key: &str, v: u64, errors: &mut Vec<ConfigError>| {
        if !(100..=60_000).contains(&v) {
            errors.push(err(key, "must be 100 to 60000 (milliseconds)"));
        }
        Duration::from_millis(v)
    };
    let server = ServerConfig {
        listen,
        starttls_listen,
        shared_listen,
        handshake_timeout: secs("server.handshake_timeout_secs", raw.server.handshake_timeout_secs, &mut errors),
        preauth_idle_timeout: secs(
            "server.preauth_idle_timeout_secs",
            raw.server.preauth_idle_timeout_secs,
            &mut errors,
        ),
        preauth_total_timeout: secs(
            "server.preauth_total_timeout_secs",
            raw.server.preauth_total_timeout_secs,
            &mut errors,
        ),
        relay_idle_timeout: secs("server.relay_idle_timeout_secs", raw.server.relay_idle_timeout_secs, &mut errors),
        write_timeout: secs("server.write_timeout_secs", raw.server.write_timeout_secs, &mut errors),
        shutdown_grace: Duration::from_secs(raw.server.shutdown_grace_secs),
        drain_spread: Duration::from_secs(raw.server.drain_spread_secs),
        upgrade_timeout: Duration::from_secs(raw.server.upgrade_timeout_secs),
        max_connections: raw.server.max_connections,
        proxy_ttl: raw.server.proxy_ttl,
        proxy_protocol: raw.server.proxy_protocol,
        proxy_protocol_from: raw.server.proxy_protocol_from,
        id_forwarded_from: raw.server.id_forwarded_from,
    };
    if server.proxy_protocol != ProxyProtocolMode::Off && server.proxy_protocol_from.is_empty() {
        errors.push(err(
            "server.proxy_protocol_from",
            "name the load balancers that may send a PROXY header (CIDRs) when server.proxy_protocol is on",
        ));
    }
    if server.max_connections == 0 {
        errors.push(err("server.max_connections", "must be at least 1"));
    }
    if raw.server.relay_idle_timeout_secs < 30 * 60 {
        errors.push(err(
            "server.relay_idle_timeout_secs",
            "must be at least 1800 (RFC 9051: IDLE clients re-issue every 29 minutes)",
        ));
    }
    if raw.server.drain_spread_secs > 3600 {
        errors.push(err("server.drain_spread_secs", "at most 3600 (an hour)"));
    }
    if !(1..=600).contains(&raw.server.upgrade_timeout_secs) {
        errors.push(err("server.upgrade_timeout_secs", "between 1 and 600"));
    }

    let tls = validate_tls(raw.tls, base, &mut errors);

    if raw.backend_tls.mode == BackendMode::Plain && !raw.backend_tls.allow_plaintext {
        errors.push(err(
            "backend_tls.mode",
            "\"plain\" sends passwords unencrypted; set backend_tls.allow_plaintext = true to accept that",
        ));
    }
    let backend_tls = BackendTlsConfig {
        mode: raw.backend_tls.mode,
        ca: raw.backend_tls.ca.map(|p| resolve(base, p)),
        connect_timeout: secs("backend_tls.connect_timeout_secs", raw.backend_tls.connect_timeout_secs, &mut errors),
        greeting_timeout: step_ms("backend_tls.greeting_timeout_ms", raw.backend_tls.greeting_timeout_ms, &mut errors),
        tls_timeout: step_ms("backend_tls.tls_timeout_ms", raw.backend_tls.tls_timeout_ms, &mut errors),
        capability_timeout: step_ms(
            "backend_tls.capability_timeout_ms",
            raw.backend_tls.capability_timeout_ms,
            &mut errors,
        ),
        login_timeout: secs("backend_tls.login_timeout_secs", raw.backend_tls.login_timeout_secs, &mut errors),
        send_proxy: raw.backend_tls.send_proxy,
        pool_size: raw.backend_tls.pool_size,
        pool_max_age: secs("backend_tls.pool_max_age_secs", raw.backend_tls.pool_max_age_secs, &mut errors),
    };
    if raw.backend_tls.pool_size > 64 {
        errors.push(err("backend_tls.pool_size", "at most 64 ready connections per backend"));
    }

    let mut backends = Vec::new();
    let mut names = HashSet::new();
    if raw.backend.is_empty() {
        errors.push(err("backend", "at least one [[backend]] is required"));
    }
    for (i, b) in raw.backend.into_iter().enumerate() {
        if b.name.is_empty() || !names.insert(b.name.clone()) {
            errors.push(err(format!("backend[{i}].name"), format!("{:?} is empty or used twice", b.name)));
        }
        let (host, port) = split_address(&b.address).unwrap_or_else(|| {
            errors.push(err(format!("backend[{i}].address"), format!("{:?} is not host:port", b.address)));
            // Kept so that routes naming it are not reported too; the errors stop the load anyway.
            (String::from("invalid"), 0)
        });
        let tls_name = b.tls_name.unwrap_or_else(|| host.clone());
        if rustls_pki_types::ServerName::try_from(tls_name.clone()).is_err() {
            errors.push(err(format!("backend[{i}].tls_name"), format!("{tls_name:?} is not a DNS name or IP")));
        }
        backends.push(Backend { name: b.name, host, port, tls_name });
    }

    let pools = validate_pools(raw.pool, &backends, &mut errors);
    let route = validate_route(raw.route, &backends, &pools, &mut errors);
    let health = HealthConfig {
        interval: secs("health.interval_secs", raw.health.interval_secs, &mut errors),
        failures: raw.health.failures.max(1),
        backoff: secs("health.backoff_secs", raw.health.backoff_secs, &mut errors),
        backoff_max: Duration::from_secs(raw.health.backoff_max_secs.max(raw.health.backoff_secs)),
    };

    let defence = validate_defence(raw.defence, &mut errors);
    let admin_listen = raw.admin.listen.parse::<SocketAddr>().unwrap_or_else(|_| {
        errors.push(err("admin.listen", format!("{:?} is not an IP:port", raw.admin.listen)));
        SocketAddr::from(([127, 0, 0, 1], 0))
    });

    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let audit = match raw.audit.path.as_str() {
        "off" => None,
        "stdout" | "-" => Some(AuditTarget::Stdout),
        path => Some(AuditTarget::File(resolve(base, PathBuf::from(path)))),
    }
    .map(|target| AuditConfig { target, queue_lines: raw.audit.queue_lines });
    if raw.audit.queue_lines == 0 {
        errors.push(err("audit.queue_lines", "must be at least 1"));
    }
    let memory = match raw.state.path.as_str() {
        _ if raw.state.redis.is_some() => None,
        "off" => None,
        "" => {
            errors.push(err("state.path", "a file path, or \"off\""));
            None
        }
        path => Some(resolve(base, PathBuf::from(path))),
    };
    let state = validate_state(raw.state, base, &mut errors);
    let mut mechanisms = Vec::new();
    for mechanism in raw.auth.mechanisms {
        if mechanisms.contains(&mechanism) {
            errors.push(err("auth.mechanisms", format!("{mechanism:?} is listed twice")));
        }
        mechanisms.push(mechanism);
    }
    if mechanisms.is_empty() {
        errors.push(err("auth.mechanisms", "offer at least one mechanism"));
    }
    if let Some(otel) = &raw.otel {
        if !(otel.endpoint.starts_with("http://") || otel.endpoint.starts_with("https://")) {
            errors.push(err("otel.endpoint", format!("{:?} is not an http:// or https:// URL", otel.endpoint)));
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Config {
        otel: raw.otel,
        audit,
        state,
        memory,
        auth: AuthConfig { mechanisms },
        defence,
        admin: AdminConfig { listen: admin_listen, token_file: raw.admin.token_file.map(|p| resolve(base, p)) },
        server,
        tls,
        backend_tls,
        backends,
        pools,
        route,
        health,
        log: raw.log,
    })
}

/// `[tls]`: paths resolved; every `[[tls.certificate]]` names at least one valid name, and no name twice.
fn validate_tls(raw: RawTls, base: Option<&Path>, errors: &mut Vec<ConfigError>) -> TlsConfig {
    let mut seen = HashSet::new();
    let mut certificates = Vec::new();
    for (i, entry) in raw.certificate.into_iter().enumerate() {
        if entry.names.is_empty() {
            errors.push(err(format!("tls.certificate[{i}].names"), "name at least one server name"));
        }
        let mut names = Vec::new();
        for name in entry.names {
            let lower = name.trim_end_matches('.').to_ascii_lowercase();
            let host = lower.strip_prefix("*.").unwrap_or(&lower);
            let valid = !host.contains('*')
                && host.contains('.')
                && rustls_pki_types::DnsName::try_from(host.to_owned()).is_ok()
                && host.parse::<std::net::IpAddr>().is_err();
            if !valid {
                errors.push(err(
                    format!("tls.certificate[{i}].names"),
                    format!("{name:?} is not a DNS name or a *.domain wildcard"),
                ));
            } else if !seen.insert(lower.clone()) {
                errors.push(err(format!("tls.certificate[{i}].names"), format!("{name:?} is served twice")));
            }
            names.push(lower);
        }
        certificates.push(NamedCertificate { cert: resolve(base, entry.cert), key: resolve(base, entry.key), names });
    }
    TlsConfig {
        cert: resolve(base, raw.cert),
        key: resolve(base, raw.key),
        certificates,
        unknown_name: raw.unknown_name,
        cipher_preference: raw.cipher_preference,
    }
}

/// `[state]`: a Redis URL with a scheme the client speaks, a namespace that keeps keys apart, a timeout a
/// login can afford.
fn validate_state(raw: RawState, base: Option<&Path>, errors: &mut Vec<ConfigError>) -> Option<StateConfig> {
    let url = raw.redis?;
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        errors.push(err("state.redis", format!("{url:?} is not a redis:// or rediss:// URL")));
    }
    if raw.prefix.is_empty() || !raw.prefix.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        errors.push(err("state.prefix", "must be letters, digits, '-', '_' or '.'"));
    }
    if raw.timeout_ms == 0 || raw.timeout_ms > 5000 {
        errors.push(err("state.timeout_ms", "must be 1 to 5000 (a login waits this long at most)"));
    }
    Some(StateConfig {
        redis: url,
        password_file: raw.password_file.map(|p| resolve(base, p)),
        fingerprint_key_file: raw.fingerprint_key_file.map(|p| resolve(base, p)),
        prefix: raw.prefix,
        timeout: Duration::from_millis(raw.timeout_ms),
        on_error: raw.on_error,
    })
}

/// Pools: unique names (backends' included), known members, at least one member that takes users.
fn validate_pools(raw: Vec<RawPool>, backends: &[Backend], errors: &mut Vec<ConfigError>) -> Vec<Pool> {
    let mut pools = Vec::new();
    let mut names: HashSet<String> = backends.iter().map(|b| b.name.clone()).collect();
    for (i, pool) in raw.into_iter().enumerate() {
        if pool.name.is_empty() || !names.insert(pool.name.clone()) {
            errors.push(err(
                format!("pool[{i}].name"),
                format!("{:?} is empty or names a backend or pool already", pool.name),
            ));
        }
        let mut members = Vec::new();
        let mut seen = HashSet::new();
        for (j, member) in pool.members.iter().enumerate() {
            let key = format!("pool[{i}].members[{j}].backend");
            match backends.iter().position(|b| b.name == member.backend) {
                Some(_) if !seen.insert(member.backend.clone()) => {
                    errors.push(err(key, format!("{:?} is a member twice", member.backend)))
                }
                Some(backend) => members.push(Member { backend, weight: if member.drain { 0 } else { member.weight } }),
                None => errors.push(err(key, format!("no [[backend]] is named {:?}", member.backend))),
            }
        }
        if !members.is_empty() && members.iter().all(|m| m.weight == 0) {
            errors.push(err(
                format!("pool[{i}].members"),
                "every member is drained or has weight 0: nobody could log in",
            ));
        }
        if pool.members.is_empty() {
            errors.push(err(format!("pool[{i}].members"), "needs at least one member"));
        }
        pools.push(Pool { name: pool.name, members, failover: pool.failover });
    }
    pools
}

/// Rules and the default: each names a backend or a pool.
fn validate_route(raw: RawRoute, backends: &[Backend], pools: &[Pool], errors: &mut Vec<ConfigError>) -> RouteConfig {
    let find = |key: String, name: &str, errors: &mut Vec<ConfigError>| {
        let found = backends
            .iter()
            .position(|b| b.name == name)
            .map(Target::Backend)
            .or_else(|| pools.iter().position(|p| p.name == name).map(Target::Pool));
        if found.is_none() {
            errors.push(err(key, format!("no [[backend]] or [[pool]] is named {name:?}")));
        }
        found
    };
    let default = raw.default.as_deref().and_then(|d| find("route.default".into(), d, errors));
    let mut rules = Vec::new();
    for (i, rule) in raw.rule.iter().enumerate() {
        let key = format!("route.rule[{i}]");
        let matches = match (&rule.user, &rule.domain) {
            (Some(user), None) if !user.is_empty() => RuleMatch::User(user.to_lowercase()),
            (None, Some(domain)) if !domain.is_empty() => {
                RuleMatch::Domain(domain.trim_start_matches('@').to_ascii_lowercase())
            }
            _ => {
                errors.push(err(key, "needs exactly one of `user` or `domain`"));
                continue;
            }
        };
        let target = match (&rule.backend, &rule.pool) {
            (Some(name), None) => find(format!("{key}.backend"), name, errors),
            (None, Some(name)) => {
                let found = pools.iter().position(|p| &p.name == name).map(Target::Pool);
                if found.is_none() {
                    errors.push(err(format!("{key}.pool"), format!("no [[pool]] is named {name:?}")));
                }
                found
            }
            _ => {
                errors.push(err(key, "needs exactly one of `backend` or `pool`"));
                continue;
            }
        };
        if let Some(target) = target {
            rules.push(RouteRule { matches, target });
        }
    }
    let lookup = raw.lookup.map(|l| {
        if !l.url.starts_with("http://") || l.url.len() <= "http://".len() {
            errors.push(err("route.lookup.url", format!("{:?} is not an http:// URL", l.url)));
        }
        if l.timeout_ms == 0 || l.max_entries == 0 {
            errors.push(err("route.lookup", "timeout_ms and max_entries must be at least 1"));
        }
        LookupConfig {
            url: l.url,
            timeout: Duration::from_millis(l.timeout_ms),
            cache: Duration::from_secs(l.cache_secs),
            negative_cache: Duration::from_secs(l.negative_cache_secs),
            max_entries: l.max_entries,
            send_password: l.send_password,
            on_error: l.on_error,
            allowed_servers: l.allowed_servers,
        }
    });
    if default.is_none() && raw.default.is_none() && rules.is_empty() && lookup.is_none() {
        errors.push(err("route", "set route.default, a [[route.rule]] or [route.lookup]"));
    }
    RouteConfig { default, rules, lookup }
}

fn validate_defence(raw: RawDefence, errors: &mut Vec<ConfigError>) -> DefenceConfig {
    let mut positive = |key: &str, value: u64| {
        if value == 0 {
            errors.push(err(format!("defence.{key}"), "must be at least 1"));
        }
    };
    positive("failures", raw.failures.into());
    positive("wide_failures", raw.wide_failures.into());
    positive("window_secs", raw.window_secs);
    positive("ban_secs", raw.ban_secs);
    positive("auth_in_flight", raw.auth_in_flight.into());
    positive("auth_queue_timeout_secs", raw.auth_queue_timeout_secs);
    positive("account_block_after", raw.account_block_after.into());
    positive("account_reset_secs", raw.account_reset_secs);
    positive("connections_per_prefix", raw.connections_per_prefix.into());
    positive("connection_rate_per_minute", raw.connection_rate_per_minute.into());
    positive("connection_burst", raw.connection_burst.into());
    positive("successes_per_failure", raw.successes_per_failure.into());
    positive("standing_half_life_secs", raw.standing_half_life_secs);
    positive("account_forget_secs", raw.account_forget_secs);
    positive("max_tracked", raw.max_tracked as u64);
    if raw.connections_per_prefix_max < raw.connections_per_prefix {
        errors.push(err("defence.connections_per_prefix_max", "must be at least defence.connections_per_prefix"));
    }
    if raw.connection_burst_max < raw.connection_burst {
        errors.push(err("defence.connection_burst_max", "must be at least defence.connection_burst"));
    }
    if raw.ipv4_prefix == 0 || raw.ipv4_prefix > 32 {
        errors.push(err("defence.ipv4_prefix", "must be 1 to 32"));
    }
    if raw.ipv6_prefix == 0 || raw.ipv6_prefix > 128 {
        errors.push(err("defence.ipv6_prefix", "must be 1 to 128"));
    }
    if raw.ipv6_wide_prefix == 0 || raw.ipv6_wide_prefix > raw.ipv6_prefix {
        errors.push(err("defence.ipv6_wide_prefix", "must be 1 to defence.ipv6_prefix"));
    }
    if raw.ban_max_secs < raw.ban_secs {
        errors.push(err("defence.ban_max_secs", "must be at least defence.ban_secs"));
    }
    if raw.tarpit_ms.is_empty() || raw.tarpit_ms.iter().any(|ms| *ms > 60_000) {
        errors.push(err("defence.tarpit_ms", "needs 1 or more delays of at most 60000 ms"));
    }
    DefenceConfig {
        enabled: raw.enabled,
        ipv4_prefix: raw.ipv4_prefix,
        ipv6_prefix: raw.ipv6_prefix,
        ipv6_wide_prefix: raw.ipv6_wide_prefix,
        failures: raw.failures,
        wide_failures: raw.wide_failures,
        window: Duration::from_secs(raw.window_secs),
        ban: Duration::from_secs(raw.ban_secs),
        ban_max: Duration::from_secs(raw.ban_max_secs),
        tarpit: raw.tarpit_ms.into_iter().map(Duration::from_millis).collect(),
        auth_in_flight: raw.auth_in_flight,
        auth_queue_timeout: Duration::from_secs(raw.auth_queue_timeout_secs),
        account_delay_after: raw.account_delay_after,
        account_block_after: raw.account_block_after,
        account_reset: Duration::from_secs(raw.account_reset_secs),
        connections_per_prefix: raw.connections_per_prefix,
        connection_rate_per_minute: raw.connection_rate_per_minute,
        connection_burst: raw.connection_burst,
        connections_per_prefix_max: raw.connections_per_prefix_max,
        connection_burst_max: raw.connection_burst_max,
        successes_per_failure: raw.successes_per_failure,
        earned_failures_max: raw.earned_failures_max,
        standing_half_life: Duration::from_secs(raw.standing_half_life_secs),
        repeat_window: Duration::from_secs(raw.repeat_secs),
        account_forget: Duration::from_secs(raw.account_forget_secs),
        trusted: raw.trusted,
        deny: raw.deny,
        max_tracked: raw.max_tracked,
    }
}

impl Default for DefenceConfig {
    fn default() -> Self {
        validate_defence(RawDefence::default(), &mut Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [server]
        listen = ["127.0.0.1:9993"]
        [tls]
        cert = "cert.pem"
        key = "key.pem"
        [[backend]]
        name = "mbox1"
        address = "mail.internal:143"
        [route]
        default = "mbox1"
    "#;

    fn keys(text: &str) -> Vec<String> {
        Config::from_toml(text, None).unwrap_err().0.into_iter().map(|e| e.key).collect()
    }

    #[test]
    fn pools_are_checked_member_by_member() {
        let base = MINIMAL.replace("[route]\n        default = \"mbox1\"", "");
        let with = |extra: &str| format!("{base}\n[[backend]]\nname = \"mbox2\"\naddress = \"b:143\"\n{extra}");
        let ok = Config::from_toml(
            &with("[[pool]]\nname = \"p\"\nfailover = \"next\"\nmembers = [{ backend = \"mbox1\", weight = 3 }, { backend = \"mbox2\", drain = true }]\n[route]\ndefault = \"p\"\n[[route.rule]]\ndomain = \"x.org\"\npool = \"p\"\n"),
            None,
        )
        .unwrap();
        assert_eq!(ok.pools[0].members, vec![Member { backend: 0, weight: 3 }, Member { backend: 1, weight: 0 }]);
        assert_eq!(ok.pools[0].failover, Failover::Next);
        assert_eq!(ok.route.default, Some(Target::Pool(0)));
        assert_eq!(ok.route.rules[0].target, Target::Pool(0));
        assert_eq!(
            keys(&with(
                "[[pool]]\nname = \"mbox1\"\nmembers = [{ backend = \"nope\" }, { backend = \"mbox2\" }, { backend = \"mbox2\" }]\n[route]\ndefault = \"mbox1\"\n"
            )),
            ["pool[0].name", "pool[0].members[0].backend", "pool[0].members[2].backend"]
        );
        assert_eq!(
            keys(&with(
                "[[pool]]\nname = \"p\"\nmembers = [{ backend = \"mbox1\", weight = 0 }]\n[route]\ndefault = \"q\"\n[[route.rule]]\nuser = \"a\"\nbackend = \"mbox1\"\npool = \"p\"\n"
            )),
            ["pool[0].members", "route.default", "route.rule[0]"]
        );
    }

    #[test]
    fn shipped_proxy_toml_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let config = Config::from_toml(&text, path.parent()).unwrap();
        assert_eq!(config.server.listen, vec!["0.0.0.0:993".parse().unwrap()]);
        assert_eq!(config.backend_tls.mode, BackendMode::Starttls);
        assert_eq!(config.backends.len(), 2);
        assert_eq!(config.backends[0].tls_name, "mbox1.internal");
        assert_eq!(config.route.rules.len(), 2);
        // The commented example states the shipped defaults.
        assert_eq!(config.defence, DefenceConfig::default());
        assert_eq!(config.server.proxy_protocol, ProxyProtocolMode::Off);
    }

    #[test]
    fn auth_mechanisms_default_to_passwords_and_are_checked() {
        let config = Config::from_toml(MINIMAL, None).unwrap();
        assert_eq!(config.auth.mechanisms, vec![AuthMechanism::Plain, AuthMechanism::Login]);
        let all = format!("{MINIMAL}\n[auth]\nmechanisms = [\"XOAUTH2\", \"OAUTHBEARER\", \"PLAIN\"]\n");
        let config = Config::from_toml(&all, None).unwrap();
        assert!(config.auth.offers(AuthMechanism::XOAuth2) && config.auth.offers(AuthMechanism::OAuthBearer));
        assert!(!config.auth.offers(AuthMechanism::Login));
        assert_eq!(keys(&format!("{MINIMAL}\n[auth]\nmechanisms = []\n")), vec!["auth.mechanisms"]);
        assert_eq!(keys(&format!("{MINIMAL}\n[auth]\nmechanisms = [\"PLAIN\", \"PLAIN\"]\n")), vec!["auth.mechanisms"]);
        assert!(Config::from_toml(&format!("{MINIMAL}\n[auth]\nmechanisms = [\"CRAM-MD5\"]\n"), None).is_err());
    }

    #[test]
    fn proxy_protocol_needs_its_trusted_peers() {
        let on = MINIMAL.replace("[server]", "[server]\nproxy_protocol = \"required\"");
        assert_eq!(keys(&on), vec!["server.proxy_protocol_from"]);
        let with_peers = on.replace("[server]", "[server]\nproxy_protocol_from = [\"10.0.0.0/24\"]");
        let config = Config::from_toml(&with_peers, None).unwrap();
        assert_eq!(config.server.proxy_protocol, ProxyProtocolMode::Required);
        assert_eq!(
            keys(&MINIMAL.replace("[server]", "[server]\nproxy_protocol = \"sometimes\"")),
            vec!["server.proxy_protocol"]
        );
        let wrong = MINIMAL.replace("[server]", "[server]\nid_forwarded_from = [\"webmail\"]");
        assert_eq!(keys(&wrong), vec!["server.id_forwarded_from.0"]);
    }

    #[test]
    fn defaults_and_relative_paths() {
        let config = Config::from_toml(MINIMAL, Some(Path::new("/etc/imapgate"))).unwrap();
        assert_eq!(config.tls.cert, Path::new("/etc/imapgate/cert.pem"));
        assert_eq!(config.server.preauth_idle_timeout, Duration::from_secs(60));
        assert!(config.server.relay_idle_timeout >= Duration::from_secs(31 * 60));
        assert_eq!(config.backends[0].host, "mail.internal");
        assert_eq!(config.backends[0].tls_name, "mail.internal");
        assert_eq!(config.backends[0].port, 143);
        assert_eq!(config.backend_tls.mode, BackendMode::Starttls);
    }

    #[test]
    fn errors_name_their_keys() {
        assert_eq!(keys(&MINIMAL.replace("127.0.0.1:9993", "nonsense")), vec!["server.listen[0]"]);
        assert_eq!(keys(&MINIMAL.replace("default = \"mbox1\"", "default = \"mbox9\"")), vec!["route.default"]);
        assert_eq!(keys(&MINIMAL.replace("mail.internal:143", "mail.internal")), vec!["backend[0].address"]);
        assert_eq!(keys(&format!("{MINIMAL}\n[backend_tls]\nmode = \"plain\"")), vec!["backend_tls.mode"]);
        assert_eq!(keys(&format!("{MINIMAL}\n[backend_tls]\nmode = \"carrier-pigeon\"")), vec!["backend_tls.mode"]);
        assert_eq!(
            keys(&format!("{MINIMAL}\n[[route.rule]]\nuser = \"a\"\ndomain = \"b\"\nbackend = \"mbox1\"")),
            vec!["route.rule[0]"]
        );
        assert_eq!(keys(&MINIMAL.replace("[tls]", "[tls]\ncolour = 1")), vec!["tls.colour"]);
        let dup = format!("{MINIMAL}\n[[backend]]\nname = \"mbox1\"\naddress = \"[::1]:143\"");
        assert_eq!(keys(&dup), vec!["backend[1].name"]);
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API fixes the error type.
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("proxy.toml", MINIMAL)?;
            jail.set_env("IMAPGATE_SERVER__LISTEN", "[\"127.0.0.1:10993\"]");
            jail.set_env("IMAPGATE_BACKEND_TLS__MODE", "tls");
            jail.set_env("IMAPGATE_DEMO_PORT", "9999");
            let config = Config::load(Path::new("proxy.toml")).map_err(|e| e.to_string())?;
            assert_eq!(config.server.listen, vec!["127.0.0.1:10993".parse().unwrap()]);
            assert_eq!(config.backend_tls.mode, BackendMode::Tls);
            jail.set_env("IMAPGATE_SERVER__LISTEN_ON", "x");
            let errors = Config::load(Path::new("proxy.toml")).unwrap_err();
            assert_eq!(errors.0[0].key, "server.listen_on");
            Ok(())
        });
    }

    #[test]
    fn plain_needs_opt_in_and_ipv6_addresses_parse() {
        let text = format!(
            "{}\n[backend_tls]\nmode = \"plain\"\nallow_plaintext = true",
            MINIMAL.replace("mail.internal:143", "[::1]:143")
        );
        let config = Config::from_toml(&text, None).unwrap();
        assert_eq!(config.backend_tls.mode, BackendMode::Plain);
        assert_eq!(config.backends[0].host, "::1");
    }
}
