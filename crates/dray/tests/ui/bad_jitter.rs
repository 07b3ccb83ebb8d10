use dray::{JobContext, JobError};

#[dray::job(retry(jitter = "no"))]
async fn shaky(_ctx: &JobContext, _input: ()) -> Result<(), JobError> {
    Ok(())
}

fn main() {}
