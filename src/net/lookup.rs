//! The HTTP side of the user lookup (`route::lookup`): one pooled hyper client, a deadline per request,
//! a bounded cache of answers, and identical concurrent lookups made once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::OnceCell;

use crate::config::LookupConfig;
use crate::route::lookup::{self, Answer, Cache, LookupError, Question};
use crate::telemetry::metrics::Metrics;

type Shared<T> = Arc<OnceCell<T>>;

/// The lookup client of one configuration.
pub struct Lookup {
    pub config: LookupConfig,
    uri: hyper::Uri,
    client: Client<HttpConnector, Empty<Bytes>>,
    cache: Mutex<Cache>,
    /// Lookups under way, by user: later askers wait for the first one's answer.
    inflight: Mutex<HashMap<String, Shared<Result<Answer, LookupError>>>>,
}

impl Lookup {
    pub fn new(config: LookupConfig) -> Result<Self, String> {
        let uri: hyper::Uri = config.url.parse().map_err(|e| format!("route.lookup.url: {e}"))?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .pool_max_idle_per_host(32)
            // As nginx sends them (`Auth-User`): some services match header names exactly.
            .http1_title_case_headers(true)
            .build(connector);
        let cache = Mutex::new(Cache::new(config.max_entries, config.cache, config.negative_cache));
        Ok(Self { config, uri, client, cache, inflight: Mutex::new(HashMap::new()) })
    }

    /// Where `question.user` lives: from the cache, from a lookup under way, or asked now. Answers are
    /// cached only when no password is sent (with one, the answer may depend on it).
    pub async fn find(&self, question: &Question<'_>, metrics: &Metrics) -> Result<Answer, LookupError> {
        if question.password.is_some() {
            return self.ask(question, metrics).await;
        }
        let key = question.user.to_lowercase();
        if let Some(answer) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key, Instant::now()) {
            metrics.lookups.with_label_values(&["cache_hit"]).inc();
            return Ok(answer);
        }
        let cell = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(inflight.entry(key.clone()).or_default())
        };
        let result = cell.get_or_init(|| self.ask(question, metrics)).await.clone();
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if inflight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                inflight.remove(&key);
            }
        }
        if let Ok(answer) = &result {
            self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(&key, answer.clone(), Instant::now());
        }
        result
    }

    async fn ask(&self, question: &Question<'_>, metrics: &Metrics) -> Result<Answer, LookupError> {
        let started = Instant::now();
        let result = self.exchange(question).await;
        metrics.lookup_seconds.observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(Answer::Server { .. }) => "ok",
            Ok(Answer::Refused { .. }) => "refused",
            Err(_) => "error",
        };
        metrics.lookups.with_label_values(&[label]).inc();
        result
    }

    async fn exchange(&self, question: &Question<'_>) -> Result<Answer, LookupError> {
        let mut request = hyper::Request::get(self.uri.clone());
        for (name, value) in lookup::headers(question) {
            request = request.header(name, value);
        }
        let request = request.body(Empty::new()).map_err(|e| LookupError::Unreachable(e.to_string()))?;
        let response = tokio::time::timeout(self.config.timeout, self.client.request(request))
            .await
            .map_err(|_| LookupError::Timeout)?
            .map_err(|e| LookupError::Unreachable(e.to_string()))?;
        let headers = response.headers().iter().map(|(name, value)| (name.as_str(), value.as_bytes()));
        lookup::parse(response.status().as_u16(), headers)
    }
}
