//! The client: enqueue typed jobs (also inside your transaction), wait for them, track them.
//!
//! FastWorker's three submission patterns map here: non-blocking [`Client::enqueue`]
//! ("delay"), blocking [`Client::submit_and_wait`] ("submit_task"), and
//! [`Client::enqueue_with_callback`] ("delay_with_callback"); [`Client::result`] is
//! "get_task_result". Forge's `dispatch_job` inside a transactional mutation is
//! [`Client::enqueue_in`].

use std::time::Duration;

use futures_core::Stream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::changes::JobChange;
use crate::error::{Error, Result};
use crate::job::{Job, unique_key};
use crate::queue::{EnqueueOptions, Queue};
use crate::store::{Store, StoreConnection};
use crate::types::{
    AttemptError, CancelOutcome, Enqueued, JobFilter, Message, MessageState, NewMessage,
};

/// How a finished job ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobOutcome {
    /// The job.
    pub id: Uuid,
    /// `completed`, `dead` or `cancelled`.
    pub state: MessageState,
    /// The output, when completed.
    pub result: Option<serde_json::Value>,
    /// Every failed attempt, oldest first.
    pub errors: Vec<AttemptError>,
    /// Attempts made.
    pub attempts: i32,
}

impl JobOutcome {
    fn from_message(m: Message) -> Option<JobOutcome> {
        m.state.is_terminal().then_some(JobOutcome {
            id: m.id,
            state: m.state,
            result: m.result,
            errors: m.errors,
            attempts: m.attempt,
        })
    }

    /// The typed output of a completed job, or [`Error::JobFailed`].
    pub fn output<T: DeserializeOwned>(&self) -> Result<T> {
        match self.state {
            MessageState::Completed => Ok(T::deserialize(
                self.result.as_ref().unwrap_or(&serde_json::Value::Null),
            )?),
            state => Err(Error::JobFailed {
                id: self.id,
                state,
                message: self
                    .errors
                    .last()
                    .map_or_else(|| "no error recorded".to_owned(), |e| e.message.clone()),
            }),
        }
    }
}

/// A snapshot of a job, as [`Client::watch`] yields it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobStatus {
    /// Job id.
    pub id: Uuid,
    /// State.
    pub state: MessageState,
    /// Current (or last) attempt.
    pub attempt: i32,
    /// Progress, 0 to 100.
    pub progress: Option<u8>,
    /// Progress message.
    pub message: Option<String>,
}

impl From<&Message> for JobStatus {
    fn from(m: &Message) -> Self {
        JobStatus {
            id: m.id,
            state: m.state,
            attempt: m.attempt,
            progress: m.progress,
            message: m.progress_message.clone(),
        }
    }
}

/// Enqueues, waits for and tracks typed jobs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client<S: Store> {
    queue: Queue<S>,
}

/// How often waits re-read a job, at first and at most (the interval doubles in between).
const POLL_MIN: Duration = Duration::from_millis(5);
const POLL_MAX: Duration = Duration::from_millis(200);

/// How long an in-process completion callback waits for its job: far longer than any job
/// lives (finished jobs are pruned after a day by default), yet small enough that adding it
/// to the current instant cannot overflow.
pub const CALLBACK_WAIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl<S: Store> Client<S> {
    /// A client on `store`.
    pub fn new(store: S) -> Self {
        Client {
            queue: Queue::new(store),
        }
    }

    /// A client on an existing queue handle (sharing its settings).
    pub fn from_queue(queue: Queue<S>) -> Self {
        Client { queue }
    }

    /// The queue handle underneath (the raw port).
    pub fn queue(&self) -> &Queue<S> {
        &self.queue
    }

    /// The store underneath.
    pub fn store(&self) -> &S {
        self.queue.store()
    }

    /// The row for job `J` with `input`: kind, queue, priority, attempts and (for unique jobs)
    /// key from `J::options()`, then adjusted by `adjust`.
    pub fn job_message<J: Job>(
        &self,
        input: &J::Input,
        adjust: impl FnOnce(EnqueueOptions) -> EnqueueOptions,
    ) -> Result<NewMessage> {
        let o = J::options();
        let mut base = EnqueueOptions::new()
            .kind(J::NAME)
            .priority(o.priority)
            .max_attempts(o.retry.max_attempts);
        if let Some(key) = J::key(input) {
            base = base.key(format!("{}:{key}", J::NAME));
        } else if o.unique {
            base = base.key(unique_key(J::NAME, &serde_json::to_string(input)?));
        }
        let options = adjust(base);
        let queue = options.queue.clone().unwrap_or(o.queue);
        self.queue.message(&queue, input, &options)
    }

    /// Enqueues job `J` (non-blocking): returns its id at once.
    pub async fn enqueue<J: Job>(&self, input: &J::Input) -> Result<Enqueued> {
        self.enqueue_with::<J>(input, |o| o).await
    }

    /// Enqueues job `J` with adjusted options (`|o| o.delay(…).priority(…).key(…)`).
    pub async fn enqueue_with<J: Job>(
        &self,
        input: &J::Input,
        adjust: impl FnOnce(EnqueueOptions) -> EnqueueOptions,
    ) -> Result<Enqueued> {
        let m = self.job_message::<J>(input, adjust)?;
        Ok(self
            .queue
            .enqueue_messages(std::slice::from_ref(&m))
            .await?
            .remove(0))
    }

    /// Enqueues many jobs of kind `J` in one statement.
    pub async fn enqueue_many<'a, J: Job>(
        &self,
        inputs: impl IntoIterator<Item = &'a J::Input>,
    ) -> Result<Vec<Enqueued>> {
        let msgs = inputs
            .into_iter()
            .map(|i| self.job_message::<J>(i, |o| o))
            .collect::<Result<Vec<_>>>()?;
        self.queue.enqueue_messages(&msgs).await
    }

    /// Enqueues job `J` inside your transaction: it exists if and only if the transaction
    /// commits (Forge's `dispatch_job` in a transactional mutation).
    ///
    /// On SQLite the transaction is begun on the store's one writer connection
    /// (`store.pool()`), so while it is open every other write of that handle waits, the
    /// worker's claims and completions included: keep it short. A write that waits longer
    /// than the store's acquire timeout (30 s by default) fails with
    /// [`Error::PoolExhausted`].
    pub async fn enqueue_in<J: Job>(
        &self,
        conn: &mut StoreConnection<S>,
        input: &J::Input,
    ) -> Result<Enqueued> {
        let m = self.job_message::<J>(input, |o| o)?;
        let one = std::slice::from_ref(&m);
        Ok(crate::metrics::count_enqueued(
            one,
            self.store().message_insert_many_in(conn, one).await,
        )?
        .remove(0))
    }

    /// Enqueues job `J` and waits for its output (blocking; FastWorker's `submit_task`).
    /// A dead or cancelled job is [`Error::JobFailed`]; no outcome within `timeout` is
    /// [`Error::Timeout`] (the job keeps going).
    pub async fn submit_and_wait<J: Job>(
        &self,
        input: &J::Input,
        timeout: Duration,
    ) -> Result<J::Output> {
        let e = self.enqueue::<J>(input).await?;
        self.wait(e.id, timeout).await?.output()
    }

    /// The outcome of a finished job, `None` while it is pending or running
    /// (FastWorker's `get_task_result`). Unknown ids are [`Error::NotFound`].
    pub async fn result(&self, id: Uuid) -> Result<Option<JobOutcome>> {
        let m = self.get(id).await?.ok_or(Error::NotFound { id })?;
        Ok(JobOutcome::from_message(m))
    }

    /// Reads a job in any state.
    pub async fn get(&self, id: Uuid) -> Result<Option<Message>> {
        self.store().message_get(id).await
    }

    /// Waits until the job is finished, up to `timeout`; a timeout longer than the clock can
    /// count (`Duration::MAX`) waits until it finishes.
    pub async fn wait(&self, id: Uuid, timeout: Duration) -> Result<JobOutcome> {
        let deadline = crate::duration::deadline(timeout);
        let mut every = POLL_MIN;
        loop {
            if let Some(o) = self.result(id).await? {
                return Ok(o);
            }
            let now = tokio::time::Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Error::Timeout(timeout));
            }
            let left = deadline.map_or(every, |d| d - now);
            tokio::time::sleep(every.min(left)).await;
            every = (every * 2).min(POLL_MAX);
        }
    }

    /// A stream of the job's status, yielding every change of state, attempt or progress
    /// it observes, and ending after the job finishes.
    pub fn watch(&self, id: Uuid) -> impl Stream<Item = Result<JobStatus>> + Send + 'static {
        let client = self.clone();
        futures_util::stream::unfold(
            (client, None::<JobStatus>, false, POLL_MIN),
            move |(client, last, done, mut every)| async move {
                if done {
                    return None;
                }
                loop {
                    let m = match client.get(id).await {
                        Ok(Some(m)) => m,
                        Ok(None) => {
                            return Some((
                                Err(Error::NotFound { id }),
                                (client, last, true, every),
                            ));
                        }
                        Err(e) => return Some((Err(e), (client, last, true, every))),
                    };
                    let status = JobStatus::from(&m);
                    if last.as_ref() != Some(&status) {
                        let finished = m.state.is_terminal();
                        return Some((
                            Ok(status.clone()),
                            (client, Some(status), finished, POLL_MIN),
                        ));
                    }
                    tokio::time::sleep(every).await;
                    every = (every * 2).min(POLL_MAX);
                }
            },
        )
    }

    /// Enqueues job `J` and calls `callback` once with its outcome when it finishes
    /// (FastWorker's `delay_with_callback`, in process). The waiting runs in a background
    /// task of this process; if the process exits first, the callback does not run.
    pub async fn enqueue_with_callback<J: Job>(
        &self,
        input: &J::Input,
        callback: impl FnOnce(Result<JobOutcome>) + Send + 'static,
    ) -> Result<Enqueued> {
        let e = self.enqueue::<J>(input).await?;
        let client = self.clone();
        tokio::spawn(async move {
            callback(client.wait(e.id, CALLBACK_WAIT).await);
        });
        Ok(e)
    }

    /// Enqueues job `J` with an HTTP completion callback: when it finishes, `url` receives a
    /// signed POST of the outcome, retried until it answers 2xx (see [`crate::callback`]).
    pub async fn enqueue_with_callback_url<J: Job>(
        &self,
        input: &J::Input,
        url: &str,
    ) -> Result<Enqueued> {
        self.enqueue_with::<J>(input, |o| o.callback_url(url)).await
    }

    /// Cancels a job: one that has not started never runs; a running one is asked to stop
    /// (cooperatively: its handler sees `JobContext::is_cancelled` at the next heartbeat).
    pub async fn cancel(&self, id: Uuid) -> Result<CancelOutcome> {
        let outcome = self
            .store()
            .job_cancel(id)
            .await?
            .ok_or(Error::NotFound { id })?;
        let feed = self.store().wake().changes();
        if outcome == CancelOutcome::Cancelled && feed.watched() {
            // The change names its queue: read it (only while somebody watches).
            if let Ok(Some(m)) = self.store().message_get(id).await {
                feed.record_with(|| {
                    Some(JobChange::new(
                        id,
                        &m.queue,
                        MessageState::Cancelled,
                        Some(m.attempt),
                    ))
                });
            }
        }
        Ok(outcome)
    }

    /// Re-drives a dead or cancelled job with fresh attempts.
    pub async fn retry(&self, id: Uuid) -> Result<Message> {
        let m = self
            .store()
            .job_redrive(id)
            .await?
            .ok_or(Error::NotFound { id })?;
        self.store()
            .wake()
            .changes()
            .record_with(|| Some(JobChange::new(id, &m.queue, m.state, Some(m.attempt))));
        Ok(m)
    }

    /// Lists jobs by queue, kind and state, newest first.
    pub async fn list(&self, filter: &JobFilter) -> Result<Vec<Message>> {
        self.store().job_list(filter).await
    }
}
