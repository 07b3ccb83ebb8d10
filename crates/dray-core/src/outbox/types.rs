//! The values of the outbox and inbox layer that cross the store seam.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};

/// An event to stage: its type, payload and, optionally, a stable id, when it happened, and
/// an ordering key (Forze's `IntegrationEvent`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutboxEvent {
    /// The event's type (`order.placed`).
    pub event_type: String,
    /// Its id: unique per outbox; a second event with the same id is dropped. Default: a new
    /// UUIDv7.
    pub event_id: String,
    /// The payload (JSON).
    pub payload: serde_json::Value,
    /// When it happened (default: the database's now at flush).
    pub occurred_at: Option<DateTime<Utc>>,
    /// Events of one key are relayed in the order they were staged (on the happy path), and
    /// brokers that partition use it (RabbitMQ's routing key, the Redis stream).
    pub ordering_key: Option<String>,
    /// Headers delivered with the event by every sink (a queue message's headers, NATS and
    /// RabbitMQ headers, Redis stream fields). Staging adds the W3C trace context of the
    /// current span (see [`crate::trace`]) unless a `traceparent` is set already.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

impl OutboxEvent {
    /// An event of `event_type` with `payload` and a new id.
    pub fn new(event_type: impl Into<String>, payload: &impl Serialize) -> Result<OutboxEvent> {
        Ok(OutboxEvent {
            event_type: event_type.into(),
            event_id: Uuid::now_v7().to_string(),
            payload: serde_json::to_value(payload)?,
            occurred_at: None,
            ordering_key: None,
            headers: BTreeMap::new(),
        })
    }
    /// Sets a stable event id (what consumers deduplicate on).
    pub fn event_id(mut self, id: impl Into<String>) -> Self {
        self.event_id = id.into();
        self
    }
    /// Sets when it happened.
    pub fn occurred_at(mut self, t: DateTime<Utc>) -> Self {
        self.occurred_at = Some(t);
        self
    }
    /// Sets the ordering key.
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Sets a header delivered with the event.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Checks the type, id, key and headers.
    pub fn check(&self) -> Result<()> {
        for (what, v, max) in [
            ("event_type", Some(self.event_type.as_str()), 256),
            ("event_id", Some(self.event_id.as_str()), 512),
            ("ordering_key", self.ordering_key.as_deref(), 512),
        ] {
            if let Some(v) = v
                && (v.is_empty() || v.len() > max || v.chars().any(char::is_control))
            {
                return Err(Error::invalid(
                    what,
                    format!(
                        "{:?}: use 1 to {max} bytes of printable text",
                        crate::error::excerpt(v)
                    ),
                ));
            }
        }
        if self.headers.len() > 64
            || self
                .headers
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 256 || v.len() > 4096)
        {
            return Err(Error::invalid(
                "headers",
                "use at most 64 headers, each a name of 1 to 256 bytes and a value of at most 4,096",
            ));
        }
        Ok(())
    }
}

/// Where a stored event stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum OutboxStatus {
    /// Waiting to be relayed (now, or at its `available_at` after a failed try).
    Pending,
    /// Claimed by a relay.
    Processing,
    /// Delivered to the sink.
    Published,
    /// Out of attempts, or refused for good: waits for `requeue_failed`.
    Failed,
}

impl OutboxStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxStatus::Pending => "pending",
            OutboxStatus::Processing => "processing",
            OutboxStatus::Published => "published",
            OutboxStatus::Failed => "failed",
        }
    }
    /// Parses a stored name.
    pub fn parse(s: &str) -> Result<OutboxStatus> {
        match s {
            "pending" => Ok(OutboxStatus::Pending),
            "processing" => Ok(OutboxStatus::Processing),
            "published" => Ok(OutboxStatus::Published),
            "failed" => Ok(OutboxStatus::Failed),
            other => Err(Error::invalid(
                "outbox status",
                format!(
                    "{:?} is not pending, processing, published or failed",
                    crate::error::excerpt(other)
                ),
            )),
        }
    }
}

impl fmt::Display for OutboxStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OutboxRow {
    /// The row's id (UUIDv7: staging order).
    pub id: Uuid,
    /// The outbox.
    pub outbox: String,
    /// The event's type.
    pub event_type: String,
    /// The event's id.
    pub event_id: String,
    /// Its payload.
    pub payload: serde_json::Value,
    /// Its ordering key.
    pub ordering_key: Option<String>,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// Where it stands.
    pub status: OutboxStatus,
    /// Publish tries so far.
    pub attempts: i32,
    /// When it may be claimed (a retry's due time).
    pub available_at: DateTime<Utc>,
    /// When a relay claimed it.
    pub claimed_at: Option<DateTime<Utc>>,
    /// When it was delivered.
    pub published_at: Option<DateTime<Utc>>,
    /// The last failed try's error.
    pub last_error: Option<String>,
    /// The headers it was staged with (see [`OutboxEvent::headers`]).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// Counts of one outbox's events by status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OutboxStats {
    /// Waiting to be relayed.
    pub pending: i64,
    /// Claimed by a relay.
    pub processing: i64,
    /// Delivered.
    pub published: i64,
    /// Failed for good (until requeued).
    pub failed: i64,
}

impl OutboxStats {
    /// Counts `n` events of `status`.
    pub fn add(&mut self, status: OutboxStatus, n: i64) {
        match status {
            OutboxStatus::Pending => self.pending += n,
            OutboxStatus::Processing => self.processing += n,
            OutboxStatus::Published => self.published += n,
            OutboxStatus::Failed => self.failed += n,
        }
    }
}

/// A retry to record: the row, its attempt count now, when to try again, why it failed.
#[derive(Clone, Debug)]
pub struct OutboxRetry {
    /// The row.
    pub id: Uuid,
    /// Attempts so far (this one included).
    pub attempts: i32,
    /// When it may be claimed again (database clock).
    pub available_at: DateTime<Utc>,
    /// Why it failed.
    pub error: String,
}
