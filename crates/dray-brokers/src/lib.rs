//! Outbox relays to external brokers: each is a [`dray_core::outbox::Sink`] behind a cargo
//! feature, publishing every event with its id (`dray-event-id`) and type
//! (`dray-event-type`), so consumers can deduplicate. A broker that cannot be reached is a
//! transient failure (the relay retries with backoff); the connection is made again on the
//! next try.

#![forbid(unsafe_code)]

#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis_streams;

#[cfg(feature = "nats")]
pub use nats::NatsSink;
#[cfg(feature = "rabbitmq")]
pub use rabbitmq::RabbitSink;

#[cfg(feature = "redis")]
pub use redis_streams::RedisStreamSink;
