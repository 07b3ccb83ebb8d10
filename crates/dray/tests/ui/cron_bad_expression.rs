use dray::{CronContext, JobError};

#[dray::cron("0 25 * * *")]
async fn never(_ctx: &CronContext) -> Result<(), JobError> {
    Ok(())
}

fn main() {}
