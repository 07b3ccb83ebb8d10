//! `dray`: the command-line tool. Migrate a database, work queues by hand or from scripts, and
//! run the demo.
//!
//! Every command validates its input before it opens the database, so a bad argument changes
//! nothing; every failure prints one line saying what was wrong and what to do, and exits 1
//! (2 for usage errors). `--json` makes output (and errors, on stdout) machine-readable.

#![forbid(unsafe_code)]

/// `println!` that treats a closed stdout (`dray … | head`) as the reader being done: exit
/// quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

/// `print!` with the same broken-pipe handling as `out!`.
macro_rules! out_inline {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout();
        if let Err(e) = write!(stdout, $($arg)*).and_then(|_| stdout.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

mod crons;
mod demo;
mod outbox;
mod serve;
mod workflows;

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dray::{
    CancelOutcome, Client, EnqueueOptions, JobFilter, Message, MessageState, NackAction, PgStore,
    Priority, Queue, QueueName, ReceiveOptions, SchemaMode, SqliteStore, Store,
};
use serde_json::json;
use uuid::Uuid;

/// Durable background work: queues, jobs, crons and workflows on PostgreSQL or SQLite.
#[derive(Parser, Debug)]
#[command(name = "dray", version, about, propagate_version = true)]
struct Cli {
    /// Database URL: postgres://user@host:port/db or sqlite://path/to/file.db
    /// [default: sqlite://dray.db; `dray demo` uses a throwaway file]
    #[arg(long, global = true, env = "DRAY_DATABASE_URL")]
    database: Option<String>,

    /// PostgreSQL schema holding Dray's tables.
    #[arg(long, global = true, env = "DRAY_SCHEMA", default_value = dray::postgres::DEFAULT_SCHEMA)]
    schema: String,

    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,

    /// Log lines (on stderr) as text or as one JSON object each. Which lines: DRAY_LOG or
    /// RUST_LOG (`info` shows one line per job outcome), `warn` by default.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create or upgrade Dray's tables (running it again changes nothing).
    Migrate,
    /// Work with queues: enqueue, receive, ack, nack, extend, stats, show.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Inspect and steer jobs: list, show, cancel, retry.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Inspect and steer workflow runs: list, describe, signal, cancel, result, restart.
    #[command(subcommand)]
    Workflows(workflows::WorkflowsCommand),
    /// Cron schedules: list (with next fire times), pause, resume, trigger, history.
    #[command(subcommand)]
    Crons(crons::CronsCommand),
    /// The transactional outbox: stats, list, stage, requeue-failed, relay.
    #[command(subcommand)]
    Outbox(outbox::OutboxCommand),
    /// The HTTP API: jobs, queues, workflows, crons, outbox, live events, workers over HTTP.
    Serve(serve::ServeArgs),
    /// Bearer tokens of the HTTP API: create, list, revoke.
    #[command(subcommand)]
    Tokens(serve::TokensCommand),
    /// A guided tour on a throwaway SQLite file (or --database): every layer, working.
    Demo(DemoArgs),
    /// Benchmark workloads (W1-single, W1-batch, W2, W2-tuned, W3, W3-remote, W3-scheduled,
    /// W4, and the raw-SQL baselines floor, plain-insert, paced-insert); one JSON line per
    /// result with --json. See bench/README.md.
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Workloads to run (repeatable, or comma-separated); all when omitted.
    #[arg(long = "workload", value_delimiter = ',')]
    workloads: Vec<String>,
    /// Jobs per repetition for W1, W2 and the floor.
    #[arg(long, default_value_t = 20_000)]
    n: usize,
    /// Repetitions per workload (the median is reported, with min and max).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// W6's phase length in seconds: clean and recovery last one, the held transaction two.
    #[arg(long, default_value_t = 60)]
    phase_secs: u64,
    /// Record Dray's metrics into a Prometheus recorder while measuring (what `dray serve`
    /// does), to measure what they cost.
    #[arg(long)]
    metrics: bool,
}

#[derive(Subcommand, Debug)]
enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
        /// Only this kind (job name).
        #[arg(long)]
        kind: Option<String>,
        /// Only this state: scheduled, available, running, retryable, completed, dead, cancelled.
        #[arg(long, value_parser = state)]
        state: Option<MessageState>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only jobs older than this id (paging).
        #[arg(long)]
        before: Option<String>,
    },
    /// Show one job: state, attempts, progress, result, every recorded error.
    Show {
        /// Job id.
        id: String,
    },
    /// Cancel a job: a queued one never runs, a running one is asked to stop.
    Cancel {
        /// Job id.
        id: String,
    },
    /// Re-drive a dead or cancelled job with fresh attempts.
    Retry {
        /// Job id.
        id: String,
    },
}

fn state(s: &str) -> Result<MessageState, String> {
    MessageState::parse(s).map_err(|e| e.to_string())
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Keep the demo database file instead of removing it at the end.
    #[arg(long)]
    keep: bool,
}

#[derive(Subcommand, Debug)]
enum QueueCommand {
    /// Enqueue one message; prints its id.
    Enqueue {
        /// Queue name (A-Z a-z 0-9 _ . : -, at most 128).
        queue: String,
        /// The payload, as JSON.
        payload: String,
        #[command(flatten)]
        options: EnqueueArgs,
    },
    /// Enqueue many messages in one transaction: payloads as arguments, or else from stdin
    /// as a JSON array or one JSON value per line.
    EnqueueMany {
        /// Queue name.
        queue: String,
        /// Payloads, as JSON (omit to read stdin).
        payloads: Vec<String>,
        #[command(flatten)]
        options: EnqueueArgs,
    },
    /// Receive (lease) up to --limit messages, waiting up to --timeout for the first.
    Receive {
        /// Queue name.
        queue: String,
        /// Most messages to receive.
        #[arg(long, default_value_t = 1)]
        limit: u32,
        /// How long to wait for a first message (e.g. 5s; 0s returns at once).
        #[arg(long, default_value = "0s", value_parser = duration)]
        timeout: Duration,
        /// Lease (visibility timeout) of the received messages.
        #[arg(long, default_value = "30s", value_parser = duration)]
        lease: Duration,
    },
    /// Acknowledge leased messages (they are completed).
    Ack {
        /// Queue name.
        queue: String,
        /// Message ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Give leased messages back: requeued (or dead with --dead, or released with --release).
    Nack {
        /// Queue name.
        queue: String,
        /// Message ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Make them dead instead of requeueing.
        #[arg(long)]
        dead: bool,
        /// The deliveries never started: due again at once in their old place, the attempt
        /// not counted.
        #[arg(long, conflicts_with_all = ["dead", "delay"])]
        release: bool,
        /// Wait this long before redelivery.
        #[arg(long, default_value = "0s", value_parser = duration, conflicts_with = "dead")]
        delay: Duration,
    },
    /// Extend leases: each now ends --by from now.
    Extend {
        /// Queue name.
        queue: String,
        /// Message ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// New lease length from now.
        #[arg(long, value_parser = duration)]
        by: Duration,
    },
    /// Count a queue's messages by state.
    Stats {
        /// Queue name.
        queue: String,
    },
    /// Show one message.
    Show {
        /// Message id.
        id: String,
    },
}

#[derive(Args, Debug)]
struct EnqueueArgs {
    /// Message type.
    #[arg(long = "type")]
    kind: Option<String>,
    /// Dedup key: while an unfinished message of the queue has it, the existing id is returned.
    #[arg(long)]
    key: Option<String>,
    /// background, low, normal, high, critical, or an integer (higher first).
    #[arg(long, default_value = "normal", value_parser = priority)]
    priority: Priority,
    /// Deliver after this long (database clock), e.g. 30s, 5m.
    #[arg(long, value_parser = duration, conflicts_with = "not_before")]
    delay: Option<Duration>,
    /// Deliver no earlier than this RFC 3339 time, e.g. 2030-01-01T09:00:00Z.
    #[arg(long, value_parser = rfc3339)]
    not_before: Option<chrono::DateTime<chrono::Utc>>,
    /// A header, name=value (repeatable).
    #[arg(long = "header", value_parser = header)]
    headers: Vec<(String, String)>,
    /// Deliveries allowed before the message is dead.
    #[arg(long)]
    max_attempts: Option<i32>,
    /// http:// URL that receives a signed POST of the outcome when the job finishes.
    #[arg(long)]
    callback_url: Option<String>,
}

fn duration(s: &str) -> Result<Duration, String> {
    dray::parse_duration(s).map_err(|e| e.to_string())
}

fn priority(s: &str) -> Result<Priority, String> {
    Priority::parse(s).map_err(|e| e.to_string())
}

fn rfc3339(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| {
            format!("{s:?} is not an RFC 3339 time ({e}); write it like 2030-01-01T09:00:00Z")
        })
}

fn header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not name=value")),
    }
}

/// What can go wrong in the CLI, beyond Dray's own errors.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Dray(#[from] dray::Error),
    #[error(
        "{what} is not valid JSON ({source}); quote it for your shell, e.g. '{{\"to\":\"a@b.c\"}}'"
    )]
    Json {
        what: String,
        source: serde_json::Error,
    },
    #[error("{0:?} is not a message id (a UUID like 0190f6b4-5a2c-7cc1-9f53-2c7b5e0a4d11)")]
    BadId(String),
    #[error(
        "{0:?} names no run: give a run id (a UUID) or WORKFLOW_NAME/WORKFLOW_ID, e.g. onboard/user-42"
    )]
    BadRun(String),
    #[error("{0}")]
    NotLeased(String),
    #[error("cannot read payloads from stdin: {0}")]
    Stdin(std::io::Error),
    #[error("no payloads given: pass them as arguments or on stdin")]
    NoPayloads,
    #[error("{0}")]
    Demo(String),
    #[error("bench: {0}")]
    Bench(String),
    #[error("serve: {0}")]
    Serve(String),
}

impl CliError {
    fn code(&self) -> &'static str {
        match self {
            CliError::Dray(e) => e.code(),
            CliError::Json { .. } => "invalid_json",
            CliError::BadId(_) => "invalid_id",
            CliError::BadRun(_) => "invalid_run",
            CliError::NotLeased(_) => "not_leased",
            CliError::Stdin(_) => "stdin",
            CliError::NoPayloads => "no_payloads",
            CliError::Demo(_) => "demo",
            CliError::Bench(_) => "bench",
            CliError::Serve(_) => "serve",
        }
    }
}

type CliResult<T> = Result<T, CliError>;

/// The database used when neither --database nor DRAY_DATABASE_URL is given.
const DEFAULT_URL: &str = "sqlite://dray.db";

impl Cli {
    fn url(&self) -> &str {
        self.database.as_deref().unwrap_or(DEFAULT_URL)
    }
}

/// The stable code of an argument error clap found, for `--json` output.
fn usage_code(kind: clap::error::ErrorKind) -> &'static str {
    use clap::error::ErrorKind as K;
    match kind {
        K::InvalidValue | K::ValueValidation | K::InvalidUtf8 => "invalid_argument",
        K::UnknownArgument => "unknown_argument",
        K::InvalidSubcommand => "unknown_command",
        K::MissingRequiredArgument | K::MissingSubcommand => "missing_argument",
        K::ArgumentConflict => "conflicting_arguments",
        K::TooManyValues | K::TooFewValues | K::WrongNumberOfValues => "wrong_number_of_values",
        _ => "usage",
    }
}

/// Parses the command line. With `--json` anywhere in it, an argument error is printed as
/// `{"error": {"code", "message"}}` on stdout with exit 1, like every other error; without, as
/// clap's text on stderr with exit 2. Help and version print as usual.
fn parse_cli() -> Result<Cli, ExitCode> {
    use clap::error::ErrorKind;
    let e = match Cli::try_parse() {
        Ok(cli) => return Ok(cli),
        Err(e) => e,
    };
    let json = std::env::args_os().skip(1).any(|a| a == "--json");
    if !json || matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    let text = e.render().to_string();
    // The error's own lines (up to clap's blank line before its advice), on one line, without
    // the "error: " prefix.
    let message = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
        .trim_start_matches("error: ")
        .to_owned();
    out!(
        "{}",
        json!({"error": {"code": usage_code(e.kind()), "message": message}})
    );
    eprint!("{text}");
    Err(ExitCode::FAILURE)
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DRAY_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let json = cli.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                out!(
                    "{}",
                    json!({"error": {"code": e.code(), "message": e.to_string()}})
                );
            }
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Which store a URL names.
enum Backend {
    Postgres,
    Sqlite,
}

fn backend_of(url: &str) -> CliResult<Backend> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Backend::Postgres)
    } else if url.starts_with("sqlite:") {
        Ok(Backend::Sqlite)
    } else {
        Err(dray::Error::InvalidUrl {
            url: url.to_owned(),
            reason: "unknown scheme".into(),
        }
        .into())
    }
}

async fn open_pg(cli: &Cli, mode: SchemaMode) -> CliResult<PgStore> {
    Ok(PgStore::builder(cli.url())
        .schema(&cli.schema)
        .max_connections(4)
        .schema_mode(mode)
        .connect()
        .await?)
}

/// Opens the SQLite file; only `migrate` (and the demo) create one, so a mistyped path is an
/// error naming it rather than a new, empty database.
async fn open_sqlite(cli: &Cli, mode: SchemaMode) -> CliResult<SqliteStore> {
    let create = matches!(cli.command, Command::Migrate | Command::Demo(_));
    Ok(SqliteStore::builder(cli.url())
        .schema_mode(mode)
        .create_if_missing(create)
        .open()
        .await?)
}

async fn run(cli: Cli) -> CliResult<()> {
    let backend = backend_of(cli.url())?;
    match &cli.command {
        Command::Migrate => {
            let report = match backend {
                Backend::Postgres => open_pg(&cli, SchemaMode::Skip).await?.migrate().await?,
                Backend::Sqlite => open_sqlite(&cli, SchemaMode::Skip).await?.migrate().await?,
            };
            if cli.json {
                out!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else if report.applied.is_empty() {
                out!("schema is up to date (version {})", report.to);
            } else {
                out!(
                    "migrated schema from version {} to {} (applied {:?})",
                    report.from,
                    report.to,
                    report.applied
                );
            }
            Ok(())
        }
        Command::Queue(cmd) => {
            let cmd = Validated::new(cmd)?;
            // PostgreSQL schemas are an operator's step (`dray migrate`); a SQLite file is
            // created and migrated on first use.
            match backend {
                Backend::Postgres => {
                    let q = Queue::new(open_pg(&cli, SchemaMode::Check).await?);
                    queue_command(&q, cmd, cli.json).await
                }
                Backend::Sqlite => {
                    let q = Queue::new(open_sqlite(&cli, SchemaMode::Migrate).await?);
                    queue_command(&q, cmd, cli.json).await
                }
            }
        }
        Command::Jobs(cmd) => {
            let cmd = JobsValidated::new(cmd)?;
            match backend {
                Backend::Postgres => {
                    let c = Client::new(open_pg(&cli, SchemaMode::Check).await?);
                    jobs_command(&c, cmd, cli.json).await
                }
                Backend::Sqlite => {
                    let c = Client::new(open_sqlite(&cli, SchemaMode::Migrate).await?);
                    jobs_command(&c, cmd, cli.json).await
                }
            }
        }
        Command::Workflows(cmd) => {
            let cmd = workflows::WorkflowsValidated::new(cmd)?;
            match backend {
                Backend::Postgres => {
                    let c = Client::new(open_pg(&cli, SchemaMode::Check).await?);
                    workflows::workflows_command(&c, cmd, cli.json).await
                }
                Backend::Sqlite => {
                    let c = Client::new(open_sqlite(&cli, SchemaMode::Migrate).await?);
                    workflows::workflows_command(&c, cmd, cli.json).await
                }
            }
        }
        Command::Crons(cmd) => {
            crons::validate(cmd)?;
            match backend {
                Backend::Postgres => {
                    let c = Client::new(open_pg(&cli, SchemaMode::Check).await?);
                    crons::crons_command(&c, cmd, cli.json).await
                }
                Backend::Sqlite => {
                    let c = Client::new(open_sqlite(&cli, SchemaMode::Migrate).await?);
                    crons::crons_command(&c, cmd, cli.json).await
                }
            }
        }
        Command::Outbox(cmd) => {
            outbox::validate(cmd)?;
            match backend {
                Backend::Postgres => {
                    let c = Client::new(open_pg(&cli, SchemaMode::Check).await?);
                    outbox::outbox_command(&c, cmd, cli.json).await
                }
                Backend::Sqlite => {
                    let c = Client::new(open_sqlite(&cli, SchemaMode::Migrate).await?);
                    outbox::outbox_command(&c, cmd, cli.json).await
                }
            }
        }
        Command::Serve(args) => match backend {
            Backend::Postgres => serve::serve(open_pg(&cli, SchemaMode::Check).await?, args).await,
            Backend::Sqlite => {
                serve::serve(open_sqlite(&cli, SchemaMode::Migrate).await?, args).await
            }
        },
        Command::Tokens(cmd) => {
            serve::validate(cmd)?;
            match backend {
                Backend::Postgres => {
                    serve::tokens_command(&open_pg(&cli, SchemaMode::Check).await?, cmd, cli.json)
                        .await
                }
                Backend::Sqlite => {
                    serve::tokens_command(
                        &open_sqlite(&cli, SchemaMode::Migrate).await?,
                        cmd,
                        cli.json,
                    )
                    .await
                }
            }
        }
        Command::Demo(args) => demo::run(&cli, args).await,
        Command::Bench(args) => bench(&cli, args).await,
    }
}

async fn bench(cli: &Cli, args: &BenchArgs) -> CliResult<()> {
    let workloads = if args.workloads.is_empty() {
        dray_bench::Workload::ALL.to_vec()
    } else {
        args.workloads
            .iter()
            .map(|w| dray_bench::Workload::parse(w.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(CliError::Bench)?
    };
    if args.n == 0 || args.reps == 0 || args.phase_secs == 0 {
        return Err(CliError::Bench(
            "--n, --reps and --phase-secs must be at least 1".into(),
        ));
    }
    if args.metrics {
        dray_server::metrics::install().map_err(|e| CliError::Bench(e.to_string()))?;
    }
    let cfg = dray_bench::BenchConfig {
        url: cli.url().to_owned(),
        n: args.n,
        reps: args.reps,
        phase: std::time::Duration::from_secs(args.phase_secs.min(24 * 3600)),
    };
    let mut meta = dray_bench::meta(&cfg.url).await;
    meta["metrics"] = serde_json::Value::Bool(args.metrics);
    if cli.json {
        out!("{meta}");
    } else {
        out!(
            "{}",
            serde_json::to_string_pretty(&meta).unwrap_or_default()
        );
        out!(
            "\n{:<8} {:<14} {:>7} {:>12} {:>8} {:>23}  extra",
            "store",
            "workload",
            "n",
            "median",
            "unit",
            "min-max"
        );
    }
    let json = cli.json;
    let results = dray_bench::run(&cfg, &workloads, |m| {
        if json {
            out!("{}", serde_json::to_string(m).unwrap_or_default());
        } else {
            // Latencies in ms to the hundredth; rates to a tenth of a job per second.
            let p = if m.unit == "ms" { 2 } else { 1 };
            out!(
                "{:<8} {:<14} {:>7} {:>12.p$} {:>8} {:>11.p$}-{:<11.p$}  {}",
                m.store,
                m.workload,
                m.n,
                m.value,
                m.unit,
                m.min,
                m.max,
                serde_json::Value::Object(m.extra.clone())
            );
        }
    })
    .await
    .map_err(|e| CliError::Bench(e.to_string()))?;
    for (what, ratio) in dray_bench::ratios(&results) {
        if json {
            out!(
                "{}",
                json!({ "system": "ratio", "what": what, "value": ratio })
            );
        } else {
            out!("{what:<32} {ratio:.2}");
        }
    }
    Ok(())
}

enum JobsValidated {
    List(JobFilter),
    Show(Uuid),
    Cancel(Uuid),
    Retry(Uuid),
}

fn parse_id(s: &str) -> CliResult<Uuid> {
    Uuid::parse_str(s.trim()).map_err(|_| CliError::BadId(dray::error::excerpt(s)))
}

impl JobsValidated {
    fn new(cmd: &JobsCommand) -> CliResult<JobsValidated> {
        Ok(match cmd {
            JobsCommand::List {
                queue,
                kind,
                state,
                limit,
                before,
            } => {
                if *limit == 0 || *limit > 10_000 {
                    return Err(dray::Error::invalid("--limit", "must be 1 to 10000").into());
                }
                JobsValidated::List(JobFilter {
                    queue: queue.as_deref().map(QueueName::new).transpose()?,
                    kind: kind.clone(),
                    state: *state,
                    before: before.as_deref().map(parse_id).transpose()?,
                    limit: *limit,
                })
            }
            JobsCommand::Show { id } => JobsValidated::Show(parse_id(id)?),
            JobsCommand::Cancel { id } => JobsValidated::Cancel(parse_id(id)?),
            JobsCommand::Retry { id } => JobsValidated::Retry(parse_id(id)?),
        })
    }
}

fn print_json(v: &impl serde::Serialize) {
    out!("{}", serde_json::to_string(v).unwrap_or_default());
}

async fn jobs_command<S: Store>(
    c: &Client<S>,
    cmd: JobsValidated,
    json_out: bool,
) -> CliResult<()> {
    match cmd {
        JobsValidated::List(filter) => {
            let jobs = c.list(&filter).await?;
            if json_out {
                print_json(&jobs);
            } else if jobs.is_empty() {
                out!("no jobs");
            } else {
                out!(
                    "{:<36}  {:<12} {:<16} {:<10} {:>7} {:>5}  enqueued",
                    "id",
                    "queue",
                    "kind",
                    "state",
                    "attempt",
                    "prog"
                );
                for j in &jobs {
                    out!(
                        "{:<36}  {:<12} {:<16} {:<10} {:>3}/{:<3} {:>5}  {}",
                        j.id,
                        j.queue,
                        j.kind.as_deref().unwrap_or("-"),
                        j.state.as_str(),
                        j.attempt,
                        j.max_attempts,
                        j.progress.map(|p| format!("{p}%")).unwrap_or_default(),
                        j.enqueued_at.format("%Y-%m-%d %H:%M:%S")
                    );
                    if let Some(why) = &j.unreadable {
                        out!("{:<38}UNREADABLE ROW: {why}", "");
                    }
                }
            }
        }
        JobsValidated::Show(id) => {
            let j = c.get(id).await?.ok_or(dray::Error::NotFound { id })?;
            if json_out {
                print_json(&j);
            } else {
                out!("{}", serde_json::to_string_pretty(&j).unwrap_or_default());
            }
        }
        JobsValidated::Cancel(id) => {
            let outcome = c.cancel(id).await?;
            if json_out {
                print_json(&json!({ "id": id, "outcome": outcome }));
            } else {
                match outcome {
                    CancelOutcome::Cancelled => out!("cancelled {id}: it will not run"),
                    CancelOutcome::Requested => {
                        out!("cancel requested for {id}: it is running and stops at its next check")
                    }
                    CancelOutcome::AlreadyFinished(s) => {
                        out!("{id} had already finished ({s}); nothing changed")
                    }
                }
            }
        }
        JobsValidated::Retry(id) => {
            let j = c.retry(id).await?;
            if json_out {
                print_json(&j);
            } else {
                out!("re-driven {id}: {} again with fresh attempts", j.state);
            }
        }
    }
    Ok(())
}

/// A queue command whose arguments have been checked, before any database is touched.
enum Validated {
    Enqueue {
        queue: String,
        payloads: Vec<serde_json::Value>,
        options: EnqueueOptions,
        many: bool,
    },
    Receive {
        queue: String,
        options: ReceiveOptions,
    },
    Lease {
        queue: String,
        ids: Vec<Uuid>,
        op: LeaseOp,
    },
    Stats(String),
    Show(Uuid),
}

#[derive(Clone, Copy)]
enum LeaseOp {
    Ack,
    Nack(NackAction),
    Extend(Duration),
}

fn parse_json(what: String, text: &str) -> CliResult<serde_json::Value> {
    serde_json::from_str(text).map_err(|source| CliError::Json { what, source })
}

fn parse_ids(ids: &[String]) -> CliResult<Vec<Uuid>> {
    ids.iter()
        .map(|s| Uuid::parse_str(s.trim()).map_err(|_| CliError::BadId(dray::error::excerpt(s))))
        .collect()
}

fn check_queue(name: &str) -> CliResult<String> {
    Ok(QueueName::new(name)?.as_str().to_owned())
}

impl EnqueueArgs {
    fn options(&self) -> CliResult<EnqueueOptions> {
        if let Some(url) = &self.callback_url {
            dray::callback::Endpoint::parse(url)?;
        }
        Ok(self.build())
    }

    fn build(&self) -> EnqueueOptions {
        EnqueueOptions {
            kind: self.kind.clone(),
            key: self.key.clone(),
            priority: self.priority,
            delay: self.delay,
            not_before: self.not_before,
            enqueued_at: None,
            headers: self.headers.iter().cloned().collect(),
            max_attempts: self.max_attempts,
            callback_url: self.callback_url.clone(),
            queue: None,
        }
    }
}

impl Validated {
    fn new(cmd: &QueueCommand) -> CliResult<Validated> {
        Ok(match cmd {
            QueueCommand::Enqueue {
                queue,
                payload,
                options,
            } => Validated::Enqueue {
                queue: check_queue(queue)?,
                payloads: vec![parse_json("the payload".into(), payload)?],
                options: options.options()?,
                many: false,
            },
            QueueCommand::EnqueueMany {
                queue,
                payloads,
                options,
            } => {
                let queue = check_queue(queue)?;
                let payloads = if payloads.is_empty() {
                    read_stdin_payloads()?
                } else {
                    payloads
                        .iter()
                        .enumerate()
                        .map(|(i, p)| parse_json(format!("payload {}", i + 1), p))
                        .collect::<CliResult<_>>()?
                };
                Validated::Enqueue {
                    queue,
                    payloads,
                    options: options.options()?,
                    many: true,
                }
            }
            QueueCommand::Receive {
                queue,
                limit,
                timeout,
                lease,
            } => {
                let options = ReceiveOptions {
                    limit: *limit,
                    wait: *timeout,
                    lease: Some(*lease),
                };
                options.validate()?;
                Validated::Receive {
                    queue: check_queue(queue)?,
                    options,
                }
            }
            QueueCommand::Ack { queue, ids } => Validated::Lease {
                queue: check_queue(queue)?,
                ids: parse_ids(ids)?,
                op: LeaseOp::Ack,
            },
            QueueCommand::Nack {
                queue,
                ids,
                dead,
                release,
                delay,
            } => Validated::Lease {
                queue: check_queue(queue)?,
                ids: parse_ids(ids)?,
                op: LeaseOp::Nack(if *dead {
                    NackAction::Dead
                } else if *release {
                    NackAction::Release
                } else {
                    NackAction::Requeue { delay: *delay }
                }),
            },
            QueueCommand::Extend { by, .. } if by.is_zero() => {
                return Err(dray::Error::invalid("--by", "must be at least 1ms").into());
            }
            QueueCommand::Extend { queue, ids, by } => Validated::Lease {
                queue: check_queue(queue)?,
                ids: parse_ids(ids)?,
                op: LeaseOp::Extend(*by),
            },
            QueueCommand::Stats { queue } => Validated::Stats(check_queue(queue)?),
            QueueCommand::Show { id } => Validated::Show(
                Uuid::parse_str(id.trim())
                    .map_err(|_| CliError::BadId(dray::error::excerpt(id)))?,
            ),
        })
    }
}

fn read_stdin_payloads() -> CliResult<Vec<serde_json::Value>> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(CliError::Stdin)?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(CliError::NoPayloads);
    }
    if trimmed.starts_with('[')
        && let Ok(serde_json::Value::Array(items)) = serde_json::from_str(trimmed)
    {
        return Ok(items);
    }
    trimmed
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse_json(format!("stdin line {}", i + 1), l))
        .collect()
}

async fn queue_command<S: Store>(q: &Queue<S>, cmd: Validated, json_out: bool) -> CliResult<()> {
    match cmd {
        Validated::Enqueue {
            queue,
            payloads,
            options,
            many,
        } => {
            let out = q.enqueue_many(&queue, &payloads, &options).await?;
            if json_out {
                if many {
                    out!("{}", serde_json::to_string(&out).unwrap_or_default());
                } else {
                    out!("{}", serde_json::to_string(&out[0]).unwrap_or_default());
                }
            } else {
                for e in &out {
                    if e.duplicate {
                        out!("{} (duplicate key: already queued)", e.id);
                    } else {
                        out!("{}", e.id);
                    }
                }
            }
        }
        Validated::Receive { queue, options } => {
            let got = q.receive_with(&queue, &options).await?;
            if json_out {
                out!("{}", serde_json::to_string(&got).unwrap_or_default());
            } else if got.is_empty() {
                out!("no messages");
            } else {
                for m in &got {
                    print_message_line(m);
                }
            }
        }
        Validated::Lease { queue, ids, op } => {
            // Check every id first, so one bad id changes nothing.
            let mut problems = Vec::new();
            for id in &ids {
                match q.get(*id).await? {
                    None => return Err(dray::Error::NotFound { id: *id }.into()),
                    Some(m) if m.queue != queue => problems.push(format!(
                        "{id} is on queue {:?}, not {queue:?}",
                        m.queue
                    )),
                    Some(m) if m.state != MessageState::Running => problems.push(format!(
                        "{id} is {} (only a received, leased message can be acked, nacked or extended)",
                        m.state
                    )),
                    Some(_) => {}
                }
            }
            if !problems.is_empty() {
                return Err(CliError::NotLeased(format!(
                    "nothing changed: {}",
                    problems.join("; ")
                )));
            }
            let (verb, n, dead) = match op {
                LeaseOp::Ack => ("acked", q.ack(&queue, &ids).await?, 0),
                LeaseOp::Nack(action) => {
                    let w = q.nack_with(&queue, &ids, action).await?;
                    let verb = match action {
                        NackAction::Dead => "dead",
                        NackAction::Requeue { .. } => "requeued",
                        NackAction::Release => "released",
                        NackAction::Defer { .. } => "deferred",
                    };
                    (verb, w.applied.len() as u64, w.dead.len())
                }
                LeaseOp::Extend(by) => ("extended", q.extend(&queue, &ids, by).await?, 0),
            };
            if json_out {
                out!("{}", json!({ "count": n, "action": verb, "dead": dead }));
            } else {
                out!("{verb} {n}");
                if dead > 0 && verb == "requeued" {
                    out!("({dead} of them were out of attempts and are dead instead)");
                }
            }
        }
        Validated::Stats(queue) => {
            let s = q.stats(&queue).await?;
            if json_out {
                out!("{}", serde_json::to_string(&s).unwrap_or_default());
            } else {
                out!("queue {queue}");
                for (name, n) in [
                    ("available", s.available),
                    ("scheduled", s.scheduled),
                    ("leased", s.leased),
                    ("completed", s.completed),
                    ("dead", s.dead),
                    ("cancelled", s.cancelled),
                ] {
                    out!("  {name:<10} {n}");
                }
            }
        }
        Validated::Show(id) => {
            let m = q.get(id).await?.ok_or(dray::Error::NotFound { id })?;
            if json_out {
                out!("{}", serde_json::to_string(&m).unwrap_or_default());
            } else {
                out!("{}", serde_json::to_string_pretty(&m).unwrap_or_default());
            }
        }
    }
    Ok(())
}

fn print_message_line(m: &Message) {
    out!(
        "{}  attempt {}  {}{}",
        m.id,
        m.attempt,
        m.kind
            .as_deref()
            .map(|k| format!("[{k}] "))
            .unwrap_or_default(),
        m.payload
    );
}
