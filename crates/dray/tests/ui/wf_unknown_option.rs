use dray::{WorkflowContext, WorkflowError};

#[dray::workflow(idempotent)]
async fn never(_ctx: &WorkflowContext, _input: ()) -> Result<(), WorkflowError> {
    Ok(())
}

fn main() {}
