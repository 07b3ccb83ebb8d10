use dray::{JobContext, JobError};

#[dray::job(priority = "urgent")]
async fn urgent(_ctx: &JobContext, _input: ()) -> Result<(), JobError> {
    Ok(())
}

fn main() {}
