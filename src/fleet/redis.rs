//! The fleet's evidence in Redis: a [`SharedStore`] over the `redis` crate's connection manager (it
//! reconnects by itself), with every call bounded by `[state] timeout_ms`, the store's health as a metric and
//! a log line per transition, and bans heard over pub/sub (and re-read from the set of bans in force every
//! few seconds and whenever the store comes back) into the local state, so that admission before TLS never
//! waits for Redis.
//!
//! While the store is down, logins do not wait for it at all: they are decided locally (or refused, with
//! `on_error = "closed"`) until the background probe, once a second, finds it answering again.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ipnet::IpNet;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Script, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use super::scripts::{self, Announcement, Layout};
use crate::config::{DefenceConfig, StateConfig, StateOnError};
use crate::lifecycle::Phase;
use crate::security::accounts::Fingerprint;
use crate::security::shared::{Evidence, SharedBan, SharedStore, StoreError, StoreFuture};
use crate::security::state::{DefenceState, Keys};
use crate::telemetry::metrics::Metrics;

/// Operations, as metric labels.
const OPS: &[&str] = &["view", "failure", "success", "ban", "unban", "sync", "subscribe"];
/// Bans read back at most per sync.
const SYNC_MAX: usize = 100_000;
/// Between full reads of the bans in force while the store is up (pub/sub carries them in between).
const SYNC_EVERY: u32 = 10;

/// Why the store could not be set up: configuration the checks cannot see (the URL's details, the
/// password file).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("state.redis: {0}")]
    Url(redis::RedisError),
    #[error("state.password_file {path}: {error}")]
    PasswordFile { path: String, error: std::io::Error },
    #[error("state.fingerprint_key_file {path}: {reason}")]
    FingerprintKey { path: String, reason: String },
}

/// The fleet's fingerprint secret from `[state] fingerprint_key_file`: at least 32 bytes (trailing newlines
/// aside), the same file on every instance.
pub fn fingerprint_secret(config: &StateConfig) -> Result<Option<Vec<u8>>, SetupError> {
    let Some(path) = &config.fingerprint_key_file else { return Ok(None) };
    let bad = |reason: String| SetupError::FingerprintKey { path: path.display().to_string(), reason };
    let mut bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.len() < 32 {
        return Err(bad(format!("holds {} bytes; at least 32 are needed (e.g. openssl rand -hex 32)", bytes.len())));
    }
    Ok(Some(bytes))
}

/// What a store is built from, checked before anything starts; connecting happens in [`RedisStore::start`].
pub struct RedisSetup {
    client: redis::Client,
    config: StateConfig,
}

impl RedisSetup {
    pub fn new(config: &StateConfig) -> Result<Self, SetupError> {
        let info = config.redis.as_str().into_connection_info().map_err(SetupError::Url)?;
        // RESP3, for pub/sub on the same multiplexed connection.
        let mut redis = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        if let Some(path) = &config.password_file {
            let text = std::fs::read_to_string(path)
                .map_err(|error| SetupError::PasswordFile { path: path.display().to_string(), error })?;
            redis = redis.set_password(text.trim_end_matches(['\r', '\n']));
        }
        // Small request/reply exchanges: without TCP_NODELAY, Nagle's algorithm and delayed ACKs hold
        // pipelined calls for tens of milliseconds (the fleet benchmark's ban propagation showed 28 ms).
        // Keepalive notices a Redis that vanished without closing.
        let keepalive = redis::io::tcp::socket2::TcpKeepalive::new().with_time(Duration::from_secs(30));
        let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true).set_keepalive(keepalive);
        let info = info.set_redis_settings(redis).set_tcp_settings(tcp);
        let client = redis::Client::open(info).map_err(SetupError::Url)?;
        Ok(Self { client, config: config.clone() })
    }
}

/// Whether the store answers, as the last call found it.
struct Health {
    up: AtomicBool,
    /// `imapgate_state_store_up{store="redis"}`, resolved once (every call sets it).
    gauge: prometheus::IntGauge,
    metrics: Arc<Metrics>,
}

impl Health {
    fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn answered(&self) -> bool {
        let was = self.up.swap(true, Ordering::Relaxed);
        self.gauge.set(1);
        if !was {
            tracing::warn!(event = "state_store_up", "shared state store answers again: defence state is shared");
        }
        !was
    }

    fn failed(&self, op: &'static str, error: &str, on_error: StateOnError) {
        self.metrics.state_store_errors.with_label_values(&[op]).inc();
        self.gauge.set(0);
        if self.up.swap(false, Ordering::Relaxed) {
            let fallback = match on_error {
                StateOnError::Local => "logins are decided with this instance's own state",
                StateOnError::Closed => "logins are refused (state.on_error = \"closed\")",
            };
            tracing::error!(event = "state_store_down", op, error, "shared state store unreachable: {fallback}");
        }
    }
}

struct Inner {
    manager: ConnectionManager,
    layout: Layout,
    timeout: Duration,
    on_error: StateOnError,
    defence: DefenceConfig,
    health: Health,
    evidence: Script,
    success: Script,
    ban: Script,
    adopt: Script,
    unban: Script,
    bans_in_force: Script,
    /// The store answered after an outage: the probe brings this instance's own bans back.
    rejoined: AtomicBool,
}

/// The shared store; cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl RedisStore {
    /// Connects lazily (Redis may be down at start-up: the instance starts alone and joins when it can),
    /// subscribes to the fleet's bans and starts the probe that keeps the local ban cache in step. The
    /// probe ends when `phase` leaves `Running`.
    pub fn start(
        setup: RedisSetup,
        defence: DefenceConfig,
        state: Arc<dyn DefenceState>,
        metrics: Arc<Metrics>,
        phase: watch::Receiver<Phase>,
    ) -> Result<Self, SetupError> {
        let layout = Layout::new(&setup.config.prefix);
        let channel = layout.channel();
        let heard = {
            let (state, metrics) = (Arc::clone(&state), Arc::clone(&metrics));
            move |push: PushInfo| -> Result<(), std::convert::Infallible> {
                hear(&push, &channel, state.as_ref(), &metrics);
                Ok(())
            }
        };
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_max_delay(Duration::from_secs(2))
            .set_push_sender(heard)
            .set_automatic_resubscription();
        let manager = ConnectionManager::new_lazy_with_config(setup.client, manager_config).map_err(SetupError::Url)?;
        for op in OPS {
            metrics.state_store_errors.with_label_values(&[op]).inc_by(0);
            let _ = metrics.state_store_seconds.with_label_values(&[op]);
        }
        let gauge = metrics.state_store_up.with_label_values(&["redis"]);
        gauge.set(1);
        let inner = Inner {
            manager,
            layout,
            timeout: setup.config.timeout,
            on_error: setup.config.on_error,
            defence,
            health: Health { up: AtomicBool::new(true), gauge, metrics },
            evidence: Script::new(scripts::EVIDENCE),
            success: Script::new(scripts::SUCCESS),
            ban: Script::new(scripts::BAN),
            adopt: Script::new(scripts::ADOPT),
            unban: Script::new(scripts::UNBAN),
            rejoined: AtomicBool::new(false),
            bans_in_force: Script::new(scripts::BANS_IN_FORCE),
        };
        let store = Self { inner: Arc::new(inner) };
        tokio::spawn(store.clone().probe(state, phase));
        Ok(store)
    }

    /// Once a second: subscribes until that succeeds, and reads the bans in force when the store has just
    /// come back and every `SYNC_EVERY` seconds (a ban announced while this instance was away is not missed).
    async fn probe(self, state: Arc<dyn DefenceState>, mut phase: watch::Receiver<Phase>) {
        let mut subscribed = false;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut count: u32 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = crate::lifecycle::stopping(&mut phase) => return,
            }
            let inner = &self.inner;
            // After an outage the connection is a new one: subscribe again rather than trust that the
            // manager's resubscription raced no announcement.
            if !inner.health.is_up() {
                subscribed = false;
            }
            if !subscribed {
                let mut manager = inner.manager.clone();
                let channel = inner.layout.channel();
                subscribed =
                    self.call("subscribe", true, async move { manager.subscribe(channel).await }).await.is_ok();
            }
            let rejoined = inner.health.is_up() && inner.rejoined.swap(false, Ordering::Relaxed);
            let due = count % SYNC_EVERY == 0 || !inner.health.is_up() || rejoined;
            count = count.wrapping_add(1);
            if due {
                let mut manager = inner.manager.clone();
                let mut invocation = inner.bans_in_force.key(inner.layout.bans());
                invocation.arg(SYNC_MAX);
                let reply: Result<Vec<String>, _> =
                    self.call("sync", true, async move { invocation.invoke_async(&mut manager).await }).await;
                if let Ok(reply) = reply {
                    let now = Instant::now();
                    for ban in scripts::parse_bans(&reply) {
                        if state.apply_ban(ban.key, ban.remaining, ban.count, now) {
                            inner.health.metrics.state_store_bans_received.inc();
                        }
                    }
                }
            }
            if rejoined {
                self.bring_back(state.as_ref()).await;
            }
        }
    }

    /// After an outage: the bans this instance made alone go to the fleet (a longer one there stays).
    async fn bring_back(&self, state: &dyn DefenceState) {
        let inner = &self.inner;
        let bans = state.bans_in_force(Instant::now());
        let mut adopted = 0u32;
        for (key, remaining, count) in bans.into_iter().take(SYNC_MAX) {
            let mut invocation = inner.adopt.key(inner.layout.ban(&key));
            invocation
                .key(inner.layout.bans())
                .arg(key.to_string())
                .arg(remaining.as_millis().max(1) as u64)
                .arg(count)
                .arg(inner.defence.ban_max.as_millis().max(1) as u64)
                .arg(inner.layout.channel());
            let mut manager = inner.manager.clone();
            match self.call("ban", true, async move { invocation.invoke_async::<i64>(&mut manager).await }).await {
                Ok(news) => adopted += u32::from(news == 1),
                // Down again: the next return tries again.
                Err(_) => return inner.rejoined.store(true, Ordering::Relaxed),
            }
        }
        if adopted > 0 {
            tracing::info!(
                event = "fleet_rejoined",
                bans = adopted,
                "bans made while the state store was away are shared"
            );
        }
    }

    /// One bounded call. While the store is down only the probe (`probe`) tries it: logins decide at once.
    async fn call<T>(
        &self,
        op: &'static str,
        probe: bool,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let inner = &self.inner;
        if !probe && !inner.health.is_up() {
            return Err(StoreError("unreachable".into()));
        }
        let started = Instant::now();
        let outcome = tokio::time::timeout(inner.timeout, call).await;
        let error = match outcome {
            Ok(Ok(value)) => {
                let metrics = &inner.health.metrics;
                metrics.state_store_seconds.with_label_values(&[op]).observe(started.elapsed().as_secs_f64());
                if inner.health.answered() {
                    // Back: the probe reads the bans announced meanwhile and brings this instance's own.
                    inner.rejoined.store(true, Ordering::Relaxed);
                }
                return Ok(value);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} ms", inner.timeout.as_millis()),
        };
        inner.health.failed(op, &error, inner.on_error);
        Err(StoreError(error))
    }

    fn leak_per_ms(&self, key: &IpNet, keys: &Keys) -> f64 {
        let d = &self.inner.defence;
        let failures = if Some(*key) == keys.wide && *key != keys.prefix { d.wide_failures } else { d.failures };
        f64::from(failures.max(1)) / (d.window.as_secs_f64().max(1.0) * 1000.0)
    }

    fn half_life_ms(&self) -> u64 {
        self.inner.defence.standing_half_life.as_millis().max(1000) as u64
    }

    /// How long a prefix's record is kept after its last change: long enough for failures to leak out and
    /// standing to decay to nothing.
    fn record_ttl_ms(&self) -> u64 {
        let d = &self.inner.defence;
        let ms = (d.window * 8).max(d.standing_half_life * 10).as_millis();
        ms.clamp(60_000, 7 * 86_400_000) as u64
    }

    fn evidence(
        &self,
        keys: Keys,
        account: String,
        fingerprint: Option<Fingerprint>,
        fail: bool,
    ) -> StoreFuture<Evidence> {
        let store = self.clone();
        Box::pin(async move {
            let inner = &store.inner;
            let counted: Vec<IpNet> = keys.counted().collect();
            let (a, ak) = inner.layout.account(&account);
            let mut invocation = inner.evidence.key(a);
            invocation.key(ak);
            for key in &counted {
                invocation.key(inner.layout.record(key)).key(inner.layout.ban(key));
            }
            invocation
                .arg(if fail { "fail" } else { "view" })
                .arg(counted.len())
                .arg(keys.prefix.to_string())
                .arg(store.half_life_ms())
                .arg(inner.defence.account_reset.as_millis().max(1000) as u64)
                .arg(store.record_ttl_ms())
                .arg(fingerprint.as_ref().map(scripts::fingerprint_hex).unwrap_or_default());
            for key in &counted {
                invocation.arg(store.leak_per_ms(key, &keys).to_string());
            }
            let mut manager = inner.manager.clone();
            let op = if fail { "failure" } else { "view" };
            let reply: Vec<String> =
                store.call(op, false, async move { invocation.invoke_async(&mut manager).await }).await?;
            scripts::parse_evidence(&counted, fingerprint, &reply).map_err(|e| {
                inner.health.metrics.state_store_errors.with_label_values(&[op]).inc();
                StoreError(e.to_string())
            })
        })
    }
}

/// A push from Redis: a ban announced on the channel goes into the local state.
fn hear(push: &PushInfo, channel: &str, state: &dyn DefenceState, metrics: &Metrics) {
    if push.kind != PushKind::Message {
        return;
    }
    let text = |v: &Value| match v {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok().map(str::to_owned),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let (Some(name), Some(message)) = (push.data.first().and_then(text), push.data.get(1).and_then(text)) else {
        return;
    };
    if name != channel {
        return;
    }
    let ban = match scripts::parse_announcement(&message) {
        Some(Announcement::Ban(ban)) => ban,
        Some(Announcement::Lift(key)) => {
            if state.lift_ban(key, Instant::now()) {
                tracing::info!(event = "fleet_unban", prefix = %key, "ban lifted by an administrator elsewhere");
            }
            return;
        }
        None => {
            tracing::warn!(event = "state_store_message", "unreadable ban announcement ignored");
            return;
        }
    };
    if state.apply_ban(ban.key, ban.remaining, ban.count, Instant::now()) {
        metrics.state_store_bans_received.inc();
        tracing::info!(
            event = "fleet_ban",
            prefix = %ban.key,
            duration_secs = ban.remaining.as_secs(),
            "prefix banned by another instance"
        );
    }
}

impl SharedStore for RedisStore {
    fn view(&self, keys: Keys, account: String, fingerprint: Option<Fingerprint>) -> StoreFuture<Evidence> {
        self.evidence(keys, account, fingerprint, false)
    }

    fn failed(&self, keys: Keys, account: String, fingerprint: Option<Fingerprint>) -> StoreFuture<Evidence> {
        self.evidence(keys, account, fingerprint, true)
    }

    fn succeeded(&self, keys: Keys, account: String) -> StoreFuture<()> {
        let store = self.clone();
        Box::pin(async move {
            let inner = &store.inner;
            let counted: Vec<IpNet> = keys.counted().collect();
            let (a, ak) = inner.layout.account(&account);
            let mut invocation = inner.success.key(a);
            invocation.key(ak);
            for key in &counted {
                invocation.key(inner.layout.record(key));
            }
            invocation
                .arg(counted.len())
                .arg(keys.prefix.to_string())
                .arg(store.half_life_ms())
                .arg(inner.defence.account_forget.as_millis().max(1000) as u64)
                .arg(store.record_ttl_ms());
            let mut manager = inner.manager.clone();
            let _: i64 =
                store.call("success", false, async move { invocation.invoke_async(&mut manager).await }).await?;
            Ok(())
        })
    }

    fn ban(&self, key: IpNet) -> StoreFuture<SharedBan> {
        let store = self.clone();
        Box::pin(async move {
            let inner = &store.inner;
            let mut invocation = inner.ban.key(inner.layout.ban(&key));
            invocation
                .key(inner.layout.bans())
                .arg(key.to_string())
                .arg(inner.defence.ban.as_millis().max(1) as u64)
                .arg(inner.defence.ban_max.as_millis().max(1) as u64)
                .arg(inner.layout.channel());
            let mut manager = inner.manager.clone();
            let reply: Vec<String> =
                store.call("ban", false, async move { invocation.invoke_async(&mut manager).await }).await?;
            scripts::parse_ban(key, &reply).map_err(|e| StoreError(e.to_string()))
        })
    }

    fn unban(&self, key: IpNet) -> StoreFuture<bool> {
        let store = self.clone();
        Box::pin(async move {
            let inner = &store.inner;
            let mut invocation = inner.unban.key(inner.layout.ban(&key));
            invocation
                .key(inner.layout.bans())
                .key(inner.layout.record(&key))
                .arg(key.to_string())
                .arg(inner.layout.channel());
            let mut manager = inner.manager.clone();
            let reply: i64 =
                store.call("unban", false, async move { invocation.invoke_async(&mut manager).await }).await?;
            Ok(reply == 1)
        })
    }

    fn closed_on_error(&self) -> bool {
        self.inner.on_error == StateOnError::Closed
    }
}
