//! Observability, on both stores, over real HTTP: `/metrics` scraped after known work shows
//! the exact counters (by queue and kind), histogram counts, the sampled queue gauges, the
//! workflow, cron and outbox metrics; and with an in-memory OpenTelemetry exporter, a job
//! enqueued (a workflow started, an outbox event staged) inside a span runs in a handler span
//! of the same trace, parented on it, across a real worker. Each test runs in a process of its
//! own (nextest), as the metrics recorder and the tracing subscriber are global.

#![allow(missing_docs)]

mod common;
use common::{on_both_stores, token};

use std::collections::BTreeMap;
use std::time::Duration;

use dray::api::Scope;
use dray::cron::ScheduleSpec;
use dray::{
    Client, EnqueueOptions, JobContext, JobError, Outbox, QueueSink, Relay, Worker,
    WorkflowContext, WorkflowError,
};
use dray_server::{App, Catalog, ServerConfig, ServerStore};

#[dray::job(queue = "m-q")]
async fn add_one(_ctx: &JobContext, n: u32) -> Result<u32, JobError> {
    Ok(n + 1)
}

#[dray::job(
    queue = "m-q",
    retry(max_attempts = 2, backoff = "fixed", base = "10ms")
)]
async fn always_fails(_ctx: &JobContext, _n: u32) -> Result<(), JobError> {
    Err(JobError::Transient("no luck".into()))
}

#[dray::job(queue = "m-cron")]
async fn cron_target(_ctx: &JobContext, _v: serde_json::Value) -> Result<(), JobError> {
    Ok(())
}

#[dray::job(queue = "m-events")]
async fn order_placed(_ctx: &JobContext, _v: serde_json::Value) -> Result<(), JobError> {
    Ok(())
}

#[dray::workflow(name = "m_two_steps", queue = "m-wf")]
async fn m_two_steps(ctx: &WorkflowContext, n: u32) -> Result<u32, WorkflowError> {
    let a: u32 = ctx.step("a", || async move { Ok(n + 1) }).await?;
    ctx.step("b", || async move { Ok(a * 2) }).await
}

/// One sample line of the exposition: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("a sample line has a value");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once("=\"").expect("label=\"value\"");
                    (k.to_owned(), v.trim_end_matches('"').to_owned())
                })
                .collect();
            Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().expect("a numeric value"),
            }
        })
        .collect()
}

/// The value of the one series of `name` whose labels include `want`.
fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let hits: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert!(hits.len() <= 1, "{name} {want:?} matches {hits:?}");
    hits.first().map(|s| s.value)
}

async fn scrape(http: &reqwest::Client, base: &str, token: &str) -> Vec<Sample> {
    let r = http
        .get(format!("{base}/metrics"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
    );
    parse(&r.text().await.unwrap())
}

/// Scrapes until `check` holds (the gauges are sampled, the relay runs on its own).
async fn scrape_until(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    what: &str,
    check: impl Fn(&[Sample]) -> bool,
) -> Vec<Sample> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = scrape(http, base, token).await;
        if check(&s) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn metrics_after_known_work<S: ServerStore + dray::WorkflowStore>(store: S) {
    dray_server::metrics::install().unwrap();
    let client = Client::new(store.clone());
    // Work enqueued before any worker runs: the queue gauges see it waiting.
    let idle = dray::Queue::new(store.clone());
    for _ in 0..3 {
        idle.enqueue(
            "m-idle",
            &1,
            &EnqueueOptions::new().kind("nobody_runs_this"),
        )
        .await
        .unwrap();
    }
    idle.enqueue(
        "m-idle",
        &1,
        &EnqueueOptions::new()
            .kind("nobody_runs_this")
            .delay(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let ok = client
        .enqueue_many::<AddOneJob>(&[1, 2, 3, 4, 5])
        .await
        .unwrap();
    let bad = client.enqueue::<AlwaysFailsJob>(&0).await.unwrap();
    // A duplicate of a unique key stores nothing and counts nothing.
    let key = |o: EnqueueOptions| o.key("only-once");
    client.enqueue_with::<AddOneJob>(&9, key).await.unwrap();
    assert!(
        client
            .enqueue_with::<AddOneJob>(&9, key)
            .await
            .unwrap()
            .duplicate
    );

    client
        .upsert_schedule(
            &ScheduleSpec::job("m-every-second", "* * * * * *", "cron_target").queue("m-cron"),
        )
        .await
        .unwrap();
    let mut outbox = Outbox::new("m-orders").unwrap();
    for i in 0..3 {
        outbox.stage("order_placed", &i).unwrap();
    }
    let mut tx = store.pool().begin().await.unwrap();
    outbox.flush(&store, &mut *tx).await.unwrap();
    tx.commit().await.unwrap();

    let worker = Worker::new(store.clone())
        .register(AddOneJob)
        .register(AlwaysFailsJob)
        .register(CronTargetJob)
        .register(OrderPlacedJob)
        .register_workflow(MTwoStepsWorkflow)
        .schedule_crons()
        .relay_outbox(
            Relay::new(
                store.clone(),
                "m-orders",
                QueueSink::new(store.clone(), "m-events").unwrap(),
            )
            .unwrap(),
        )
        .configure(|c| {
            c.gauge_interval = Duration::from_millis(50);
            c.maintenance_interval = Duration::from_millis(50);
        })
        .start()
        .unwrap();
    let run = client
        .start_workflow::<MTwoStepsWorkflow>(&3, "m-run-1")
        .await
        .unwrap();
    assert_eq!(run.result(Duration::from_secs(30)).await.unwrap(), 8);
    for e in &ok {
        client.wait(e.id, Duration::from_secs(30)).await.unwrap();
    }
    client.wait(bad.id, Duration::from_secs(30)).await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let reader = token(&store, "prometheus", &[Scope::Read]).await;
    let app = App::new(store.clone(), ServerConfig::default(), Catalog::new());
    let server = tokio::spawn(dray_server::serve_on(listener, app, std::future::pending()));
    let http = reqwest::Client::new();

    // Without a token: 401, like every other read.
    let r = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    let s = scrape_until(&http, &base, &reader, "relay, cron and gauges", |s| {
        value(s, "dray_outbox_published_total", &[("outbox", "m-orders")]) == Some(3.0)
            && value(
                s,
                "dray_cron_ticks_total",
                &[("schedule", "m-every-second"), ("outcome", "run")],
            )
            .is_some_and(|n| n >= 1.0)
            && value(
                s,
                "dray_queue_jobs",
                &[("queue", "m-idle"), ("state", "available")],
            ) == Some(3.0)
            && value(
                s,
                "dray_outbox_events",
                &[("outbox", "m-orders"), ("state", "pending")],
            ) == Some(0.0)
    })
    .await;
    let job = |name: &str, kind: &str| value(&s, name, &[("queue", "m-q"), ("kind", kind)]);
    assert_eq!(job("dray_jobs_enqueued_total", "add_one"), Some(6.0));
    assert_eq!(job("dray_jobs_enqueued_total", "always_fails"), Some(1.0));
    assert_eq!(job("dray_jobs_started_total", "add_one"), Some(6.0));
    assert_eq!(job("dray_jobs_completed_total", "add_one"), Some(6.0));
    assert_eq!(job("dray_jobs_started_total", "always_fails"), Some(2.0));
    assert_eq!(job("dray_jobs_completed_total", "always_fails"), Some(0.0));
    assert_eq!(job("dray_jobs_retried_total", "always_fails"), Some(1.0));
    assert_eq!(job("dray_jobs_dead_total", "always_fails"), Some(1.0));
    assert_eq!(job("dray_jobs_dead_total", "add_one"), Some(0.0));
    assert_eq!(
        value(
            &s,
            "dray_jobs_failed_total",
            &[
                ("queue", "m-q"),
                ("kind", "always_fails"),
                ("failure", "error")
            ]
        ),
        Some(2.0)
    );
    assert_eq!(job("dray_job_duration_seconds_count", "add_one"), Some(6.0));
    assert_eq!(
        job("dray_job_pickup_latency_seconds_count", "add_one"),
        Some(6.0)
    );
    assert_eq!(
        job("dray_job_duration_seconds_count", "always_fails"),
        Some(2.0)
    );
    // A histogram: cumulative buckets up to +Inf, which equals the count.
    assert_eq!(
        value(
            &s,
            "dray_job_duration_seconds_bucket",
            &[("queue", "m-q"), ("kind", "add_one"), ("le", "+Inf")]
        ),
        Some(6.0)
    );
    assert_eq!(
        value(&s, "dray_jobs_in_flight", &[("queue", "m-q")]),
        Some(0.0)
    );
    // The sampled gauges of the queue nobody serves: 3 waiting, 1 scheduled, none running.
    let idle = |state: &str| {
        value(
            &s,
            "dray_queue_jobs",
            &[("queue", "m-idle"), ("state", state)],
        )
    };
    assert_eq!(idle("scheduled"), Some(1.0));
    assert_eq!(idle("running"), Some(0.0));
    assert!(
        value(
            &s,
            "dray_queue_oldest_available_age_seconds",
            &[("queue", "m-idle")]
        )
        .is_some_and(|age| age > 0.0)
    );
    // Workflows: one run started and completed, its two steps timed; its driving job counted.
    assert_eq!(
        value(
            &s,
            "dray_workflow_runs_started_total",
            &[("workflow", "m_two_steps")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "dray_workflow_runs_ended_total",
            &[("workflow", "m_two_steps"), ("status", "completed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "dray_workflow_step_duration_seconds_count",
            &[("workflow", "m_two_steps")]
        ),
        Some(2.0)
    );
    // The outbox: three published through the relay, each with its latency, none failed; the
    // relay's enqueues are counted as jobs of the event type.
    assert_eq!(
        value(
            &s,
            "dray_outbox_publish_latency_seconds_count",
            &[("outbox", "m-orders")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &s,
            "dray_outbox_publish_failures_total",
            &[("outbox", "m-orders")]
        ),
        None
    );
    assert_eq!(
        value(
            &s,
            "dray_jobs_enqueued_total",
            &[("queue", "m-events"), ("kind", "order_placed")]
        ),
        Some(3.0)
    );
    // Cron: every tick run was also enqueued as a job of its target; ticks have delays.
    let ticks = value(
        &s,
        "dray_cron_ticks_total",
        &[("schedule", "m-every-second"), ("outcome", "run")],
    )
    .unwrap();
    assert_eq!(
        value(
            &s,
            "dray_cron_tick_delay_seconds_count",
            &[("schedule", "m-every-second")]
        ),
        Some(ticks)
    );
    // Help and type lines come with the metrics.
    let text = http
        .get(format!("{base}/metrics"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("# TYPE dray_jobs_completed_total counter"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE dray_job_duration_seconds histogram"),
        "{text}"
    );
    assert!(text.contains("# HELP dray_jobs_completed_total "), "{text}");

    worker.shutdown().await.unwrap();
    server.abort();
}

async fn worker_metrics_on_their_own_address<S: ServerStore>(store: S) {
    // A worker process without the API: /metrics alone, no token. The recorder goes in before
    // the worker starts (serve installs it too, but in its own task: maybe after the job ran).
    dray_server::metrics::install().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(dray_server::metrics::serve(listener, async move {
        let _ = stop_rx.await;
    }));
    let client = Client::new(store.clone());
    let worker = Worker::new(store.clone())
        .register(AddOneJob)
        .start()
        .unwrap();
    let e = client.enqueue::<AddOneJob>(&41).await.unwrap();
    client.wait(e.id, Duration::from_secs(30)).await.unwrap();
    let http = reqwest::Client::new();
    let s = scrape_until(&http, &base, "", "the completion", |s| {
        value(
            s,
            "dray_jobs_completed_total",
            &[("queue", "m-q"), ("kind", "add_one")],
        ) == Some(1.0)
    })
    .await;
    assert_eq!(
        value(
            &s,
            "dray_jobs_started_total",
            &[("queue", "m-q"), ("kind", "add_one")]
        ),
        Some(1.0)
    );
    worker.shutdown().await.unwrap();
    let _ = stop_tx.send(());
    served.await.unwrap().unwrap();
}

/// The guide lists every metric, and the Grafana dashboard queries only metrics that exist.
#[test]
fn the_guide_and_the_dashboard_match_the_metrics() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs");
    let guide = std::fs::read_to_string(format!("{root}/observability.md")).unwrap();
    for name in dray::metrics::ALL {
        assert!(
            guide.contains(&format!("| `{name}` |")),
            "{name} is not in the guide's table"
        );
    }
    let dashboard = std::fs::read_to_string(format!("{root}/grafana-dashboard.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(json["panels"].as_array().is_some_and(|p| p.len() > 10));
    let mut used = std::collections::BTreeSet::new();
    for (i, _) in dashboard.match_indices("dray_") {
        let name: String = dashboard[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if name.len() > "dray_".len() {
            used.insert(name);
        }
    }
    for name in &used {
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            dray::metrics::ALL.contains(&base),
            "the dashboard queries {name}, which Dray does not record"
        );
    }
    let all: std::collections::BTreeSet<&str> = dray::metrics::ALL.iter().copied().collect();
    let queried: std::collections::BTreeSet<&str> = used
        .iter()
        .map(|n| {
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
        })
        .collect();
    assert_eq!(
        all.difference(&queried).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "every metric has a panel"
    );
}

on_both_stores!(
    metrics_after_known_work,
    worker_metrics_on_their_own_address
);
