use dray::{JobContext, JobError};

#[dray::job(public)]
async fn exposed(_ctx: &JobContext, _input: ()) -> Result<(), JobError> {
    Ok(())
}

fn main() {}
