//! The outbox and inbox layer's part of the store contract (Forze's outbox command and query
//! ports, and the inbox port).

use std::future::Future;
use std::time::Duration;

use uuid::Uuid;

use crate::error::Result;
use crate::outbox::types::{OutboxEvent, OutboxRetry, OutboxRow, OutboxStats, OutboxStatus};
use crate::store::{Store, StoreConnection};

/// A store that keeps outboxes and inboxes (both of Dray's stores do).
pub trait OutboxStore: Store {
    /// Writes staged events of `outbox` inside the caller's transaction (Forze `flush`):
    /// they exist if and only if it commits. An event whose id the outbox has already is
    /// dropped. Returns how many rows were written.
    fn outbox_insert_in(
        &self,
        conn: &mut StoreConnection<Self>,
        outbox: &str,
        events: &[OutboxEvent],
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Claims up to `limit` pending events whose `available_at` has come, oldest first, as
    /// `processing` (Forze `claim_pending`). Concurrent relays never claim the same row.
    fn outbox_claim(
        &self,
        outbox: &str,
        limit: u32,
        relay: &str,
    ) -> impl Future<Output = Result<Vec<OutboxRow>>> + Send;

    /// Marks claimed events delivered (Forze `mark_published`); returns how many.
    fn outbox_mark_published(&self, ids: &[Uuid]) -> impl Future<Output = Result<u64>> + Send;

    /// Marks claimed events failed for good (Forze `mark_failed`).
    fn outbox_mark_failed(
        &self,
        ids: &[Uuid],
        error: &str,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Sends claimed events back to pending, due at their `available_at`, with their attempt
    /// count (Forze `mark_retry`).
    fn outbox_mark_retry(
        &self,
        retries: &[OutboxRetry],
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Sends events claimed longer than `older_than` ago back to pending (their relay died;
    /// Forze `reclaim_stale_processing`).
    fn outbox_reclaim_stale(
        &self,
        outbox: &str,
        older_than: Duration,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Re-drives failed events (all of the outbox's, or those of `ids`), attempts back to 0
    /// (Forze `requeue_failed`).
    fn outbox_requeue_failed(
        &self,
        outbox: &str,
        ids: Option<&[Uuid]>,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Counts an outbox's events by status.
    fn outbox_stats(&self, outbox: &str) -> impl Future<Output = Result<OutboxStats>> + Send;

    /// Lists an outbox's events, newest first.
    fn outbox_list(
        &self,
        outbox: &str,
        status: Option<OutboxStatus>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<OutboxRow>>> + Send;

    /// Deletes published events older than `older_than`; returns how many.
    fn outbox_prune(&self, older_than: Duration) -> impl Future<Output = Result<u64>> + Send;

    /// Records `message_id` in `inbox` inside the caller's transaction: true the first time,
    /// false after (Forze `mark_if_unseen`).
    fn inbox_mark_if_unseen_in(
        &self,
        conn: &mut StoreConnection<Self>,
        inbox: &str,
        message_id: &str,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Deletes inbox marks older than `older_than`; returns how many.
    fn inbox_prune(&self, older_than: Duration) -> impl Future<Output = Result<u64>> + Send;
}
