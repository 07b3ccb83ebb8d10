//! A worker process for crash tests. It runs one job kind, `effect`, whose effect is a row in
//! `crash_effects` written in the same transaction as nothing else: the test counts those rows.
//!
//! `dray-crash-worker URL SCHEMA MODE LEASE_MS`: MODE `hang` records that the attempt started and
//! then never finishes (the test kills the process with SIGKILL); MODE `work` records the
//! effect and completes. Prints `ready` once the worker runs.
//!
//! It also runs two workflows whose steps record effects (`job_id` = the run id, `phase` = what
//! ran): `crash_flow`, five steps `step1`…`step5`, and `crash_saga`, three bookings whose
//! compensations record `undo-…` before a permanent failure. In MODE `hang`, `step3` records
//! `step3-started` and never finishes, and so does the compensation of `b` (`undo-b-started`). `DRAY_APP_NAME` sets the
//! PostgreSQL `application_name` of its connections (so a test can find and end them).

use std::time::Duration;

use dray::{
    Job, JobContext, JobError, PgStore, SchemaMode, SqliteStore, Worker, Workflow, WorkflowContext,
    WorkflowError,
};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Hang,
    Work,
    /// Also schedules and runs `crash_tick`, a per-second cron whose runs record
    /// `tick <scheduled time>`.
    Cron,
    /// Also relays outbox `crash` to queue `crash-events` (stale claims taken back after
    /// LEASE_MS).
    Relay,
    /// As `Relay`, but the sink delivers each batch to the queue and then never answers, so
    /// the events stay `processing` (the test kills the process).
    RelayHang,
}

/// Delivers to the queue, then hangs: the relay never marks what it delivered.
struct HangAfterPublish<S: dray::Store>(dray::QueueSink<S>);

impl<S: dray::Store> dray::Sink for HangAfterPublish<S> {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn publish<'a>(
        &'a self,
        events: &'a [dray::outbox::OutboxRow],
    ) -> std::pin::Pin<
        Box<dyn Future<Output = Vec<Result<(), dray::outbox::PublishError>>> + Send + 'a>,
    > {
        Box::pin(async move {
            let _ = self.0.publish(events).await;
            std::future::pending().await
        })
    }
}

/// A per-second schedule: each run records its tick.
struct Tick;

impl dray::Cron for Tick {
    const NAME: &'static str = "crash_tick";
    fn options() -> dray::CronOptions {
        dray::CronOptions::new("* * * * * *")
    }
    async fn run(&self, ctx: &dray::CronContext) -> Result<(), JobError> {
        let phase = format!("tick {}", ctx.scheduled_at().timestamp());
        record_in(
            ctx.store::<PgStore>(),
            ctx.store::<SqliteStore>(),
            &ctx.run_id().to_string(),
            ctx.attempt(),
            &phase,
        )
        .await?;
        Ok(())
    }
}

struct Effect {
    mode: Mode,
}

impl Job for Effect {
    const NAME: &'static str = "effect";
    type Input = i64;
    type Output = i64;

    async fn run(&self, ctx: &JobContext, n: i64) -> Result<i64, JobError> {
        let phase = if self.mode == Mode::Hang {
            "started"
        } else {
            "done"
        };
        record(ctx, phase).await?;
        if self.mode == Mode::Hang {
            std::future::pending::<()>().await;
        }
        Ok(n)
    }
}

async fn record(ctx: &JobContext, phase: &str) -> Result<(), JobError> {
    let id = ctx.id().to_string();
    record_in(
        ctx.store::<PgStore>(),
        ctx.store::<SqliteStore>(),
        &id,
        ctx.attempt(),
        phase,
    )
    .await
    .map_err(JobError::from)
}

/// Writes one effect row through whichever store the worker runs on.
async fn record_in(
    pg: Option<&PgStore>,
    lite: Option<&SqliteStore>,
    id: &str,
    attempt: i32,
    phase: &str,
) -> Result<(), dray::Error> {
    if let Some(pg) = pg {
        let sql = format!(
            "INSERT INTO \"{}\".crash_effects (job_id, attempt, phase) VALUES ($1, $2, $3)",
            pg.schema()
        );
        dray::sqlx::query(dray::sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(attempt)
            .bind(phase)
            .execute(pg.pool())
            .await
            .map_err(dray::Error::db("crash_effects"))?;
    } else if let Some(lite) = lite {
        dray::sqlx::query("INSERT INTO crash_effects (job_id, attempt, phase) VALUES (?1, ?2, ?3)")
            .bind(id)
            .bind(attempt)
            .bind(phase)
            .execute(lite.pool())
            .await
            .map_err(dray::Error::db("crash_effects"))?;
    } else {
        return Err(dray::Error::invalid("store", "unknown store"));
    }
    Ok(())
}

async fn effect(ctx: &WorkflowContext, phase: &str) -> Result<(), WorkflowError> {
    let id = ctx.run_id().to_string();
    record_in(
        ctx.store::<PgStore>(),
        ctx.store::<SqliteStore>(),
        &id,
        ctx.attempt(),
        phase,
    )
    .await
    .map_err(WorkflowError::from)
}

/// Five steps, each recording its effect; in `hang` mode the third never finishes.
struct CrashFlow {
    mode: Mode,
}

impl Workflow for CrashFlow {
    const NAME: &'static str = "crash_flow";
    type Input = ();
    type Output = u32;
    async fn run(&self, ctx: &WorkflowContext, _: ()) -> Result<u32, WorkflowError> {
        let mut sum = 0;
        for i in 1..=5u32 {
            let name = format!("step{i}");
            sum += ctx
                .step(&name, || async {
                    if i == 3 && self.mode == Mode::Hang {
                        effect(ctx, "step3-started").await?;
                        std::future::pending::<()>().await;
                    }
                    effect(ctx, &name).await?;
                    Ok(i)
                })
                .await?;
        }
        Ok(sum)
    }
}

/// Books a, b and c with compensations, then fails for good; in `hang` mode the compensation
/// of `b` never finishes.
struct CrashSaga {
    mode: Mode,
}

impl Workflow for CrashSaga {
    const NAME: &'static str = "crash_saga";
    type Input = ();
    type Output = ();
    async fn run(&self, ctx: &WorkflowContext, _: ()) -> Result<(), WorkflowError> {
        for what in ["a", "b", "c"] {
            let undo = ctx.clone();
            let hang = self.mode == Mode::Hang;
            ctx.step(what, || async { effect(ctx, what).await })
                .compensate_with(move |()| async move {
                    if what == "b" && hang {
                        effect(&undo, "undo-b-started").await?;
                        std::future::pending::<()>().await;
                    }
                    effect(&undo, &format!("undo-{what}")).await
                })
                .await?;
        }
        ctx.step("pay", || async {
            Err::<(), _>(WorkflowError::permanent("card declined"))
        })
        .await
    }
}

async fn serve<S: dray::CronStore + dray::OutboxStore>(
    store: S,
    mode: Mode,
    lease: Duration,
) -> dray::Result<()> {
    let mut worker = Worker::new(store.clone());
    if mode == Mode::Cron {
        worker = worker.register_cron(Tick);
    }
    if matches!(mode, Mode::Relay | Mode::RelayHang) {
        let sink = dray::QueueSink::new(store.clone(), "crash-events")?;
        let configure = |c: &mut dray::outbox::RelayConfig| {
            c.stale_after = lease;
            c.poll = Duration::from_millis(20);
        };
        let relay = if mode == Mode::RelayHang {
            dray::Relay::new(store.clone(), "crash", HangAfterPublish(sink))?
                .configure(configure)?
        } else {
            dray::Relay::new(store.clone(), "crash", sink)?.configure(configure)?
        };
        worker = worker.relay_outbox(relay);
    }
    let worker = worker
        .register(Effect { mode })
        .register_workflow(CrashFlow { mode })
        .register_workflow(CrashSaga { mode })
        .configure(|c| {
            c.lease = lease;
            c.heartbeat = lease / 4;
            c.maintenance_interval = Duration::from_millis(100);
        })
        .start()?;
    // The process's own wall clock, so a test can check that a faked clock took effect.
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    println!("ready {} {clock}", worker.id());
    // Runs until killed, or until stdin closes (the test's way of stopping it gently).
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    })
    .await
    .ok();
    worker.shutdown().await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, schema, mode, lease_ms] = args.as_slice() else {
        return Err(
            "usage: dray-crash-worker URL SCHEMA hang|work|cron|relay|relay-hang LEASE_MS".into(),
        );
    };
    let mode = match mode.as_str() {
        "hang" => Mode::Hang,
        "work" => Mode::Work,
        "cron" => Mode::Cron,
        "relay" => Mode::Relay,
        "relay-hang" => Mode::RelayHang,
        other => return Err(format!("unknown mode {other}").into()),
    };
    let lease = Duration::from_millis(lease_ms.parse()?);
    if url.starts_with("postgres") {
        let mut builder = PgStore::builder(url.as_str())
            .schema(schema.as_str())
            .schema_mode(SchemaMode::Migrate)
            .max_connections(4);
        if let Ok(name) = std::env::var("DRAY_APP_NAME") {
            builder = builder.application_name(name);
        }
        let store = builder.connect().await?;
        serve(store, mode, lease).await?;
    } else {
        serve(SqliteStore::open(url).await?, mode, lease).await?;
    }
    Ok(())
}
