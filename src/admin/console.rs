//! The live console: one page (`console.html`, embedded in the binary: no CDN, no build step) that asks for
//! a token, keeps it in the browser's session storage and draws from the API. Its history is a ring of
//! samples taken here every [`SAMPLE_EVERY`] for [`HISTORY`] (180 small samples); per-command rates and
//! p95 come from the command histograms, compared with the snapshot a minute back.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode};
use prometheus::proto::MetricFamily;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::AdminState;
use crate::lifecycle::Phase;

pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How far back the charts go.
pub const HISTORY: Duration = Duration::from_secs(15 * 60);
const SAMPLES: usize = (HISTORY.as_secs() / SAMPLE_EVERY.as_secs()) as usize;
/// Command snapshots kept for the per-command table: a minute back.
const COMMAND_SNAPSHOTS: usize = 13;

const PAGE: &str = include_str!("console.html");

/// One point of the charts.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    unix: u64,
    sessions: usize,
    logins_ok: u64,
    logins_failed: u64,
    bans: usize,
    backends_up: usize,
}

/// Per command: completions, and the duration histogram's cumulative bucket counts.
type CommandTotals = HashMap<String, (u64, Vec<(f64, u64)>)>;

/// The console's memory: bounded rings.
#[derive(Debug, Default)]
pub struct History {
    inner: Mutex<Rings>,
}

#[derive(Debug, Default)]
struct Rings {
    samples: VecDeque<Sample>,
    commands: VecDeque<CommandTotals>,
}

fn counter_sum(families: &[MetricFamily], name: &str, label: &str, values: &[&str]) -> u64 {
    families
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .filter(|m| m.get_label().iter().any(|l| l.name() == label && values.contains(&l.value())))
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

fn command_totals(families: &[MetricFamily]) -> CommandTotals {
    let mut totals = CommandTotals::new();
    for family in families.iter().filter(|f| f.name() == "imapgate_command_duration_seconds") {
        for metric in family.get_metric() {
            let Some(command) = metric.get_label().iter().find(|l| l.name() == "command") else { continue };
            let h = metric.get_histogram();
            let mut buckets: Vec<(f64, u64)> =
                h.get_bucket().iter().map(|b| (b.upper_bound(), b.cumulative_count())).collect();
            buckets.push((f64::INFINITY, h.get_sample_count()));
            totals.insert(command.value().to_owned(), (h.get_sample_count(), buckets));
        }
    }
    totals
}

fn take_sample(state: &AdminState, families: &[MetricFamily]) -> Sample {
    let shared = (state.current)();
    Sample {
        unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        sessions: shared.sessions.len(),
        logins_ok: counter_sum(families, "imapgate_auth_attempts_total", "result", &["success"]),
        logins_failed: counter_sum(families, "imapgate_auth_attempts_total", "result", &["bad_credentials"]),
        bans: shared.defence.bans().len(),
        backends_up: shared.config.backends.iter().filter(|b| shared.circuits.healthy(b)).count(),
    }
}

/// Takes a sample every [`SAMPLE_EVERY`] until shutdown.
pub async fn sample(state: Arc<AdminState>, mut phase: watch::Receiver<Phase>) {
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = crate::lifecycle::stopping(&mut phase) => return,
        }
        let families = state.metrics.gather();
        let sample = take_sample(&state, &families);
        let commands = command_totals(&families);
        let mut rings = state.history.inner.lock().unwrap_or_else(|p| p.into_inner());
        rings.samples.push_back(sample);
        while rings.samples.len() > SAMPLES {
            rings.samples.pop_front();
        }
        rings.commands.push_back(commands);
        while rings.commands.len() > COMMAND_SNAPSHOTS {
            rings.commands.pop_front();
        }
    }
}

/// The smallest bucket bound holding 95% of the observations between two cumulative snapshots.
fn p95(now: &[(f64, u64)], before: Option<&[(f64, u64)]>) -> Option<f64> {
    let earlier = |bound: f64| before.and_then(|b| b.iter().find(|(u, _)| *u == bound)).map_or(0, |(_, c)| *c);
    let deltas: Vec<(f64, u64)> = now.iter().map(|(u, c)| (*u, c.saturating_sub(earlier(*u)))).collect();
    let total = deltas.last().map(|(_, c)| *c)?;
    if total == 0 {
        return None;
    }
    let wanted = (total as f64 * 0.95).ceil() as u64;
    deltas.iter().find(|(_, c)| *c >= wanted).map(|(u, _)| *u)
}

/// Tiles, the charts' series, the per-command table (the last minute).
pub fn overview(state: &AdminState) -> Value {
    let families = state.metrics.gather();
    let current = take_sample(state, &families);
    let commands_now = command_totals(&families);
    let rings = state.history.inner.lock().unwrap_or_else(|p| p.into_inner());
    let mut points: Vec<Sample> = rings.samples.iter().copied().collect();
    points.push(current);
    let series: Vec<Value> = points
        .windows(2)
        .map(|w| {
            let (a, b) = (w[0], w[1]);
            let secs = b.unix.saturating_sub(a.unix).max(1) as f64;
            let (ok, failed) =
                (b.logins_ok.saturating_sub(a.logins_ok), b.logins_failed.saturating_sub(a.logins_failed));
            let ratio = if ok + failed == 0 { 0.0 } else { failed as f64 / (ok + failed) as f64 };
            json!({
                "t": b.unix,
                "sessions": b.sessions,
                "logins_per_s": (ok + failed) as f64 / secs,
                "failure_ratio": ratio,
                "bans": b.bans,
            })
        })
        .collect();
    let minute_ago = rings.commands.front();
    let span = (rings.commands.len().max(1) as u64 * SAMPLE_EVERY.as_secs()) as f64;
    let mut commands: Vec<Value> = commands_now
        .iter()
        .filter_map(|(name, (count, buckets))| {
            let before = minute_ago.and_then(|m| m.get(name));
            let done = count.saturating_sub(before.map_or(0, |(c, _)| *c));
            (done > 0).then(|| {
                json!({
                    "command": name,
                    "per_s": done as f64 / span,
                    "p95_ms": p95(buckets, before.map(|(_, b)| b.as_slice())).map(|s| s * 1000.0),
                })
            })
        })
        .collect();
    commands.sort_by(|a, b| b["per_s"].as_f64().partial_cmp(&a["per_s"].as_f64()).unwrap_or(std::cmp::Ordering::Equal));
    let last = series.last();
    drop(rings);
    let mut clients: Vec<(String, u64)> = families
        .iter()
        .filter(|f| f.name() == "imapgate_clients_total")
        .flat_map(|f| f.get_metric())
        .filter_map(|m| {
            let label = m.get_label().iter().find(|l| l.name() == "client")?;
            let count = m.get_counter().get_value() as u64;
            (count > 0).then(|| (label.value().to_owned(), count))
        })
        .collect();
    clients.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut attention = super::api::attention(state);
    // The console shows the slowest mailboxes in their own table, not as something to act on.
    let slow = attention.as_object_mut().and_then(|a| a.remove("slow_mailboxes")).unwrap_or(Value::Null);
    json!({
        "attention": attention,
        "slow_mailboxes": slow,
        "clients": clients.iter().map(|(c, n)| json!({ "client": c, "logins": n })).collect::<Vec<_>>(),
        "sessions": current.sessions,
        "logins_per_s": last.map_or(json!(0.0), |l| l["logins_per_s"].clone()),
        "failure_ratio": last.map_or(json!(0.0), |l| l["failure_ratio"].clone()),
        "bans": current.bans,
        "backends_up": current.backends_up,
        "backends": (state.current)().config.backends.len(),
        "sample_secs": SAMPLE_EVERY.as_secs(),
        "series": series,
        "commands": commands,
    })
}

/// `GET /` (and `/console`): the page; anything else under it is not found.
pub fn page(method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET {
        return super::text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n");
    }
    if path != "/" && path != "/console" {
        return super::text(StatusCode::NOT_FOUND, "text/plain", "not found\n");
    }
    let mut response = super::text(StatusCode::OK, "text/html; charset=utf-8", PAGE);
    let headers = response.headers_mut();
    // Everything the page needs is inline; nothing may load from elsewhere.
    headers.insert(
        hyper::header::CONTENT_SECURITY_POLICY,
        hyper::header::HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
        ),
    );
    headers.insert(hyper::header::X_FRAME_OPTIONS, hyper::header::HeaderValue::from_static("DENY"));
    headers.insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_of_the_last_minute() {
        let before = [(0.001, 10), (0.01, 10), (0.1, 10), (f64::INFINITY, 10)];
        // Since then: 90 fast, 9 at 10 ms, 1 slow.
        let now = [(0.001, 100), (0.01, 109), (0.1, 110), (f64::INFINITY, 110)];
        assert_eq!(p95(&now, Some(&before)), Some(0.01));
        assert_eq!(p95(&now, None), Some(0.01));
        assert_eq!(p95(&before, Some(&before)), None, "nothing happened");
    }

    #[test]
    fn the_page_is_self_contained() {
        // The only URL is the SVG namespace, which loads nothing.
        assert_eq!(
            PAGE.matches("http").count(),
            PAGE.matches("http://www.w3.org/2000/svg").count(),
            "no external resource"
        );
        assert!(PAGE.contains("sessionStorage"));
    }
}
