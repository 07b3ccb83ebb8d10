//! W3C trace context across the queue: the span that enqueues a job (or starts a workflow run,
//! or stages an outbox event) becomes the parent of the span its handler runs in, in whatever
//! process runs it.
//!
//! With the `opentelemetry` feature (on the `dray` facade: `features = ["opentelemetry"]`) and
//! a [`tracing-opentelemetry`](https://docs.rs/tracing-opentelemetry) layer installed, an
//! enqueue writes the current span's context into the job's headers as
//! [`TRACEPARENT`] (and [`TRACESTATE`] when there is one), and the worker parents its
//! `dray.job` span on it, so a trace reads request → enqueue → handler → steps. A
//! `traceparent` the caller put in the headers itself (say, from an incoming HTTP request, or
//! a job enqueued over the HTTP API with `headers`) is kept and followed the same way.
//!
//! Without the feature these functions do nothing, and nothing is added to a job.

use std::collections::BTreeMap;

/// The header that carries the W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
pub const TRACEPARENT: &str = "traceparent";
/// The header that carries the W3C `tracestate`, when the context has one.
pub const TRACESTATE: &str = "tracestate";

/// The current span's trace context as `(traceparent, tracestate)`, if it belongs to a
/// sampled-or-not valid OpenTelemetry trace.
#[cfg(feature = "opentelemetry")]
pub fn current() -> Option<(String, Option<String>)> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::Span::current();
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return None;
    }
    let parent = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    );
    let state = sc.trace_state().header();
    Some((parent, (!state.is_empty()).then_some(state)))
}

/// Without the `opentelemetry` feature there is no trace context to read.
#[cfg(not(feature = "opentelemetry"))]
pub fn current() -> Option<(String, Option<String>)> {
    None
}

/// Adds the current span's context to `headers` unless they carry a `traceparent` already.
pub fn inject(headers: &mut BTreeMap<String, String>) {
    if headers.contains_key(TRACEPARENT) {
        return;
    }
    if let Some((parent, state)) = current() {
        headers.insert(TRACEPARENT.to_owned(), parent);
        if let Some(state) = state {
            headers.insert(TRACESTATE.to_owned(), state);
        }
    }
}

/// `headers` serialized as stored, with the current span's context added (see [`inject`]):
/// no copy of the map when there is nothing to add.
pub(crate) fn headers_json(headers: &BTreeMap<String, String>) -> serde_json::Result<String> {
    if headers.contains_key(TRACEPARENT) {
        return serde_json::to_string(headers);
    }
    match current() {
        None => serde_json::to_string(headers),
        Some(_) => {
            let mut h = headers.clone();
            inject(&mut h);
            serde_json::to_string(&h)
        }
    }
}

/// Makes the context in `traceparent` (with its `tracestate`) the parent of `span`. A missing or
/// malformed value leaves the span where it is (a new root, or the current span's child).
#[cfg(feature = "opentelemetry")]
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let Some(tp) = traceparent else { return };
    let Some((trace_id, span_id, flags)) = parse(tp) else {
        return;
    };
    let state = tracestate
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let sc = SpanContext::new(
        TraceId::from(trace_id),
        SpanId::from(span_id),
        TraceFlags::new(flags),
        true,
        state,
    );
    // Without a tracing-opentelemetry layer there is nothing to parent (an error we ignore).
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
}

/// Without the `opentelemetry` feature spans are not parented across the queue.
#[cfg(not(feature = "opentelemetry"))]
pub fn set_parent(_span: &tracing::Span, _traceparent: Option<&str>, _tracestate: Option<&str>) {}

/// Parses a version-00 `traceparent` into (trace id, span id, flags); all-zero ids are invalid.
pub fn parse(tp: &str) -> Option<(u128, u64, u8)> {
    let mut parts = tp.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let lower_hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(trace) || !lower_hex(span) || !lower_hex(flags) {
        return None;
    }
    let trace = u128::from_str_radix(trace, 16).ok()?;
    let span = u64::from_str_radix(span, 16).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    (trace != 0 && span != 0).then_some((trace, span, flags))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn traceparent_parsing_follows_w3c() {
        assert_eq!(
            parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1))
        );
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
