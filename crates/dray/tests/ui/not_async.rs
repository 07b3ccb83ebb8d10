use dray::{JobContext, JobError};

#[dray::job]
fn blocking(_ctx: &JobContext, _input: ()) -> Result<(), JobError> {
    Ok(())
}

fn main() {}
