//! W3C trace context (`traceparent`, `tracestate`) in and out of gRPC metadata, HTTP headers
//! and plain key/value lists, so one trace covers client → router → worker.
//!
//! The sender injects the *current tracing span's* OpenTelemetry context; the receiver
//! extracts a [`Context`] and makes it the parent of its request span with
//! [`set_span_parent`]. The propagator is always W3C TraceContext, built here rather than
//! read from the global, so these helpers behave the same in tests that install no
//! subscriber. Malformed or absent headers extract to an empty context (a new root trace):
//! a bad `traceparent` from a client is never an error.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Keys are the propagator's fixed lowercase ASCII names; a value that is not valid
        // metadata (it always is for W3C) is skipped rather than sent broken.
        let Ok(key) = tonic::metadata::MetadataKey::from_bytes(key.as_bytes()) else {
            return;
        };
        if let Ok(value) = tonic::metadata::MetadataValue::try_from(value.as_str()) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                tonic::metadata::KeyRef::Ascii(key) => Some(key.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let Ok(name) = http::HeaderName::from_bytes(key.as_bytes()) else {
            return;
        };
        if let Ok(value) = http::HeaderValue::from_str(&value) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct PairsInjector<'a>(&'a mut Vec<(String, String)>);

impl Injector for PairsInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator writes an empty `tracestate` when there is none; it carries nothing.
        if value.is_empty() {
            return;
        }
        self.0
            .retain(|(existing, _)| !existing.eq_ignore_ascii_case(key));
        self.0.push((key.to_owned(), value));
    }
}

struct PairsExtractor<'a>(&'a [(String, String)]);

impl Extractor for PairsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, value)| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_str()).collect()
    }
}

fn current_context() -> Context {
    tracing::Span::current().context()
}

/// Writes the current span's trace context into outgoing gRPC metadata.
pub fn inject_context(metadata: &mut tonic::metadata::MetadataMap) {
    TraceContextPropagator::new()
        .inject_context(&current_context(), &mut MetadataInjector(metadata));
}

/// Reads the caller's trace context from incoming gRPC metadata.
pub fn extract_context(metadata: &tonic::metadata::MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// Writes the current span's trace context into outgoing HTTP headers.
pub fn inject_context_into_headers(headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(&current_context(), &mut HeaderInjector(headers));
}

/// Reads the caller's trace context from incoming HTTP headers.
pub fn extract_context_from_headers(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The current span's trace context as `(name, value)` pairs (`traceparent`, and
/// `tracestate` when set): the transport-neutral form a `RequestContext` carries.
/// Empty when the current span has no valid OpenTelemetry context.
pub fn current_trace_headers() -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    TraceContextPropagator::new()
        .inject_context(&current_context(), &mut PairsInjector(&mut pairs));
    pairs
}

/// Reads a trace context from `(name, value)` pairs (names compared case-insensitively).
pub fn extract_context_from_pairs(pairs: &[(String, String)]) -> Context {
    TraceContextPropagator::new().extract(&PairsExtractor(pairs))
}

/// Writes `(name, value)` trace pairs into outgoing gRPC metadata, for a caller that carries
/// the context as data (e.g. a router forwarding `RequestContext::trace_headers`).
pub fn inject_pairs_into_metadata(
    pairs: &[(String, String)],
    metadata: &mut tonic::metadata::MetadataMap,
) {
    let mut injector = MetadataInjector(metadata);
    for (name, value) in pairs {
        injector.set(&name.to_ascii_lowercase(), value.clone());
    }
}

/// Makes `parent` the parent of `span`, so a request span joins the caller's trace. Call it
/// before the span is first entered. An empty `parent` (no incoming context) leaves the span
/// a root; when no OpenTelemetry layer is installed this does nothing.
pub fn set_span_parent(span: &tracing::Span, parent: Context) {
    // Fails only when the span was already started or has no OpenTelemetry data; both leave
    // the span a valid root, which is the documented fallback.
    let _ = span.set_parent(parent);
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
    use tracing_subscriber::layer::SubscriberExt as _;

    fn with_otel_subscriber<T>(body: impl FnOnce() -> T) -> T {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, body)
    }

    fn trace_id_of(span: &tracing::Span) -> opentelemetry::trace::TraceId {
        span.context().span().span_context().trace_id()
    }

    fn is_w3c_traceparent(value: &str) -> bool {
        let parts: Vec<&str> = value.split('-').collect();
        parts.len() == 4
            && parts[0] == "00"
            && parts[1].len() == 32
            && parts[2].len() == 16
            && parts
                .iter()
                .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
    }

    #[test]
    fn metadata_round_trip_joins_the_same_trace() {
        with_otel_subscriber(|| {
            let router_span = tracing::info_span!("route");
            let mut metadata = tonic::metadata::MetadataMap::new();
            router_span.in_scope(|| inject_context(&mut metadata));
            let traceparent = metadata
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .expect("traceparent injected");
            assert!(is_w3c_traceparent(traceparent), "{traceparent}");

            let worker_span = tracing::info_span!("worker_generate");
            set_span_parent(&worker_span, extract_context(&metadata));
            assert_eq!(trace_id_of(&worker_span), trace_id_of(&router_span));
        });
    }

    #[test]
    fn headers_and_pairs_round_trip_join_the_same_trace() {
        with_otel_subscriber(|| {
            let http_span = tracing::info_span!("http_request");
            let mut headers = http::HeaderMap::new();
            let pairs = http_span.in_scope(|| {
                inject_context_into_headers(&mut headers);
                current_trace_headers()
            });
            assert_eq!(pairs.len(), 1, "{pairs:?}");
            assert_eq!(pairs[0].0, "traceparent");

            let from_headers = tracing::info_span!("a");
            set_span_parent(&from_headers, extract_context_from_headers(&headers));
            let from_pairs = tracing::info_span!("b");
            set_span_parent(&from_pairs, extract_context_from_pairs(&pairs));
            assert_eq!(trace_id_of(&from_headers), trace_id_of(&http_span));
            assert_eq!(trace_id_of(&from_pairs), trace_id_of(&http_span));

            let mut metadata = tonic::metadata::MetadataMap::new();
            inject_pairs_into_metadata(&pairs, &mut metadata);
            let via_metadata = tracing::info_span!("c");
            set_span_parent(&via_metadata, extract_context(&metadata));
            assert_eq!(trace_id_of(&via_metadata), trace_id_of(&http_span));
        });
    }

    #[test]
    fn malformed_traceparent_starts_a_new_trace() {
        with_otel_subscriber(|| {
            let pairs = vec![("TraceParent".to_owned(), "00-zz-not-hex".to_owned())];
            let context = extract_context_from_pairs(&pairs);
            assert!(!context.span().span_context().is_valid());

            let well_formed = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
            let pairs = vec![("TraceParent".to_owned(), well_formed.to_owned())];
            let span = tracing::info_span!("child");
            set_span_parent(&span, extract_context_from_pairs(&pairs));
            assert_eq!(
                trace_id_of(&span).to_string(),
                "0af7651916cd43dd8448eb211c80319c"
            );
        });
    }

    #[test]
    fn no_subscriber_means_no_headers() {
        assert!(current_trace_headers().is_empty());
    }
}
