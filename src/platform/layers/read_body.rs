//! Unary requests are read in full before they may take a slot of the unary pool
//! (`shed.rs`). A request whose headers arrived but whose body is withheld or trickled holds no
//! slot that real traffic needs: it waits on its own, within its deadline (the layer above),
//! and then ends with DEADLINE_EXCEEDED.
//!
//! Reading is bounded twice: a request may not exceed one largest message (its declared length
//! is checked as soon as its 5-byte prefix is in, so an oversized body is refused before it is
//! read), and the bytes buffered count against the budget of the connection they came on
//! (`platform::connections`), so one connection cannot make the server buffer more than one
//! largest message for it, however many streams it opens.
//!
//! Streams are passed through untouched: their messages are read as they are handled.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, Either};
use http_body_util::{BodyExt, Full};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::platform::connections::connection_of;
use crate::platform::service::{Kind, route_of};

/// A gRPC message's prefix: the compression flag and the 4-byte length.
const PREFIX_BYTES: usize = 5;

#[derive(Clone)]
pub struct ReadBodyLayer {
    max_message_bytes: usize,
}

impl ReadBodyLayer {
    pub fn new(max_message_bytes: usize) -> ReadBodyLayer {
        ReadBodyLayer { max_message_bytes }
    }
}

impl<S> Layer<S> for ReadBodyLayer {
    type Service = ReadBody<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReadBody {
            inner,
            max_message_bytes: self.max_message_bytes,
        }
    }
}

#[derive(Clone)]
pub struct ReadBody<S> {
    inner: S,
    max_message_bytes: usize,
}

impl<S> Service<http::Request<Body>> for ReadBody<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<Self::Response, Self::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if route_of(&request).kind == Kind::Streaming {
            return Either::Left(self.inner.call(request));
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let budget = connection_of(&request).map(|c| c.body_budget.clone());
        let max_message_bytes = self.max_message_bytes;
        Either::Right(Box::pin(async move {
            let (parts, body) = request.into_parts();
            let (bytes, _buffered) = match read_unary(body, max_message_bytes, budget).await {
                Ok(read) => read,
                Err(status) => return Ok(status.into_http()),
            };
            let request = http::Request::from_parts(parts, Body::new(Full::new(bytes)));
            // The budget is given back when the handler is done with the message.
            inner.call(request).await
        }))
    }
}

/// Reads a unary request body: at most one message of `max_message_bytes`, each chunk
/// reserved from the connection's budget before it is kept.
async fn read_unary(
    mut body: Body,
    max_message_bytes: usize,
    budget: Option<Arc<Semaphore>>,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), Status> {
    let limit = max_message_bytes + PREFIX_BYTES;
    let mut buffered = Buffered {
        first: None,
        rest: None,
        limit,
    };
    let mut reserved: Option<OwnedSemaphorePermit> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // request trailers: gRPC has none to give
        };
        if data.is_empty() {
            continue;
        }
        if buffered.len() + data.len() > limit {
            return Err(too_large(buffered.len() + data.len(), max_message_bytes));
        }
        let mut data = data;
        if let Some(budget) = &budget {
            let wanted = data.len() as u32;
            let permit = match budget.clone().try_acquire_many_owned(wanted) {
                Ok(permit) => permit,
                Err(_) => {
                    // A chunk may pin the whole read buffer it was cut from: keep a copy of
                    // its own while waiting, so waiting streams cost their bytes only.
                    data = Bytes::copy_from_slice(&data);
                    // Within `limit`, at most the whole budget: it always fits in time.
                    budget
                        .clone()
                        .acquire_many_owned(wanted)
                        .await
                        .map_err(|_| Status::unavailable("connection closing"))?
                }
            };
            match &mut reserved {
                Some(reserved) => reserved.merge(permit),
                None => reserved = Some(permit),
            }
        }
        buffered.push(data);
        if let Some(declared) = buffered.declared_length()
            && declared > max_message_bytes
        {
            return Err(too_large(declared, max_message_bytes));
        }
    }
    Ok((buffered.into_bytes(), reserved))
}

/// tonic's own words for an oversized message, in the code the gRPC specification gives it.
fn too_large(found: usize, limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "Error, decoded message length too large: found {found} bytes, the limit is: {limit} bytes"
    ))
}

/// The chunks read so far; the common single-chunk body is kept without a copy.
struct Buffered {
    first: Option<Bytes>,
    rest: Option<BytesMut>,
    /// The most a body may hold.
    limit: usize,
}

impl Buffered {
    fn len(&self) -> usize {
        match (&self.first, &self.rest) {
            (_, Some(rest)) => rest.len(),
            (Some(first), None) => first.len(),
            (None, None) => 0,
        }
    }

    fn push(&mut self, data: Bytes) {
        match (&mut self.first, &mut self.rest) {
            (_, Some(rest)) => rest.extend_from_slice(&data),
            (Some(first), None) => {
                // Sized for the whole message once its length is known (capped by the caller),
                // so the buffer does not double its way up.
                let wanted = Self::declared_in(first)
                    .map(|declared| declared + PREFIX_BYTES)
                    .unwrap_or(0)
                    .min(self.limit)
                    .max(first.len() + data.len());
                let mut joined = BytesMut::with_capacity(wanted);
                joined.extend_from_slice(first);
                joined.extend_from_slice(&data);
                self.rest = Some(joined);
                self.first = None;
            }
            (None, None) => self.first = Some(data),
        }
    }

    /// The length the first message declares, once its prefix is in.
    fn declared_length(&self) -> Option<usize> {
        match (&self.first, &self.rest) {
            (_, Some(rest)) => Self::declared_in(rest),
            (Some(first), None) => Self::declared_in(first),
            (None, None) => None,
        }
    }

    fn declared_in(bytes: &[u8]) -> Option<usize> {
        let prefix = bytes.get(1..PREFIX_BYTES)?;
        Some(u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize)
    }

    fn into_bytes(self) -> Bytes {
        match (self.first, self.rest) {
            (_, Some(rest)) => rest.freeze(),
            (Some(first), None) => first,
            (None, None) => Bytes::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&(len as u32).to_be_bytes());
        bytes.extend(std::iter::repeat_n(7u8, len));
        bytes
    }

    fn body_of(chunks: Vec<Vec<u8>>) -> Body {
        let stream = futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, Status>(http_body::Frame::data(Bytes::from(c)))),
        );
        Body::new(http_body_util::StreamBody::new(stream))
    }

    #[tokio::test]
    async fn a_body_in_several_chunks_is_joined_and_its_bytes_reserved() {
        let whole = message(100);
        let chunks = vec![
            whole[..3].to_vec(),
            whole[3..50].to_vec(),
            whole[50..].to_vec(),
        ];
        let budget = Arc::new(Semaphore::new(1024));
        let (bytes, reserved) = read_unary(body_of(chunks), 1000, Some(budget.clone()))
            .await
            .unwrap();
        assert_eq!(&bytes[..], &whole[..]);
        assert_eq!(budget.available_permits(), 1024 - whole.len());
        drop(reserved);
        assert_eq!(budget.available_permits(), 1024);
    }

    #[tokio::test]
    async fn an_oversized_message_is_refused_by_its_prefix_before_its_body_arrives() {
        // Only the prefix is sent, declaring more than the limit; the rest never comes.
        let prefix = message(5000)[..PREFIX_BYTES].to_vec();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, Status>>(1);
        tx.send(Ok(http_body::Frame::data(Bytes::from(prefix))))
            .await
            .unwrap();
        let body = Body::new(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ));
        let status = read_unary(body, 1000, None).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("found 5000 bytes"), "{status:?}");
        drop(tx);
    }

    #[tokio::test]
    async fn more_bytes_than_one_message_are_refused() {
        let mut bytes = message(600);
        bytes.extend(message(600));
        let status = read_unary(body_of(vec![bytes]), 1000, None)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    }

    #[tokio::test]
    async fn a_connection_cannot_buffer_more_than_its_budget() {
        let budget = Arc::new(Semaphore::new(1000 + PREFIX_BYTES));
        let (_first, held) = read_unary(body_of(vec![message(900)]), 1000, Some(budget.clone()))
            .await
            .unwrap();
        // A second body on the same connection waits until the first is handled.
        let second = read_unary(body_of(vec![message(500)]), 1000, Some(budget.clone()));
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), &mut second)
                .await
                .is_err()
        );
        drop(held);
        let (bytes, _) = second.await.unwrap();
        assert_eq!(bytes.len(), 505);
    }
}
