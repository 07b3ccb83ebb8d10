//! `#[dray::job]`: the generated job runs, its options are what the attribute says, and bad
//! attribute values are compile errors pointing at them (trybuild).

#![allow(missing_docs)]

use std::time::Duration;

use dray::{Backoff, Client, Job, JobContext, JobError, Priority, SqliteStore, Worker};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportInput {
    pub format: String,
    pub user_id: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportOutput {
    pub count: usize,
    pub format: String,
}

#[dray::job(
    timeout = "5m",
    priority = "low",
    retry(
        max_attempts = 3,
        backoff = "exponential",
        base = "2s",
        max = "1h30m",
        jitter
    ),
    idempotent,
    queue = "exports"
)]
pub async fn export_users(ctx: &JobContext, input: ExportInput) -> Result<ExportOutput, JobError> {
    ctx.progress(100, "done").await?;
    Ok(ExportOutput {
        count: input.format.len() + ctx.attempt() as usize,
        format: input.format,
    })
}

#[dray::job(name = "welcome.email", unique(key = "user_id"))]
async fn welcome(_ctx: &JobContext, input: ExportInput) -> Result<u64, std::io::Error> {
    Ok(input.user_id)
}

#[dray::job(retry(max_attempts = 2, jitter = false))]
async fn cleanup_job(_ctx: &JobContext, _input: ()) -> Result<(), JobError> {
    Ok(())
}

#[test]
fn jitter_can_be_turned_off_and_job_names_are_not_suffixed_twice() {
    assert_eq!(CleanupJob::NAME, "cleanup_job");
    let o = CleanupJob::options();
    assert!(!o.retry.jitter);
    assert_eq!(o.retry.max_attempts, 2);
    assert!(WelcomeJob::options().retry.jitter, "on by default");
}

#[test]
fn options_come_from_the_attribute() {
    assert_eq!(ExportUsersJob::NAME, "export_users");
    let o = ExportUsersJob::options();
    assert_eq!(o.queue, "exports");
    assert_eq!(o.priority, Priority::LOW);
    assert_eq!(o.timeout, Some(Duration::from_secs(300)));
    assert_eq!(o.retry.max_attempts, 3);
    assert_eq!(o.retry.backoff, Backoff::Exponential);
    assert_eq!(o.retry.base, Duration::from_secs(2));
    assert_eq!(o.retry.max, Duration::from_secs(5400));
    assert!(o.retry.jitter);
    assert!(o.unique);
    assert_eq!(WelcomeJob::NAME, "welcome.email");
    let input = ExportInput {
        format: "csv".into(),
        user_id: 42,
    };
    assert_eq!(WelcomeJob::key(&input).as_deref(), Some("42"));
    assert_eq!(ExportUsersJob::key(&input), None);
}

#[tokio::test]
async fn generated_jobs_run() {
    let dir = tempfile_dir();
    let store = SqliteStore::open(dir.join("m.db").to_str().unwrap())
        .await
        .unwrap();
    let worker = Worker::new(store.clone())
        .register(ExportUsersJob)
        .register(WelcomeJob)
        .start()
        .unwrap();
    let client = Client::new(store);
    let out = client
        .submit_and_wait::<ExportUsersJob>(
            &ExportInput {
                format: "csv".into(),
                user_id: 1,
            },
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        ExportOutput {
            count: 4,
            format: "csv".into()
        }
    );
    let a = client
        .enqueue::<WelcomeJob>(&ExportInput {
            format: "a".into(),
            user_id: 9,
        })
        .await
        .unwrap();
    let b = client
        .enqueue::<WelcomeJob>(&ExportInput {
            format: "b".into(),
            user_id: 9,
        })
        .await
        .unwrap();
    assert!(
        b.duplicate && a.id == b.id,
        "unique(key = \"user_id\") dedups on that field"
    );
    assert_eq!(
        client
            .wait(a.id, Duration::from_secs(10))
            .await
            .unwrap()
            .output::<u64>()
            .unwrap(),
        9
    );
    worker.shutdown().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "dray-macros-{}",
        dray::uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[dray::workflow(
    name = "onboard",
    version = 3,
    timeout = "24h",
    queue = "onboarding",
    priority = "high",
    retry(max_attempts = 4, backoff = "fixed", base = "1s", jitter = false)
)]
pub async fn onboard(
    ctx: &dray::WorkflowContext,
    user: String,
) -> Result<String, dray::WorkflowError> {
    let welcome: String = ctx
        .step("welcome", || async { Ok(format!("welcome {user}")) })
        .await?;
    ctx.sleep(Duration::from_millis(10)).await?;
    Ok(welcome)
}

#[dray::workflow]
async fn plain_workflow(_ctx: &dray::WorkflowContext, n: u32) -> Result<u32, std::io::Error> {
    Ok(n)
}

#[test]
fn workflow_options_are_what_the_attribute_says() {
    use dray::Workflow;
    assert_eq!(OnboardWorkflow::NAME, "onboard");
    assert_eq!(OnboardWorkflow::VERSION, 3);
    let o = OnboardWorkflow::options();
    assert_eq!(o.timeout, Some(Duration::from_secs(24 * 3600)));
    assert_eq!(o.queue, "onboarding");
    assert_eq!(o.priority, Priority::HIGH);
    assert_eq!(o.retry.max_attempts, 4);
    assert_eq!(o.retry.backoff, Backoff::Fixed);
    assert!(!o.retry.jitter);
    assert_eq!(PlainWorkflow::NAME, "plain_workflow");
    assert_eq!(PlainWorkflow::VERSION, 1);
    assert_eq!(PlainWorkflow::options().queue, "workflows");
}

#[tokio::test]
async fn a_macro_workflow_runs() {
    let dir = tempfile_dir();
    let store = SqliteStore::open(&format!("sqlite://{}", dir.join("w.db").display()))
        .await
        .unwrap();
    let worker = Worker::new(store.clone())
        .register_workflow(OnboardWorkflow)
        .register_workflow(PlainWorkflow)
        .start()
        .unwrap();
    let client = Client::new(store.clone());
    let run = client
        .start_workflow::<OnboardWorkflow>(&"ann".to_owned(), "onboard-ann")
        .await
        .unwrap();
    assert_eq!(
        run.result(Duration::from_secs(20)).await.unwrap(),
        "welcome ann"
    );
    let plain = client
        .start_workflow::<PlainWorkflow>(&7, "p")
        .await
        .unwrap();
    assert_eq!(plain.result(Duration::from_secs(20)).await.unwrap(), 7);
    worker.shutdown().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[dray::cron(
    "0 9 * * MON-FRI",
    timezone = "America/New_York",
    catch_up,
    catch_up_limit = 3,
    overlap = "allow",
    queue = "reports",
    retry(max_attempts = 2)
)]
async fn morning_report(ctx: &dray::CronContext) -> Result<(), JobError> {
    let _ = ctx.is_late();
    Ok(())
}

#[dray::cron("* * * * * *", name = "heartbeat.cron")]
async fn beat_cron(_ctx: &dray::CronContext) -> Result<(), std::io::Error> {
    Ok(())
}

#[test]
fn cron_options_are_what_the_attribute_says() {
    use dray::Cron;
    assert_eq!(MorningReportCron::NAME, "morning_report");
    let o = MorningReportCron::options();
    assert_eq!(o.expression, "0 9 * * MON-FRI");
    assert_eq!(o.timezone, "America/New_York");
    assert!(o.catch_up);
    assert_eq!(o.catch_up_limit, 3);
    assert_eq!(o.overlap, dray::Overlap::Allow);
    assert_eq!(o.job.queue, "reports");
    assert_eq!(o.job.retry.max_attempts, 2);
    assert_eq!(BeatCron::NAME, "heartbeat.cron");
    let b = BeatCron::options();
    assert_eq!(
        (b.timezone.as_str(), b.catch_up, b.catch_up_limit),
        ("UTC", false, 1)
    );
    assert_eq!(b.overlap, dray::Overlap::Skip);
    assert_eq!(b.job.queue, "crons");
}

#[test]
fn bad_attributes_are_compile_errors() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
