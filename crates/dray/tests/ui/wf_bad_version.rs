use dray::{WorkflowContext, WorkflowError};

#[dray::workflow(version = "2")]
async fn never(_ctx: &WorkflowContext, _input: ()) -> Result<(), WorkflowError> {
    Ok(())
}

fn main() {}
