//! Trace export for real: an in-test OTLP/gRPC receiver (the collector's trace service from the
//! opentelemetry-proto definitions, served with tonic) receives a session's spans, and the session id in
//! them is the one Dovecot logged from `x-session-id`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use imapgate::config::{LogConfig, OtelConfig};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use support::client::TlsClient;
use support::dovecot::Dovecot;
use support::pki::Pki;
use support::proxy::{TestProxy, backend, config_text};

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| match a.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        other => Some(format!("{other:?}")),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_spans_reach_an_otlp_collector_with_the_session_id() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let log = LogConfig { level: "imapgate=info".into(), ..LogConfig::default() };
    let otel = OtelConfig { endpoint, service_name: "imapgate-test".into() };
    let telemetry = imapgate::telemetry::init(&log, Some(&otel)).unwrap();

    let dir = support::scratch_dir("imapgate-otel-");
    let pki = Pki::generate(&dir);
    let dovecot = Dovecot::start("otel", &pki, &[]);
    let rest = format!("{}\n[route]\ndefault = \"mbox\"\n", backend("mbox", dovecot.imap_port));
    let proxy = TestProxy::start(&config_text(&pki, &rest)).await;
    let (mut c, _) = TlsClient::greeted(proxy.addr, &pki.ca).await;
    assert!(c.command("a", "LOGIN bob@example.com bob-pw").await.unwrap().tagged.starts_with("a OK"));
    c.command("b", "LOGOUT").await.unwrap();
    drop(c);
    let line = dovecot.wait_for_log_line(&["Login: user=<bob@example.com>"]).unwrap();
    let session_id = line.split("session=<").nth(1).unwrap().split('>').next().unwrap().to_owned();
    proxy.stop().await;

    let wanted = ["session", "tls_handshake", "pre_auth", "login", "backend_connect", "starttls", "authenticate"];
    let spans = support::wait_until(Duration::from_secs(15), || {
        telemetry.flush();
        let spans = collector.spans.lock().unwrap().clone();
        wanted.iter().all(|w| spans.iter().any(|s| s.name == *w)).then_some(spans)
    })
    .unwrap_or_else(|| {
        panic!("spans missing: {:?}", collector.spans.lock().unwrap().iter().map(|s| &s.name).collect::<Vec<_>>())
    });

    let session = spans
        .iter()
        .find(|s| s.name == "session" && attribute(s, "session_id").as_deref() == Some(session_id.as_str()))
        .unwrap_or_else(|| panic!("no session span with session_id {session_id}"));
    assert_eq!(attribute(session, "user").as_deref(), Some("bob@example.com"));
    assert!(attribute(session, "peer").unwrap().starts_with("127.0.0.1:"));
    // The children belong to this session's trace, under the session span.
    for name in &wanted[1..] {
        let child = spans
            .iter()
            .find(|s| s.name == *name && s.trace_id == session.trace_id)
            .unwrap_or_else(|| panic!("no {name} span in the session's trace"));
        assert!(!child.parent_span_id.is_empty(), "{name} has no parent");
    }
    let pre_auth = spans.iter().find(|s| s.name == "pre_auth" && s.trace_id == session.trace_id).unwrap();
    assert_eq!(pre_auth.parent_span_id, session.span_id);
    drop(telemetry);
}
