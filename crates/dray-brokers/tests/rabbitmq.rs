//! The RabbitMQ relay against the local broker (127.0.0.1:5672, guest/guest).

mod common;

use dray_brokers::RabbitSink;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A topic exchange and a queue bound to `k0` only, both named after a fresh suffix.
async fn topology() -> (Connection, lapin::Channel, String, String) {
    let conn = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .expect("RabbitMQ is required at 127.0.0.1:5672");
    let ch = conn.create_channel().await.unwrap();
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let (exchange, queue) = (
        format!("dray-test-x-{suffix}"),
        format!("dray-test-q-{suffix}"),
    );
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "k0".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    (conn, ch, exchange, queue)
}

/// Every message of `queue`: (message_id, type, header dray-event-id, body).
async fn drain(ch: &lapin::Channel, queue: &str) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let p = &m.delivery.properties;
        let header = p
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("dray-event-id").cloned());
        let header = match header {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => format!("{other:?}"),
        };
        out.push((
            p.message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            p.kind().as_ref().map(|s| s.to_string()).unwrap_or_default(),
            header,
            String::from_utf8(m.delivery.data.clone()).unwrap(),
        ));
    }
    out
}

async fn cleanup(ch: &lapin::Channel, exchange: &str, queue: &str) {
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    ch.exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn events_arrive_confirmed_with_their_ids_routed_by_ordering_key() {
    let (_conn, ch, exchange, queue) = topology().await;
    let dir = tempfile::tempdir().unwrap();
    let store = common::staged(dir.path(), common::events(10)).await;
    let relay = common::relay(&store, RabbitSink::new(AMQP, &exchange, "none").unwrap());
    common::until_published(&relay, &store, 10).await;
    let got = drain(&ch, &queue).await;
    let want: Vec<_> = (0..10)
        .filter(|i| i % 2 == 0)
        .map(|i| {
            (
                format!("e{i}"),
                "thing.happened".to_owned(),
                format!("e{i}"),
                i.to_string(),
            )
        })
        .collect();
    assert_eq!(
        got, want,
        "key k0's events, in order, with message_id, type and header"
    );
    cleanup(&ch, &exchange, &queue).await;
}

#[tokio::test]
async fn a_rabbitmq_that_is_down_at_the_start_gets_retries_then_delivery() {
    let (_conn, ch, exchange, queue) = topology().await;
    let dir = tempfile::tempdir().unwrap();
    let store = common::staged(dir.path(), common::events(4)).await;
    let port = common::free_port();
    let uri = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let relay = common::relay(&store, RabbitSink::new(&uri, &exchange, "none").unwrap());
    common::first_round_is_refused(
        &relay,
        &store,
        4,
        &format!("cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:{port}"),
    )
    .await;
    let proxy = common::proxy(port, "127.0.0.1:5672").await;
    common::until_published(&relay, &store, 4).await;
    assert_eq!(drain(&ch, &queue).await.len(), 2);
    proxy.abort();
    cleanup(&ch, &exchange, &queue).await;
    assert!(RabbitSink::new("http://x", "e", "k").is_err());
}
