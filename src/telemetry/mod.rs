//! Telemetry: diagnostic logging with `tracing` (human-readable or JSON lines, filtered by `RUST_LOG` or the
//! configured level), optional OpenTelemetry trace export over OTLP/gRPC, Prometheus metrics and the audit
//! log, and the hook that turns a session task's panic into one counted line (`panics`).

pub mod audit;
pub mod metrics;
pub mod panics;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat, OtelConfig};

/// Keeps the trace pipeline alive; dropping it flushes and shuts the exporter down.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Sends every finished span now.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            if let Err(e) = provider.force_flush() {
                tracing::warn!(error = %e, "trace flush failed");
            }
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// The OTLP exporter runs on its own small tokio runtime: the SDK's batch processor exports from a plain
/// thread, where tonic would find no reactor.
#[derive(Debug)]
struct OnOwnRuntime {
    inner: opentelemetry_otlp::SpanExporter,
    runtime: tokio::runtime::Runtime,
}

impl SpanExporter for OnOwnRuntime {
    fn export(&self, batch: Vec<SpanData>) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        std::future::ready(self.runtime.block_on(self.inner.export(batch)))
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

fn otlp_provider(otel: &OtelConfig) -> Result<SdkTracerProvider, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("imapgate-otlp")
        .build()
        .map_err(|e| format!("otel: runtime: {e}"))?;
    let inner = {
        let _context = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(otel.endpoint.clone())
            .with_timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| format!("otel.endpoint: {e}"))?
    };
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(otel.service_name.clone()).build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(OnOwnRuntime { inner, runtime })
        .with_resource(resource)
        .build())
}

/// Dependencies' warnings about what clients send (rustls: "Illegal SNI extension: ignoring IP address
/// presented as hostname", common and harmless) are noise at a front door: they show only when the
/// configured level asks for debug output, or names the dependency itself.
fn with_quiet_dependencies(level: &str) -> String {
    const NOISY: &[&str] = &["rustls", "h2", "hyper", "tonic"];
    let lower = level.to_ascii_lowercase();
    if lower.contains("debug") || lower.contains("trace") {
        return level.to_owned();
    }
    let mut directives = level.to_owned();
    for dependency in NOISY.iter().filter(|d| !lower.contains(*d)) {
        directives.push_str(&format!(",{dependency}=error"));
    }
    directives
}

/// Installs the global subscriber: the log output, and with `otel` an OpenTelemetry layer exporting spans.
/// Returns an error if the filter or the endpoint is invalid, or a subscriber is already set.
pub fn init(log: &LogConfig, otel: Option<&OtelConfig>) -> Result<TelemetryGuard, String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(from_env) if !from_env.is_empty() => EnvFilter::try_new(from_env),
        _ => EnvFilter::try_new(with_quiet_dependencies(&log.level)),
    }
    .map_err(|e| format!("log.level: {e}"))?;
    let output = match log.format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let provider = otel.map(otlp_provider).transpose()?;
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer().with_tracer(p.tracer("imapgate")).with_filter(EnvFilter::new("imapgate=info"))
    });
    tracing_subscriber::registry()
        .with(output.with_filter(filter))
        .with(traces)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(TelemetryGuard { provider })
}

#[cfg(test)]
mod tests {
    use super::with_quiet_dependencies;

    #[test]
    fn dependency_noise_is_kept_for_debug() {
        assert_eq!(with_quiet_dependencies("info"), "info,rustls=error,h2=error,hyper=error,tonic=error");
        assert_eq!(with_quiet_dependencies("debug"), "debug");
        assert_eq!(with_quiet_dependencies("info,rustls=warn"), "info,rustls=warn,h2=error,hyper=error,tonic=error");
        assert!(tracing_subscriber::EnvFilter::try_new(with_quiet_dependencies("warn,imapgate=info")).is_ok());
    }
}
