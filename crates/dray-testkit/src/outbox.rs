//! Conformance tests of the outbox, its relay and the inbox, run against every store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dray_core::outbox::{
    EVENT_ID_HEADER, EVENT_TYPE_HEADER, Outbox, OutboxEvent, OutboxRow, OutboxStatus, PublishError,
    QueueSink, Relay, RelayConfig, Sink, inbox_message_id,
};
use dray_core::{Client, OutboxStore, Queue, Store};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use crate::Fixture;

const WAIT: Duration = Duration::from_secs(60);

fn quick(c: &mut RelayConfig) {
    c.poll = Duration::from_millis(10);
    c.backoff.base = Duration::from_millis(20);
    c.backoff.max = Duration::from_millis(50);
    c.backoff.jitter = false;
}

async fn until<Fut: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> Fut) {
    let start = std::time::Instant::now();
    while !f().await {
        assert!(start.elapsed() < WAIT, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn rollback_leaves_no_event_and_two_relays_deliver_each_once<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    let client = Client::new(store.clone());
    let mut outbox = Outbox::new("orders").unwrap();
    // Rolled back: no event.
    let mut tx = store.pool().begin().await.unwrap();
    outbox
        .stage("order.placed", &serde_json::json!({"n": -1}))
        .unwrap();
    assert_eq!(outbox.flush(&store, &mut *tx).await.unwrap(), 1);
    tx.rollback().await.unwrap();
    assert_eq!(client.outbox_stats("orders").await.unwrap().pending, 0);
    // Committed: 10,000 events in transactions of 500, one of them staged twice (dropped).
    for chunk in 0..20 {
        let mut tx = store.pool().begin().await.unwrap();
        for i in 0..500 {
            let n = chunk * 500 + i;
            outbox
                .stage_event(
                    OutboxEvent::new("order.placed", &serde_json::json!({ "n": n }))
                        .unwrap()
                        .event_id(format!("order-{n}")),
                )
                .unwrap();
        }
        if chunk == 0 {
            outbox
                .stage_event(
                    OutboxEvent::new("order.placed", &serde_json::json!({ "n": 0 }))
                        .unwrap()
                        .event_id("order-0"),
                )
                .unwrap();
        }
        let written = outbox.flush(&store, &mut *tx).await.unwrap();
        assert_eq!(written, 500, "a repeated event id is dropped");
        tx.commit().await.unwrap();
    }
    assert_eq!(client.outbox_stats("orders").await.unwrap().pending, 10_000);
    // Two relays at once, into a Dray queue: one alone, one run by a worker.
    let relay = |id: &str| {
        Relay::new(
            store.clone(),
            "orders",
            QueueSink::new(store.clone(), "order-events").unwrap(),
        )
        .unwrap()
        .configure(|c| {
            quick(c);
            c.relay_id = id.into();
        })
        .unwrap()
    };
    let a = relay("a").spawn();
    let b = dray_core::Worker::new(store.clone())
        .relay_outbox(relay("b"))
        .start()
        .unwrap();
    until("every event published", || {
        let client = client.clone();
        async move { client.outbox_stats("orders").await.unwrap().published == 10_000 }
    })
    .await;
    a.shutdown().await;
    b.shutdown().await.unwrap();
    let q = Queue::new(store.clone());
    let mut seen: HashMap<String, usize> = HashMap::new();
    loop {
        let got = q
            .receive("order-events", 1000, Duration::ZERO)
            .await
            .unwrap();
        if got.is_empty() {
            break;
        }
        for m in &got {
            assert_eq!(m.kind.as_deref(), Some("order.placed"));
            assert_eq!(m.headers[EVENT_TYPE_HEADER], "order.placed");
            assert_eq!(m.key.as_deref(), Some(m.headers[EVENT_ID_HEADER].as_str()));
            *seen.entry(inbox_message_id(m)).or_default() += 1;
        }
        q.ack("order-events", got.iter().map(|m| m.id).collect::<Vec<_>>())
            .await
            .unwrap();
    }
    assert_eq!(seen.len(), 10_000, "every event arrived");
    assert!(seen.values().all(|n| *n == 1), "each once");
    let listed = client
        .outbox_list("orders", Some(OutboxStatus::Published), 5)
        .await
        .unwrap();
    assert_eq!(listed.len(), 5);
    assert!(
        listed
            .iter()
            .all(|r| r.attempts == 1 && r.published_at.is_some())
    );
    // Bad names are typed errors.
    assert!(Outbox::new("bad name").is_err());
    assert!(OutboxEvent::new("", &1).and_then(|e| e.check()).is_err());
}

/// Fails its first `fail` calls (transiently), then delivers; records what it delivered.
struct Flaky {
    fail: AtomicUsize,
    permanent_for: Option<String>,
    delivered: Arc<Mutex<Vec<OutboxRow>>>,
}

impl Sink for Flaky {
    fn describe(&self) -> String {
        "flaky".into()
    }
    fn publish<'a>(
        &'a self,
        events: &'a [OutboxRow],
    ) -> BoxFuture<'a, Vec<Result<(), PublishError>>> {
        async move {
            events
                .iter()
                .map(|e| {
                    if self.permanent_for.as_deref() == Some(e.event_id.as_str()) {
                        return Err(PublishError::permanent("the broker refuses this event"));
                    }
                    if self
                        .fail
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        return Err(PublishError::transient("broker unreachable"));
                    }
                    self.delivered.lock().unwrap().push(e.clone());
                    Ok(())
                })
                .collect()
        }
        .boxed()
    }
}

async fn stage<S: OutboxStore>(store: &S, outbox: &str, events: Vec<OutboxEvent>) {
    let mut o = Outbox::new(outbox).unwrap();
    o.stage_many(events).unwrap();
    let mut tx = store.pool().begin().await.unwrap();
    o.flush(store, &mut *tx).await.unwrap();
    tx.commit().await.unwrap();
}

pub async fn publish_failures_retry_then_fail_until_requeued<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    let client = Client::new(store.clone());
    stage(
        &store,
        "flaky",
        vec![
            OutboxEvent::new("t", &1).unwrap().event_id("e1"),
            OutboxEvent::new("t", &2).unwrap().event_id("refused"),
        ],
    )
    .await;
    // Fails more than max_attempts (3) times: e1 ends failed after 3 tries; `refused` at once.
    let sink = Flaky {
        fail: AtomicUsize::new(100),
        permanent_for: Some("refused".into()),
        delivered: Arc::default(),
    };
    let relay = Relay::new(store.clone(), "flaky", sink)
        .unwrap()
        .configure(|c| {
            quick(c);
            c.max_attempts = 3;
        })
        .unwrap();
    let start = std::time::Instant::now();
    while client.outbox_stats("flaky").await.unwrap().failed < 2 {
        assert!(start.elapsed() < WAIT, "the events never failed");
        relay.run_once().await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let failed = client
        .outbox_list("flaky", Some(OutboxStatus::Failed), 10)
        .await
        .unwrap();
    let e1 = failed.iter().find(|r| r.event_id == "e1").unwrap();
    assert_eq!(e1.attempts, 3, "retried with backoff up to max_attempts");
    assert_eq!(e1.last_error.as_deref(), Some("broker unreachable"));
    let refused = failed.iter().find(|r| r.event_id == "refused").unwrap();
    assert_eq!(refused.attempts, 1, "a permanent failure is not retried");
    // Re-driven, with a sink that now works: delivered.
    assert_eq!(
        client.outbox_requeue_failed("flaky", None).await.unwrap(),
        2
    );
    let ok = Flaky {
        fail: AtomicUsize::new(0),
        permanent_for: None,
        delivered: Arc::default(),
    };
    let relay = Relay::new(store.clone(), "flaky", ok).unwrap();
    relay.run_once().await.unwrap();
    assert_eq!(client.outbox_stats("flaky").await.unwrap().published, 2);
    // A claim that was never marked (its relay died) is taken back.
    stage(
        &store,
        "flaky",
        vec![OutboxEvent::new("t", &3).unwrap().event_id("stuck")],
    )
    .await;
    let claimed = store.outbox_claim("flaky", 10, "dead-relay").await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        store
            .outbox_reclaim_stale("flaky", Duration::from_secs(3600))
            .await
            .unwrap(),
        0,
        "not stale yet"
    );
    // Once the claim is older than 10 ms, it is taken back.
    until("the claim is stale", || {
        let store = store.clone();
        async move {
            store
                .outbox_reclaim_stale("flaky", Duration::from_millis(10))
                .await
                .unwrap()
                == 1
        }
    })
    .await;
    assert_eq!(client.outbox_stats("flaky").await.unwrap().pending, 1);
}

pub async fn order_per_key_and_a_retrying_row_does_not_block_its_key<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    let events: Vec<OutboxEvent> = (0..30)
        .map(|i| {
            OutboxEvent::new("moved", &i)
                .unwrap()
                .event_id(format!("m{i}"))
                .ordering_key(format!("k{}", i % 3))
        })
        .collect();
    stage(&store, "ordered", events).await;
    let delivered: Arc<Mutex<Vec<OutboxRow>>> = Arc::default();
    let sink = Flaky {
        fail: AtomicUsize::new(0),
        permanent_for: None,
        delivered: delivered.clone(),
    };
    let relay = Relay::new(store.clone(), "ordered", sink)
        .unwrap()
        .configure(|c| c.batch = 7)
        .unwrap();
    for _ in 0..10 {
        relay.run_once().await.unwrap();
    }
    let client = Client::new(store.clone());
    let published = delivered.lock().unwrap().clone();
    assert_eq!(published.len(), 30);
    for key in ["k0", "k1", "k2"] {
        let ids: Vec<_> = published
            .iter()
            .filter(|r| r.ordering_key.as_deref() == Some(key))
            .map(|r| r.id)
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "{key} relayed in staging order");
    }
    // The first event of a key fails once: the key's later events go on meanwhile.
    stage(
        &store,
        "blocked",
        (0..3)
            .map(|i| {
                OutboxEvent::new("moved", &i)
                    .unwrap()
                    .event_id(format!("b{i}"))
                    .ordering_key("k")
            })
            .collect(),
    )
    .await;
    let sink = Flaky {
        fail: AtomicUsize::new(1),
        permanent_for: None,
        delivered: Arc::default(),
    };
    let relay = Relay::new(store.clone(), "blocked", sink)
        .unwrap()
        .configure(|c| {
            c.backoff.base = Duration::from_secs(3600);
            c.backoff.max = Duration::from_secs(7200);
            c.backoff.jitter = false;
        })
        .unwrap();
    let round = relay.run_once().await.unwrap();
    assert_eq!((round.published, round.retried), (2, 1));
    let rows = client.outbox_list("blocked", None, 10).await.unwrap();
    let first = rows.iter().find(|r| r.event_id == "b0").unwrap();
    assert_eq!(first.status, OutboxStatus::Pending);
    assert!(first.available_at > chrono::Utc::now() + chrono::TimeDelta::minutes(30));
    assert!(
        rows.iter()
            .filter(|r| r.event_id != "b0")
            .all(|r| r.status == OutboxStatus::Published)
    );
}

pub async fn the_inbox_marks_each_message_once<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let client = Client::new(store.clone());
    // Rolled back: not marked.
    let tx = client
        .inbox_begin("billing", "evt-1")
        .await
        .unwrap()
        .unwrap();
    drop(tx);
    let tx = client.inbox_begin("billing", "evt-1").await.unwrap();
    assert!(tx.is_some(), "a rolled-back mark is no mark");
    tx.unwrap().commit().await.unwrap();
    assert!(
        client
            .inbox_begin("billing", "evt-1")
            .await
            .unwrap()
            .is_none()
    );
    // Another inbox has its own marks.
    let other = client.inbox_begin("shipping", "evt-1").await.unwrap();
    other.unwrap().commit().await.unwrap();
    // Concurrent consumers of one message: one wins.
    let wins = futures_util::future::join_all((0..8).map(|_| {
        let client = client.clone();
        async move {
            match client.inbox_begin("billing", "evt-2").await {
                Ok(Some(tx)) => tx.commit().await.is_ok(),
                _ => false,
            }
        }
    }))
    .await;
    assert_eq!(wins.iter().filter(|w| **w).count(), 1);
    assert!(client.inbox_begin("bad inbox", "x").await.is_err());
    assert!(client.inbox_begin("billing", "").await.is_err());
    assert_eq!(
        store.inbox_prune(Duration::from_secs(3600)).await.unwrap(),
        0
    );
    // Marks older than zero: all three, once the clock has moved past them.
    let mut pruned = 0;
    let start = std::time::Instant::now();
    while pruned < 3 {
        assert!(start.elapsed() < WAIT, "pruned {pruned} of 3 marks");
        pruned += store.inbox_prune(Duration::ZERO).await.unwrap();
        tokio::task::yield_now().await;
    }
    assert_eq!(pruned, 3);
}
