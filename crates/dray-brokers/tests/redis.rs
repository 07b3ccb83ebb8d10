//! The Redis Streams relay against the local Redis (127.0.0.1:6379).

mod common;

use dray_brokers::RedisStreamSink;
use redis::AsyncCommands;

const REDIS: &str = "redis://127.0.0.1:6379";

async fn conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis is required at 127.0.0.1:6379")
}

/// (event id, type, payload) of every entry of `stream`, in stream order.
async fn entries(stream: &str) -> Vec<(String, String, String)> {
    let mut c = conn().await;
    let reply: redis::streams::StreamRangeReply = c.xrange_all(stream).await.unwrap();
    reply
        .ids
        .iter()
        .map(|e| {
            let get = |f: &str| -> String { e.get(f).unwrap() };
            (get("dray-event-id"), get("dray-event-type"), get("payload"))
        })
        .collect()
}

#[tokio::test]
async fn events_arrive_in_their_key_streams_with_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::staged(dir.path(), common::events(10)).await;
    let prefix = format!("dray-test-{}", uuid::Uuid::now_v7().simple());
    let relay = common::relay(&store, RedisStreamSink::new(REDIS, &prefix).unwrap());
    common::until_published(&relay, &store, 10).await;
    for k in 0..2 {
        let got = entries(&format!("{prefix}:k{k}")).await;
        let want: Vec<(String, String, String)> = (0..10)
            .filter(|i| i % 2 == k)
            .map(|i| (format!("e{i}"), "thing.happened".to_owned(), i.to_string()))
            .collect();
        assert_eq!(
            got, want,
            "key k{k}: every event, in order, with its id and type"
        );
    }
    let mut c = conn().await;
    let _: () = c
        .del(&[format!("{prefix}:k0"), format!("{prefix}:k1")])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_redis_that_is_down_at_the_start_gets_retries_then_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::staged(dir.path(), common::events(4)).await;
    let port = common::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let prefix = format!("dray-test-{}", uuid::Uuid::now_v7().simple());
    let relay = common::relay(&store, RedisStreamSink::new(&url, &prefix).unwrap());
    // Nothing listens: a transient failure, with a clear error.
    common::first_round_is_refused(&relay, &store, 4, &format!("cannot reach Redis at {url}"))
        .await;
    // The broker comes up on that port: delivery resumes.
    let proxy = common::proxy(port, "127.0.0.1:6379").await;
    common::until_published(&relay, &store, 4).await;
    assert_eq!(entries(&format!("{prefix}:k0")).await.len(), 2);
    proxy.abort();
    let mut c = conn().await;
    let _: () = c
        .del(&[format!("{prefix}:k0"), format!("{prefix}:k1")])
        .await
        .unwrap();
    assert!(RedisStreamSink::new("not a url", "p").is_err());
}
