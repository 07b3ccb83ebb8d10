//! What the broker tests share: an outbox on a fresh SQLite file, and a TCP proxy that
//! stands for a broker that comes up late.

#![allow(dead_code)]

use std::time::Duration;

use dray_core::outbox::{Outbox, OutboxEvent, Relay, Sink};
use dray_sqlite::SqliteStore;

/// A fresh store in `dir`, with `events` staged in outbox `out` and committed.
pub async fn staged(dir: &std::path::Path, events: Vec<OutboxEvent>) -> SqliteStore {
    let store = SqliteStore::open(&format!("sqlite://{}", dir.join("b.db").display()))
        .await
        .unwrap();
    let mut o = Outbox::new("out").unwrap();
    o.stage_many(events).unwrap();
    let mut tx = dray_core::Store::pool(&store).begin().await.unwrap();
    o.flush(&store, &mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    store
}

/// A relay of outbox `out` with quick retries.
pub fn relay(store: &SqliteStore, sink: impl Sink) -> Relay<SqliteStore> {
    Relay::new(store.clone(), "out", sink)
        .unwrap()
        .configure(|c| {
            c.backoff.base = Duration::from_millis(10);
            c.backoff.max = Duration::from_millis(20);
            c.backoff.jitter = false;
            c.max_attempts = 1000;
        })
        .unwrap()
}

/// Runs rounds until every event is published, up to 30 s; answers the rounds' retry count.
pub async fn until_published(relay: &Relay<SqliteStore>, store: &SqliteStore, n: i64) -> usize {
    let start = std::time::Instant::now();
    let mut retried = 0;
    loop {
        let r = relay.run_once().await.unwrap();
        retried += r.retried;
        let s = dray_core::OutboxStore::outbox_stats(store, "out")
            .await
            .unwrap();
        if s.published == n {
            return retried;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A port nothing listens on (yet).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Listens on `port` and forwards every connection to `to`, from now on.
pub async fn proxy(port: u16, to: &'static str) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

/// Events `e0`…: type `t`, payload the index, ordering keys `k0`/`k1` alternately.
pub fn events(n: usize) -> Vec<OutboxEvent> {
    (0..n)
        .map(|i| {
            OutboxEvent::new("thing.happened", &i)
                .unwrap()
                .event_id(format!("e{i}"))
                .ordering_key(format!("k{}", i % 2))
        })
        .collect()
}

/// The first round of a relay whose broker is down: every event is sent back for a retry,
/// with an error that says `says`.
pub async fn first_round_is_refused(
    relay: &Relay<SqliteStore>,
    store: &SqliteStore,
    n: usize,
    says: &str,
) {
    let r = relay.run_once().await.unwrap();
    assert_eq!(r.retried, n);
    let rows = dray_core::OutboxStore::outbox_list(store, "out", None, 10)
        .await
        .unwrap();
    let err = rows[0].last_error.clone().unwrap();
    assert!(err.contains(says), "{err}");
}
