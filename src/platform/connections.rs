//! Bounds on what one TCP connection can hold, below gRPC:
//!
//! * at most `max_connections` are open at once; one more is accepted and closed at once (the
//!   client sees a reset and can go to another replica) rather than left in the backlog;
//! * each connection has a budget of request bytes the server buffers for it
//!   (`layers::read_body`): one largest message. A connection that trickles or withholds its
//!   bodies can only make itself wait, and the memory that request bodies take stays below
//!   `max_connections × (budget + HTTP/2 connection window)`.
//!
//! The budget travels with every request as the connection's [`ConnectionInfo`] (tonic puts
//! it in the request extensions), so it goes away with the connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TlsConnectInfo};

use crate::telemetry::throttle::LogThrottle;

static REFUSED: LogThrottle = LogThrottle::per_minute(10);
static ACCEPT_FAILED: LogThrottle = LogThrottle::per_minute(10);

/// What the server knows of the connection a request came on.
#[derive(Clone)]
pub struct ConnectionInfo {
    pub remote_addr: Option<SocketAddr>,
    pub local_addr: Option<SocketAddr>,
    /// Request bytes this connection may have buffered at once.
    pub body_budget: Arc<Semaphore>,
}

/// The connection a request came on, with or without TLS; `None` for in-process transports.
pub fn connection_of<B>(request: &http::Request<B>) -> Option<&ConnectionInfo> {
    let extensions = request.extensions();
    extensions.get::<ConnectionInfo>().or_else(|| {
        extensions
            .get::<TlsConnectInfo<ConnectionInfo>>()
            .map(|tls| tls.get_ref())
    })
}

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// Request bytes buffered per connection at once (at least one largest message).
    pub body_budget_bytes: usize,
}

/// One accepted connection; holds its slot until it closes.
pub struct Connection {
    stream: TcpStream,
    info: ConnectionInfo,
    _slot: OwnedSemaphorePermit,
}

/// Accepts connections from `listener` within `limits`. Never ends and never yields an error:
/// a failed accept (out of file descriptors, say) is logged and retried after a pause.
pub fn accept_within(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> impl Stream<Item = Result<Connection, io::Error>> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    futures::stream::unfold((listener, slots), move |(listener, slots)| async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    if let Some(suppressed) = ACCEPT_FAILED.admit() {
                        tracing::warn!(%error, suppressed, "accepting a connection failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if let Some(suppressed) = REFUSED.admit() {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        suppressed,
                        "connection refused: too many open connections"
                    );
                }
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let info = ConnectionInfo {
                remote_addr: stream.peer_addr().ok(),
                local_addr: stream.local_addr().ok(),
                body_budget: Arc::new(Semaphore::new(limits.body_budget_bytes)),
            };
            let connection = Connection {
                stream,
                info,
                _slot: slot,
            };
            return Some((Ok(connection), (listener, slots)));
        }
    })
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
