use dray::{JobContext, JobError};

#[dray::job(timeout = "5 parsecs")]
async fn far(_ctx: &JobContext, _input: ()) -> Result<(), JobError> {
    Ok(())
}

fn main() {}
