//! `dray demo`: a guided tour that runs every layer against a real store and checks what it
//! shows. Each layer adds a section here.

use std::time::{Duration, Instant};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dray::{
    Backoff, Client, EnqueueOptions, FailureKind, Job, JobContext, JobError, JobOptions,
    MessageState, Priority, Queue, ReceiveOptions, RetryPolicy, SchemaMode, Store, Worker,
    WorkflowContext, WorkflowError, WorkflowStore,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
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
                out!("Dray demo on PostgreSQL (schema {:?})\n", store.schema());
                tour(store).await
            }
            Backend::Sqlite => {
                let store = crate::open_sqlite(cli, SchemaMode::Migrate).await?;
                out!("Dray demo on {url}\n");
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
            out!("Dray demo on embedded SQLite: {}\n", path.display());
            let outcome = tour(store.clone()).await;
            store.close().await;
            if args.keep {
                out!("\nkept the demo database: {}", path.display());
            } else if let Err(e) = std::fs::remove_dir_all(&dir) {
                eprintln!("note: could not remove {}: {e}", dir.display());
            }
            outcome
        }
    }
}

async fn tour<S: dray_server::ServerStore>(store: S) -> CliResult<()> {
    queue_section(store.clone()).await?;
    jobs_section(store.clone()).await?;
    workflows_section(store.clone()).await?;
    crons_section(store.clone()).await?;
    outbox_section(store.clone()).await?;
    http_section(store).await?;
    out!("\nAll demo checks passed.");
    Ok(())
}

async fn queue_section<S: Store>(store: S) -> CliResult<()> {
    let q = Queue::new(store.clone());
    let queue = format!("demo-{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    out!("== Queues: enqueue, receive, ack, nack, leases ({queue})");

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
    out!("  enqueued 3 emails in one batch, 1 critical report, 1 reminder delayed 1s, invoice-42");
    out!(
        "  enqueued invoice-42 again: duplicate={} (same id: {})",
        again.duplicate,
        again.id == first.id
    );
    check(
        again.duplicate && again.id == first.id,
        "a repeated key returns the existing id",
    )?;
    let s = q.stats(&queue).await?;
    out!(
        "  stats: available {}, scheduled {}",
        s.available,
        s.scheduled
    );
    check(
        s.available == 5 && s.scheduled == 1,
        "5 available, 1 scheduled",
    )?;

    let got = q.receive(&queue, 10, Duration::ZERO).await?;
    out!(
        "  received {} in delivery order (priority, then due time, then id):",
        got.len()
    );
    for m in &got {
        out!("    {:<8} {}", m.kind.as_deref().unwrap_or("-"), m.payload);
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
    out!("  acked 3; nacked grace@ for a retry; nacked alan@ without requeue (dead)");
    let retry = q.receive(&queue, 1, Duration::ZERO).await?;
    check(
        retry.len() == 1 && retry[0].attempt == 2,
        "the nacked message comes back as attempt 2",
    )?;
    out!("  grace@ delivered again: attempt {}", retry[0].attempt);
    q.ack_lease(&retry[0]).await?;

    let started = Instant::now();
    let late = q.receive(&queue, 1, Duration::from_secs(5)).await?;
    check(
        late.first().map(|m| m.id) == Some(reminder.id),
        "the reminder arrives once due",
    )?;
    out!(
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
    out!("  a receiver took 'resize' with a 300ms lease and crashed without acking ...");
    let started = Instant::now();
    let back = q.receive(&queue, 1, Duration::from_secs(10)).await?;
    check(
        back.len() == 1 && back[0].id == crash.id && back[0].attempt == 2,
        "the expired lease is redelivered",
    )?;
    out!(
        "  ... redelivered after {:?} as attempt {}",
        round(started.elapsed()),
        back[0].attempt
    );
    let late = q.ack_lease(&held[0]).await;
    check(
        matches!(late, Err(dray::Error::LeaseLost { .. })),
        "the crashed receiver's late ack is refused",
    )?;
    out!("  the first receiver's late ack is refused: LeaseLost");
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
    out!("  enqueue inside a transaction: rolled back -> gone; committed -> queued");
    let order = q.receive(&queue, 1, Duration::from_secs(5)).await?;
    q.ack(&queue, &order).await?;

    let s = q.stats(&queue).await?;
    out!(
        "  final stats: completed {}, dead {}, available {}, leased {}",
        s.completed,
        s.dead,
        s.available,
        s.leased
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

/// Forge's `export_users`, in Dray: reports progress as it goes.
struct ExportUsers;

#[derive(Serialize, Deserialize)]
struct ExportInput {
    format: String,
    users: usize,
}

#[derive(Serialize, Deserialize)]
struct ExportOutput {
    count: usize,
    format: String,
}

impl Job for ExportUsers {
    const NAME: &'static str = "export_users";
    type Input = ExportInput;
    type Output = ExportOutput;

    fn options() -> JobOptions {
        JobOptions {
            queue: "demo-jobs".into(),
            priority: Priority::LOW,
            timeout: Some(Duration::from_secs(60)),
            ..JobOptions::default()
        }
    }

    async fn run(&self, ctx: &JobContext, input: ExportInput) -> Result<ExportOutput, JobError> {
        ctx.progress(0, "Initializing export...").await?;
        for done in (0..=input.users).step_by(input.users.max(1) / 10) {
            // Stands in for real work: fetching and formatting users.
            tokio::time::sleep(Duration::from_millis(60)).await;
            let pct = (done * 100 / input.users.max(1)) as u8;
            ctx.progress(pct, format!("Processing {done}/{} users", input.users))
                .await?;
        }
        ctx.progress(100, "Export complete").await?;
        Ok(ExportOutput {
            count: input.users,
            format: input.format,
        })
    }
}

/// Fails its first attempt (a flaky upstream), then succeeds.
struct SendEmail;

impl Job for SendEmail {
    const NAME: &'static str = "send_email";
    type Input = String;
    type Output = String;

    fn options() -> JobOptions {
        JobOptions {
            queue: "demo-jobs".into(),
            retry: RetryPolicy {
                max_attempts: 3,
                backoff: Backoff::Exponential,
                base: Duration::from_millis(300),
                max: Duration::from_secs(5),
                jitter: false,
            },
            ..JobOptions::default()
        }
    }

    async fn run(&self, ctx: &JobContext, to: String) -> Result<String, JobError> {
        if !ctx.is_retry() {
            return Err(JobError::transient("SMTP server said 421: try again later"));
        }
        Ok(format!("sent to {to} on attempt {}", ctx.attempt()))
    }
}

/// Refuses bad input permanently, until the "bug" is fixed (the flag), then succeeds.
struct ChargeCard {
    fixed: Arc<AtomicBool>,
}

impl Job for ChargeCard {
    const NAME: &'static str = "charge_card";
    type Input = u32;
    type Output = String;

    fn options() -> JobOptions {
        JobOptions {
            queue: "demo-jobs".into(),
            ..JobOptions::default()
        }
    }

    async fn run(&self, _ctx: &JobContext, cents: u32) -> Result<String, JobError> {
        if !self.fixed.load(Ordering::SeqCst) {
            return Err(JobError::permanent(
                "card processor rejected the currency code",
            ));
        }
        Ok(format!("charged {cents} cents"))
    }
}

fn bar(pct: u8) -> String {
    let filled = usize::from(pct) / 5;
    format!(
        "[{}{}] {pct:>3}%",
        "#".repeat(filled),
        " ".repeat(20 - filled)
    )
}

async fn jobs_section<S: Store>(store: S) -> CliResult<()> {
    out!("\n== Jobs: typed handlers, a worker, progress, retries, dead jobs, re-drive");
    let fixed = Arc::new(AtomicBool::new(false));
    let worker = Worker::new(store.clone())
        .register(ExportUsers)
        .register(SendEmail)
        .register(ChargeCard {
            fixed: fixed.clone(),
        })
        .queue("demo-jobs", 4)?
        .configure(|c| c.shutdown_grace = Duration::from_secs(2))
        .start()?;
    let client = Client::new(store);

    // Non-blocking (FastWorker's delay / Forge's dispatch): an id at once, progress to watch.
    let export = client
        .enqueue::<ExportUsers>(&ExportInput {
            format: "csv".into(),
            users: 500,
        })
        .await?;
    out!(
        "  enqueued export_users {}; watching its progress:",
        export.id
    );
    let mut watch = std::pin::pin!(client.watch(export.id));
    let mut last = None;
    while let Some(status) = watch.next().await {
        let status = status?;
        if let Some(p) = status.progress {
            out_inline!(
                "\r    {} {:<30}",
                bar(p),
                status.message.clone().unwrap_or_default()
            );
            last = Some(p);
        }
        if status.state.is_terminal() {
            out!();
            check(
                status.state == MessageState::Completed,
                "the export completes",
            )?;
            break;
        }
    }
    check(last == Some(100), "progress reached 100%")?;
    let out: ExportOutput = client
        .result(export.id)
        .await?
        .ok_or_else(|| CliError::Demo("no result".into()))?
        .output()?;
    out!("  result: {} users exported as {}", out.count, out.format);

    // Blocking (FastWorker's submit_task): wait for the output. The first attempt fails.
    let started = Instant::now();
    let sent = client
        .submit_and_wait::<SendEmail>(&"ada@example.com".to_owned(), Duration::from_secs(10))
        .await?;
    out!(
        "  submit_and_wait(send_email): {sent} (after a transient failure and {:?} of backoff)",
        round(started.elapsed())
    );
    check(
        sent.contains("attempt 2"),
        "the email went out on the retry",
    )?;

    // A permanent error: dead at once, no retries.
    let charge = client.enqueue::<ChargeCard>(&1999).await?;
    let outcome = client.wait(charge.id, Duration::from_secs(10)).await?;
    let why = outcome
        .errors
        .last()
        .map(|e| e.message.clone())
        .unwrap_or_default();
    out!(
        "  charge_card is {} after {} attempt: {why}",
        outcome.state,
        outcome.attempts
    );
    check(
        outcome.state == MessageState::Dead && outcome.attempts == 1,
        "a permanent error is dead at once",
    )?;
    check(
        outcome.errors[0].kind == FailureKind::Permanent,
        "the error is recorded as permanent",
    )?;

    // Fix the bug, re-drive the dead job (dray jobs retry ID does the same).
    fixed.store(true, Ordering::SeqCst);
    client.retry(charge.id).await?;
    let outcome = client.wait(charge.id, Duration::from_secs(10)).await?;
    let charged: String = outcome.output()?;
    out!(
        "  re-driven after the fix: {charged} ({} earlier error kept in its history)",
        outcome.errors.len()
    );

    // In-process completion callback (FastWorker's delay_with_callback).
    let (tx, rx) = tokio::sync::oneshot::channel();
    client
        .enqueue_with_callback::<ExportUsers>(
            &ExportInput {
                format: "json".into(),
                users: 10,
            },
            move |o| {
                let _ = tx.send(o.map(|o| o.state));
            },
        )
        .await?;
    let state = rx
        .await
        .map_err(|_| CliError::Demo("callback never ran".into()))??;
    out!("  enqueue_with_callback: the callback ran once, with state {state}");
    check(
        state == MessageState::Completed,
        "the callback saw the job complete",
    )?;

    worker.shutdown().await?;
    out!("  worker shut down gracefully");
    Ok(())
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Signup {
    email: String,
}

/// Forge's account verification, shortened: a token, a durable sleep, a wait for the click.
#[dray::workflow(name = "demo_verify_account", timeout = "1h")]
async fn verify_account(ctx: &WorkflowContext, input: Signup) -> Result<bool, WorkflowError> {
    let token: String = ctx
        .step("make_token", || async {
            Ok(format!(
                "verify-{}",
                &uuid::Uuid::now_v7().simple().to_string()[24..]
            ))
        })
        .await?;
    ctx.step("send_email", || async {
        // A real workflow sends the link here; the demo sends the click itself.
        Ok(format!("sent to {}", input.email))
    })
    .await?;
    ctx.set_state("token", &token).await?;
    ctx.sleep(Duration::from_millis(300)).await?;
    let clicked: Option<String> = ctx
        .wait_for_signal("clicked", Some(Duration::from_secs(60)))
        .await?;
    Ok(clicked.as_deref() == Some(token.as_str()))
}

/// A trip whose payment fails for good: the bookings before it are compensated, newest first.
#[dray::workflow(name = "demo_book_trip")]
async fn book_trip(ctx: &WorkflowContext, city: String) -> Result<(), WorkflowError> {
    for what in ["flight", "hotel"] {
        let booking = format!("{what} to {city}");
        ctx.step(what, || async { Ok(booking.clone()) })
            .compensate_with(|booking: String| async move {
                out!("  compensation: cancelled the {booking}");
                Ok(())
            })
            .await?;
    }
    ctx.step("pay", || async {
        Err::<(), _>(WorkflowError::permanent("card declined"))
    })
    .await?;
    Ok(())
}

async fn workflows_section<S: WorkflowStore>(store: S) -> CliResult<()> {
    out!("\n== Workflows: durable steps, sleep, signals, queries, compensation");
    let worker = Worker::new(store.clone())
        .register_workflow(VerifyAccountWorkflow)
        .register_workflow(BookTripWorkflow)
        .configure(|c| {
            c.heartbeat = Duration::from_millis(200);
            c.maintenance_interval = Duration::from_millis(200);
        })
        .start()?;
    let client = Client::new(store.clone());
    let wid = format!(
        "signup-{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let run = client
        .start_workflow::<VerifyAccountWorkflow>(
            &Signup {
                email: "ada@example.com".into(),
            },
            &wid,
        )
        .await?;
    let again = client
        .start_workflow::<VerifyAccountWorkflow>(
            &Signup {
                email: "ada@example.com".into(),
            },
            &wid,
        )
        .await?;
    out!(
        "  started demo_verify_account as run {} (workflow id {wid:?}); starting it again returns the same run: {}",
        run.run_id(),
        again.run_id() == run.run_id()
    );
    check(
        again.run_id() == run.run_id(),
        "a workflow id starts one run",
    )?;
    // It makes a token, sleeps (holding no worker slot), then waits for the click.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut saw_sleeping = false;
    loop {
        let info = run.describe().await?;
        saw_sleeping |= info.status == dray::RunStatus::Sleeping;
        if info.status == dray::RunStatus::Waiting {
            break;
        }
        check(
            Instant::now() < deadline,
            "the run reaches its wait for the click",
        )?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out!(
        "  it slept 300 ms{} and now waits for the signal \"clicked\" (running on the worker: {})",
        if saw_sleeping { " (seen sleeping)" } else { "" },
        worker.running()
    );
    let token: String = run
        .query("token")
        .await?
        .ok_or_else(|| CliError::Demo("the run set no token".into()))?;
    out!(
        "  query \"token\" while it waits: {token:?}; the demo clicks the link: signal \"clicked\""
    );
    run.signal("clicked", &token).await?;
    let verified = run.result(Duration::from_secs(30)).await?;
    check(verified, "the run verified the token it was sent")?;
    out!("  result: verified = {verified}; its timeline:");
    crate::workflows::print_timeline(&run.describe().await?);

    let trip = client
        .start_workflow::<BookTripWorkflow>(&"Lisbon".to_owned(), &format!("{wid}-trip"))
        .await?;
    let err = trip.result(Duration::from_secs(30)).await;
    let compensated = matches!(
        &err,
        Err(dray::Error::WorkflowFailed {
            status: dray::RunStatus::Compensated,
            ..
        })
    );
    check(compensated, "the failed saga compensated")?;
    let info = trip.describe().await?;
    let undone: Vec<&str> = info
        .steps
        .iter()
        .filter(|s| s.compensated_at.is_some())
        .map(|s| s.name.as_str())
        .collect();
    check(
        undone == ["flight", "hotel"],
        "both bookings were compensated",
    )?;
    out!(
        "\n  a saga whose payment failed: the hotel, then the flight, were cancelled ({}):",
        info.status
    );
    crate::workflows::print_timeline(&info);
    out!("  (`dray workflows list|describe|signal|cancel|result|restart` work on these runs)");
    worker.shutdown().await?;
    Ok(())
}

/// Every second: prints its tick.
#[dray::cron("* * * * * *", name = "demo_tick")]
async fn demo_tick(ctx: &dray::CronContext) -> Result<(), JobError> {
    out!(
        "  tick of {} ran {} ms after its time",
        ctx.scheduled_at().format("%H:%M:%S"),
        ctx.delay().as_millis()
    );
    Ok(())
}

async fn crons_section<S: dray::CronStore>(store: S) -> CliResult<()> {
    out!("\n== Crons: a per-second schedule, each tick exactly once");
    let worker = Worker::new(store.clone())
        .register_cron(DemoTickCron)
        .configure(|c| c.maintenance_interval = Duration::from_millis(200))
        .start()?;
    let client = Client::new(store.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    // The worker stores its declared schedule as it starts.
    while !client
        .schedules()
        .await?
        .iter()
        .any(|(s, _)| s.spec.name == "demo_tick")
    {
        check(Instant::now() < deadline, "the worker stored demo_tick")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fired = loop {
        let h = client.schedule_history("demo_tick", 100).await?;
        let done: Vec<_> = h
            .iter()
            .filter(|t| t.job_state == Some(MessageState::Completed))
            .cloned()
            .collect();
        if done.len() >= 3 {
            break done;
        }
        check(Instant::now() < deadline, "three ticks of demo_tick ran")?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    worker.shutdown().await?;
    let mut ticks: Vec<_> = fired.iter().map(|t| t.tick).collect();
    ticks.sort();
    ticks.dedup();
    check(ticks.len() == fired.len(), "no tick ran twice")?;
    let (row, _) = client
        .schedules()
        .await?
        .into_iter()
        .find(|(s, _)| s.spec.name == "demo_tick")
        .ok_or_else(|| CliError::Demo("demo_tick is not stored".into()))?;
    out!(
        "  schedule demo_tick ({:?} in {}): {} ticks recorded, each once (`dray crons history demo_tick`)",
        row.spec.expression,
        row.spec.timezone,
        fired.len()
    );
    Ok(())
}

async fn outbox_section<S: dray::OutboxStore>(store: S) -> CliResult<()> {
    out!("\n== Outbox: events staged in your transaction, relayed to a queue");
    let mut outbox = dray::Outbox::new("demo")?;
    let sql_err = |e: dray::sqlx::Error| CliError::Demo(format!("demo transaction: {e}"));
    // One event in a transaction that commits…
    let mut tx = store.pool().begin().await.map_err(sql_err)?;
    outbox.stage_event(
        dray::OutboxEvent::new("order.placed", &json!({ "order": 42 }))?.event_id("order-42"),
    )?;
    outbox.flush(&store, &mut *tx).await?;
    tx.commit().await.map_err(sql_err)?;
    // …and one in a transaction that rolls back.
    let mut tx = store.pool().begin().await.map_err(sql_err)?;
    outbox.stage_event(
        dray::OutboxEvent::new("order.placed", &json!({ "order": 43 }))?.event_id("order-43"),
    )?;
    outbox.flush(&store, &mut *tx).await?;
    tx.rollback().await.map_err(sql_err)?;
    out!("  staged order-42 in a transaction that committed, order-43 in one that rolled back");
    let relay = dray::Relay::new(
        store.clone(),
        "demo",
        dray::QueueSink::new(store.clone(), "order-events")?,
    )?
    .spawn();
    let q = Queue::new(store.clone());
    let got = q
        .receive("order-events", 10, Duration::from_secs(10))
        .await?;
    relay.shutdown().await;
    check(got.len() == 1, "exactly one event was delivered")?;
    let m = &got[0];
    let event_id = dray::outbox::inbox_message_id(m);
    check(event_id == "order-42", "the committed event was delivered")?;
    out!(
        "  the relay delivered {} to queue order-events: {} {} (header dray-event-id)",
        got.len(),
        m.kind.as_deref().unwrap_or("-"),
        event_id
    );
    // The consumer's inbox: its effects and the mark commit together, once per event id.
    let client = Client::new(store.clone());
    let mut applied = 0;
    for _ in 0..2 {
        if let Some(tx) = client.inbox_begin("billing", &event_id).await? {
            applied += 1;
            tx.commit().await.map_err(sql_err)?;
        }
    }
    q.ack_lease(m).await?;
    check(applied == 1, "the inbox applied the event once")?;
    out!("  the consumer's inbox applied it once, though it was handed to it twice");
    Ok(())
}

/// The demo's jobs and workflows in a server's catalog (`dray serve` knows their types).
pub(crate) fn catalog<S: dray_server::ServerStore>(
    catalog: dray_server::Catalog<S>,
) -> dray_server::Catalog<S> {
    catalog
        .job::<ExportUsers>()
        .job::<SendEmail>()
        .job::<ChargeCard>()
        .workflow::<VerifyAccountWorkflow>()
        .workflow::<BookTripWorkflow>()
}

/// A worker for the demo's jobs and workflows (`dray serve --worker`); `charge_card` succeeds.
pub(crate) fn serve_worker<S: WorkflowStore>(store: S) -> CliResult<dray::WorkerHandle> {
    Ok(Worker::new(store)
        .register(ExportUsers)
        .register(SendEmail)
        .register(ChargeCard {
            fixed: Arc::new(AtomicBool::new(true)),
        })
        .register_workflow(VerifyAccountWorkflow)
        .register_workflow(BookTripWorkflow)
        .queue("demo-jobs", 4)?
        .start()?)
}

fn http_err(e: reqwest::Error) -> CliError {
    CliError::Demo(format!("HTTP request to the demo server failed: {e}"))
}

/// One call to the demo server: status and JSON body.
async fn call(req: reqwest::RequestBuilder) -> CliResult<(u16, serde_json::Value)> {
    let r = req.send().await.map_err(http_err)?;
    let status = r.status().as_u16();
    let body = r.json().await.map_err(http_err)?;
    Ok((status, body))
}

async fn http_section<S: dray_server::ServerStore>(store: S) -> CliResult<()> {
    use dray::api::{NewToken, Scope, generate_token};
    out!("\n== The HTTP API: dray serve, a token, live progress over SSE, a worker over HTTP");
    let (secret, hash) = generate_token()?;
    store
        .token_insert(&NewToken {
            id: uuid::Uuid::now_v7(),
            name: format!("demo-{}", &uuid::Uuid::now_v7().simple().to_string()[20..]),
            scopes: vec![Scope::Admin],
            hash,
            ttl: Some(Duration::from_secs(600)),
        })
        .await?;
    let config = dray_server::ServerConfig {
        addr: "127.0.0.1:0"
            .parse()
            .map_err(|e| CliError::Demo(format!("{e}")))?,
        event_tick: Duration::from_millis(50),
        ..dray_server::ServerConfig::default()
    };
    let listener = dray_server::bind(&config)
        .await
        .map_err(|e| CliError::Demo(format!("cannot listen on loopback: {e}")))?;
    let base = format!(
        "http://{}",
        listener
            .local_addr()
            .map_err(|e| CliError::Demo(e.to_string()))?
    );
    let app = dray_server::App::new(store.clone(), config, catalog(dray_server::Catalog::new()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(dray_server::serve_on(listener, app, async move {
        let _ = stopped.await;
    }));
    let worker = serve_worker(store.clone())?;
    out!("  serving {base}/api/v1 with a token of scope admin");
    let http = reqwest::Client::new();

    let (status, e) = call(
        http.post(format!("{base}/api/v1/jobs"))
            .bearer_auth(&secret)
            .header("Idempotency-Key", "demo-export-1")
            .json(&json!({"kind": "export_users", "input": {"format": "json", "users": 300}})),
    )
    .await?;
    check(status == 201, "POST /api/v1/jobs answers 201")?;
    let id = e["id"].as_str().unwrap_or_default().to_owned();
    out!("  POST /api/v1/jobs → 201, job {id}");
    let (status, again) = call(
        http.post(format!("{base}/api/v1/jobs"))
            .bearer_auth(&secret)
            .header("Idempotency-Key", "demo-export-1")
            .json(&json!({"kind": "export_users", "input": {"format": "json", "users": 300}})),
    )
    .await?;
    check(
        status == 201 && again == e,
        "a retried POST with its Idempotency-Key answers the same job",
    )?;
    out!("  the same POST again with its Idempotency-Key → the same job, nothing new enqueued");

    // Follow its progress over server-sent events, to the end.
    let mut stream = http
        .get(format!("{base}/api/v1/jobs/{id}/events"))
        .bearer_auth(&secret)
        .send()
        .await
        .map_err(http_err)?
        .bytes_stream();
    let mut buf = String::new();
    let mut ended = None;
    let follow = async {
        while let Some(chunk) = stream.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk.map_err(http_err)?));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let event = block
                    .lines()
                    .find_map(|l| l.strip_prefix("event: "))
                    .unwrap_or("");
                let data: serde_json::Value = block
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .and_then(|d| serde_json::from_str(d).ok())
                    .unwrap_or_default();
                match event {
                    "status" => {
                        if let Some(p) = data["progress"].as_u64() {
                            out!(
                                "  SSE status: {} {}",
                                bar(p as u8),
                                data["message"].as_str().unwrap_or("")
                            );
                        }
                    }
                    "end" => ended = Some(data),
                    _ => {}
                }
            }
        }
        Ok::<(), CliError>(())
    };
    tokio::time::timeout(Duration::from_secs(30), follow)
        .await
        .map_err(|_| CliError::Demo("the job's event stream did not end within 30 s".into()))??;
    let ended = ended.unwrap_or_default();
    check(
        ended["state"] == "completed",
        "the SSE stream ends with the completed job",
    )?;
    out!(
        "  SSE end: {} with result {}",
        ended["state"],
        ended["result"]
    );

    // A worker in any language: claim over HTTP, complete; a late write is fenced off.
    call(
        http.post(format!("{base}/api/v1/jobs"))
            .bearer_auth(&secret)
            .json(&json!({"kind": "py.thumbnail", "queue": "http-demo", "input": {"image": "cat.png"}})),
    )
    .await?;
    let (_, claimed) = call(
        http.post(format!("{base}/api/v1/queues/http-demo/claim"))
            .bearer_auth(&secret)
            .json(&json!({"limit": 1, "lease_secs": 30, "wait_secs": 5})),
    )
    .await?;
    let job = &claimed["jobs"][0];
    let jid = job["id"].as_str().unwrap_or_default().to_owned();
    out!(
        "  an HTTP worker claimed {} (kind {}, attempt {})",
        jid,
        job["kind"],
        job["attempt"]
    );
    let done = format!("{base}/api/v1/queues/http-demo/jobs/{jid}/complete");
    let (s1, _) = call(
        http.post(&done)
            .bearer_auth(&secret)
            .json(&json!({"attempt": 1, "result": {"thumb": "cat-64.png"}})),
    )
    .await?;
    let (s2, p) = call(
        http.post(&done)
            .bearer_auth(&secret)
            .json(&json!({"attempt": 1, "result": "again"})),
    )
    .await?;
    check(
        s1 == 200 && s2 == 409,
        "completing twice: 200, then 409 lease_lost",
    )?;
    out!(
        "  complete → 200; the same write again → {s2} {}",
        p["code"]
    );
    let (s, p) = call(
        http.get(format!("{base}/api/v1/jobs"))
            .bearer_auth("dray_not_a_token"),
    )
    .await?;
    check(s == 401, "an unknown token is refused")?;
    out!(
        "  a request with an unknown token → {s} {} (problem+json)",
        p["code"]
    );

    let _ = stop.send(());
    server
        .await
        .map_err(|e| CliError::Demo(format!("the demo server task failed: {e}")))?
        .map_err(|e| CliError::Demo(format!("the demo server failed: {e}")))?;
    worker.shutdown().await?;
    out!("  server shut down gracefully; `dray serve` runs the same API (docs/http.md)");
    Ok(())
}
