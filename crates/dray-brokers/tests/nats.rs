//! The NATS JetStream relay against the local server (127.0.0.1:4222, JetStream on).

mod common;

use std::time::Duration;

use dray_brokers::NatsSink;
use dray_core::outbox::Sink;

const NATS: &str = "nats://127.0.0.1:4222";

/// A stream capturing a fresh subject, with a two-minute duplicate window.
async fn stream() -> (async_nats::jetstream::Context, String, String) {
    let client = async_nats::connect(NATS)
        .await
        .expect("NATS is required at 127.0.0.1:4222");
    let js = async_nats::jetstream::new(client);
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let (name, subject) = (format!("DRAY_TEST_{suffix}"), format!("dray.test.{suffix}"));
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .expect("JetStream is required (nats-server -js)");
    (js, name, subject)
}

/// Every message of the stream: (Nats-Msg-Id, dray-event-type, body).
async fn messages(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> Vec<(String, String, String)> {
    let mut stream = js.get_stream(name).await.unwrap();
    let n = stream.info().await.unwrap().state.messages;
    let mut out = Vec::new();
    for seq in 1..=n {
        let m = stream.get_raw_message(seq).await.unwrap();
        let h = |k: &str| {
            m.headers
                .get(k)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        out.push((
            h("Nats-Msg-Id"),
            h("dray-event-type"),
            String::from_utf8(m.payload.to_vec()).unwrap(),
        ));
    }
    out
}

#[tokio::test]
async fn events_arrive_with_their_ids_and_a_re_send_is_dropped() {
    let (js, name, subject) = stream().await;
    let dir = tempfile::tempdir().unwrap();
    let store = common::staged(dir.path(), common::events(6)).await;
    let relay = common::relay(&store, NatsSink::new(NATS, &subject).unwrap());
    common::until_published(&relay, &store, 6).await;
    let want: Vec<_> = (0..6)
        .map(|i| (format!("e{i}"), "thing.happened".to_owned(), i.to_string()))
        .collect();
    assert_eq!(messages(&js, &name).await, want);
    // A forced re-publish of the same events (a relay that died before marking them): the
    // stream's duplicate window drops them, and the sink reports them published.
    let rows = dray_core::OutboxStore::outbox_list(&store, "out", None, 10)
        .await
        .unwrap();
    let again = NatsSink::new(NATS, &subject).unwrap().publish(&rows).await;
    assert!(again.iter().all(Result::is_ok), "{again:?}");
    assert_eq!(messages(&js, &name).await.len(), 6, "no duplicate stored");
    js.delete_stream(&name).await.unwrap();
}

#[tokio::test]
async fn a_nats_that_is_down_at_the_start_gets_retries_then_delivery() {
    let (js, name, subject) = stream().await;
    let dir = tempfile::tempdir().unwrap();
    let store = common::staged(dir.path(), common::events(4)).await;
    let port = common::free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let relay = common::relay(&store, NatsSink::new(&url, &subject).unwrap());
    common::first_round_is_refused(&relay, &store, 4, &format!("cannot reach NATS at {url}")).await;
    let proxy = common::proxy(port, "127.0.0.1:4222").await;
    common::until_published(&relay, &store, 4).await;
    assert_eq!(messages(&js, &name).await.len(), 4);
    proxy.abort();
    js.delete_stream(&name).await.unwrap();
    assert!(NatsSink::new("http://x", "s").is_err());
    assert!(NatsSink::new(NATS, "has space").is_err());
}
