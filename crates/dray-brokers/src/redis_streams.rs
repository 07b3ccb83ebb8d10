//! Redis Streams: each event is one `XADD` entry with the fields `dray-event-id`,
//! `dray-event-type`, `payload` (the JSON text) and, when set, `dray-ordering-key`. The
//! ordering key picks the stream (`<prefix>:<key>`), so each key's events keep their order in a
//! stream of their own; events without one go to `<prefix>`. A batch is one pipelined round
//! trip.

use dray_core::outbox::{
    EVENT_ID_HEADER, EVENT_TYPE_HEADER, ORDERING_KEY_HEADER, OutboxRow, PublishError, Sink,
};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::Mutex;

/// Publishes events to Redis Streams.
pub struct RedisStreamSink {
    client: redis::Client,
    url: String,
    prefix: String,
    conn: Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl std::fmt::Debug for RedisStreamSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamSink")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisStreamSink {
    /// A sink to the Redis at `url` (`redis://127.0.0.1:6379`), streams named from `prefix`.
    /// Nothing connects yet: the first publish does (and a failed one is retried later).
    pub fn new(url: &str, prefix: &str) -> dray_core::Result<Self> {
        let client = redis::Client::open(url).map_err(|e| dray_core::Error::InvalidUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        if prefix.is_empty() {
            return Err(dray_core::Error::invalid(
                "stream prefix",
                "must not be empty",
            ));
        }
        Ok(RedisStreamSink {
            client,
            url: url.to_owned(),
            prefix: prefix.to_owned(),
            conn: Mutex::new(None),
        })
    }

    /// The stream an event goes to.
    pub fn stream_of(&self, e: &OutboxRow) -> String {
        match &e.ordering_key {
            Some(k) => format!("{}:{k}", self.prefix),
            None => self.prefix.clone(),
        }
    }

    async fn try_publish(&self, events: &[OutboxRow]) -> Result<(), String> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            let conn = self
                .client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| format!("cannot reach Redis at {}: {e}", self.url))?;
            *guard = Some(conn);
        }
        let Some(conn) = guard.as_mut() else {
            return Err("no connection".into());
        };
        let mut pipe = redis::pipe();
        for e in events {
            let payload = e.payload.to_string();
            let mut fields: Vec<(&str, &str)> = vec![
                (EVENT_ID_HEADER, &e.event_id),
                (EVENT_TYPE_HEADER, &e.event_type),
                ("payload", &payload),
            ];
            if let Some(k) = &e.ordering_key {
                fields.push((ORDERING_KEY_HEADER, k));
            }
            pipe.xadd(self.stream_of(e), "*", &fields);
        }
        let res: redis::RedisResult<Vec<String>> = pipe.query_async(conn).await;
        if let Err(e) = res {
            // Connect afresh next time.
            *guard = None;
            return Err(format!("XADD to Redis at {} failed: {e}", self.url));
        }
        Ok(())
    }
}

impl Sink for RedisStreamSink {
    fn describe(&self) -> String {
        format!("redis streams {}* at {}", self.prefix, self.url)
    }

    fn publish<'a>(
        &'a self,
        events: &'a [OutboxRow],
    ) -> BoxFuture<'a, Vec<Result<(), PublishError>>> {
        async move {
            match self.try_publish(events).await {
                Ok(()) => events.iter().map(|_| Ok(())).collect(),
                Err(e) => PublishError::transient(e).for_each(events),
            }
        }
        .boxed()
    }
}
