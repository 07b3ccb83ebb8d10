use dray::{JobContext, JobError};

#[dray::job(retry(max_attempts = 0))]
async fn never(_ctx: &JobContext, _input: ()) -> Result<(), JobError> {
    Ok(())
}

fn main() {}
