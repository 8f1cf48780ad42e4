//! Logging and tracing: `tracing` with structured fields to stderr (JSON when
//! `HERALD_LOG_FORMAT=json`), filtered by `HERALD_LOG` or `RUST_LOG`, and
//! OpenTelemetry export over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//! W3C trace context travels inside events (`traceparent`), so one trace shows
//! commit → capture → broadcast → flush. Colour codes only when stderr is a
//! terminal (and `NO_COLOR` is unset). [`announce`] tells the user which
//! servers a command talks to, passwords hidden.

use std::collections::HashMap;
use std::io::IsTerminal as _;

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
    // Colour only for a person at a terminal: log files and collectors get plain text.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let text_fmt = (!json).then(|| tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr));

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

/// Prints (to stderr) which servers `command` uses, passwords hidden, so a
/// command pointed at the wrong servers says so at once.
pub fn announce(command: &str, config: &crate::config::Config) {
    eprintln!(
        "{command}: postgres {}, redis {}, env {}",
        redact_url(&config.postgres.url),
        redact_url(&config.redis.url),
        config.env
    );
}

/// `url` with the password of its user-info (`user:password@`) and any
/// `password=` parameter (query, or key=value form) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    if !url.contains("://") {
        // key=value form (`host=… password=…`)
        let words: Vec<String> = url
            .split(' ')
            .map(|w| match w.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => w.to_string(),
            })
            .collect();
        return words.join(" ");
    }
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        let authority_end = out[rest..].find(['/', '?', '#']).map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..authority_end].rfind('@') {
            let userinfo = &out[rest..rest + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest + colon + 1..rest + at, "***");
            }
        }
    }
    if let Some(query) = out.find('?') {
        let (head, params) = out.split_at(query + 1);
        let params: Vec<String> = params
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => p.to_string(),
            })
            .collect();
        out = format!("{head}{}", params.join("&"));
    }
    out
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

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact_url("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("redis://:p%40ss@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(
            redact_url("postgres://u@h/db?password=x&sslmode=off"),
            "postgres://u@h/db?password=***&sslmode=off"
        );
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_url("postgres://u:a@b@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("host=h user=u password=x dbname=d"), "host=h user=u password=*** dbname=d");
    }
}
