//! The jobs and workflows the server knows as Rust types: an enqueue of a known kind takes
//! its defaults (queue, priority, attempts, unique key) from the job's options and has its
//! input checked against the job's input type (422 when it does not fit); a workflow starts
//! by name only when it is known, since only its type knows its queue and version. Kinds the
//! server does not know are still enqueued as given (for workers in other languages).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use dray_core::{Client, EnqueueOptions, Job, NewMessage, Result, StartOptions, Workflow};
use serde_json::Value;
use uuid::Uuid;

use crate::ServerStore;

/// Changes a request makes to a job's options (queue, key, priority, delay, …).
pub(crate) type Adjust = Box<dyn FnOnce(EnqueueOptions) -> EnqueueOptions + Send>;

/// Builds a known job's row with `Client::job_message`; `Err` with why when the input does not
/// fit the job's input type.
type Build<S> = dyn Fn(&Client<S>, &Value, Adjust) -> std::result::Result<Result<NewMessage>, String>
    + Send
    + Sync;

type StartFuture = Pin<Box<dyn Future<Output = Result<(Uuid, bool)>> + Send>>;
type Start<S> = dyn Fn(Client<S>, Value, StartOptions) -> std::result::Result<StartFuture, String>
    + Send
    + Sync;

/// Jobs and workflows known by type. Build it with [`Catalog::job`] and [`Catalog::workflow`].
pub struct Catalog<S: ServerStore> {
    jobs: BTreeMap<String, Arc<Build<S>>>,
    workflows: BTreeMap<String, Arc<Start<S>>>,
}

impl<S: ServerStore> Default for Catalog<S> {
    fn default() -> Self {
        Catalog {
            jobs: BTreeMap::new(),
            workflows: BTreeMap::new(),
        }
    }
}

impl<S: ServerStore> Catalog<S> {
    /// An empty catalog: every kind is enqueued as given, no workflow can be started by name.
    pub fn new() -> Self {
        Self::default()
    }

    /// Knows job `J`.
    pub fn job<J: Job>(mut self) -> Self {
        let build = |client: &Client<S>,
                     input: &Value,
                     adjust: Adjust|
         -> std::result::Result<Result<NewMessage>, String> {
            let typed = J::Input::deserialize(input).map_err(|e| e.to_string())?;
            Ok(client.job_message::<J>(&typed, adjust))
        };
        self.jobs.insert(J::NAME.to_owned(), Arc::new(build));
        self
    }

    /// Knows workflow `W`: `POST /api/v1/workflows` can start it by name.
    pub fn workflow<W: Workflow>(mut self) -> Self {
        let start = |client: Client<S>,
                     input: Value,
                     options: StartOptions|
         -> std::result::Result<StartFuture, String> {
            let typed = W::Input::deserialize(&input).map_err(|e| e.to_string())?;
            Ok(Box::pin(async move {
                let handle = client.start_workflow_with::<W>(&typed, options).await?;
                Ok((handle.run_id(), handle.is_existing()))
            }))
        };
        self.workflows.insert(W::NAME.to_owned(), Arc::new(start));
        self
    }

    /// Names of the known workflows.
    pub fn workflow_names(&self) -> Vec<&str> {
        self.workflows.keys().map(String::as_str).collect()
    }

    /// The row of a job of kind `kind`: a known kind's defaults (queue, priority, attempts,
    /// unique key) from its options as `Client::job_message` applies them, then `adjust`; a
    /// kind the server does not know as given, on `adjust`'s queue or `default`. `Err` with
    /// why when the input does not fit a known kind's input type.
    pub(crate) fn message(
        &self,
        client: &Client<S>,
        kind: &str,
        input: &Value,
        adjust: Adjust,
    ) -> std::result::Result<Result<NewMessage>, String> {
        match self.jobs.get(kind) {
            Some(build) => build(client, input, adjust),
            None => {
                let options = adjust(EnqueueOptions::new().kind(kind));
                let queue = options
                    .queue
                    .clone()
                    .unwrap_or_else(|| dray_core::job::DEFAULT_JOB_QUEUE.to_owned());
                Ok(client.queue().message(&queue, input, &options))
            }
        }
    }

    pub(crate) fn starter(&self, name: &str) -> Option<Arc<Start<S>>> {
        self.workflows.get(name).cloned()
    }
}

use serde::Deserialize as _;
