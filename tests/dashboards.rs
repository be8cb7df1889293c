//! Keeps the dashboard and the alerts honest: valid JSON with unique panel ids, every query valid PromQL
//! (checked by promtool), every metric name one that a running imapgate exports (scraped here), the
//! exposition accepted by `promtool check metrics`, and the alert unit tests passing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use support::client::TlsClient;
use support::dovecot::Dovecot;
use support::pki::Pki;
use support::proxy::{TestProxy, backend, config_text};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn promtool(args: &[&str], stdin: Option<&str>, dir: &Path) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package 'prometheus'; scripts/test.sh installs it)");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `imapgate_*` identifiers used in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("imapgate_") {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Metric names as they can appear in queries: families plus histogram series suffixes.
fn exported(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

async fn scrape(proxy: &TestProxy) -> String {
    support::admin_get(proxy.admin, "/metrics").await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_valid_promql_over_exported_metrics() {
    // A running instance with some traffic, so that per-command families exist.
    let dir = support::scratch_dir("imapgate-dashboards-");
    let pki = Pki::generate(&dir);
    let dovecot = Dovecot::start("dashboards", &pki, &[]);
    // A pool and a state store (unreachable: its families are exported all the same), so that the pool and
    // fleet families are exported too.
    let rest = format!(
        "{}\n[[pool]]\nname = \"cluster\"\nmembers = [{{ backend = \"mbox\" }}]\n[route]\ndefault = \"cluster\"\n\
         [state]\nredis = \"redis://127.0.0.1:1/0\"\n",
        backend("mbox", dovecot.imap_port)
    );
    let proxy = TestProxy::start(&config_text(&pki, &rest)).await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &pki.ca).await;
    assert!(c.command("a", "LOGIN bob@example.com bob-pw").await.unwrap().tagged.starts_with("a OK"));
    c.send(b"i IDLE\r\n").await.unwrap();
    c.line().await.unwrap();
    c.send(b"DONE\r\n").await.unwrap();
    c.until_tagged("i").await.unwrap();
    c.command("b", "LOGOUT").await.unwrap();
    drop(c);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let exposition = scrape(&proxy).await;
    proxy.stop().await;
    let names = exported(&exposition);

    let (ok, out) = promtool(&["check", "metrics"], Some(&exposition), &dir);
    assert!(ok, "promtool check metrics:\n{out}");

    // The dashboard: JSON, unique ids, queries.
    let text = std::fs::read_to_string(root().join("dashboards/imapgate.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboards/imapgate.json is JSON");
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for panel in panels {
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} used twice");
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    let variables: Vec<&str> =
        dashboard["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(variables, ["datasource", "instance"]);

    // Every query as a recording rule, with Grafana's variables filled in, through promtool.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let concrete = expr.replace("$__rate_interval", "5m").replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&concrete).unwrap()
        ));
    }
    std::fs::write(dir.join("dashboard-rules.yml"), rules).unwrap();
    let (ok, out) = promtool(&["check", "rules", "dashboard-rules.yml"], None, &dir);
    assert!(ok, "dashboard queries are not valid PromQL:\n{out}");

    // Every metric the dashboard and the alerts name is exported.
    let alerts = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap();
    for source in exprs.iter().map(String::as_str).chain([alerts.as_str()]) {
        for name in metric_names(source) {
            assert!(names.contains(&name), "{name} is not exported by imapgate; exported: {names:?}");
        }
    }

    // The alert rules and their unit tests.
    let prometheus_dir = root().join("deploy/prometheus");
    let (ok, out) = promtool(&["check", "rules", "alerts.yml"], None, &prometheus_dir);
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["test", "rules", "alerts_test.yml"], None, &prometheus_dir);
    assert!(ok, "{out}");
}
