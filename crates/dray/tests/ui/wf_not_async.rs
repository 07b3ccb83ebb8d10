use dray::{WorkflowContext, WorkflowError};

#[dray::workflow]
fn never(_ctx: &WorkflowContext, _input: ()) -> Result<(), WorkflowError> {
    Ok(())
}

fn main() {}
