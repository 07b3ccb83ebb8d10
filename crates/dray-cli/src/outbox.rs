//! `dray outbox`: stats, list, stage, requeue-failed, relay.

use clap::Subcommand;
use dray::outbox::{Outbox, OutboxEvent, OutboxStatus, QueueSink, Relay};
use dray::{Client, OutboxStore};
use serde_json::json;

use crate::{CliResult, parse_json, print_json};

#[derive(Subcommand, Debug)]
pub(crate) enum OutboxCommand {
    /// Count an outbox's events by status.
    Stats {
        /// Outbox name.
        outbox: String,
    },
    /// List an outbox's events, newest first.
    List {
        /// Outbox name.
        outbox: String,
        /// Only this status: pending, processing, published, failed.
        #[arg(long, value_parser = status)]
        status: Option<OutboxStatus>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Stage one event and commit it (an operator's publish by hand).
    Stage {
        /// Outbox name.
        outbox: String,
        /// Event type.
        event_type: String,
        /// Payload, as JSON.
        payload: String,
        /// A stable event id (default: a new one).
        #[arg(long)]
        event_id: Option<String>,
        /// An ordering key.
        #[arg(long)]
        ordering_key: Option<String>,
    },
    /// Re-drive failed events: pending again with fresh attempts.
    RequeueFailed {
        /// Outbox name.
        outbox: String,
    },
    /// Relay an outbox until interrupted (Ctrl-C), or one round with --once, to a Dray queue,
    /// Redis Streams, NATS JetStream or a RabbitMQ exchange.
    #[command(group(clap::ArgGroup::new("to").required(true)
        .args(["to_queue", "to_redis", "to_nats", "to_rabbitmq"])))]
    Relay {
        /// Outbox name.
        outbox: String,
        /// A Dray queue of this store: events become its messages.
        #[arg(long)]
        to_queue: Option<String>,
        /// A Redis URL (redis://127.0.0.1:6379): events are XADDed to --stream (and
        /// `<stream>:<ordering key>`).
        #[arg(long, requires = "stream")]
        to_redis: Option<String>,
        /// The Redis stream prefix.
        #[arg(long)]
        stream: Option<String>,
        /// A NATS URL (nats://127.0.0.1:4222): events are published to --subject, which a
        /// JetStream stream captures.
        #[arg(long, requires = "subject")]
        to_nats: Option<String>,
        /// The NATS subject.
        #[arg(long)]
        subject: Option<String>,
        /// An AMQP URI (amqp://guest:guest@127.0.0.1:5672/%2f): events are published to
        /// --exchange, routed by their ordering key (or --routing-key).
        #[arg(long, requires = "exchange")]
        to_rabbitmq: Option<String>,
        /// The RabbitMQ exchange.
        #[arg(long)]
        exchange: Option<String>,
        /// The routing key of events without an ordering key.
        #[arg(long, default_value = "")]
        routing_key: String,
        /// One round, then exit.
        #[arg(long)]
        once: bool,
        /// Tries of an event before it is failed.
        #[arg(long, default_value_t = dray::outbox::DEFAULT_MAX_ATTEMPTS)]
        max_attempts: i32,
    },
}

fn status(s: &str) -> Result<OutboxStatus, String> {
    OutboxStatus::parse(s).map_err(|e| e.to_string())
}

pub(crate) fn validate(cmd: &OutboxCommand) -> CliResult<()> {
    let name = match cmd {
        OutboxCommand::Stats { outbox }
        | OutboxCommand::List { outbox, .. }
        | OutboxCommand::Stage { outbox, .. }
        | OutboxCommand::RequeueFailed { outbox }
        | OutboxCommand::Relay { outbox, .. } => outbox,
    };
    dray::outbox::check_name("outbox", name)?;
    match cmd {
        OutboxCommand::List { limit, .. } if *limit == 0 || *limit > 10_000 => {
            Err(dray::Error::invalid("--limit", "must be 1 to 10000").into())
        }
        OutboxCommand::Stage { payload, .. } => {
            parse_json("the payload".into(), payload).map(|_| ())
        }
        OutboxCommand::Relay {
            to_queue,
            max_attempts,
            ..
        } => {
            if let Some(q) = to_queue {
                dray::QueueName::new(q.as_str())?;
            }
            if *max_attempts < 1 {
                return Err(dray::Error::invalid("--max-attempts", "must be at least 1").into());
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

pub(crate) async fn outbox_command<S: OutboxStore>(
    c: &Client<S>,
    cmd: &OutboxCommand,
    json_out: bool,
) -> CliResult<()> {
    match cmd {
        OutboxCommand::Stats { outbox } => {
            let s = c.outbox_stats(outbox).await?;
            if json_out {
                print_json(&s);
            } else {
                out!(
                    "{outbox}: pending {}, processing {}, published {}, failed {}",
                    s.pending,
                    s.processing,
                    s.published,
                    s.failed
                );
            }
        }
        OutboxCommand::List {
            outbox,
            status,
            limit,
        } => {
            let rows = c.outbox_list(outbox, *status, *limit).await?;
            if json_out {
                print_json(&rows);
            } else if rows.is_empty() {
                out!("no events");
            } else {
                out!(
                    "{:<36}  {:<20} {:<24} {:<10} {:>3}  error",
                    "id",
                    "type",
                    "event id",
                    "status",
                    "try"
                );
                for r in &rows {
                    out!(
                        "{:<36}  {:<20} {:<24} {:<10} {:>3}  {}",
                        r.id,
                        r.event_type,
                        r.event_id,
                        r.status.as_str(),
                        r.attempts,
                        r.last_error.as_deref().unwrap_or("")
                    );
                }
            }
        }
        OutboxCommand::Stage {
            outbox,
            event_type,
            payload,
            event_id,
            ordering_key,
        } => {
            let payload = parse_json("the payload".into(), payload)?;
            let mut event = OutboxEvent::new(event_type.as_str(), &payload)?;
            if let Some(id) = event_id {
                event = event.event_id(id.as_str());
            }
            if let Some(k) = ordering_key {
                event = event.ordering_key(k.as_str());
            }
            let id = event.event_id.clone();
            let mut tx = c
                .store()
                .pool()
                .begin()
                .await
                .map_err(dray::Error::db("outbox stage"))?;
            let n = Outbox::publish_in(c.store(), &mut *tx, outbox, event).await?;
            tx.commit().await.map_err(dray::Error::db("outbox stage"))?;
            if json_out {
                print_json(&json!({ "outbox": outbox, "event_id": id, "staged": n }));
            } else if n == 0 {
                out!("{outbox} has event {id} already; nothing staged");
            } else {
                out!("staged event {id} in {outbox}");
            }
        }
        OutboxCommand::RequeueFailed { outbox } => {
            let n = c.outbox_requeue_failed(outbox, None).await?;
            if json_out {
                print_json(&json!({ "outbox": outbox, "requeued": n }));
            } else {
                out!("requeued {n} failed event(s) of {outbox}");
            }
        }
        OutboxCommand::Relay {
            outbox,
            to_queue,
            to_redis,
            stream,
            to_nats,
            subject,
            to_rabbitmq,
            exchange,
            routing_key,
            once,
            max_attempts,
        } => {
            let run = Run {
                outbox,
                once: *once,
                max_attempts: *max_attempts,
                json: json_out,
            };
            if let Some(q) = to_queue {
                run.go(c.store(), QueueSink::new(c.store().clone(), q)?)
                    .await?;
            } else if let (Some(url), Some(prefix)) = (to_redis, stream) {
                run.go(c.store(), dray::brokers::RedisStreamSink::new(url, prefix)?)
                    .await?;
            } else if let (Some(url), Some(subject)) = (to_nats, subject) {
                run.go(c.store(), dray::brokers::NatsSink::new(url, subject)?)
                    .await?;
            } else if let (Some(uri), Some(exchange)) = (to_rabbitmq, exchange) {
                run.go(
                    c.store(),
                    dray::brokers::RabbitSink::new(uri, exchange, routing_key)?,
                )
                .await?;
            }
        }
    }
    Ok(())
}

/// One relay command, for any sink.
struct Run<'a> {
    outbox: &'a str,
    once: bool,
    max_attempts: i32,
    json: bool,
}

impl Run<'_> {
    async fn go<S: OutboxStore>(&self, store: &S, sink: impl dray::Sink) -> CliResult<()> {
        let to = sink.describe();
        let relay = Relay::new(store.clone(), self.outbox, sink)?
            .configure(|r| r.max_attempts = self.max_attempts)?;
        if self.once {
            let r = relay.run_once().await?;
            if self.json {
                print_json(&json!({
                    "claimed": r.claimed, "published": r.published,
                    "retried": r.retried, "failed": r.failed
                }));
            } else {
                out!(
                    "relayed {} to {to}: {} published, {} to retry, {} failed",
                    self.outbox,
                    r.published,
                    r.retried,
                    r.failed
                );
            }
        } else {
            eprintln!("relaying outbox {} to {to}; Ctrl-C stops", self.outbox);
            let handle = relay.spawn();
            let _ = tokio::signal::ctrl_c().await;
            handle.shutdown().await;
        }
        Ok(())
    }
}
