//! Bounds on what one TCP connection can hold, below gRPC:
//!
//! * at most `max_connections` are open at once, and at most `max_connections_per_peer` from
//!   one remote address (so one client cannot take every slot); one more is accepted and
//!   closed at once (the client sees a reset and can go to another replica) rather than left
//!   in the backlog;
//! * each connection has a budget of request bytes the server buffers for it
//!   (`layers::read_body`): one largest message. A connection that trickles or withholds its
//!   bodies can only make itself wait, and the memory that request bodies take stays below
//!   `max_connections × (budget + HTTP/2 connection window)`.
//!
//! The budget travels with every request as the connection's [`ConnectionInfo`] (tonic puts
//! it in the request extensions), so it goes away with the connection.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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
    pub max_connections_per_peer: usize,
    /// Request bytes buffered per connection at once (at least one largest message).
    pub body_budget_bytes: usize,
}

/// One accepted connection; holds its slot until it closes.
pub struct Connection {
    stream: TcpStream,
    info: ConnectionInfo,
    _slot: OwnedSemaphorePermit,
    _peer_slot: Option<PeerSlot>,
}

/// Open connections per remote address.
#[derive(Clone)]
struct PeerSlots {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_peer: usize,
}

/// One connection's place in its peer's count; given back when dropped.
struct PeerSlot {
    peer: IpAddr,
    slots: PeerSlots,
}

impl PeerSlots {
    fn new(max_per_peer: usize) -> PeerSlots {
        PeerSlots {
            open: Arc::new(Mutex::new(HashMap::new())),
            max_per_peer,
        }
    }

    fn take(&self, peer: IpAddr) -> Option<PeerSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(peer).or_insert(0);
        if *count >= self.max_per_peer {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            peer,
            slots: self.clone(),
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// Accepts connections from `listener` within `limits`. Never ends and never yields an error:
/// a failed accept (out of file descriptors, say) is logged and retried after a pause.
pub fn accept_within(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> impl Stream<Item = Result<Connection, io::Error>> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let peers = PeerSlots::new(limits.max_connections_per_peer);
    futures::stream::unfold((listener, slots), move |(listener, slots)| {
        let peers = peers.clone();
        async move {
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
                let remote_addr = stream.peer_addr().ok();
                let peer_slot = match remote_addr {
                    Some(addr) => match peers.take(addr.ip()) {
                        Some(peer_slot) => Some(peer_slot),
                        None => {
                            if let Some(suppressed) = REFUSED.admit() {
                                tracing::warn!(
                                    max_connections_per_peer = limits.max_connections_per_peer,
                                    suppressed,
                                    "connection refused: too many open connections from one address"
                                );
                            }
                            drop(stream);
                            continue;
                        }
                    },
                    None => None,
                };
                let _ = stream.set_nodelay(true);
                let info = ConnectionInfo {
                    remote_addr,
                    local_addr: stream.local_addr().ok(),
                    body_budget: Arc::new(Semaphore::new(limits.body_budget_bytes)),
                };
                let connection = Connection {
                    stream,
                    info,
                    _slot: slot,
                    _peer_slot: peer_slot,
                };
                return Some((Ok(connection), (listener, slots)));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_its_slots_back_when_its_connections_close() {
        let peers = PeerSlots::new(2);
        let a: IpAddr = "203.0.113.1".parse().unwrap();
        let b: IpAddr = "203.0.113.2".parse().unwrap();
        let first = peers.take(a).unwrap();
        let _second = peers.take(a).unwrap();
        assert!(peers.take(a).is_none(), "a third from the same address");
        let _other = peers.take(b).expect("another address has slots of its own");
        drop(first);
        let _again = peers.take(a).expect("a slot given back");
        drop(_again);
        drop(_second);
        assert!(
            !peers.open.lock().unwrap().contains_key(&a),
            "forgotten at zero"
        );
    }
}
