use dray::{JobContext, JobError};

#[dray::job(retry(max_attempts = 3, backoff = "quadratic"))]
async fn retrying(_ctx: &JobContext, _input: ()) -> Result<(), JobError> {
    Ok(())
}

fn main() {}
