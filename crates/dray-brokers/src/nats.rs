//! NATS JetStream: each event is published to a subject with the headers `Nats-Msg-Id` (the
//! event id, so the stream's duplicate window drops a re-send of it), `dray-event-id`,
//! `dray-event-type` and, when set, `dray-ordering-key`; its body is the payload JSON. An
//! event is published once the stream acknowledged it (a duplicate acknowledgement counts: the
//! stream has it).

use async_nats::HeaderMap;
use async_nats::header::NATS_MESSAGE_ID;
use dray_core::outbox::{
    EVENT_ID_HEADER, EVENT_TYPE_HEADER, ORDERING_KEY_HEADER, OutboxRow, PublishError, Sink,
};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::Mutex;

/// Publishes events to a NATS JetStream subject.
pub struct NatsSink {
    url: String,
    subject: String,
    context: Mutex<Option<async_nats::jetstream::Context>>,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("url", &self.url)
            .field("subject", &self.subject)
            .finish()
    }
}

impl NatsSink {
    /// A sink to `subject` on the NATS server at `url` (`nats://127.0.0.1:4222`); a stream
    /// must capture the subject. Nothing connects until the first publish.
    pub fn new(url: &str, subject: &str) -> dray_core::Result<Self> {
        if subject.is_empty() || subject.contains(char::is_whitespace) {
            return Err(dray_core::Error::invalid(
                "subject",
                "a NATS subject is non-empty and has no spaces",
            ));
        }
        if !url.starts_with("nats://") && !url.starts_with("tls://") {
            return Err(dray_core::Error::InvalidUrl {
                url: dray_core::error::excerpt(url),
                reason: "a NATS URL starts with nats:// or tls://".into(),
            });
        }
        Ok(NatsSink {
            url: url.to_owned(),
            subject: subject.to_owned(),
            context: Mutex::new(None),
        })
    }

    async fn try_publish(&self, events: &[OutboxRow]) -> Vec<Result<(), PublishError>> {
        let mut guard = self.context.lock().await;
        if guard.is_none() {
            match async_nats::connect(&self.url).await {
                Ok(client) => *guard = Some(async_nats::jetstream::new(client)),
                Err(e) => {
                    return PublishError::transient(format!(
                        "cannot reach NATS at {}: {e}",
                        self.url
                    ))
                    .for_each(events);
                }
            }
        }
        let Some(js) = guard.as_ref() else {
            return events
                .iter()
                .map(|_| Err(PublishError::transient("no connection")))
                .collect();
        };
        // Publish all, then wait for the acknowledgements.
        let mut acks = Vec::with_capacity(events.len());
        for e in events {
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MESSAGE_ID, e.event_id.as_str());
            headers.insert(EVENT_ID_HEADER, e.event_id.as_str());
            headers.insert(EVENT_TYPE_HEADER, e.event_type.as_str());
            if let Some(k) = &e.ordering_key {
                headers.insert(ORDERING_KEY_HEADER, k.as_str());
            }
            acks.push(
                js.publish_with_headers(
                    self.subject.clone(),
                    headers,
                    e.payload.to_string().into(),
                )
                .await,
            );
        }
        let mut out = Vec::with_capacity(events.len());
        for a in acks {
            out.push(match a {
                Ok(pending) => match pending.await {
                    Ok(_) => Ok(()),
                    Err(e) => Err(PublishError::transient(format!(
                        "JetStream did not acknowledge on {}: {e}",
                        self.subject
                    ))),
                },
                Err(e) => Err(PublishError::transient(format!(
                    "publish to NATS subject {}: {e}",
                    self.subject
                ))),
            });
        }
        out
    }
}

impl Sink for NatsSink {
    fn describe(&self) -> String {
        format!("nats jetstream subject {} at {}", self.subject, self.url)
    }

    fn publish<'a>(
        &'a self,
        events: &'a [OutboxRow],
    ) -> BoxFuture<'a, Vec<Result<(), PublishError>>> {
        self.try_publish(events).boxed()
    }
}
