//! Logging and tracing: `tracing` with structured fields to stderr (JSON when
//! `HERALD_LOG_FORMAT=json`), filtered by `HERALD_LOG` or `RUST_LOG`, and
//! OpenTelemetry export over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//! W3C trace context travels inside events (`traceparent`), so one trace shows
//! commit → capture → broadcast → flush.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Flushes exported spans when dropped; keep it alive in `main`.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber for `service`. Call once, from `main`.
pub fn init(service: &'static str) -> anyhow::Result<TelemetryGuard> {
    let filter = std::env::var("HERALD_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    let filter = EnvFilter::try_new(filter)?;
    let json = std::env::var("HERALD_LOG_FORMAT").is_ok_and(|f| f == "json");
    let json_fmt = json.then(|| tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr));
    let text_fmt = (!json).then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));

    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
        Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
    } else {
        None
    };
    let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));
    tracing_subscriber::registry().with(otel).with(filter).with(json_fmt).with(text_fmt).try_init()?;
    Ok(TelemetryGuard { provider })
}

/// Makes `span` a child of the trace named by a W3C `traceparent` value.
/// An empty or malformed value leaves the span a root.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}

/// The W3C `traceparent` of `span`, or empty when tracing export is off.
pub fn traceparent(span: &tracing::Span) -> String {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent").unwrap_or_default()
}
