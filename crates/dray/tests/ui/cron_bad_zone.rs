use dray::{CronContext, JobError};

#[dray::cron("0 9 * * *", timezone = "America/Nowhere")]
async fn never(_ctx: &CronContext) -> Result<(), JobError> {
    Ok(())
}

fn main() {}
