//! RabbitMQ: each event is published to an exchange with publisher confirms, its routing key
//! the event's ordering key (or the sink's default), its `message_id` the event id, its `type`
//! the event type, its body the payload JSON, and the headers `dray-event-id`,
//! `dray-event-type` (and `dray-ordering-key`). An event is published only once the broker
//! confirmed it; a nack or a lost connection is a transient failure.

use dray_core::outbox::{
    EVENT_ID_HEADER, EVENT_TYPE_HEADER, ORDERING_KEY_HEADER, OutboxRow, PublishError, Sink,
};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

/// Publishes events to a RabbitMQ exchange.
pub struct RabbitSink {
    uri: String,
    exchange: String,
    default_routing_key: String,
    channel: Mutex<Option<(Connection, Channel)>>,
}

impl std::fmt::Debug for RabbitSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitSink")
            .field("exchange", &self.exchange)
            .field("default_routing_key", &self.default_routing_key)
            .finish()
    }
}

impl RabbitSink {
    /// A sink to `exchange` at `uri` (`amqp://guest:guest@127.0.0.1:5672/%2f`); events without
    /// an ordering key are routed with `default_routing_key`. The exchange must exist (declare
    /// it with your topology). Nothing connects until the first publish.
    pub fn new(uri: &str, exchange: &str, default_routing_key: &str) -> dray_core::Result<Self> {
        if !uri.starts_with("amqp://") && !uri.starts_with("amqps://") {
            return Err(dray_core::Error::InvalidUrl {
                url: dray_core::error::excerpt(uri),
                reason: "an AMQP URI starts with amqp:// or amqps://".into(),
            });
        }
        Ok(RabbitSink {
            uri: uri.to_owned(),
            exchange: exchange.to_owned(),
            default_routing_key: default_routing_key.to_owned(),
            channel: Mutex::new(None),
        })
    }

    fn redacted(&self) -> String {
        // amqp://user:password@host → amqp://user:***@host
        match (self.uri.find("://"), self.uri.rfind('@')) {
            (Some(s), Some(at)) if self.uri[s + 3..at].contains(':') => {
                let colon = s + 3 + self.uri[s + 3..at].find(':').unwrap_or(0);
                format!("{}:***{}", &self.uri[..colon], &self.uri[at..])
            }
            _ => self.uri.clone(),
        }
    }

    async fn try_publish(&self, events: &[OutboxRow]) -> Vec<Result<(), PublishError>> {
        let mut guard = self.channel.lock().await;
        if guard.as_ref().is_none_or(|(c, _)| !c.status().connected()) {
            let connected = async {
                let conn = Connection::connect(&self.uri, ConnectionProperties::default()).await?;
                let channel = conn.create_channel().await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                Ok::<_, lapin::Error>((conn, channel))
            }
            .await;
            match connected {
                Ok(c) => *guard = Some(c),
                Err(e) => {
                    return PublishError::transient(format!(
                        "cannot reach RabbitMQ at {}: {e}",
                        self.redacted()
                    ))
                    .for_each(events);
                }
            }
        }
        let Some((_, channel)) = guard.as_ref() else {
            return events
                .iter()
                .map(|_| Err(PublishError::transient("no channel")))
                .collect();
        };
        // Publish all, then wait for all the confirms.
        let mut confirms = Vec::with_capacity(events.len());
        for e in events {
            let mut headers = FieldTable::default();
            headers.insert(
                EVENT_ID_HEADER.into(),
                AMQPValue::LongString(LongString::from(e.event_id.as_str())),
            );
            headers.insert(
                EVENT_TYPE_HEADER.into(),
                AMQPValue::LongString(LongString::from(e.event_type.as_str())),
            );
            if let Some(k) = &e.ordering_key {
                headers.insert(
                    ORDERING_KEY_HEADER.into(),
                    AMQPValue::LongString(LongString::from(k.as_str())),
                );
            }
            let properties = BasicProperties::default()
                .with_message_id(e.event_id.as_str().into())
                .with_type(e.event_type.as_str().into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_headers(headers);
            let routing = e
                .ordering_key
                .as_deref()
                .unwrap_or(&self.default_routing_key);
            let body = e.payload.to_string();
            confirms.push(
                channel
                    .basic_publish(
                        self.exchange.as_str().into(),
                        routing.into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        properties,
                    )
                    .await,
            );
        }
        let mut out = Vec::with_capacity(events.len());
        let mut broken = false;
        for c in confirms {
            let r = match c {
                Ok(pending) => match pending.await {
                    Ok(Confirmation::Ack(_)) | Ok(Confirmation::NotRequested) => Ok(()),
                    Ok(Confirmation::Nack(_)) => Err(PublishError::transient(
                        "RabbitMQ refused the message (nack)",
                    )),
                    Err(e) => {
                        broken = true;
                        Err(PublishError::transient(format!("RabbitMQ confirm: {e}")))
                    }
                },
                Err(e) => {
                    broken = true;
                    Err(PublishError::transient(format!(
                        "publish to RabbitMQ exchange {:?}: {e}",
                        self.exchange
                    )))
                }
            };
            out.push(r);
        }
        if broken {
            *guard = None;
        }
        out
    }
}

impl Sink for RabbitSink {
    fn describe(&self) -> String {
        format!(
            "rabbitmq exchange {:?} at {}",
            self.exchange,
            self.redacted()
        )
    }

    fn publish<'a>(
        &'a self,
        events: &'a [OutboxRow],
    ) -> BoxFuture<'a, Vec<Result<(), PublishError>>> {
        self.try_publish(events).boxed()
    }
}
