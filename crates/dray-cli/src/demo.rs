//! `dray demo`: a guided tour that runs every layer against a real store and checks what it
//! shows. Each layer adds a section here.

use std::time::{Duration, Instant};

use dray::{EnqueueOptions, Priority, Queue, ReceiveOptions, SchemaMode, Store};
use serde_json::json;

use crate::{Backend, Cli, CliError, CliResult, DemoArgs, backend_of};

/// Fails the demo (exit 1) when what it shows is not what happened.
fn check(ok: bool, what: &str) -> CliResult<()> {
    if ok {
        Ok(())
    } else {
        Err(CliError::Demo(format!("demo check failed: {what}")))
    }
}

pub async fn run(cli: &Cli, args: &DemoArgs) -> CliResult<()> {
    match &cli.database {
        Some(url) => match backend_of(url)? {
            Backend::Postgres => {
                let store = crate::open_pg(cli, SchemaMode::Migrate).await?;
                println!("Dray demo on PostgreSQL (schema {:?})\n", store.schema());
                tour(store).await
            }
            Backend::Sqlite => {
                let store = crate::open_sqlite(cli, SchemaMode::Migrate).await?;
                println!("Dray demo on {url}\n");
                tour(store).await
            }
        },
        None => {
            let dir =
                std::env::temp_dir().join(format!("dray-demo-{}", uuid::Uuid::now_v7().simple()));
            std::fs::create_dir_all(&dir)
                .map_err(|e| CliError::Demo(format!("cannot create {}: {e}", dir.display())))?;
            let path = dir.join("demo.db");
            let url = format!("sqlite://{}", path.display());
            let store = dray::SqliteStore::open(&url).await?;
            println!("Dray demo on embedded SQLite: {}\n", path.display());
            let outcome = tour(store.clone()).await;
            store.close().await;
            if args.keep {
                println!("\nkept the demo database: {}", path.display());
            } else if let Err(e) = std::fs::remove_dir_all(&dir) {
                eprintln!("note: could not remove {}: {e}", dir.display());
            }
            outcome
        }
    }
}

async fn tour<S: Store>(store: S) -> CliResult<()> {
    queue_section(store).await?;
    println!("\nAll demo checks passed.");
    Ok(())
}

async fn queue_section<S: Store>(store: S) -> CliResult<()> {
    let q = Queue::new(store.clone());
    let queue = format!("demo-{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    println!("== Queues: enqueue, receive, ack, nack, leases ({queue})");

    let emails = q
        .enqueue_many(
            &queue,
            ["ada@example.com", "grace@example.com", "alan@example.com"]
                .map(|to| json!({ "to": to })),
            &EnqueueOptions::new().kind("email"),
        )
        .await?;
    let urgent = q
        .enqueue(
            &queue,
            &json!({"report": "outage"}),
            &EnqueueOptions::new()
                .kind("report")
                .priority(Priority::CRITICAL),
        )
        .await?;
    let reminder = q
        .enqueue(
            &queue,
            &json!({"remind": "standup"}),
            &EnqueueOptions::new()
                .kind("reminder")
                .delay(Duration::from_secs(1)),
        )
        .await?;
    let first = q
        .enqueue(
            &queue,
            &json!({"invoice": 42}),
            &EnqueueOptions::new().kind("invoice").key("invoice-42"),
        )
        .await?;
    let again = q
        .enqueue(
            &queue,
            &json!({"invoice": 42}),
            &EnqueueOptions::new().kind("invoice").key("invoice-42"),
        )
        .await?;
    println!(
        "  enqueued 3 emails in one batch, 1 critical report, 1 reminder delayed 1s, invoice-42"
    );
    println!(
        "  enqueued invoice-42 again: duplicate={} (same id: {})",
        again.duplicate,
        again.id == first.id
    );
    check(
        again.duplicate && again.id == first.id,
        "a repeated key returns the existing id",
    )?;
    let s = q.stats(&queue).await?;
    println!(
        "  stats: available {}, scheduled {}",
        s.available, s.scheduled
    );
    check(
        s.available == 5 && s.scheduled == 1,
        "5 available, 1 scheduled",
    )?;

    let got = q.receive(&queue, 10, Duration::ZERO).await?;
    println!(
        "  received {} in delivery order (priority, then due time, then id):",
        got.len()
    );
    for m in &got {
        println!("    {:<8} {}", m.kind.as_deref().unwrap_or("-"), m.payload);
    }
    check(
        got.first().map(|m| m.id) == Some(urgent.id),
        "the critical report comes first",
    )?;
    check(got.len() == 5, "the delayed reminder is not delivered yet")?;

    let bounced = got.iter().find(|m| m.id == emails[1].id).cloned();
    let poison = got.iter().find(|m| m.id == emails[2].id).cloned();
    let rest: Vec<_> = got
        .iter()
        .filter(|m| m.id != emails[1].id && m.id != emails[2].id)
        .collect();
    q.ack(&queue, rest.iter().copied()).await?;
    if let Some(b) = &bounced {
        q.nack(&queue, [b], true).await?;
    }
    if let Some(p) = &poison {
        q.nack(&queue, [p], false).await?;
    }
    println!("  acked 3; nacked grace@ for a retry; nacked alan@ without requeue (dead)");
    let retry = q.receive(&queue, 1, Duration::ZERO).await?;
    check(
        retry.len() == 1 && retry[0].attempt == 2,
        "the nacked message comes back as attempt 2",
    )?;
    println!("  grace@ delivered again: attempt {}", retry[0].attempt);
    q.ack_lease(&retry[0]).await?;

    let started = Instant::now();
    let late = q.receive(&queue, 1, Duration::from_secs(5)).await?;
    check(
        late.first().map(|m| m.id) == Some(reminder.id),
        "the reminder arrives once due",
    )?;
    println!(
        "  the delayed reminder arrived after waiting {:?} (database clock)",
        round(started.elapsed())
    );
    q.ack(&queue, &late).await?;

    // A receiver that dies holding a lease: the message comes back when the lease ends.
    let crash = q
        .enqueue(&queue, &json!({"job": "resize"}), &EnqueueOptions::new())
        .await?;
    let held = q
        .receive_with(
            &queue,
            &ReceiveOptions {
                limit: 1,
                wait: Duration::ZERO,
                lease: Some(Duration::from_millis(300)),
            },
        )
        .await?;
    check(
        held.len() == 1 && held[0].id == crash.id,
        "the resize message is leased",
    )?;
    println!("  a receiver took 'resize' with a 300ms lease and crashed without acking ...");
    let started = Instant::now();
    let back = q.receive(&queue, 1, Duration::from_secs(10)).await?;
    check(
        back.len() == 1 && back[0].id == crash.id && back[0].attempt == 2,
        "the expired lease is redelivered",
    )?;
    println!(
        "  ... redelivered after {:?} as attempt {}",
        round(started.elapsed()),
        back[0].attempt
    );
    let late = q.ack_lease(&held[0]).await;
    check(
        matches!(late, Err(dray::Error::LeaseLost { .. })),
        "the crashed receiver's late ack is refused",
    )?;
    println!("  the first receiver's late ack is refused: LeaseLost");
    q.ack_lease(&back[0]).await?;

    // Enqueue inside the caller's transaction.
    let mut tx = store
        .pool()
        .begin()
        .await
        .map_err(dray::Error::db("begin"))?;
    let gone = q
        .enqueue_in(
            &mut *tx,
            &queue,
            &json!({"order": 1}),
            &EnqueueOptions::new(),
        )
        .await?;
    tx.rollback().await.map_err(dray::Error::db("rollback"))?;
    let mut tx = store
        .pool()
        .begin()
        .await
        .map_err(dray::Error::db("begin"))?;
    let kept = q
        .enqueue_in(
            &mut *tx,
            &queue,
            &json!({"order": 2}),
            &EnqueueOptions::new(),
        )
        .await?;
    tx.commit().await.map_err(dray::Error::db("commit"))?;
    check(
        q.get(gone.id).await?.is_none(),
        "a rolled-back enqueue leaves nothing",
    )?;
    check(
        q.get(kept.id).await?.is_some(),
        "a committed enqueue is stored",
    )?;
    println!("  enqueue inside a transaction: rolled back -> gone; committed -> queued");
    let order = q.receive(&queue, 1, Duration::from_secs(5)).await?;
    q.ack(&queue, &order).await?;

    let s = q.stats(&queue).await?;
    println!(
        "  final stats: completed {}, dead {}, available {}, leased {}",
        s.completed, s.dead, s.available, s.leased
    );
    check(
        s.completed == 7 && s.dead == 1 && s.available == 0 && s.leased == 0,
        "final counts",
    )?;
    Ok(())
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}
