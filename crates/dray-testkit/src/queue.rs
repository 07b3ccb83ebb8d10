//! Conformance tests of the queue port (seed 001), run against every store.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dray_core::{
    EnqueueOptions, Error, MessageState, Priority, Queue, QueueConfig, ReceiveOptions, Store,
};
use futures_util::StreamExt;
use serde_json::json;
use uuid::Uuid;

use crate::{Fixture, wait_until};

const NO_WAIT: Duration = Duration::ZERO;
const LONG: Duration = Duration::from_secs(10);

fn opts() -> EnqueueOptions {
    EnqueueOptions::new()
}

pub async fn enqueue_receive_ack_round_trip<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store);
    let e = q
        .enqueue(
            "emails",
            &json!({"to": "a@b.c", "n": 1}),
            &opts()
                .kind("welcome")
                .header("trace", "t-1")
                .priority(Priority::HIGH),
        )
        .await
        .unwrap();
    assert!(!e.duplicate);
    assert_eq!(e.id.get_version_num(), 7, "ids are UUIDv7");

    let got = q.receive("emails", 10, NO_WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.id, e.id);
    assert_eq!(m.queue, "emails");
    assert_eq!(m.kind.as_deref(), Some("welcome"));
    assert_eq!(m.payload, json!({"to": "a@b.c", "n": 1}));
    assert_eq!(m.headers.get("trace").map(String::as_str), Some("t-1"));
    assert_eq!(m.priority, Priority::HIGH);
    assert_eq!(m.state, MessageState::Running);
    assert_eq!(m.attempt, 1);
    assert!(m.leased_until.unwrap() > m.enqueued_at);
    // Leased: invisible to other receivers.
    assert!(q.receive("emails", 10, NO_WAIT).await.unwrap().is_empty());

    assert_eq!(q.ack("emails", [m]).await.unwrap(), 1);
    assert_eq!(
        q.ack("emails", [m]).await.unwrap(),
        0,
        "a second ack changes nothing"
    );
    let stored = q.get(e.id).await.unwrap().unwrap();
    assert_eq!(stored.state, MessageState::Completed);
    assert!(stored.finished_at.is_some());
    let s = q.stats("emails").await.unwrap();
    assert_eq!((s.available, s.leased, s.completed), (0, 0, 1));
    // Another queue is untouched by all this.
    assert_eq!(q.stats("other").await.unwrap(), Default::default());
}

pub async fn enqueue_many_is_one_batch_in_id_order<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store);
    let payloads: Vec<_> = (0..1000).map(|i| json!({ "i": i })).collect();
    let out = q.enqueue_many("bulk", &payloads, &opts()).await.unwrap();
    assert_eq!(out.len(), 1000);
    let ids: HashSet<Uuid> = out.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 1000, "distinct ids");
    assert!(out.iter().all(|e| !e.duplicate));
    assert_eq!(q.stats("bulk").await.unwrap().available, 1000);

    let got = q.receive("bulk", 1000, NO_WAIT).await.unwrap();
    assert_eq!(got.len(), 1000);
    let mut expected: Vec<Uuid> = out.iter().map(|e| e.id).collect();
    expected.sort();
    let received: Vec<Uuid> = got.iter().map(|m| m.id).collect();
    assert_eq!(
        received, expected,
        "same priority and due time: delivered in id order"
    );
    assert_eq!(q.ack("bulk", &got).await.unwrap(), 1000);

    // A batch of one options (stores may send what repeats once) and a mixed batch: every
    // row is stored with its own options.
    let same = opts()
        .header("h", "v")
        .priority(Priority(2))
        .max_attempts(3)
        .delay(Duration::from_secs(3600));
    let out = q
        .enqueue_many("bulk2", [json!(1), json!(2)], &same)
        .await
        .unwrap();
    for e in &out {
        let m = q.get(e.id).await.unwrap().unwrap();
        assert_eq!(
            (m.queue.as_str(), m.state, m.priority, m.max_attempts),
            ("bulk2", MessageState::Scheduled, Priority(2), 3)
        );
        assert_eq!(m.headers.get("h").map(String::as_str), Some("v"));
        assert!(m.run_at > m.enqueued_at + chrono::Duration::minutes(59));
    }
    let mixed = [
        q.message("m1", &json!("a"), &opts().priority(Priority(5)))
            .unwrap(),
        q.message("m2", &json!("b"), &opts().header("x", "y"))
            .unwrap(),
        q.message("m1", &json!("c"), &opts().delay(Duration::from_secs(60)))
            .unwrap(),
    ];
    let out = q.enqueue_messages(&mixed).await.unwrap();
    let stored: Vec<dray_core::Message> = {
        let mut v = Vec::new();
        for e in &out {
            v.push(q.get(e.id).await.unwrap().unwrap());
        }
        v
    };
    assert_eq!(
        stored
            .iter()
            .map(|m| (m.queue.as_str(), m.priority, m.state, m.payload.clone()))
            .collect::<Vec<_>>(),
        vec![
            ("m1", Priority(5), MessageState::Available, json!("a")),
            ("m2", Priority(0), MessageState::Available, json!("b")),
            ("m1", Priority(0), MessageState::Scheduled, json!("c")),
        ]
    );
    assert_eq!(stored[1].headers.get("x").map(String::as_str), Some("y"));
    assert!(stored[0].headers.is_empty());

    // An empty batch is a no-op, not an error.
    let none: Vec<serde_json::Value> = Vec::new();
    assert!(
        q.enqueue_many("bulk", none, &opts())
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn keys_dedup_unfinished_messages<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store);
    let a = q
        .enqueue("k", &json!(1), &opts().key("order-7"))
        .await
        .unwrap();
    let b = q
        .enqueue("k", &json!(2), &opts().key("order-7"))
        .await
        .unwrap();
    assert!(!a.duplicate);
    assert!(b.duplicate);
    assert_eq!(a.id, b.id);
    // The same key on another queue is another message.
    let other = q
        .enqueue("k2", &json!(1), &opts().key("order-7"))
        .await
        .unwrap();
    assert!(!other.duplicate);

    // Still deduplicated while leased.
    let got = q.receive("k", 10, NO_WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, json!(1), "the first payload is kept");
    let c = q
        .enqueue("k", &json!(3), &opts().key("order-7"))
        .await
        .unwrap();
    assert!(c.duplicate);
    assert_eq!(c.id, a.id);

    // Finished: the key is free again.
    q.ack("k", &got).await.unwrap();
    let d = q
        .enqueue("k", &json!(4), &opts().key("order-7"))
        .await
        .unwrap();
    assert!(!d.duplicate);
    assert_ne!(d.id, a.id);

    // Inside one batch, and against stored rows, in one call.
    let out = q
        .enqueue_messages(&[
            q.message("k", &json!(5), &opts().key("x")).unwrap(),
            q.message("k", &json!(6), &opts().key("x")).unwrap(),
            q.message("k", &json!(7), &opts().key("order-7")).unwrap(),
            q.message("k", &json!(8), &opts()).unwrap(),
        ])
        .await
        .unwrap();
    assert!(!out[0].duplicate);
    assert!(out[1].duplicate);
    assert_eq!(out[0].id, out[1].id);
    assert!(out[2].duplicate);
    assert_eq!(out[2].id, d.id);
    assert!(!out[3].duplicate);
    assert_eq!(q.stats("k").await.unwrap().available, 3);
}

pub async fn keys_dedup_under_concurrent_enqueues<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            q.enqueue("uniq", &json!({ "i": i }), &opts().key("same"))
                .await
                .unwrap()
        }));
    }
    let mut ids = HashSet::new();
    let mut fresh = 0;
    for t in tasks {
        let e = t.await.unwrap();
        ids.insert(e.id);
        if !e.duplicate {
            fresh += 1;
        }
    }
    assert_eq!(
        ids.len(),
        1,
        "50 concurrent enqueues of one key make one message"
    );
    assert_eq!(fresh, 1, "exactly one enqueue reports a new message");
    assert_eq!(q.stats("uniq").await.unwrap().available, 1);
}

pub async fn delay_and_not_before_are_exclusive<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store.clone());
    let now = store.now().await.unwrap();
    let both = opts().delay(Duration::from_secs(1)).not_before(now);
    let err = q.enqueue("x", &json!(1), &both).await.unwrap_err();
    assert!(matches!(err, Error::DelayConflict), "{err}");
    assert_eq!(err.code(), "delay_conflict");
    let err = q
        .enqueue_many("x", [json!(1), json!(2)], &both)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DelayConflict));
    assert_eq!(
        q.stats("x").await.unwrap(),
        Default::default(),
        "nothing stored"
    );
}

pub async fn payload_limit_is_enforced<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    // The default limit is 1 MiB.
    let q = Queue::new(store.clone());
    let big = "x".repeat(1024 * 1024);
    let err = q.enqueue("p", &big, &opts()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::PayloadTooLarge {
                limit: 1_048_576,
                ..
            }
        ),
        "{err}"
    );
    let ok = "x".repeat(1024 * 1024 - 2); // plus two quotes = exactly the limit
    q.enqueue("p", &ok, &opts()).await.unwrap();

    // Configurable; a batch with one oversized payload stores none of them.
    let small = Queue::with_config(
        store,
        QueueConfig {
            max_payload_bytes: 100,
            ..QueueConfig::default()
        },
    );
    let err = small
        .enqueue_many("p2", [json!("short"), json!("y".repeat(200))], &opts())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::PayloadTooLarge { limit: 100, .. }),
        "{err}"
    );
    assert_eq!(small.stats("p2").await.unwrap(), Default::default());
    let got = q.receive("p", 1, NO_WAIT).await.unwrap();
    assert_eq!(got[0].payload.as_str().unwrap().len(), 1024 * 1024 - 2);
}

pub async fn bad_arguments_are_refused<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store);
    let long = "q".repeat(129);
    for bad in [
        "",
        "has space",
        long.as_str(),
        "ümlaut",
        "semi;colon",
        "quote\"",
    ] {
        let err = q.enqueue(bad, &json!(1), &opts()).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidQueueName { .. }),
            "{bad:?}: {err}"
        );
        assert!(
            err.to_string().contains("A-Z a-z 0-9"),
            "the message says what is allowed"
        );
        assert!(matches!(
            q.receive(bad, 1, NO_WAIT).await.unwrap_err(),
            Error::InvalidQueueName { .. }
        ));
        assert!(matches!(
            q.ack(bad, [Uuid::now_v7()]).await.unwrap_err(),
            Error::InvalidQueueName { .. }
        ));
    }
    q.enqueue(&"q".repeat(128), &json!(1), &opts())
        .await
        .unwrap();
    q.enqueue("a.b:c-d_9", &json!(1), &opts()).await.unwrap();

    for limit in [0, dray_core::queue::MAX_RECEIVE_LIMIT + 1] {
        let err = q.receive("ok", limit, NO_WAIT).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { what: "limit", .. }),
            "{err}"
        );
    }
    let err = q
        .enqueue("ok", &json!(1), &opts().max_attempts(0))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let err = q
        .enqueue("ok", &json!(1), &opts().key(""))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { what: "key", .. }),
        "{err}"
    );
    let err = q
        .extend("ok", [Uuid::now_v7()], Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    assert_eq!(
        q.stats("ok").await.unwrap(),
        Default::default(),
        "nothing stored"
    );
}

/// Enqueues six messages whose delivery order is known; returns their ids in that order.
async fn enqueue_ordered_set<S: Store>(q: &Queue<S>, queue: &str) -> Vec<Uuid> {
    let e = |p: Priority| opts().priority(p);
    let low = q.enqueue(queue, &"low", &e(Priority::LOW)).await.unwrap();
    let crit = q
        .enqueue(queue, &"crit", &e(Priority::CRITICAL))
        .await
        .unwrap();
    let norm1 = q.enqueue(queue, &"norm1", &opts()).await.unwrap();
    let high = q.enqueue(queue, &"high", &e(Priority::HIGH)).await.unwrap();
    let norm2 = q.enqueue(queue, &"norm2", &opts()).await.unwrap();
    // Same priority, due earlier: ahead of the other normal ones though enqueued last.
    let past = q.store().now().await.unwrap() - chrono::Duration::seconds(60);
    let early = q
        .enqueue(queue, &"early", &opts().not_before(past))
        .await
        .unwrap();
    vec![crit.id, high.id, early.id, norm1.id, norm2.id, low.id]
}

pub async fn priority_then_due_time_then_id<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store.clone());
    let want = enqueue_ordered_set(&q, "p").await;
    let got = q.receive("p", 10, NO_WAIT).await.unwrap();
    let order: Vec<Uuid> = got.iter().map(|m| m.id).collect();
    assert_eq!(order, want, "one batch comes back in delivery order");

    // The same order holds across separate receives of one message each.
    let want = enqueue_ordered_set(&q, "p1").await;
    let mut one_by_one = Vec::new();
    for _ in 0..6 {
        one_by_one.push(q.receive("p1", 1, NO_WAIT).await.unwrap()[0].id);
    }
    assert_eq!(one_by_one, want);

    // A requeued message is due again from the requeue: behind those due before it.
    q.nack("p", [&got[2]], true).await.unwrap();
    let later = q.enqueue("p", &"later", &opts()).await.unwrap();
    let again = q.receive("p", 2, NO_WAIT).await.unwrap();
    assert_eq!(again[0].id, got[2].id);
    assert_eq!(again[1].id, later.id);
}

pub async fn delay_is_measured_on_the_database_clock<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store.clone());
    let e = q
        .enqueue("d", &json!(1), &opts().delay(Duration::from_millis(800)))
        .await
        .unwrap();
    let stored = q.get(e.id).await.unwrap().unwrap();
    assert_eq!(stored.state, MessageState::Scheduled);
    // The due time is the database's now() at insert plus the delay, exactly.
    assert_eq!(
        stored.run_at - stored.enqueued_at,
        chrono::Duration::milliseconds(800)
    );
    assert!(
        q.receive("d", 1, NO_WAIT).await.unwrap().is_empty(),
        "not due yet"
    );
    let s = q.stats("d").await.unwrap();
    assert_eq!((s.available, s.scheduled), (0, 1));

    let got = q.receive("d", 1, LONG).await.unwrap();
    assert_eq!(got.len(), 1, "delivered once due, by a waiting receiver");
    let now = store.now().await.unwrap();
    assert!(
        now >= stored.run_at,
        "not delivered before its due time by the database clock"
    );
}

pub async fn not_before_is_honoured<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store.clone());
    let at = store.now().await.unwrap() + chrono::Duration::milliseconds(700);
    let at = at.with_timezone(&chrono::Utc);
    let e = q
        .enqueue("nb", &json!(1), &opts().not_before(at))
        .await
        .unwrap();
    let stored = q.get(e.id).await.unwrap().unwrap();
    let diff = (stored.run_at - at).num_milliseconds().abs();
    assert!(
        diff <= 1,
        "run_at is the given instant (to the store's precision)"
    );
    assert!(q.receive("nb", 1, NO_WAIT).await.unwrap().is_empty());
    let got = q.receive("nb", 1, LONG).await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(store.now().await.unwrap() >= stored.run_at);

    // A not_before in the past is due at once.
    let past = store.now().await.unwrap() - chrono::Duration::hours(1);
    q.enqueue("nb", &json!(2), &opts().not_before(past))
        .await
        .unwrap();
    assert_eq!(q.receive("nb", 1, NO_WAIT).await.unwrap().len(), 1);
}

/// Receivers sweep expired leases by their handle's `rescue_interval`: the first receive of a
/// handle sweeps, and `Duration::MAX` means never (a worker's own receives, whose maintenance
/// leader sweeps instead).
pub async fn receivers_sweep_by_their_rescue_interval<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let never = Queue::with_config(
        store.clone(),
        QueueConfig {
            rescue_interval: Duration::MAX,
            ..QueueConfig::default()
        },
    );
    let e = never.enqueue("ri", &json!(1), &opts()).await.unwrap();
    let short = ReceiveOptions {
        limit: 1,
        wait: NO_WAIT,
        lease: Some(Duration::from_millis(50)),
    };
    let first = Queue::new(store.clone())
        .receive_with("ri", &short)
        .await
        .unwrap();
    let until = first[0].leased_until.expect("a received message is leased");
    let deadline = Instant::now() + LONG;
    while store.now().await.unwrap() <= until {
        assert!(
            Instant::now() < deadline,
            "the database clock never passed the lease"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Expired, but this handle never sweeps, not even on its first receive: nothing to
    // receive, the lease still stands.
    assert!(never.receive("ri", 1, NO_WAIT).await.unwrap().is_empty());
    assert_eq!(
        never.get(e.id).await.unwrap().unwrap().state,
        MessageState::Running
    );
    // A handle with the default interval sweeps on its first receive and gets it back.
    let swept = Queue::new(store).receive("ri", 1, NO_WAIT).await.unwrap();
    assert_eq!(swept.len(), 1);
    assert_eq!((swept[0].id, swept[0].attempt), (e.id, 2));
}

pub async fn expired_lease_is_redelivered_and_fenced<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store);
    let e = q.enqueue("l", &json!(1), &opts()).await.unwrap();
    let short = ReceiveOptions {
        limit: 1,
        wait: NO_WAIT,
        lease: Some(Duration::from_millis(300)),
    };
    let first = q.receive_with("l", &short).await.unwrap();
    assert_eq!(first[0].attempt, 1);

    // Nobody acks; once the lease ends the message is delivered again, attempt raised.
    let second = q.receive("l", 1, LONG).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].id, e.id);
    assert_eq!(second[0].attempt, 2);

    // The first receiver's late writes are fenced off.
    assert_eq!(q.ack("l", [&first[0]]).await.unwrap(), 0);
    let err = q.ack_lease(&first[0]).await.unwrap_err();
    assert!(matches!(err, Error::LeaseLost { attempt: 1, .. }), "{err}");
    assert_eq!(err.code(), "lease_lost");
    assert_eq!(q.nack("l", [&first[0]], false).await.unwrap(), 0);
    assert!(
        q.extend_lease(&first[0], Duration::from_secs(5))
            .await
            .is_err()
    );
    assert_eq!(
        q.get(e.id).await.unwrap().unwrap().state,
        MessageState::Running
    );

    // The current holder's ack works.
    q.ack_lease(&second[0]).await.unwrap();
    assert_eq!(
        q.get(e.id).await.unwrap().unwrap().state,
        MessageState::Completed
    );
}

pub async fn nack_requeue_and_dead<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store);
    let a = q.enqueue("n", &json!("a"), &opts()).await.unwrap();
    let got = q.receive("n", 1, NO_WAIT).await.unwrap();
    assert_eq!(q.nack("n", &got, true).await.unwrap(), 1);
    let again = q.receive("n", 1, NO_WAIT).await.unwrap();
    assert_eq!(again[0].id, a.id);
    assert_eq!(
        again[0].attempt, 2,
        "a requeued message counts its deliveries"
    );

    assert_eq!(q.nack("n", &again, false).await.unwrap(), 1);
    let dead = q.get(a.id).await.unwrap().unwrap();
    assert_eq!(dead.state, MessageState::Dead);
    assert!(dead.finished_at.is_some());
    assert!(
        q.receive("n", 1, NO_WAIT).await.unwrap().is_empty(),
        "dead is not redelivered"
    );
    let s = q.stats("n").await.unwrap();
    assert_eq!((s.available, s.leased, s.dead), (0, 0, 1));

    // A requeue with a delay waits on the database clock.
    q.enqueue("n", &json!("b"), &opts()).await.unwrap();
    let got = q.receive("n", 1, NO_WAIT).await.unwrap();
    let w = q
        .nack_with(
            "n",
            &got,
            dray_core::NackAction::Requeue {
                delay: Duration::from_millis(400),
            },
        )
        .await
        .unwrap();
    assert_eq!(w.applied.len(), 1);
    assert!(w.dead.is_empty());
    assert_eq!(q.stats("n").await.unwrap().scheduled, 1);
    assert!(q.receive("n", 1, NO_WAIT).await.unwrap().is_empty());
    assert_eq!(q.receive("n", 1, LONG).await.unwrap().len(), 1);

    // Unknown or never-received ids change nothing.
    assert_eq!(q.nack("n", [Uuid::now_v7()], true).await.unwrap(), 0);
    assert_eq!(q.ack("n", [Uuid::now_v7()]).await.unwrap(), 0);
}

pub async fn release_gives_back_without_counting_an_attempt<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    let q = Queue::new(store);
    let release = dray_core::NackAction::Release;
    // On its last attempt: a release neither kills it nor uses the attempt up.
    let a = q
        .enqueue("r", &json!("a"), &opts().max_attempts(1))
        .await
        .unwrap();
    let b = q.enqueue("r", &json!("b"), &opts()).await.unwrap();
    let got = q.receive("r", 2, NO_WAIT).await.unwrap();
    assert_eq!(got.len(), 2);
    let w = q.nack_with("r", &got[..1], release).await.unwrap();
    assert_eq!((w.applied.clone(), w.dead.clone()), (vec![a.id], vec![]));
    let m = q.get(a.id).await.unwrap().unwrap();
    assert_eq!(
        (m.state, m.attempt, m.finished_at),
        (MessageState::Available, 0, None),
        "released: available again, the attempt not counted"
    );
    // It keeps its place: ahead of a message enqueued after it.
    let c = q.enqueue("r", &json!("c"), &opts()).await.unwrap();
    let again = q.receive("r", 1, NO_WAIT).await.unwrap();
    assert_eq!((again[0].id, again[0].attempt), (a.id, 1));
    // Fenced: a release naming an attempt that no longer holds the lease changes nothing.
    let stale = dray_core::LeaseRef {
        id: a.id,
        attempt: Some(0),
    };
    let w = q.nack_with("r", [stale], release).await.unwrap();
    assert!(w.applied.is_empty(), "a stale release is refused");
    assert_eq!(q.ack("r", &again).await.unwrap(), 1);
    assert_eq!(
        q.get(a.id).await.unwrap().unwrap().state,
        MessageState::Completed
    );
    // A released message wakes a waiting receiver, and every message is still there once.
    q.nack_with("r", &got[1..], release).await.unwrap();
    let rest: HashSet<Uuid> = q
        .receive("r", 10, NO_WAIT)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(rest, HashSet::from([b.id, c.id]));
}

/// Lease writes naming hundreds of rows (the worker's batches): every row is found, and the
/// same statements keep working when short and long lists alternate (the PostgreSQL store runs
/// long lists through a differently planned statement).
pub async fn long_lists_of_lease_writes<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store.clone());
    let payloads: Vec<serde_json::Value> = (0..300).map(|i| json!(i)).collect();
    q.enqueue_many("big", &payloads, &opts()).await.unwrap();
    for round in 0..2 {
        let got = q.receive("big", 300, NO_WAIT).await.unwrap();
        // Round two gets back the hundred that round one gave back.
        assert_eq!(got.len(), if round == 0 { 300 } else { 100 });
        // Short and long lists, alternating, each form more than five times.
        for _ in 0..4 {
            for chunk in [&got[..5], &got[..], &got[..3]] {
                assert_eq!(
                    q.extend("big", chunk, Duration::from_secs(30))
                        .await
                        .unwrap(),
                    chunk.len() as u64
                );
            }
        }
        let (give_back, keep) = got.split_at(100);
        let w = q
            .nack_with("big", give_back, dray_core::NackAction::Release)
            .await
            .unwrap();
        assert_eq!(w.applied.len(), 100);
        let (by_ack, by_complete) = keep.split_at(keep.len() / 2);
        assert_eq!(q.ack("big", by_ack).await.unwrap(), by_ack.len() as u64);
        // Completions with outputs, then without (a store may send those differently), the
        // latter with one lease that is no longer held: only the held ones are applied.
        let (with_output, without) = by_complete.split_at(by_complete.len() / 2);
        let done: Vec<dray_core::Completion> = with_output
            .iter()
            .map(|m| dray_core::Completion {
                lease: m.lease(),
                result: Some("1".into()),
            })
            .collect();
        let w = store.job_complete_many(&done).await.unwrap();
        assert_eq!(w.applied.len(), with_output.len());
        let mut done: Vec<dray_core::Completion> = without
            .iter()
            .map(|m| dray_core::Completion {
                lease: m.lease(),
                result: None,
            })
            .collect();
        if let Some(acked) = by_ack.first() {
            done.push(dray_core::Completion {
                lease: acked.lease(),
                result: None,
            });
        }
        let w = store.job_complete_many(&done).await.unwrap();
        let applied: HashSet<Uuid> = w.applied.iter().copied().collect();
        assert_eq!(
            applied,
            without.iter().map(|m| m.id).collect::<HashSet<_>>()
        );
    }
    let s = q.stats("big").await.unwrap();
    assert_eq!((s.available, s.leased, s.completed), (100, 0, 200));
}

pub async fn exhausted_attempts_go_dead<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store);
    let a = q
        .enqueue("x", &json!(1), &opts().max_attempts(2))
        .await
        .unwrap();
    let got = q.receive("x", 1, NO_WAIT).await.unwrap();
    let w = q
        .nack_with(
            "x",
            &got,
            dray_core::NackAction::Requeue {
                delay: Duration::ZERO,
            },
        )
        .await
        .unwrap();
    assert!(w.dead.is_empty(), "one attempt left");
    let got = q.receive("x", 1, NO_WAIT).await.unwrap();
    assert_eq!(got[0].attempt, 2);
    let w = q
        .nack_with(
            "x",
            &got,
            dray_core::NackAction::Requeue {
                delay: Duration::ZERO,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        w.dead,
        vec![a.id],
        "out of attempts: dead instead of requeued"
    );
    assert_eq!(
        q.get(a.id).await.unwrap().unwrap().state,
        MessageState::Dead
    );

    // An expired lease on the last attempt is dead too, not redelivered.
    let b = q
        .enqueue("x", &json!(2), &opts().max_attempts(1))
        .await
        .unwrap();
    let short = ReceiveOptions {
        limit: 1,
        wait: NO_WAIT,
        lease: Some(Duration::from_millis(50)),
    };
    assert_eq!(q.receive_with("x", &short).await.unwrap().len(), 1);
    let deadline = Instant::now() + LONG;
    loop {
        let r = q.rescue_expired().await.unwrap();
        if r.dead == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "lease never expired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        q.get(b.id).await.unwrap().unwrap().state,
        MessageState::Dead
    );
}

/// A store may bound how many unfinished rows one sweep of expired leases examines
/// (both stores walk them in windows of `dray_core::batch::SWEEP_WINDOW`): a lease that ends behind a backlog
/// larger than a window still comes back within a few sweeps, each taking up where the last
/// stopped, and the sweeps leave the backlog as it was.
pub async fn expired_leases_behind_a_large_backlog_are_rescued<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    const BACKLOG: usize = 25_000;
    let q = Queue::new(store);
    // Queue "z" sorts after queue "a" in the claim order that the sweep walks.
    let e = q.enqueue("z", &json!(0), &opts()).await.unwrap();
    let short = ReceiveOptions {
        limit: 1,
        wait: NO_WAIT,
        lease: Some(Duration::from_millis(50)),
    };
    assert_eq!(q.receive_with("z", &short).await.unwrap().len(), 1);
    let backlog: Vec<serde_json::Value> = (0..BACKLOG).map(|i| json!(i)).collect();
    for chunk in backlog.chunks(5_000) {
        q.enqueue_many("a", chunk, &opts()).await.unwrap();
    }
    let deadline = Instant::now() + LONG;
    let mut sweeps = 0;
    loop {
        let r = q.rescue_expired().await.unwrap();
        sweeps += 1;
        if r.requeued == 1 {
            break;
        }
        assert_eq!(r, Default::default(), "only one lease can end");
        assert!(
            Instant::now() < deadline,
            "the lease was not rescued in {sweeps} sweeps"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let m = q.get(e.id).await.unwrap().unwrap();
    assert_eq!(m.state, MessageState::Available);
    assert_eq!(m.attempt, 1);
    assert_eq!(m.errors.len(), 1, "{:?}", m.errors);
    let stats = q.stats("a").await.unwrap();
    assert_eq!((stats.available, stats.leased), (BACKLOG as i64, 0));
    assert_eq!(q.rescue_expired().await.unwrap(), Default::default());
    assert_eq!(q.receive("z", 5, NO_WAIT).await.unwrap().len(), 1);
}

pub async fn extend_keeps_the_lease<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store);
    let e = q.enqueue("h", &json!(1), &opts()).await.unwrap();
    let short = ReceiveOptions {
        limit: 1,
        wait: NO_WAIT,
        lease: Some(Duration::from_millis(400)),
    };
    let got = q.receive_with("h", &short).await.unwrap();
    let before = got[0].leased_until.unwrap();
    assert_eq!(
        q.extend("h", &got, Duration::from_secs(60)).await.unwrap(),
        1
    );
    let after = q.get(e.id).await.unwrap().unwrap().leased_until.unwrap();
    assert!(
        after - before > chrono::Duration::seconds(50),
        "{before} -> {after}"
    );
    // Well past the original lease, nothing is redelivered and the sweep takes nothing back.
    assert!(
        q.receive("h", 1, Duration::from_millis(800))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(q.rescue_expired().await.unwrap(), Default::default());
    q.extend_lease(&got[0], Duration::from_secs(60))
        .await
        .unwrap();
    q.ack_lease(&got[0]).await.unwrap();
}

pub async fn caller_transaction_rollback_and_commit<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store.clone());
    let mut tx = store.pool().begin().await.unwrap();
    let rolled = q
        .enqueue_in(&mut *tx, "t", &json!("rolled back"), &opts())
        .await
        .unwrap();
    q.enqueue_many_in(&mut *tx, "t", [json!(1), json!(2)], &opts())
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(
        q.get(rolled.id).await.unwrap().is_none(),
        "rolled back: gone"
    );
    assert_eq!(q.stats("t").await.unwrap(), Default::default());

    let mut tx = store.pool().begin().await.unwrap();
    let kept = q
        .enqueue_in(&mut *tx, "t", &json!("kept"), &opts())
        .await
        .unwrap();
    let many = q
        .enqueue_many_in(&mut *tx, "t", [json!(1), json!(2)], &opts())
        .await
        .unwrap();
    // Validation errors inside a transaction leave it usable.
    let err = q
        .enqueue_in(&mut *tx, "bad name", &json!(1), &opts())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidQueueName { .. }));
    tx.commit().await.unwrap();
    let got = q.receive("t", 10, LONG).await.unwrap();
    let mut ids: Vec<Uuid> = got.iter().map(|m| m.id).collect();
    ids.sort();
    let mut want = vec![kept.id, many[0].id, many[1].id];
    want.sort();
    assert_eq!(ids, want, "committed: delivered");
}

pub async fn consume_streams_until_idle<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store);
    let out = q
        .enqueue_many("c", (0..5).map(|i| json!(i)), &opts())
        .await
        .unwrap();
    let stream = q.consume("c", 2, Duration::from_millis(300));
    let mut stream = std::pin::pin!(stream);
    let mut seen = Vec::new();
    while let Some(m) = stream.next().await {
        let m = m.unwrap();
        q.ack_lease(&m).await.unwrap();
        seen.push(m.id);
    }
    let want: Vec<Uuid> = out.iter().map(|e| e.id).collect();
    assert_eq!(
        seen, want,
        "every message once, in order; then the stream ends"
    );
    assert_eq!(q.stats("c").await.unwrap().completed, 5);
    // A bad queue name ends the stream with the error.
    let mut bad = std::pin::pin!(q.consume("no good", 1, NO_WAIT));
    assert!(matches!(
        bad.next().await,
        Some(Err(Error::InvalidQueueName { .. }))
    ));
    assert!(bad.next().await.is_none());
}

pub async fn concurrent_consumers_receive_each_message_once<F: Fixture>(
    fx: Arc<F>,
    store: F::Store,
) {
    const N: usize = 10_000;
    let q = Queue::new(store.clone());
    let payloads: Vec<_> = (0..N).map(|i| json!(i)).collect();
    for chunk in payloads.chunks(1000) {
        q.enqueue_many("drain", chunk, &opts()).await.unwrap();
    }
    // 8 consumers, half of them on a second handle (as another process would be).
    let other = Queue::new(fx.reopen(&store).await);
    let seen = Arc::new(Mutex::new(Vec::with_capacity(N)));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..8 {
        let q = if c % 2 == 0 { q.clone() } else { other.clone() };
        let seen = seen.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while done.load(Ordering::SeqCst) < N {
                let got = q
                    .receive("drain", 50, Duration::from_millis(200))
                    .await
                    .unwrap();
                if got.is_empty() {
                    continue;
                }
                let acked = q.ack("drain", &got).await.unwrap();
                assert_eq!(acked as usize, got.len(), "every received message acks");
                done.fetch_add(got.len(), Ordering::SeqCst);
                seen.lock().unwrap().extend(got.iter().map(|m| m.id));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let unique: HashSet<&Uuid> = seen.iter().collect();
    assert_eq!(seen.len(), N, "no message received twice");
    assert_eq!(unique.len(), N, "every message received");
    let s = q.stats("drain").await.unwrap();
    assert_eq!((s.completed, s.available, s.leased), (N as i64, 0, 0));
}

/// Starts a receiver on `rq`, waits until it is blocked, enqueues on `eq`, and returns how long
/// the receiver took to return the message after the enqueue returned.
async fn wake_latency<S: Store>(rq: &Queue<S>, eq: &Queue<impl Store>, queue: &str) -> Duration {
    let receiver = {
        let rq = rq.clone();
        let queue = queue.to_owned();
        tokio::spawn(async move {
            let got = rq
                .receive(&queue, 1, Duration::from_secs(30))
                .await
                .unwrap();
            (Instant::now(), got)
        })
    };
    let hub_queue = queue.to_owned();
    let store = rq.store().clone();
    wait_until("the receiver is blocked", LONG, || {
        store.wake().waiting(&hub_queue) == 1
    })
    .await;
    eq.enqueue(queue, &json!("wake"), &opts()).await.unwrap();
    let sent = Instant::now();
    let (woke, got) = receiver.await.unwrap();
    assert_eq!(got.len(), 1);
    woke.saturating_duration_since(sent)
}

pub async fn receiver_wakes_on_enqueue_in_process<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store);
    for round in 0..3 {
        let latency = wake_latency(&q, &q, "wake").await;
        assert!(
            latency < Duration::from_millis(100),
            "round {round}: woke {latency:?} after the enqueue"
        );
    }
}

pub async fn receiver_wakes_on_enqueue_from_another_handle<F: Fixture>(
    fx: Arc<F>,
    store: F::Store,
) {
    let rq = Queue::new(store.clone());
    let other = fx.reopen(&store).await;
    let eq = Queue::new(other);
    // PostgreSQL: LISTEN/NOTIFY, within 100 ms. SQLite: by its poll, which this test tells
    // apart from the 30 s long-poll timeout. One poll is enough on a quiet machine (the next
    // starts at most one interval after the enqueue commits), but on a loaded one the poll's
    // timer fires late: the full suite on this 2-core box, with trybuild compiling beside it,
    // saw 351 ms and 512 ms against a bound of one interval plus 100 ms (300 ms). Three
    // intervals still fail a receiver that waits for anything but its poll.
    let bound = if F::CROSS_HANDLE_WAKE {
        Duration::from_millis(100)
    } else {
        store.poll_interval() * 3 + Duration::from_millis(100)
    };
    for round in 0..3 {
        let latency = wake_latency(&rq, &eq, "xwake").await;
        assert!(
            latency < bound,
            "round {round}: woke {latency:?} after the enqueue (bound {bound:?})"
        );
    }
}

pub async fn stats_count_every_state<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store);
    q.enqueue_many("s", [1, 2, 3, 4, 5], &opts()).await.unwrap();
    q.enqueue("s", &6, &opts().delay(Duration::from_secs(3600)))
        .await
        .unwrap();
    let got = q.receive("s", 3, NO_WAIT).await.unwrap();
    q.ack("s", [&got[0]]).await.unwrap();
    q.nack("s", [&got[1]], false).await.unwrap();
    let s = q.stats("s").await.unwrap();
    assert_eq!(s.available, 2);
    assert_eq!(s.scheduled, 1);
    assert_eq!(s.leased, 1);
    assert_eq!(s.completed, 1);
    assert_eq!(s.dead, 1);
    assert_eq!(s.cancelled, 0);
}

pub async fn get_unknown_id_is_none<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store);
    assert!(q.get(Uuid::now_v7()).await.unwrap().is_none());
}

pub async fn migrations_twice_change_nothing<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store.clone());
    let e = q
        .enqueue("m", &json!({"keep": true}), &opts())
        .await
        .unwrap();
    let version = store.schema_version().await.unwrap();
    assert!(version >= 1);
    for _ in 0..2 {
        let r = store.migrate().await.unwrap();
        assert!(r.applied.is_empty(), "nothing left to apply: {r:?}");
        assert_eq!((r.from, r.to), (version, version));
    }
    assert_eq!(store.schema_version().await.unwrap(), version);
    let m = q.get(e.id).await.unwrap().unwrap();
    assert_eq!(
        m.payload,
        json!({"keep": true}),
        "data survives re-running migrations"
    );
}

/// Under a backlog a store may start each claim where the previous one ended (PostgreSQL does,
/// to skip the index entries earlier claims left dead). Rows that sort before that position must
/// still be delivered: at once when this process made them, and while the backlog lasts when
/// another process did.
pub async fn rows_that_sort_before_a_drained_backlog_are_not_left_behind<F: Fixture>(
    fx: Arc<F>,
    store: F::Store,
) {
    const BACKLOG: usize = 3000;
    let q = Queue::new(store.clone());
    q.enqueue_many("behind", (0..BACKLOG).map(|i| json!(i)), &opts())
        .await
        .unwrap();
    let mut left = BACKLOG;
    for _ in 0..3 {
        // Full batches: the case where a claim position is remembered.
        assert_eq!(q.receive("behind", 50, NO_WAIT).await.unwrap().len(), 50);
        left -= 50;
    }

    // Enqueued by this process: a higher priority, and a due time before the whole backlog.
    let urgent = q
        .enqueue("behind", &"urgent", &opts().priority(Priority::HIGH))
        .await
        .unwrap();
    assert_eq!(
        q.receive("behind", 1, NO_WAIT).await.unwrap()[0].id,
        urgent.id
    );
    let past = q.store().now().await.unwrap() - chrono::Duration::hours(1);
    let early = q
        .enqueue("behind", &"early", &opts().not_before(past))
        .await
        .unwrap();
    assert_eq!(
        q.receive("behind", 1, NO_WAIT).await.unwrap()[0].id,
        early.id
    );

    // Enqueued by another process, which this one's bookkeeping knows nothing of: claimed
    // while the backlog still has rows (one-row claims take far longer to drain it than the
    // store's bound on a row waiting behind the claim position).
    let other = Queue::new(fx.reopen(&store).await);
    let remote = other
        .enqueue("behind", &"remote", &opts().priority(Priority::CRITICAL))
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        let got = q.receive("behind", 1, NO_WAIT).await.unwrap();
        assert_eq!(
            got.len(),
            1,
            "the backlog ran out before the remote row was claimed"
        );
        if got[0].id == remote.id {
            break;
        }
        left -= 1;
        assert!(
            left > 0 && start.elapsed() < LONG,
            "the remote row was left behind"
        );
    }
    // Nothing was skipped or claimed twice: exactly the rest of the backlog remains.
    let stats = q.stats("behind").await.unwrap();
    assert_eq!(stats.available as usize, left);
    assert_eq!(stats.leased as usize, BACKLOG - left + 3);
}

/// The id of the running row that a store's upgrade test writes at the old schema version.
pub const UPGRADED_RUNNING_ID: Uuid = Uuid::from_u128(0x0190a000_0000_7000_8000_000000000001);

/// After a store's upgrade test migrated a database holding, in queue `up`, one row in each
/// state as the old schema version wrote them (payload `1` due, `2` not yet due, `3` running
/// with attempt 1, key `k` and id [`UPGRADED_RUNNING_ID`], `4` completed with key `k`, `5`
/// dead, `6` cancelled): nothing is lost. Every row keeps its state, the claim takes only what
/// is due, the dedup key still matches the running row that holds it, and that row's lease
/// still works (fenced by attempt), after which the key is free again.
pub async fn an_upgraded_store_keeps_every_row<S: Store>(store: S) {
    let q = Queue::new(store.clone());
    let s = q.stats("up").await.unwrap();
    assert_eq!(
        (
            s.available,
            s.scheduled,
            s.leased,
            s.completed,
            s.dead,
            s.cancelled
        ),
        (1, 1, 1, 1, 1, 1)
    );
    let got = q.receive("up", 10, NO_WAIT).await.unwrap();
    assert_eq!(got.len(), 1, "only the due row is claimable");
    assert_eq!(got[0].payload, json!(1));
    // The running row still holds its key; the completed one no longer does.
    let dup = q.enqueue("up", &json!(7), &opts().key("k")).await.unwrap();
    assert!(dup.duplicate);
    assert_eq!(dup.id, UPGRADED_RUNNING_ID);
    // Its lease is still fenced by attempt, and acking it frees the key.
    let lease = dray_core::LeaseRef {
        id: UPGRADED_RUNNING_ID,
        attempt: Some(1),
    };
    let w = store
        .message_ack_many(&dray_core::QueueName::new("up").unwrap(), &[lease])
        .await
        .unwrap();
    assert_eq!(w.applied, vec![UPGRADED_RUNNING_ID]);
    let fresh = q.enqueue("up", &json!(8), &opts().key("k")).await.unwrap();
    assert!(!fresh.duplicate);
}

/// Starts `receive` on `q` and waits until it is blocked on `queue` (so it has offered to take
/// the next message directly).
async fn blocked_receive<S: Store>(
    q: &Queue<S>,
    queue: &str,
) -> tokio::task::JoinHandle<Vec<dray_core::Message>> {
    let receiver = {
        let (q, queue) = (q.clone(), queue.to_owned());
        tokio::spawn(async move { q.receive(&queue, 5, LONG).await.unwrap() })
    };
    let (store, queue) = (q.store().clone(), queue.to_owned());
    wait_until("the receiver is blocked", LONG, || {
        store.wake().waiting(&queue) == 1
    })
    .await;
    receiver
}

/// A receiver waiting on an empty queue is handed a message enqueued in the same process: it
/// gets it leased to itself, exactly as stored, and nobody else can take it.
pub async fn a_waiting_receiver_is_handed_a_new_message_directly<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    let q = Queue::with_config(
        store.clone(),
        QueueConfig {
            receiver_id: Some("receiver-1".into()),
            ..QueueConfig::default()
        },
    );
    let receiver = blocked_receive(&q, "direct").await;
    let sent = q
        .enqueue(
            "direct",
            &json!({"n": 1}),
            &opts()
                .header("trace", "t-1")
                .priority(Priority(3))
                .max_attempts(4),
        )
        .await
        .unwrap();
    assert!(!sent.duplicate);
    let got = receiver.await.unwrap();
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.id, sent.id);
    assert_eq!(
        (m.state, m.attempt, m.max_attempts, m.leased_by.as_deref()),
        (MessageState::Running, 1, 4, Some("receiver-1"))
    );
    assert_eq!(m.payload, json!({"n": 1}));
    assert_eq!(m.headers.get("trace").map(String::as_str), Some("t-1"));
    assert!(
        m.leased_until.unwrap() > m.enqueued_at,
        "leased from now on"
    );
    let stored = q.get(sent.id).await.unwrap().unwrap();
    assert_eq!(&stored, m, "the handed-over message is the stored row");
    assert!(
        q.receive("direct", 10, NO_WAIT).await.unwrap().is_empty(),
        "nobody else can take it"
    );
    // It acks like any received message, fenced by its attempt.
    assert_eq!(q.ack("direct", &got).await.unwrap(), 1);
    let s = q.stats("direct").await.unwrap();
    assert_eq!((s.completed, s.available, s.leased), (1, 0, 0));
}

/// Messages that must go through the queue are never handed over: keyed ones (the key must be
/// stored, for dedup), delayed ones, and batches.
pub async fn keyed_delayed_and_batched_messages_are_not_handed_over<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    let q = Queue::new(store.clone());
    // Keyed: the waiting receiver gets it, and the key still dedups while it runs.
    let receiver = blocked_receive(&q, "k").await;
    let first = q
        .enqueue("k", &json!(1), &opts().key("once"))
        .await
        .unwrap();
    let got = receiver.await.unwrap();
    assert_eq!(got[0].id, first.id);
    assert_eq!(got[0].key.as_deref(), Some("once"));
    let again = q
        .enqueue("k", &json!(2), &opts().key("once"))
        .await
        .unwrap();
    assert_eq!((again.id, again.duplicate), (first.id, true));
    // Delayed: stored scheduled, not leased to the waiting receiver.
    let receiver = blocked_receive(&q, "d").await;
    let later = q
        .enqueue("d", &json!(1), &opts().delay(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!(
        q.get(later.id).await.unwrap().unwrap().state,
        MessageState::Scheduled
    );
    receiver.abort();
    let _ = receiver.await;
    // A batch: stored available, then claimed by the receiver like any other.
    let receiver = blocked_receive(&q, "b").await;
    let batch = q
        .enqueue_many("b", [json!(1), json!(2)], &opts())
        .await
        .unwrap();
    let mut got: Vec<Uuid> = receiver.await.unwrap().iter().map(|m| m.id).collect();
    while got.len() < 2 {
        got.extend(q.receive("b", 5, LONG).await.unwrap().iter().map(|m| m.id));
    }
    assert_eq!(
        got.into_iter().collect::<HashSet<_>>(),
        batch.iter().map(|e| e.id).collect::<HashSet<_>>()
    );
}

/// A receiver that stopped waiting (returned, or was dropped) takes nothing; one that left
/// after an enqueue took its offer gets the message given back, its attempt uncounted.
pub async fn messages_for_a_receiver_that_left_stay_in_the_queue<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    let q = Queue::new(store.clone());
    // Returned (its wait ended by `stop`) and dropped (its task aborted) before the enqueue.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stopped = {
        let q = q.clone();
        tokio::spawn(async move {
            let options = ReceiveOptions {
                limit: 1,
                wait: LONG,
                lease: None,
            };
            q.receive_until("left", &options, async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap()
        })
    };
    wait_until("the receiver is blocked", LONG, || {
        store.wake().waiting("left") == 1
    })
    .await;
    stop_tx.send(()).unwrap();
    assert!(stopped.await.unwrap().is_empty());
    let aborted = blocked_receive(&q, "left").await;
    aborted.abort();
    let _ = aborted.await;
    let a = q.enqueue("left", &json!("a"), &opts()).await.unwrap();
    let m = q.get(a.id).await.unwrap().unwrap();
    assert_eq!((m.state, m.attempt), (MessageState::Available, 0));
    // Left after its offer was taken: the enqueue is held up (its id is taken by an open
    // transaction on PostgreSQL; SQLite's one writer is busy), the receiver leaves meanwhile.
    let params = dray_core::ClaimParams {
        queue: dray_core::QueueName::new("left").unwrap(),
        limit: 1,
        lease: Duration::from_secs(30),
        leased_by: Some("gone".into()),
    };
    let offer = store.wake().signal("left").offer(params);
    let msg = q.message("left", &json!("b"), &opts()).unwrap();
    let mut tx = store.pool().begin().await.unwrap();
    store
        .message_insert_many_in(&mut *tx, std::slice::from_ref(&msg))
        .await
        .unwrap();
    let enqueue = {
        let (q, msg) = (q.clone(), msg.clone());
        tokio::spawn(async move { q.enqueue_messages(&[msg]).await })
    };
    wait_until("the enqueue took the offer", LONG, || offer.taken()).await;
    drop(offer);
    tx.rollback().await.unwrap();
    let out = enqueue.await.unwrap().unwrap();
    assert_eq!((out[0].id, out[0].duplicate), (msg.id, false));
    let m = q.get(msg.id).await.unwrap().unwrap();
    assert_eq!(
        (m.state, m.attempt),
        (MessageState::Available, 0),
        "given back, its attempt uncounted"
    );
    let got = q.receive("left", 5, NO_WAIT).await.unwrap();
    let ids: HashSet<Uuid> = got.iter().map(|m| m.id).collect();
    assert_eq!(ids, HashSet::from([a.id, msg.id]));
    assert!(got.iter().all(|m| m.attempt == 1));
}
