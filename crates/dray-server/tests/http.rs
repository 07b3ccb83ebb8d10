//! The HTTP API over real HTTP, against a running server on both stores: every resource, the
//! error statuses, idempotent POSTs, live events to the end of a job and of a workflow with
//! `Last-Event-ID` resume, a worker over plain HTTP with fencing, and token scopes. PostgreSQL
//! must be running (these tests fail, never skip, when it is not).

#![allow(missing_docs)]

mod common;
use common::{on_both_stores, pg_url, token};

use std::time::Duration;

use dray::api::Scope;
use dray::{JobContext, JobError, Worker, WorkflowContext, WorkflowError};
use dray_server::{App, Auth, Catalog, ServerConfig, ServerStore};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;

// ---- jobs and workflows the server knows ----------------------------------------------------

#[dray::job(queue = "http-jobs")]
async fn count_to(ctx: &JobContext, n: u32) -> Result<u32, JobError> {
    for i in 1..=n {
        tokio::time::sleep(Duration::from_millis(40)).await;
        ctx.progress((i * 100 / n.max(1)) as u8, format!("{i}/{n}"))
            .await?;
    }
    Ok(n * 2)
}

#[dray::workflow(name = "approval")]
async fn approval(ctx: &WorkflowContext, amount: u32) -> Result<String, WorkflowError> {
    let checked: u32 = ctx.step("check", || async move { Ok(amount) }).await?;
    ctx.set_state("stage", &"waiting").await?;
    let who: Option<String> = ctx
        .wait_for_signal("approve", Some(Duration::from_secs(60)))
        .await?;
    let who = who.unwrap_or_else(|| "nobody".to_owned());
    let line = format!("{checked} approved by {who}");
    ctx.step("record", || {
        let line = line.clone();
        async move { Ok(line) }
    })
    .await
}

#[dray::workflow(name = "two_steps")]
async fn two_steps(ctx: &WorkflowContext, start: u32) -> Result<u32, WorkflowError> {
    let a: u32 = ctx.step("a", || async move { Ok(start + 1) }).await?;
    ctx.sleep(Duration::from_millis(50)).await?;
    ctx.step("b", || async move { Ok(a + 1) }).await
}

/// An input whose decoding panics on a magic value: a bug in user code, inside a handler.
#[derive(serde::Serialize, Clone, Debug)]
struct Fragile(u32);

impl<'de> serde::Deserialize<'de> for Fragile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u32::deserialize(d)?;
        assert!(n != 666, "fragile input");
        Ok(Fragile(n))
    }
}

#[dray::workflow(name = "fragile")]
async fn fragile(_ctx: &WorkflowContext, input: Fragile) -> Result<u32, WorkflowError> {
    Ok(input.0)
}

fn catalog<S: ServerStore>() -> Catalog<S> {
    Catalog::new()
        .job::<CountToJob>()
        .workflow::<ApprovalWorkflow>()
        .workflow::<TwoStepsWorkflow>()
        .workflow::<FragileWorkflow>()
}

// ---- the harness ----------------------------------------------------------------------------

struct Server {
    base: String,
    http: reqwest::Client,
    admin: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start<S: ServerStore>(store: S, adjust: impl FnOnce(&mut ServerConfig)) -> Server {
        let admin = token(
            &store,
            &format!("admin-{}", uuid::Uuid::now_v7().simple()),
            &[Scope::Admin],
        )
        .await;
        Server::launch(store, adjust, admin).await
    }

    /// A server whose store holds no token (one that cannot be written to, say).
    async fn start_without_token<S: ServerStore>(store: S) -> Server {
        Server::launch(store, |_| {}, String::new()).await
    }

    async fn launch<S: ServerStore>(
        store: S,
        adjust: impl FnOnce(&mut ServerConfig),
        admin: String,
    ) -> Server {
        let mut config = ServerConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            token_cache: Duration::ZERO,
            event_tick: Duration::from_millis(20),
            max_wait: Duration::from_secs(10),
            ..ServerConfig::default()
        };
        adjust(&mut config);
        let listener = dray_server::bind(&config).await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = App::new(store, config, catalog());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(dray_server::serve_on(listener, app, async move {
            let _ = rx.await;
        }));
        Server {
            base,
            http: reqwest::Client::new(),
            admin,
            stop: Some(tx),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.get_as(path, &self.admin.clone()).await
    }

    async fn get_as(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        read(r).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.post_as(path, body, &self.admin.clone()).await
    }

    async fn post_as(&self, path: &str, body: Value, token: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        read(r).await
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("the server shuts down gracefully, live streams included")
            .unwrap()
            .unwrap();
    }
}

async fn read(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let problem = r.headers().get("content-type").is_some_and(|v| {
        v.to_str()
            .unwrap_or("")
            .starts_with("application/problem+json")
    });
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if !status.is_success() {
        assert!(problem, "an error answers problem+json: {status} {body}");
        assert_eq!(body["status"], status.as_u16(), "{body}");
        assert!(
            body["type"]
                .as_str()
                .unwrap()
                .starts_with("urn:dray:problem:"),
            "{body}"
        );
    }
    (status, body)
}

/// One server-sent event.
#[derive(Debug, Clone)]
struct Sse {
    event: String,
    id: String,
    data: Value,
}

/// An open event stream, read one event at a time.
struct SseReader {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<Vec<u8>>>,
    buf: String,
}

impl SseReader {
    async fn open(http: &reqwest::Client, url: &str, token: &str, last_id: Option<&str>) -> Self {
        use futures_util::StreamExt;
        let mut req = http.get(url).bearer_auth(token);
        if let Some(id) = last_id {
            req = req.header("Last-Event-ID", id);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        SseReader {
            body: r.bytes_stream().map(|c| c.map(|c| c.to_vec())).boxed(),
            buf: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped), or `None` once the stream has closed.
    async fn next(&mut self) -> Option<Sse> {
        use futures_util::StreamExt;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut e = Sse {
                    event: String::new(),
                    id: String::new(),
                    data: Value::Null,
                };
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        e.event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        e.id = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        e.data = serde_json::from_str(v).unwrap();
                    }
                }
                if !e.event.is_empty() {
                    return Some(e);
                }
            }
            let chunk = self.body.next().await?;
            self.buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    }

    /// Events until one for which `until` is true (included), within 20 s.
    async fn until(&mut self, until: impl Fn(&Sse) -> bool) -> Vec<Sse> {
        let mut out = Vec::new();
        let read = async {
            while let Some(e) = self.next().await {
                let stop = until(&e);
                out.push(e);
                if stop {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .expect("the event stream delivers within 20 s");
        out
    }
}

/// Reads events from a stream until it closes or `until` says stop; bounded in time.
async fn events(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    last_id: Option<&str>,
    until: impl Fn(&Sse) -> bool,
) -> Vec<Sse> {
    SseReader::open(http, url, token, last_id)
        .await
        .until(until)
        .await
}

async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- the tests, run on both stores ----------------------------------------------------------

async fn jobs_resource<S: ServerStore>(store: S) {
    let backend = store.backend();
    let s = Server::start(store, |c| c.body_limit = 64 * 1024).await;
    // Enqueue a known kind: its queue comes from the job; Location names it.
    let r = s
        .http
        .post(s.url("/api/v1/jobs"))
        .bearer_auth(&s.admin)
        .json(&json!({"kind": "count_to", "input": 3, "key": "k1", "priority": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let (_, e) = read(r).await;
    let id = e["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/api/v1/jobs/{id}"));
    assert_eq!(e["duplicate"], false);
    let (st, job) = s.get(&location).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(job["queue"], "http-jobs");
    assert_eq!(job["kind"], "count_to");
    assert_eq!(job["priority"], 5);
    assert_eq!(job["state"], "available");
    // The same key while it is unfinished: that job, duplicate.
    let (st, dup) = s
        .post(
            "/api/v1/jobs",
            json!({"kind": "count_to", "input": 3, "key": "k1"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(dup, json!({"id": id, "duplicate": true}));
    // An unknown kind goes to the given queue (for workers in other languages).
    for i in 0..3 {
        let (st, _) = s
            .post(
                "/api/v1/jobs",
                json!({"kind": "py.resize", "input": {"n": i}, "queue": "py", "delay_secs": 3600}),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED);
    }
    // List with filters and cursor pagination.
    let (_, page1) = s.get("/api/v1/jobs?queue=py&limit=2").await;
    assert_eq!(page1["jobs"].as_array().unwrap().len(), 2);
    assert!(
        page1["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["state"] == "scheduled")
    );
    let next = page1["next_before"].as_str().unwrap();
    let (_, page2) = s
        .get(&format!("/api/v1/jobs?queue=py&limit=2&before={next}"))
        .await;
    assert_eq!(page2["jobs"].as_array().unwrap().len(), 1);
    assert!(page2["next_before"].is_null());
    let (_, by_state) = s.get("/api/v1/jobs?state=available").await;
    assert_eq!(by_state["jobs"].as_array().unwrap().len(), 1);
    // Result before it ran; a short wait runs out and says so.
    let (_, res) = s.get(&format!("/api/v1/jobs/{id}/result")).await;
    assert_eq!(res["finished"], false);
    let (st, waited) = s
        .get(&format!("/api/v1/jobs/{id}/wait?timeout_secs=0.2"))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(waited["finished"], false);
    // Cancel, then retry.
    let (st, c) = s
        .post(&format!("/api/v1/jobs/{id}/cancel"), json!(null))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(c, json!("cancelled"));
    let (_, res) = s.get(&format!("/api/v1/jobs/{id}/result")).await;
    assert_eq!(
        (res["state"].clone(), res["finished"].clone()),
        (json!("cancelled"), json!(true))
    );
    let (st, again) = s
        .post(&format!("/api/v1/jobs/{id}/retry"), json!(null))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(again["state"], "available");
    // Queues: every queue with its counts, and one.
    let (_, queues) = s.get("/api/v1/queues").await;
    let names: Vec<&str> = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["queue"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["http-jobs", "py"]);
    let (_, py) = s.get("/api/v1/queues/py").await;
    assert_eq!(
        (py["scheduled"].clone(), py["available"].clone()),
        (json!(3), json!(0))
    );

    // Errors: each with its status, code and (for bad input) the field.
    let missing = uuid::Uuid::now_v7();
    let (st, p) = s.get(&format!("/api/v1/jobs/{missing}")).await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (st, p) = s.get("/api/v1/jobs/not-a-uuid").await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_path"))
    );
    let (st, p) = s.get("/api/v1/jobs?state=finished").await;
    assert_eq!(
        (st, p["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("state"))
    );
    let (st, p) = s.get("/api/v1/jobs?limit=0").await;
    assert_eq!(
        (st, p["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("limit"))
    );
    let (st, p) = s
        .post(
            "/api/v1/jobs",
            json!({"kind": "count_to", "input": "three"}),
        )
        .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_input"))
    );
    let (st, p) = s
        .post("/api/v1/jobs", json!({"kind": "x", "inptu": 1}))
        .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_body"))
    );
    assert!(p["detail"].as_str().unwrap().contains("inptu"), "{p}");
    let (st, p) = s
        .post("/api/v1/jobs", json!({"kind": "x", "queue": "bad queue!"}))
        .await;
    assert_eq!(
        (st, p["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("queue"))
    );
    let (st, p) = s
        .post("/api/v1/jobs", json!({"kind": "x", "delay_secs": -1}))
        .await;
    assert_eq!(
        (st, p["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("delay_secs"))
    );
    let (st, p) = s
        .post(
            "/api/v1/jobs",
            json!({"kind": "x", "delay_secs": 1, "not_before": "2030-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("delay_conflict"))
    );
    let r = s
        .http
        .post(s.url("/api/v1/jobs"))
        .bearer_auth(&s.admin)
        .body("{\"kind\": ")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    let (st, p) = read(r).await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );
    let r = s
        .http
        .post(s.url("/api/v1/jobs"))
        .bearer_auth(&s.admin)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(read(r).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let big = "x".repeat(100 * 1024);
    let (st, p) = s
        .post("/api/v1/jobs", json!({"kind": "x", "input": big}))
        .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large"))
    );
    // A NUL character: PostgreSQL cannot store it in text or JSON, which is bad input (400
    // naming it), never a 500; SQLite stores it.
    for body in [
        json!({"kind": "x", "queue": "nul", "headers": {"a": "b\u{0}c"}}),
        json!({"kind": "x", "queue": "nul", "input": "a\u{0}b"}),
    ] {
        let (st, p) = s.post("/api/v1/jobs", body).await;
        if backend == "postgres" {
            assert_eq!(
                (st, p["field"].as_str()),
                (StatusCode::BAD_REQUEST, Some("text")),
                "{p}"
            );
        } else {
            assert_eq!(st, StatusCode::CREATED, "{p}");
        }
    }
    let (st, p) = s.get("/api/v1/nothing-here").await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("no_route"))
    );
    // Health, readiness and the OpenAPI document need no token.
    let r = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (st, ready) = read(s.http.get(s.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(st, StatusCode::OK);
    assert!(ready["schema_version"].as_i64().unwrap() > 0);
    let (st, doc) = read(
        s.http
            .get(s.url("/api/v1/openapi.json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    for path in [
        "/api/v1/jobs",
        "/api/v1/queues/{queue}/claim",
        "/api/v1/workflows/{run}/events",
        "/api/v1/crons/{name}/trigger",
        "/api/v1/outbox/{outbox}/requeue-failed",
        "/api/v1/tokens/{token}",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} is documented");
    }
    s.stop().await;
}

async fn idempotent_posts<S: ServerStore>(store: S) {
    let s = Server::start(store, |_| {}).await;
    let send = |key: &str, body: Value| {
        s.http
            .post(s.url("/api/v1/jobs"))
            .bearer_auth(&s.admin)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };
    let body = json!({"kind": "py.charge", "queue": "pay", "input": {"cents": 100}});
    let first = send("order-1", body.clone()).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let (_, a) = read(first).await;
    let second = send("order-1", body.clone()).await.unwrap();
    assert_eq!(
        second.status(),
        StatusCode::CREATED,
        "the first answer, replayed"
    );
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    let (_, b) = read(second).await;
    assert_eq!(a, b);
    let (_, page) = s.get("/api/v1/jobs?queue=pay").await;
    assert_eq!(
        page["jobs"].as_array().unwrap().len(),
        1,
        "one job, not two"
    );
    // The same key with another body: refused, nothing enqueued.
    let (st, p) = read(
        send(
            "order-1",
            json!({"kind": "py.charge", "queue": "pay", "input": {"cents": 5}}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("idempotency_key_reused")
        )
    );
    // Another key: another job. A bad key: 400 naming the header.
    let (st, _) = read(send("order-2", body.clone()).await.unwrap()).await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, p) = read(send(&"k".repeat(300), body.clone()).await.unwrap()).await;
    assert_eq!(
        (st, p["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("Idempotency-Key"))
    );
    // An error answer is kept too: the retry gets the same 422.
    let bad = json!({"kind": "count_to", "input": "x"});
    let (st1, p1) = read(send("bad-1", bad.clone()).await.unwrap()).await;
    let (st2, p2) = read(send("bad-1", bad).await.unwrap()).await;
    assert_eq!(
        (st1, st2),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            StatusCode::UNPROCESSABLE_ENTITY
        )
    );
    assert_eq!(p1, p2);
    let (_, page) = s.get("/api/v1/jobs?queue=pay").await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 2);
    s.stop().await;
}

async fn token_scopes<S: ServerStore>(store: S) {
    let s = Server::start(store.clone(), |_| {}).await;
    let reader = token(&store, "reader", &[Scope::Read]).await;
    let writer = token(&store, "writer", &[Scope::Write]).await;
    let worker = token(&store, "worker", &[Scope::Worker]).await;
    let job = json!({"kind": "py.x", "queue": "q"});
    // No token, a malformed header, an unknown token: 401.
    let r = s.http.get(s.url("/api/v1/jobs")).send().await.unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"dray\"");
    assert_eq!(read(r).await.0, StatusCode::UNAUTHORIZED);
    let r = s
        .http
        .get(s.url("/api/v1/jobs"))
        .header("Authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_eq!(read(r).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        s.get_as("/api/v1/jobs", "dray_nope").await.0,
        StatusCode::UNAUTHORIZED
    );
    // read: reads, cannot enqueue; write: both; worker: only the worker routes.
    assert_eq!(s.get_as("/api/v1/jobs", &reader).await.0, StatusCode::OK);
    let (st, p) = s.post_as("/api/v1/jobs", job.clone(), &reader).await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    assert_eq!(
        s.post_as("/api/v1/jobs", job.clone(), &writer).await.0,
        StatusCode::CREATED
    );
    assert_eq!(s.get_as("/api/v1/queues", &writer).await.0, StatusCode::OK);
    assert_eq!(
        s.get_as("/api/v1/jobs", &worker).await.0,
        StatusCode::FORBIDDEN
    );
    let (st, claimed) = s
        .post_as("/api/v1/queues/q/claim", json!({}), &worker)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(claimed["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(
        s.post_as("/api/v1/queues/q/claim", json!({}), &writer)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    // Tokens are admin's: list (no secrets), create, revoke.
    assert_eq!(
        s.get_as("/api/v1/tokens", &writer).await.0,
        StatusCode::FORBIDDEN
    );
    let (_, list) = s.get("/api/v1/tokens").await;
    assert_eq!(list["tokens"].as_array().unwrap().len(), 4);
    assert!(
        !list.to_string().contains(&reader),
        "no secret in a listing"
    );
    let (st, made) = s
        .post(
            "/api/v1/tokens",
            json!({"name": "ci", "scopes": "read,worker"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let ci = made["secret"].as_str().unwrap().to_owned();
    assert_eq!(made["token"]["scopes"], json!(["read", "worker"]));
    assert_eq!(s.get_as("/api/v1/jobs", &ci).await.0, StatusCode::OK);
    let (st, p) = s
        .post("/api/v1/tokens", json!({"name": "ci", "scopes": "read"}))
        .await;
    assert_eq!(
        (st, p["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("token name"))
    );
    let (st, p) = s
        .post("/api/v1/tokens", json!({"name": "x", "scopes": "root"}))
        .await;
    assert_eq!(
        (st, p["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("scope"))
    );
    // Revoked through the API: refused at once. Revoked in the store (`dray tokens revoke`):
    // refused once the cache forgets it (at once here, the cache is off).
    let r = s
        .http
        .delete(s.url("/api/v1/tokens/ci"))
        .bearer_auth(&s.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(read(r).await.0, StatusCode::OK);
    assert_eq!(
        s.get_as("/api/v1/jobs", &ci).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert!(store.token_revoke("reader").await.unwrap());
    assert_eq!(
        s.get_as("/api/v1/jobs", &reader).await.0,
        StatusCode::UNAUTHORIZED
    );
    let r = s
        .http
        .delete(s.url("/api/v1/tokens/ci"))
        .bearer_auth(&s.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(read(r).await.0, StatusCode::NOT_FOUND);
    s.stop().await;
}

async fn http_worker_with_fencing<S: ServerStore>(store: S) {
    let s = Server::start(store.clone(), |_| {}).await;
    let w = token(&store, "py-worker", &[Scope::Worker]).await;
    let ids: Vec<String> = futures_util::future::join_all((0..3).map(|i| {
        s.post(
            "/api/v1/jobs",
            json!({"kind": "py.work", "queue": "ext", "input": i, "max_attempts": 3}),
        )
    }))
    .await
    .into_iter()
    .map(|(_, e)| e["id"].as_str().unwrap().to_owned())
    .collect();
    let (st, claimed) = s
        .post_as(
            "/api/v1/queues/ext/claim",
            json!({"limit": 3, "lease_secs": 30}),
            &w,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let jobs = claimed["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 3);
    let job = |id: &str| jobs.iter().find(|j| j["id"] == id).unwrap().clone();
    let at = |id: &str, op: &str| format!("/api/v1/queues/ext/jobs/{id}/{op}");
    // Heartbeat with progress; the job shows it.
    let j0 = job(&ids[0]);
    assert_eq!(
        (j0["state"].as_str(), j0["attempt"].as_i64()),
        (Some("running"), Some(1))
    );
    let (st, hb) = s
        .post_as(
            &at(&ids[0], "heartbeat"),
            json!({"attempt": 1, "progress": 40, "message": "resizing"}),
            &w,
        )
        .await;
    assert_eq!(
        (st, hb["cancel_requested"].as_bool()),
        (StatusCode::OK, Some(false))
    );
    let (_, seen) = s.get(&format!("/api/v1/jobs/{}", ids[0])).await;
    assert_eq!(
        (seen["progress"].as_i64(), seen["progress_message"].as_str()),
        (Some(40), Some("resizing"))
    );
    // Complete with a result; a second completion of the same attempt is fenced off.
    let (st, _) = s
        .post_as(
            &at(&ids[0], "complete"),
            json!({"attempt": 1, "result": {"w": 64}}),
            &w,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, p) = s
        .post_as(
            &at(&ids[0], "complete"),
            json!({"attempt": 1, "result": "again"}),
            &w,
        )
        .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::CONFLICT, Some("lease_lost"))
    );
    let (_, res) = s.get(&format!("/api/v1/jobs/{}/result", ids[0])).await;
    assert_eq!(
        (res["state"].as_str(), res["result"].clone()),
        (Some("completed"), json!({"w": 64}))
    );
    // A permanent failure: dead at once, with the error recorded.
    let (st, f) = s
        .post_as(
            &at(&ids[1], "fail"),
            json!({"attempt": 1, "error": "bad image", "permanent": true}),
            &w,
        )
        .await;
    assert_eq!((st, f["dead"].as_bool()), (StatusCode::OK, Some(true)));
    let (_, res) = s.get(&format!("/api/v1/jobs/{}/result", ids[1])).await;
    assert_eq!(res["state"], "dead");
    assert_eq!(res["errors"][0]["message"], "bad image");
    assert_eq!(res["errors"][0]["kind"], "permanent");
    // An error message with a NUL character is recorded (the NUL replaced), on both stores.
    let (_, r) = s
        .post(
            "/api/v1/jobs",
            json!({"kind": "py.work", "queue": "ext-nul"}),
        )
        .await;
    let nul_id = r["id"].as_str().unwrap().to_owned();
    s.post_as("/api/v1/queues/ext-nul/claim", json!({}), &w)
        .await;
    let (st, _) = s
        .post_as(
            &format!("/api/v1/queues/ext-nul/jobs/{nul_id}/heartbeat"),
            json!({"attempt": 1, "progress": 5, "message": "half\u{0}way"}),
            &w,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = s
        .post_as(
            &format!("/api/v1/queues/ext-nul/jobs/{nul_id}/fail"),
            json!({"attempt": 1, "error": "bad\u{0}byte", "permanent": true}),
            &w,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (_, res) = s.get(&format!("/api/v1/jobs/{nul_id}/result")).await;
    assert_eq!(res["errors"][0]["message"], "bad\u{FFFD}byte");
    // A cancel request reaches the worker at its next heartbeat.
    let (_, c) = s
        .post(&format!("/api/v1/jobs/{}/cancel", ids[2]), json!(null))
        .await;
    assert_eq!(c, json!("requested"));
    let (_, hb) = s
        .post_as(&at(&ids[2], "heartbeat"), json!({"attempt": 1}), &w)
        .await;
    assert_eq!(hb["cancel_requested"], true);
    // A transient failure: retried (now), the attempt counted; the late write of the old
    // attempt after the job was claimed again changes nothing.
    let (_, r) = s
        .post(
            "/api/v1/jobs",
            json!({"kind": "py.work", "queue": "ext2", "input": 9, "max_attempts": 3}),
        )
        .await;
    let id = r["id"].as_str().unwrap().to_owned();
    let at2 = |op: &str| format!("/api/v1/queues/ext2/jobs/{id}/{op}");
    let (_, c1) = s.post_as("/api/v1/queues/ext2/claim", json!({}), &w).await;
    assert_eq!(c1["jobs"][0]["attempt"], 1);
    let (st, f) = s
        .post_as(
            &at2("fail"),
            json!({"attempt": 1, "error": "timeout upstream", "retry_in_secs": 0}),
            &w,
        )
        .await;
    assert_eq!((st, f["dead"].as_bool()), (StatusCode::OK, Some(false)));
    let (_, c2) = s
        .post_as("/api/v1/queues/ext2/claim", json!({"wait_secs": 5}), &w)
        .await;
    assert_eq!(c2["jobs"][0]["attempt"], 2);
    let (st, p) = s
        .post_as(
            &at2("complete"),
            json!({"attempt": 1, "result": "late"}),
            &w,
        )
        .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::CONFLICT, Some("lease_lost"))
    );
    let (st, _) = s
        .post_as(&at2("heartbeat"), json!({"attempt": 1}), &w)
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, _) = s
        .post_as(&at2("complete"), json!({"attempt": 2, "result": "ok"}), &w)
        .await;
    assert_eq!(st, StatusCode::OK);
    let (_, res) = s.get(&format!("/api/v1/jobs/{id}/result")).await;
    assert_eq!(
        (res["result"].clone(), res["attempts"].clone()),
        (json!("ok"), json!(2))
    );
    // An expired lease is taken back: the job is claimed again with the next attempt, and the
    // first holder's completion is refused.
    let (_, r) = s
        .post(
            "/api/v1/jobs",
            json!({"kind": "py.work", "queue": "ext3", "input": 1}),
        )
        .await;
    let id3 = r["id"].as_str().unwrap().to_owned();
    let (_, c1) = s
        .post_as("/api/v1/queues/ext3/claim", json!({"lease_secs": 1}), &w)
        .await;
    assert_eq!(c1["jobs"][0]["attempt"], 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let again = loop {
        let (_, c) = s
            .post_as("/api/v1/queues/ext3/claim", json!({"wait_secs": 1}), &w)
            .await;
        if !c["jobs"].as_array().unwrap().is_empty() {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expired lease is taken back and the job claimed again"
        );
    };
    assert_eq!(again["jobs"][0]["attempt"], 2);
    let (st, _) = s
        .post_as(
            &format!("/api/v1/queues/ext3/jobs/{id3}/complete"),
            json!({"attempt": 1}),
            &w,
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    // A long-poll claim returns as soon as a job arrives.
    let poll = s.post_as("/api/v1/queues/ext4/claim", json!({"wait_secs": 10}), &w);
    let enqueue = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.post("/api/v1/jobs", json!({"kind": "py.work", "queue": "ext4"}))
            .await
    };
    let started = std::time::Instant::now();
    let ((_, polled), _) = tokio::join!(poll, enqueue);
    assert_eq!(polled["jobs"].as_array().unwrap().len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Bad worker input: 400 naming the field.
    let (st, p) = s
        .post_as("/api/v1/queues/ext/claim", json!({"limit": 0}), &w)
        .await;
    assert_eq!(
        (st, p["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("limit"))
    );
    let (st, p) = s
        .post_as(&at(&ids[2], "complete"), json!({"attempt": 0}), &w)
        .await;
    assert_eq!(
        (st, p["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("attempt"))
    );
    s.stop().await;
}

async fn live_job_events<S: ServerStore>(store: S) {
    let worker = Worker::new(store.clone())
        .register(CountToJob)
        .start()
        .unwrap();
    let s = Server::start(store, |_| {}).await;
    let (_, e) = s
        .post("/api/v1/jobs", json!({"kind": "count_to", "input": 5}))
        .await;
    let id = e["id"].as_str().unwrap().to_owned();
    let url = s.url(&format!("/api/v1/jobs/{id}/events"));
    let got = events(&s.http, &url, &s.admin, None, |_| false).await;
    // Status events as it runs, the final one completed, then `end` with the result; the
    // stream closes by itself.
    let end = got.last().unwrap();
    assert_eq!(end.event, "end");
    assert_eq!(end.data["result"], 10);
    assert_eq!(end.data["state"], "completed");
    let statuses: Vec<&Sse> = got.iter().filter(|e| e.event == "status").collect();
    assert_eq!(statuses.last().unwrap().data["state"], "completed");
    let progress: Vec<i64> = statuses
        .iter()
        .filter_map(|e| e.data["progress"].as_i64())
        .collect();
    assert!(
        progress.len() >= 2,
        "progress is delivered as it goes: {got:?}"
    );
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_eq!(*progress.last().unwrap(), 100);
    // Resume with the last id seen: nothing new, the stream closes.
    let again = events(&s.http, &url, &s.admin, Some(&end.id), |_| false).await;
    assert!(again.is_empty(), "{again:?}");
    // Resume from an older id: the current state, then the end.
    let again = events(&s.http, &url, &s.admin, Some(&statuses[0].id), |_| false).await;
    let kinds: Vec<&str> = again.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["status", "end"]);
    // Unknown job: 404 before any stream.
    let (st, _) = s
        .get(&format!("/api/v1/jobs/{}/events", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    worker.shutdown().await.unwrap();
    s.stop().await;
}

/// The dashboard stream: every queue's counts first, then each queue whose counts change, and
/// each job's state changes, made by this process or (PostgreSQL) by another one: here a
/// worker on a store handle of its own, as a separate process would have.
async fn dashboard_job_changes<S: ServerStore>(store: S, worker_store: S) {
    let s = Server::start(store.clone(), |_| {}).await;
    worker_store.listen().await.unwrap();
    let mut all = SseReader::open(&s.http, &s.url("/api/v1/events"), &s.admin, None).await;
    let mut one = SseReader::open(
        &s.http,
        &s.url("/api/v1/events?queue=http-jobs"),
        &s.admin,
        None,
    )
    .await;
    let mut counts =
        SseReader::open(&s.http, &s.url("/api/v1/events?jobs=false"), &s.admin, None).await;
    for r in [&mut all, &mut one, &mut counts] {
        assert_eq!(r.next().await.unwrap().event, "queues");
    }
    // The subscriptions are known to the worker's store handle (PostgreSQL: by NOTIFY; a
    // process that starts listening later hears the next announcement, within 5 s).
    wait_for("the worker's store to hear of the watchers", || async {
        worker_store.wake().changes().watched()
    })
    .await;
    let worker = Worker::new(worker_store.clone())
        .register(CountToJob)
        .start()
        .unwrap();
    let (_, e) = s
        .post("/api/v1/jobs", json!({"kind": "count_to", "input": 2}))
        .await;
    let id = e["id"].as_str().unwrap().to_owned();
    s.post("/api/v1/jobs", json!({"kind": "py.x", "queue": "dash"}))
        .await;
    let mine = |e: &Sse| e.event == "job" && e.data["id"] == id.as_str();
    let done = |e: &Sse| mine(e) && e.data["state"] == "completed";
    let seen = one.until(done).await;
    let states: Vec<(&str, Option<i64>, Option<i64>)> = seen
        .iter()
        // An enqueue handed straight to a waiting receiver of the same process is never
        // `available`.
        .filter(|e| mine(e) && e.data["state"] != "available")
        .map(|e| {
            (
                e.data["state"].as_str().unwrap(),
                e.data["attempt"].as_i64(),
                e.data["progress"].as_i64(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("running", Some(1), None),
            ("running", Some(1), Some(50)),
            ("running", Some(1), Some(100)),
            ("completed", Some(1), None),
        ],
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|e| e.event != "job" || e.data["queue"] == "http-jobs"),
        "the queue filter holds: {seen:?}"
    );
    // The unfiltered stream has the other queue's job too, and the counts as they change.
    let everything = all.until(done).await;
    assert!(
        everything.iter().any(|e| e.event == "job"
            && e.data["queue"] == "dash"
            && e.data["state"] == "available"),
        "{everything:?}"
    );
    // A cancel through the API is a change too.
    let (_, later) = s
        .post(
            "/api/v1/jobs",
            json!({"kind": "py.x", "queue": "http-jobs", "delay_secs": 3600}),
        )
        .await;
    let later = later["id"].as_str().unwrap().to_owned();
    let (st, _) = s
        .post(&format!("/api/v1/jobs/{later}/cancel"), json!({}))
        .await;
    assert_eq!(st, StatusCode::OK);
    let cancelled = one
        .until(|e| {
            e.event == "job" && e.data["id"] == later.as_str() && e.data["state"] == "cancelled"
        })
        .await;
    assert!(
        cancelled.iter().any(|e| e.event == "job"
            && e.data["id"] == later.as_str()
            && e.data["state"] == "scheduled"),
        "{cancelled:?}"
    );
    // Counts only: `queue` events, never a `job` event.
    let c = counts
        .until(|e| e.event == "queue" && e.data["queue"] == "dash")
        .await;
    assert!(c.iter().all(|e| e.event == "queue"), "{c:?}");
    // A bad filter is refused before any stream.
    let (st, p) = s.get("/api/v1/events?queue=no%20spaces").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{p}");
    worker.shutdown().await.unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_job_changes_on_sqlite() {
    common::on_sqlite(|store| dashboard_job_changes(store.clone(), store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_job_changes_on_postgres_across_store_handles() {
    common::on_postgres(|store| async move {
        let other = dray::PgStore::builder(common::pg_url())
            .schema(store.schema())
            .max_connections(4)
            .connect()
            .await
            .unwrap();
        dashboard_job_changes(store, other).await;
    })
    .await;
}

async fn workflows_resource<S: ServerStore>(store: S) {
    let worker = Worker::new(store.clone())
        .register_workflow(ApprovalWorkflow)
        .register_workflow(TwoStepsWorkflow)
        .configure(|c| {
            c.heartbeat = Duration::from_millis(200);
            c.maintenance_interval = Duration::from_millis(200);
        })
        .start()
        .unwrap();
    let s = Server::start(store, |_| {}).await;
    // Live: a run's steps as they complete, then its end.
    let (st, started) = s
        .post(
            "/api/v1/workflows",
            json!({"name": "two_steps", "input": 1}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let run = started["run_id"].as_str().unwrap().to_owned();
    let got = events(
        &s.http,
        &s.url(&format!("/api/v1/workflows/{run}/events")),
        &s.admin,
        None,
        |_| false,
    )
    .await;
    let steps: Vec<&str> = got
        .iter()
        .filter(|e| e.event == "step" && e.data["status"] == "completed")
        .map(|e| e.data["name"].as_str().unwrap())
        .collect();
    assert!(steps.contains(&"a") && steps.contains(&"b"), "{got:?}");
    let end = got.last().unwrap();
    assert_eq!(
        (end.event.as_str(), end.data["output"].clone()),
        ("end", json!(3))
    );
    assert!(got.iter().any(|e| e.event == "status"));
    // Start with a workflow id: a second start answers that run; with raise: 409.
    let body = json!({"name": "approval", "input": 250, "workflow_id": "order-7"});
    let (st, a) = s.post("/api/v1/workflows", body.clone()).await;
    assert_eq!(
        (st, a["existing"].as_bool()),
        (StatusCode::CREATED, Some(false))
    );
    let run = a["run_id"].as_str().unwrap().to_owned();
    let (st, b) = s.post("/api/v1/workflows", body).await;
    assert_eq!(
        (st, b["run_id"].as_str()),
        (StatusCode::OK, Some(run.as_str()))
    );
    let (st, p) = s
        .post("/api/v1/workflows", json!({"name": "approval", "input": 1, "workflow_id": "order-7", "raise_on_already_started": true}))
        .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::CONFLICT, Some("already_started"))
    );
    let (st, p) = s.post("/api/v1/workflows", json!({"name": "nope"})).await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_workflow"))
    );
    let (st, p) = s
        .post(
            "/api/v1/workflows",
            json!({"name": "approval", "input": "lots"}),
        )
        .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_input"))
    );
    // Query its state once it waits; signal it; its result.
    wait_for("the run to publish its stage", || {
        let s = &s;
        let run = &run;
        async move {
            s.get(&format!("/api/v1/workflows/{run}/query/stage"))
                .await
                .1["value"]
                == "waiting"
        }
    })
    .await;
    let (_, r) = s.get(&format!("/api/v1/workflows/{run}/result")).await;
    assert_eq!(r["finished"], false);
    let (st, sig) = s
        .post(
            &format!("/api/v1/workflows/{run}/signals"),
            json!({"name": "approve", "payload": "ana"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    assert!(sig["signal_id"].is_string());
    wait_for("the run to complete", || {
        let s = &s;
        let run = &run;
        async move { s.get(&format!("/api/v1/workflows/{run}/result")).await.1["finished"] == true }
    })
    .await;
    let (_, r) = s.get(&format!("/api/v1/workflows/{run}/result")).await;
    assert_eq!(
        (r["status"].as_str(), r["output"].clone()),
        (Some("completed"), json!("250 approved by ana"))
    );
    let (_, d) = s.get(&format!("/api/v1/workflows/{run}")).await;
    let names: Vec<&str> = d["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"check") && names.contains(&"record"), "{d}");
    // Restart from a step: a new run.
    let (st, re) = s
        .post(
            &format!("/api/v1/workflows/{run}/restart"),
            json!({"step": "record"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    assert_ne!(re["run_id"].as_str(), Some(run.as_str()));
    // A signal to an ended run: 409. Cancel: what it did. List with a filter.
    let (st, p) = s
        .post(
            &format!("/api/v1/workflows/{run}/signals"),
            json!({"name": "approve"}),
        )
        .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::CONFLICT, Some("run_finished"))
    );
    let (_, c) = s
        .post("/api/v1/workflows", json!({"name": "approval", "input": 1}))
        .await;
    let (st, _) = s
        .post(
            &format!("/api/v1/workflows/{}/cancel", c["run_id"].as_str().unwrap()),
            json!(null),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (_, list) = s.get("/api/v1/workflows?name=two_steps").await;
    assert_eq!(list["runs"].as_array().unwrap().len(), 1);
    let (st, p) = s.get("/api/v1/workflows?status=bogus").await;
    assert_eq!(
        (st, p["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("status"))
    );
    let (st, p) = s
        .get(&format!("/api/v1/workflows/{}", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("run_not_found"))
    );
    worker.shutdown().await.unwrap();
    s.stop().await;
}

async fn crons_outbox_and_failures<S: ServerStore>(store: S) {
    let s = Server::start(store.clone(), |_| {}).await;
    let client = dray::Client::new(store.clone());
    client
        .upsert_schedule(
            &dray::cron::ScheduleSpec::job("nightly", "0 3 * * *", "py.nightly").queue("cron-q"),
        )
        .await
        .unwrap();
    let (_, list) = s.get("/api/v1/crons").await;
    let first = &list["schedules"][0];
    assert_eq!(first["schedule"]["name"], "nightly");
    assert!(first["next_fire_at"].is_string());
    let (st, p) = s.post("/api/v1/crons/nightly/pause", json!(null)).await;
    assert_eq!((st, p["paused"].as_bool()), (StatusCode::OK, Some(true)));
    let (_, list) = s.get("/api/v1/crons").await;
    assert_eq!(list["schedules"][0]["schedule"]["paused"], true);
    let (st, _) = s.post("/api/v1/crons/nightly/resume", json!(null)).await;
    assert_eq!(st, StatusCode::OK);
    let (st, t) = s.post("/api/v1/crons/nightly/trigger", json!(null)).await;
    assert_eq!(st, StatusCode::CREATED);
    let (_, job) = s
        .get(&format!("/api/v1/jobs/{}", t["id"].as_str().unwrap()))
        .await;
    assert_eq!(job["queue"], "cron-q");
    let (_, h) = s.get("/api/v1/crons/nightly/history").await;
    assert_eq!(h["ticks"].as_array().unwrap().len(), 1);
    for op in ["pause", "resume", "trigger"] {
        let (st, p) = s
            .post(&format!("/api/v1/crons/nope/{op}"), json!(null))
            .await;
        assert_eq!(
            (st, p["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("schedule_not_found"))
        );
    }
    // The outbox: events staged in a transaction, counted, listed, failed ones requeued.
    let mut outbox = dray::Outbox::new("orders").unwrap();
    outbox.stage("order.placed", &json!({"id": 1})).unwrap();
    outbox.stage("order.placed", &json!({"id": 2})).unwrap();
    let mut tx = store.pool().begin().await.unwrap();
    outbox.flush(&store, &mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    let (_, stats) = s.get("/api/v1/outbox/orders/stats").await;
    assert_eq!(stats["pending"], 2);
    let (_, evs) = s
        .get("/api/v1/outbox/orders/events?status=pending&limit=1")
        .await;
    assert_eq!(evs["events"].as_array().unwrap().len(), 1);
    assert_eq!(evs["events"][0]["event_type"], "order.placed");
    let (st, rq) = s
        .post("/api/v1/outbox/orders/requeue-failed", json!(null))
        .await;
    assert_eq!((st, rq["requeued"].as_u64()), (StatusCode::OK, Some(0)));
    let (st, p) = s.get("/api/v1/outbox/orders/events?status=gone").await;
    assert_eq!(
        (st, p["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("status"))
    );
    // A handler that panics (here: a workflow input's decoder, user code) is a 500 with a
    // problem body, and the server goes on serving.
    let s2 = Server::start(store, |_| {}).await;
    let (st, p) = s2
        .post(
            "/api/v1/workflows",
            json!({"name": "fragile", "input": 666}),
        )
        .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, Some("internal"))
    );
    let (st, _) = s2
        .post("/api/v1/workflows", json!({"name": "fragile", "input": 7}))
        .await;
    assert_eq!(st, StatusCode::CREATED);
    s2.stop().await;
    s.stop().await;
}

#[tokio::test]
async fn insecure_no_auth_binds_loopback_only_and_cors_answers_preflights() {
    let config = ServerConfig {
        addr: "0.0.0.0:0".parse().unwrap(),
        auth: Auth::InsecureNoAuth,
        ..ServerConfig::default()
    };
    let err = dray_server::bind(&config).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(err.to_string().contains("loopback"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let store = dray::SqliteStore::open(&format!("sqlite://{}/cors.db", dir.path().display()))
        .await
        .unwrap();
    let s = Server::start(store, |c| {
        c.auth = Auth::InsecureNoAuth;
        c.cors_origins = vec!["http://app.example".to_owned()];
    })
    .await;
    let r = s.http.get(s.url("/api/v1/queues")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "no token needed with auth off");
    let r = s
        .http
        .request(reqwest::Method::OPTIONS, s.url("/api/v1/jobs"))
        .header("Origin", "http://app.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://app.example"
    );
    s.stop().await;
}

#[tokio::test]
async fn readiness_is_503_when_the_schema_is_not_current() {
    let url = pg_url();
    let schema = format!("dray_h_{}", uuid::Uuid::now_v7().simple());
    let empty = dray::PgStore::builder(&url)
        .schema(&schema)
        .max_connections(2)
        .schema_mode(dray::SchemaMode::Skip)
        .connect()
        .await
        .unwrap();
    let s = Server::start_without_token(empty).await;
    let (st, p) = read(s.http.get(s.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("schema_outdated"))
    );
    let r = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    s.stop().await;
}

/// A TCP proxy to PostgreSQL that can be cut: every connection through it ends, and new ones
/// are refused.
struct Cut {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
}

async fn proxy_to_postgres() -> Cut {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cut, watch) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let mut stop = watch.clone();
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|c| *c) => return, // the listener is dropped: refused
            };
            let Ok((mut client, _)) = accepted else {
                return;
            };
            let mut stop = watch.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = stop.wait_for(|c| *c) => {}
                }
            });
        }
    });
    Cut { addr, cut }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_503_and_the_process_stays_healthy() {
    let proxy = proxy_to_postgres().await;
    let schema = format!("dray_h_{}", uuid::Uuid::now_v7().simple());
    let url = format!("postgres://postgres@{}/postgres", proxy.addr);
    let store = dray::PgStore::builder(&url)
        .schema(&schema)
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(1))
        .schema_mode(dray::SchemaMode::Migrate)
        .connect()
        .await
        .unwrap();
    let s = Server::start(store, |_| {}).await;
    assert_eq!(s.get("/api/v1/queues").await.0, StatusCode::OK);
    let _ = proxy.cut.send(true);
    // The database is gone: reads, writes and readiness say 503 with a problem body, the
    // process stays healthy.
    let (st, p) = s.get("/api/v1/queues").await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{p}");
    assert!(
        ["connect", "pool_exhausted"].contains(&p["code"].as_str().unwrap()),
        "{p}"
    );
    let (st, _) = s
        .post("/api/v1/jobs", json!({"kind": "x", "queue": "q"}))
        .await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    let (st, _) = read(s.http.get(s.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    let r = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    s.stop().await;
    let cleanup = dray::PgStore::builder(pg_url())
        .schema(&schema)
        .schema_mode(dray::SchemaMode::Skip)
        .connect()
        .await
        .unwrap();
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(cleanup.pool())
    .await;
}

on_both_stores!(
    jobs_resource,
    idempotent_posts,
    token_scopes,
    http_worker_with_fencing,
    live_job_events,
    workflows_resource,
    crons_outbox_and_failures,
);
