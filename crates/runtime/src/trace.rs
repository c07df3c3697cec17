//! W3C trace context across the outbox and the broker (see docs/ARCHITECTURE.md, "Tracing").
//!
//! A request's span context is written on each outbox row it causes (`traceparent`,
//! `tracestate`), the relay copies it into the NATS headers of the same names, and each
//! consumer starts a process span per message as a child of that context (or linked only, see
//! [`ParentMode`]). The ids are made by the OpenTelemetry layer that `telemetry::init_logging`
//! installs when span export is configured; without it no context is made, and rows and
//! messages carry none (tracing off costs nothing per span).

use std::collections::HashMap;
use std::sync::OnceLock;

use async_nats::HeaderMap;
use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The W3C header carrying trace id, parent span id and flags.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header carrying vendor trace state.
pub const TRACESTATE: &str = "tracestate";

/// How a consumer's process span relates to the context a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ParentMode {
    /// A child of the message's context (one trace from the request on), and linked to it.
    #[default]
    Child,
    /// A new trace, linked to the message's context.
    Link,
}

static CONSUMER_PARENT: OnceLock<ParentMode> = OnceLock::new();

/// Sets how this process's consumers relate their process spans to a message (once; later
/// calls are ignored).
pub fn set_consumer_parent(mode: ParentMode) {
    let _ = CONSUMER_PARENT.set(mode);
}

/// How this process's consumers relate their process spans to a message.
pub fn consumer_parent() -> ParentMode {
    CONSUMER_PARENT.get().copied().unwrap_or_default()
}

/// A W3C trace context as it is stored on an outbox row and sent in NATS headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

impl TraceHeaders {
    /// The headers of `cx`'s span, if it has a valid one.
    pub fn of(cx: &Context) -> Option<Self> {
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(cx, &mut carrier);
        let traceparent = carrier.remove(TRACEPARENT)?;
        let tracestate = carrier.remove(TRACESTATE).filter(|s| !s.is_empty());
        Some(Self { traceparent, tracestate })
    }

    /// The headers of the current `tracing` span.
    pub fn current() -> Option<Self> {
        Self::of(&tracing::Span::current().context())
    }

    /// Parses `traceparent` (and `tracestate`); `None` unless the result is a valid remote
    /// span context.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
        let mut carrier = HashMap::new();
        carrier.insert(TRACEPARENT.to_owned(), traceparent.to_owned());
        if let Some(state) = tracestate {
            carrier.insert(TRACESTATE.to_owned(), state.to_owned());
        }
        let cx = TraceContextPropagator::new().extract(&carrier);
        let sc = cx.span().span_context().clone();
        sc.is_valid().then_some(sc)
    }

    /// This context as a remote span context.
    pub fn span_context(&self) -> Option<SpanContext> {
        Self::parse(&self.traceparent, self.tracestate.as_deref())
    }

    /// The trace id: the second field of `traceparent`.
    pub fn trace_id(&self) -> Option<&str> {
        self.traceparent.split('-').nth(1)
    }

    /// The context carried by NATS message headers.
    pub fn from_nats(headers: Option<&HeaderMap>) -> Option<Self> {
        let headers = headers?;
        let traceparent = headers.get(TRACEPARENT)?.as_str().to_owned();
        let tracestate = headers.get(TRACESTATE).map(|v| v.as_str().to_owned()).filter(|s| !s.is_empty());
        Some(Self { traceparent, tracestate })
    }

    /// Writes this context into NATS message headers under `traceparent` and `tracestate`.
    pub fn to_nats(&self, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT, self.traceparent.as_str());
        if let Some(state) = &self.tracestate {
            headers.insert(TRACESTATE, state.as_str());
        }
    }
}

/// Makes `span` a child of `parent` (a remote context) and links it to `parent`, or only links
/// it when `mode` is [`ParentMode::Link`]. Must be called before `span` is first entered.
pub fn relate(span: &tracing::Span, parent: &SpanContext, mode: ParentMode) {
    if mode == ParentMode::Child {
        let _ = span.set_parent(Context::new().with_remote_span_context(parent.clone()));
    }
    span.add_link(parent.clone());
}

/// `span`, its OpenTelemetry context started now (it is otherwise started when a child is made or
/// its context is first read): the log lines written inside it then carry its trace and span
/// ids. Call it once the span's parent and links are set.
pub fn started(span: tracing::Span) -> tracing::Span {
    let _ = span.context();
    span
}

/// Links `span` to `other`.
pub fn link(span: &tracing::Span, other: &SpanContext) {
    span.add_link(other.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_through_nats_headers() {
        let headers = TraceHeaders {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: Some("vendor=x".into()),
        };
        let mut nats = HeaderMap::new();
        headers.to_nats(&mut nats);
        assert_eq!(TraceHeaders::from_nats(Some(&nats)), Some(headers.clone()));
        let sc = headers.span_context().expect("valid");
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(sc.trace_state().header(), "vendor=x");
        assert_eq!(headers.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        let cx = Context::new().with_remote_span_context(sc);
        assert_eq!(TraceHeaders::of(&cx), Some(headers));
    }

    #[test]
    fn an_invalid_traceparent_is_no_context() {
        for bad in [
            "",
            "00-abc",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceHeaders::parse(bad, None).is_none(), "{bad}");
        }
    }
}
