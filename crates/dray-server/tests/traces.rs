//! Traces across the queue, on both stores, with an in-memory OpenTelemetry exporter behind
//! `tracing-opentelemetry`: a job enqueued inside a span runs in a `dray.job` span of the same
//! trace whose parent is that span, across a real worker; so does the driving job of a
//! workflow run started inside a span (its steps' `dray.step` spans are children of it), and a
//! job delivered by an outbox relay for an event staged inside a span. The subscriber is
//! global: each test runs in a process of its own (nextest).

#![allow(missing_docs)]

mod common;
use common::on_both_stores;

use std::time::Duration;

use dray::{
    Client, JobContext, JobError, Outbox, QueueSink, Relay, Worker, WorkflowContext, WorkflowError,
};
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

#[dray::job(queue = "t-q")]
async fn traced(_ctx: &JobContext, n: u32) -> Result<u32, JobError> {
    Ok(n + 1)
}

#[dray::job(queue = "t-events")]
async fn order_placed(_ctx: &JobContext, _v: serde_json::Value) -> Result<(), JobError> {
    Ok(())
}

#[dray::workflow(name = "t_flow", queue = "t-wf")]
async fn t_flow(ctx: &WorkflowContext, n: u32) -> Result<u32, WorkflowError> {
    let a: u32 = ctx.step("first", || async move { Ok(n + 1) }).await?;
    ctx.step("second", || async move { Ok(a * 2) }).await
}

fn install() -> InMemorySpanExporter {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let tracer = provider.tracer("dray-test");
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
    tracing::subscriber::set_global_default(subscriber).unwrap();
    exporter
}

fn attr(s: &SpanData, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

/// The finished spans named `name` whose `key` attribute is `value`.
fn spans(exporter: &InMemorySpanExporter, name: &str, key: &str, value: &str) -> Vec<SpanData> {
    exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.name == name && attr(s, key).as_deref() == Some(value))
        .collect()
}

/// The one finished span named `name` (a span of the test's own).
fn own(exporter: &InMemorySpanExporter, name: &str) -> (TraceId, SpanId) {
    let all: Vec<SpanData> = exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.name == name)
        .collect();
    assert_eq!(all.len(), 1, "one span {name}");
    (
        all[0].span_context.trace_id(),
        all[0].span_context.span_id(),
    )
}

/// Waits until `check` holds (a span is exported when it closes, just after the handler).
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn enqueue_to_handler_is_one_trace<S: dray_server::ServerStore + dray::WorkflowStore>(
    store: S,
) {
    let exporter = install();
    let client = Client::new(store.clone());
    let worker = Worker::new(store.clone())
        .register(TracedJob)
        .register(OrderPlacedJob)
        .register_workflow(TFlowWorkflow)
        .relay_outbox(
            Relay::new(
                store.clone(),
                "t-orders",
                QueueSink::new(store.clone(), "t-events").unwrap(),
            )
            .unwrap(),
        )
        .start()
        .unwrap();

    // A job enqueued inside the request's span.
    let job = async { client.enqueue::<TracedJob>(&1).await.unwrap() }
        .instrument(tracing::info_span!("http.request"))
        .await;
    client.wait(job.id, Duration::from_secs(30)).await.unwrap();
    let id = job.id.to_string();
    until("the job's span", || {
        !spans(&exporter, "dray.job", "id", &id).is_empty()
    })
    .await;
    let (trace, parent) = own(&exporter, "http.request");
    let handler = spans(&exporter, "dray.job", "id", &id);
    assert_eq!(handler.len(), 1);
    assert_eq!(handler[0].span_context.trace_id(), trace);
    assert_eq!(handler[0].parent_span_id, parent);
    assert!(handler[0].parent_span_is_remote);
    assert_eq!(attr(&handler[0], "kind").as_deref(), Some("traced"));
    // The header the worker followed is on the stored job.
    let stored = client.get(job.id).await.unwrap().unwrap();
    assert_eq!(
        stored.headers["traceparent"],
        format!("00-{trace}-{parent}-01")
    );

    // A workflow run started inside a span: its driving job's span is the span's child, and
    // each step's span is a child of a driving job's span.
    let run = async {
        client
            .start_workflow::<TFlowWorkflow>(&5, "t-run")
            .await
            .unwrap()
    }
    .instrument(tracing::info_span!("start.flow"))
    .await;
    assert_eq!(run.result(Duration::from_secs(30)).await.unwrap(), 12);
    let run_id = run.run_id().to_string();
    until("the steps' spans", || {
        exporter
            .get_finished_spans()
            .unwrap()
            .iter()
            .filter(|s| s.name == "dray.step")
            .count()
            >= 2
    })
    .await;
    let (flow_trace, flow_parent) = own(&exporter, "start.flow");
    let drivers = spans(&exporter, "dray.job", "id", &run_id);
    assert!(!drivers.is_empty());
    for d in &drivers {
        assert_eq!(d.span_context.trace_id(), flow_trace);
        assert_eq!(d.parent_span_id, flow_parent);
    }
    let steps: Vec<SpanData> = exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "dray.step")
        .collect();
    let mut names: Vec<String> = steps.iter().filter_map(|s| attr(s, "step")).collect();
    names.sort();
    assert_eq!(names, ["first", "second"]);
    for s in &steps {
        assert_eq!(s.span_context.trace_id(), flow_trace);
        assert!(
            drivers
                .iter()
                .any(|d| d.span_context.span_id() == s.parent_span_id),
            "a step's parent is a driving job's span"
        );
    }

    // An outbox event staged inside a span, relayed to a queue: the job's handler span is the
    // staging span's child.
    let mut outbox = Outbox::new("t-orders").unwrap();
    tracing::info_span!("stage.order").in_scope(|| {
        outbox
            .stage("order_placed", &serde_json::json!({"order": 7}))
            .unwrap();
    });
    let mut tx = store.pool().begin().await.unwrap();
    outbox.flush(&store, &mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    until("the relayed job's span", || {
        !spans(&exporter, "dray.job", "kind", "order_placed").is_empty()
    })
    .await;
    let (stage_trace, stage_span) = own(&exporter, "stage.order");
    let relayed = spans(&exporter, "dray.job", "kind", "order_placed");
    assert_eq!(relayed.len(), 1);
    assert_eq!(relayed[0].span_context.trace_id(), stage_trace);
    assert_eq!(relayed[0].parent_span_id, stage_span);

    // Without a span around it, an enqueue adds no header and its handler starts a trace of
    // its own.
    let plain = client.enqueue::<TracedJob>(&2).await.unwrap();
    client
        .wait(plain.id, Duration::from_secs(30))
        .await
        .unwrap();
    let stored = client.get(plain.id).await.unwrap().unwrap();
    assert!(!stored.headers.contains_key("traceparent"));

    worker.shutdown().await.unwrap();
}

on_both_stores!(enqueue_to_handler_is_one_trace);
