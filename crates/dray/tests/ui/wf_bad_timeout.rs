use dray::{WorkflowContext, WorkflowError};

#[dray::workflow(timeout = "one day")]
async fn never(_ctx: &WorkflowContext, _input: ()) -> Result<(), WorkflowError> {
    Ok(())
}

fn main() {}
