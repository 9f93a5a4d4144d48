//! Writes that finish even when their request is abandoned.
//!
//! When a request's deadline passes, or its client goes away, tonic drops the handler's
//! future. A write dropped after its statement reached Postgres can still commit there (a
//! statement waiting on a row lock runs on once the lock is free), and then nothing publishes
//! the new state to the cache, nor notes it for repair: the cache would serve the old balance
//! for its whole TTL. So a use case that changes a balance runs as a task of its own: the
//! request may give up waiting, the write and its publication run to the end.

use std::future::Future;

use tracing::Instrument;

use crate::error::Error;

/// Runs `write` to completion in a task of its own (keeping the request's span, so its log
/// lines still carry the request id) and waits for its result.
pub async fn detach<T, F>(write: F) -> Result<T, Error>
where
    F: Future<Output = Result<T, Error>> + Send + 'static,
    T: Send + 'static,
{
    match tokio::spawn(write.in_current_span()).await {
        Ok(result) => result,
        Err(error) => Err(Error::internal(format!("a write task failed: {error}"))),
    }
}
