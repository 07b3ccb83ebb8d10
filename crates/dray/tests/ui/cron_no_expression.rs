use dray::{CronContext, JobError};

#[dray::cron(timezone = "UTC")]
async fn never(_ctx: &CronContext) -> Result<(), JobError> {
    Ok(())
}

fn main() {}
