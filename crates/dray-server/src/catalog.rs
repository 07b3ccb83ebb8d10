//! The jobs and workflows the server knows as Rust types: an enqueue of a known kind takes
//! its defaults (queue, priority, attempts, unique key) from the job's options and has its
//! input checked against the job's input type (422 when it does not fit); a workflow starts
//! by name only when it is known, since only its type knows its queue and version. Kinds the
//! server does not know are still enqueued as given (for workers in other languages).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use dray_core::job::unique_key;
use dray_core::{Client, EnqueueOptions, Job, JobOptions, Result, StartOptions, Workflow};
use serde_json::Value;
use uuid::Uuid;

use crate::ServerStore;

type Prepare = dyn Fn(&Value) -> std::result::Result<Option<String>, String> + Send + Sync;

type StartFuture = Pin<Box<dyn Future<Output = Result<(Uuid, bool)>> + Send>>;
type Start<S> = dyn Fn(Client<S>, Value, StartOptions) -> std::result::Result<StartFuture, String>
    + Send
    + Sync;

/// What a known job kind brings to an enqueue.
pub(crate) struct JobDefaults {
    /// Kind, priority and attempts.
    pub options: EnqueueOptions,
    /// Its queue.
    pub queue: String,
    /// Its unique key for this input, if it has one.
    pub key: Option<String>,
}

struct JobEntry {
    options: JobOptions,
    prepare: Arc<Prepare>,
}

/// Jobs and workflows known by type. Build it with [`Catalog::job`] and [`Catalog::workflow`].
pub struct Catalog<S: ServerStore> {
    jobs: BTreeMap<String, JobEntry>,
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
        let prepare = |input: &Value| -> std::result::Result<Option<String>, String> {
            let typed = J::Input::deserialize(input).map_err(|e| e.to_string())?;
            if let Some(key) = J::key(&typed) {
                return Ok(Some(format!("{}:{key}", J::NAME)));
            }
            if J::options().unique {
                let text = serde_json::to_string(&typed).map_err(|e| e.to_string())?;
                return Ok(Some(unique_key(J::NAME, &text)));
            }
            Ok(None)
        };
        self.jobs.insert(
            J::NAME.to_owned(),
            JobEntry {
                options: J::options(),
                prepare: Arc::new(prepare),
            },
        );
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

    /// The defaults of a known kind, and its unique key for `input`; `Err` when the input
    /// does not fit the kind's input type.
    pub(crate) fn job_defaults(
        &self,
        kind: &str,
        input: &Value,
    ) -> Option<std::result::Result<JobDefaults, String>> {
        let entry = self.jobs.get(kind)?;
        Some((entry.prepare)(input).map(|key| {
            let o = &entry.options;
            JobDefaults {
                options: EnqueueOptions::new()
                    .kind(kind)
                    .priority(o.priority)
                    .max_attempts(o.retry.max_attempts),
                queue: o.queue.clone(),
                key,
            }
        }))
    }

    pub(crate) fn starter(&self, name: &str) -> Option<Arc<Start<S>>> {
        self.workflows.get(name).cloned()
    }
}

use serde::Deserialize as _;
