use dray::{CronContext, JobError};

#[dray::cron("@daily", overlap = "queue")]
async fn never(_ctx: &CronContext) -> Result<(), JobError> {
    Ok(())
}

fn main() {}
