//! Logging, tracing (OpenTelemetry, exported over OTLP when configured) and the Prometheus
//! recorder.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::level_filters::LevelFilter;
use tracing::{Event, Subscriber, span};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, JsonFields, Writer};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::LogFormat;

/// The environment variable that switches span export on (the OpenTelemetry standard one).
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

static PROVIDER: std::sync::OnceLock<SdkTracerProvider> = std::sync::OnceLock::new();

/// Installs the global `tracing` subscriber: the log output, filtered by `RUST_LOG` (default
/// `info`), and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, the OpenTelemetry layer, which gives
/// every `info` span a W3C trace and span id (whatever `RUST_LOG` says) and exports spans over
/// OTLP (http/protobuf); `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER` and `OTEL_BSP_*` configure it
/// as the standard says. Without it there is no OpenTelemetry layer at all: tracing off costs
/// nothing per span (installed always, the layer builds every `info` span's data for nothing),
/// and no trace context is made, stored or forwarded.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let otel = export_configured().then(|| {
        let provider = PROVIDER.get_or_init(tracer_provider).clone();
        let otel = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("trellis"))
            .with_tracked_inactivity(false)
            // Entering a span does not make its context the current OpenTelemetry context: that
            // costs a context clone and a thread-local push on every poll of every instrumented
            // future. The trace context is read from the `tracing` span instead
            // (`OpenTelemetrySpanExt::context`), and `trace::started` starts a span's context
            // where it is made, so that the log lines inside it carry its ids.
            .with_context_activation(false)
            // The span names say where a span comes from: the source location, thread and
            // target attributes would be five more strings on every exported span.
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_filter(LevelFilter::INFO);
        WithoutEnterExit(otel)
    });
    let fmt = tracing_subscriber::fmt::layer().with_target(true);
    let fmt = match format {
        LogFormat::Json => fmt.fmt_fields(JsonFields::new()).event_format(TraceJson::new()).with_filter(filter).boxed(),
        LogFormat::Pretty => fmt.with_filter(filter).boxed(),
    };
    // A second init (tests running several apps in one process) keeps the first subscriber.
    drop(tracing_subscriber::registry().with(otel).with(fmt).try_init());
}

/// A layer passing on everything but span enters and exits, which it drops.
///
/// Futures instrumented with a span enter and leave it on every poll (sqlx enters the
/// request's span once for each row it yields), and each of those would cost the OpenTelemetry
/// layer, behind its level filter, two span lookups, a lock of the span's extensions and a
/// clock read, only to move the span's end time to its last exit. With no context activation
/// and no busy/idle timings the layer needs nothing else from enters and exits; a span's end
/// time is then when it closes (its last handle dropped), which for a request is when its
/// response has been sent.
struct WithoutEnterExit<L>(L);

impl<S: Subscriber, L: tracing_subscriber::Layer<S>> tracing_subscriber::Layer<S> for WithoutEnterExit<L> {
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.0.on_register_dispatch(subscriber)
    }
    fn on_layer(&mut self, subscriber: &mut S) {
        self.0.on_layer(subscriber)
    }
    fn register_callsite(&self, metadata: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        self.0.register_callsite(metadata)
    }
    fn enabled(&self, metadata: &tracing::Metadata<'_>, ctx: Context<'_, S>) -> bool {
        self.0.enabled(metadata, ctx)
    }
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_new_span(attrs, id, ctx)
    }
    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.0.max_level_hint()
    }
    fn on_record(&self, span: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        self.0.on_record(span, values, ctx)
    }
    fn on_follows_from(&self, span: &span::Id, follows: &span::Id, ctx: Context<'_, S>) {
        self.0.on_follows_from(span, follows, ctx)
    }
    fn event_enabled(&self, event: &Event<'_>, ctx: Context<'_, S>) -> bool {
        self.0.event_enabled(event, ctx)
    }
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        self.0.on_event(event, ctx)
    }
    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        self.0.on_close(id, ctx)
    }
    fn on_id_change(&self, old: &span::Id, new: &span::Id, ctx: Context<'_, S>) {
        self.0.on_id_change(old, new, ctx)
    }
    // How the per-layer filter is found and how `OpenTelemetrySpanExt` reaches the layer's
    // context: the same forwarding as tracing-subscriber's own wrappers.
    #[allow(unsafe_code)]
    unsafe fn downcast_raw(&self, id: std::any::TypeId) -> Option<*const ()> {
        if id == std::any::TypeId::of::<Self>() {
            return Some(self as *const Self as *const ());
        }
        // SAFETY: the pointer is the inner layer's own answer for `id`, and the inner layer
        // lives as long as `self`.
        unsafe { self.0.downcast_raw(id) }
    }
}

/// Whether span export is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` set and not empty).
pub fn export_configured() -> bool {
    std::env::var(OTLP_ENDPOINT_ENV).is_ok_and(|e| !e.trim().is_empty())
}

/// The tracer provider: with a batch OTLP exporter when `OTEL_EXPORTER_OTLP_ENDPOINT` is set,
/// bare otherwise. An exporter that cannot be built is reported and export stays off.
fn tracer_provider() -> SdkTracerProvider {
    let builder = SdkTracerProvider::builder();
    let endpoint = std::env::var(OTLP_ENDPOINT_ENV).unwrap_or_default();
    if endpoint.trim().is_empty() {
        return builder.build();
    }
    match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
        Ok(exporter) => builder.with_batch_exporter(exporter).build(),
        Err(e) => {
            eprintln!(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter cannot be built ({e}); spans are not exported"
            );
            builder.build()
        }
    }
}

/// Exports the spans still buffered and stops the exporter. Called once at process exit.
pub fn shutdown_tracing() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.force_flush();
        let _ = provider.shutdown();
    }
}

/// The JSON log format with the current span's `trace_id` and `span_id` at the top level of
/// every line written inside a span.
struct TraceJson(format::Format<format::Json>);

impl TraceJson {
    fn new() -> Self {
        Self(format::format().json().flatten_event(true).with_current_span(true))
    }
}

impl<S, N> FormatEvent<S, N> for TraceJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    format::Format<format::Json>: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let ids = ctx.lookup_current().and_then(|span| {
            let extensions = span.extensions();
            let data = extensions.get::<tracing_opentelemetry::OtelData>()?;
            Some((data.trace_id()?, data.span_id()?))
        });
        let Some((trace_id, span_id)) = ids.filter(|(t, s)| *t != TraceId::INVALID && *s != SpanId::INVALID) else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => {
                write!(writer, "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",")?;
                writer.write_str(rest)
            }
            None => writer.write_str(&line),
        }
    }
}

/// Latency buckets in seconds, 1 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle)
/// and starts its upkeep. Every `*_seconds` histogram gets real buckets.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("bucket list is not empty")
                .install_recorder()
                .expect("the metrics recorder is installed once");
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawning the upkeep thread");
            record_binary_size();
            handle
        })
        .clone()
}

/// `trellis_build_binary_size_bytes`: the size of this process's executable, read once at
/// start-up. The guide's B→C table has "API binary size > 200 MB" as a trigger; every binary
/// exports it so that the trigger (and the dashboard) can see each of them.
fn record_binary_size() {
    match std::env::current_exe().and_then(std::fs::metadata) {
        Ok(meta) => crate::instrument::BinarySizeRead { bytes: meta.len() }.emit(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read this executable's size; trellis_build_binary_size_bytes is not exported")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_json_line_inside_a_span_carries_its_trace_and_span_id_and_one_outside_none() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")).with_context_activation(false))
            .with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(JsonFields::new())
                    .event_format(TraceJson::new())
                    .with_writer(move || writer.clone()),
            );
        let (trace_id, span_id) = tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            // As the processes do: no context activation on entry; the span started where made.
            let span = crate::trace::started(tracing::info_span!("request", request_id = "r1"));
            let ids = span.in_scope(|| {
                tracing::info!(n = 1, "inside");
                let cx = tracing::Span::current().context();
                let sc = cx.span().span_context().clone();
                (sc.trace_id().to_string(), sc.span_id().to_string())
            });
            drop(span);
            ids
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect(l)).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["message"], "outside");
        assert!(lines[0].get("trace_id").is_none(), "{text}");
        assert_eq!(lines[1]["message"], "inside");
        assert_eq!(lines[1]["n"], 1);
        assert_eq!(lines[1]["span"]["request_id"], "r1");
        assert_eq!(lines[1]["trace_id"], trace_id.as_str());
        assert_eq!(lines[1]["span_id"], span_id.as_str());
        assert_ne!(trace_id, opentelemetry::trace::TraceId::INVALID.to_string());
    }

    #[derive(Debug, Clone, Default)]
    struct Collected(Arc<Mutex<Vec<opentelemetry_sdk::trace::SpanData>>>);

    impl opentelemetry_sdk::trace::SpanExporter for Collected {
        async fn export(
            &self,
            batch: Vec<opentelemetry_sdk::trace::SpanData>,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    #[test]
    fn spans_entered_many_times_export_once_each_with_their_parent_and_end_at_close() {
        let collected = Collected::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(collected.clone()).build();
        let otel = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("test"))
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(LevelFilter::INFO);
        let subscriber = tracing_subscriber::registry().with(WithoutEnterExit(otel));
        let (before_close, parent_id) = tracing::subscriber::with_default(subscriber, || {
            let parent = crate::trace::started(tracing::info_span!("parent"));
            for _ in 0..50 {
                parent.in_scope(|| {});
            }
            let child = parent.in_scope(|| tracing::info_span!("child"));
            child.in_scope(|| {});
            drop(child);
            // Nothing below info reaches the layer, enters or not.
            parent.in_scope(|| drop(tracing::debug_span!("hidden").entered()));
            let parent_id = parent.context().span().span_context().span_id();
            let before_close = std::time::SystemTime::now();
            drop(parent);
            (before_close, parent_id)
        });
        let spans = collected.0.lock().unwrap().clone();
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
        assert_eq!(names, ["child", "parent"]);
        let (child, parent) = (&spans[0], &spans[1]);
        assert_eq!(parent.span_context.span_id(), parent_id);
        assert_eq!(child.parent_span_id, parent_id);
        assert_eq!(child.span_context.trace_id(), parent.span_context.trace_id());
        // Ended when closed, not at its last exit (before `before_close`).
        assert!(parent.end_time >= before_close, "{:?} < {before_close:?}", parent.end_time);
        assert!(child.end_time <= parent.end_time && parent.start_time <= child.start_time);
    }
}
