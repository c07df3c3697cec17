//! The public listener: HTTP/1.1 through hyper with a header-read timeout, caps on open
//! connections (in all and per client address) and graceful shutdown.
//!
//! `axum::serve` has no header-read timeout, so a client that opens connections and sends a
//! byte a minute holds them forever. Here a connection that has not sent a whole request head
//! within `HEADER_READ_TIMEOUT` is closed (an idle keep-alive connection too: hyper restarts
//! the timer when it waits for the next request). A connection's first head is read here, into
//! a buffer that grows with what arrives, and hyper's connection (its read and write buffers,
//! 8 KiB each) is made only once the head is whole: a connection that trickles bytes costs
//! about a kibibyte.
//!
//! When `MAX_CONNECTIONS` are open, a new connection takes the place of one waiting for a
//! request head: the oldest of those that never sent a request, or else the oldest idle
//! keep-alive one. A client that sends its request at once is never the oldest of the first
//! kind and then becomes the second, so slow clients from many addresses, each reopening what is
//! closed, only ever displace each other. A connection in the middle of a request is never
//! closed this way. Only when every open connection is busy, or
//! beyond `MAX_CONNECTIONS_PER_ADDRESS` from one client address, is a connection answered with a
//! 503 problem and `Retry-After` and closed; at most [`REFUSALS_AT_ONCE`] such answers are
//! written at a time, and past that a connection is closed unanswered. Connections from a
//! trusted proxy count against `MAX_CONNECTIONS` only (their clients are told apart per request).
//!
//! HTTP/2 is not served: hyper-util's version detection before the first request has no
//! timeout. A proxy in front terminates HTTP/2.
//!
//! Shutdown is what `axum::serve`'s graceful shutdown does: stop accepting, let each
//! connection finish the request it is on (idle ones close), and return when all have closed.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::response::IntoResponse as _;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::client_address::{ClientAddress, is_trusted};
use crate::error::ApiError;
use crate::instrument::{ConnectionDisplaced, RequestShed, ShedReason};

/// Refusals (503 answers to connections over a cap) written at once.
pub const REFUSALS_AT_ONCE: usize = 64;

/// How long a refused connection may take to send its request head and read the answer.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(2);

/// How long a connection that displaced another waits for the slot to be given back (the
/// displaced connection's task gives it back as soon as it runs).
const DISPLACEMENT_DEADLINE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub trusted_proxies: Arc<[IpNet]>,
}

/// Open connections per client address; an address leaves the map with its last connection.
struct PerAddress {
    max: usize,
    open: Mutex<HashMap<ClientAddress, usize>>,
}

/// One connection's place in [`PerAddress`], given back when dropped.
struct AddressSlot {
    owner: Arc<PerAddress>,
    address: ClientAddress,
}

impl PerAddress {
    fn take(self: &Arc<Self>, address: ClientAddress) -> Option<AddressSlot> {
        let mut open = self.open.lock().expect("connection map lock");
        let count = open.entry(address).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(AddressSlot { owner: self.clone(), address })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().expect("connection map lock");
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// The open connections that are waiting for a request head, in the order they are displaced:
/// those that never sent a request first (slow clients are among them), then idle keep-alive
/// ones; each group oldest first. A connection leaves it while one of its requests is in
/// progress.
#[derive(Default)]
struct Waiting {
    next_id: AtomicU64,
    set: Mutex<WaitingSet>,
}

#[derive(Default)]
struct WaitingSet {
    /// (has been served, waiting since, id) → how to close it.
    order: BTreeMap<(bool, Instant, u64), CancellationToken>,
    /// id → its key in `order`.
    keys: HashMap<u64, (bool, Instant, u64)>,
}

impl WaitingSet {
    fn insert(&mut self, id: u64, served: bool, close: CancellationToken) {
        let key = (served, Instant::now(), id);
        self.order.insert(key, close);
        self.keys.insert(id, key);
    }

    fn remove(&mut self, id: u64) {
        if let Some(key) = self.keys.remove(&id) {
            self.order.remove(&key);
        }
    }
}

impl Waiting {
    fn register(self: &Arc<Self>) -> WaitingEntry {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        self.set.lock().expect("waiting set lock").insert(id, false, close.clone());
        WaitingEntry { owner: self.clone(), id, close }
    }

    /// Closes the first connection in displacement order, if any waits.
    fn displace_oldest(&self) -> bool {
        let mut set = self.set.lock().expect("waiting set lock");
        let Some(((_, _, id), close)) = set.order.pop_first() else {
            return false;
        };
        set.keys.remove(&id);
        close.cancel();
        true
    }
}

/// One connection's place in [`Waiting`]: out of it while a request is in progress, back in
/// (as served) when the response's body has been written, gone when the connection is.
struct WaitingEntry {
    owner: Arc<Waiting>,
    id: u64,
    close: CancellationToken,
}

impl WaitingEntry {
    fn busy(&self) {
        self.owner.set.lock().expect("waiting set lock").remove(self.id);
    }

    fn waiting(&self) {
        if !self.close.is_cancelled() {
            self.owner.set.lock().expect("waiting set lock").insert(self.id, true, self.close.clone());
        }
    }
}

impl Drop for WaitingEntry {
    fn drop(&mut self) {
        self.busy();
    }
}

/// A response body that puts its connection back among the waiting ones when it is dropped,
/// that is, when hyper has written it (or given up on it).
struct ResponseBody {
    inner: axum::body::Body,
    entry: Arc<WaitingEntry>,
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.entry.waiting();
    }
}

impl http_body::Body for ResponseBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Connections the kernel completes and queues for this listener before it accepts them (capped
/// by `net.core.somaxconn`, 4,096 by default). When slow clients hold every place and reopen each
/// one that is displaced, the queue holds what waits to be accepted; once it is full the kernel
/// drops new handshakes, and a legitimate client's connect waits for its SYN to be sent again
/// (1 s, then 3 s). A queue deeper than the usual 1,024 keeps that from happening.
pub const LISTEN_BACKLOG: u32 = 4096;

/// File descriptors kept for everything but client connections (pools, NATS, logs, files).
const NON_CLIENT_FILES: u64 = 256;

/// Raises the soft limit of open files to the hard limit, as the Go runtime does for every
/// program: the soft limit is often 1,024, fewer than `MAX_CONNECTIONS`, while the hard limit
/// is what the deployment grants. Warns when `max_connections` still does not fit.
pub fn raise_open_file_limit(max_connections: usize) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit { current: limit.maximum, maximum: limit.maximum };
    let soft = match setrlimit(Resource::Nofile, raised) {
        Ok(()) => limit.maximum,
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the soft limit of open files");
            limit.current
        }
    };
    if let Some(soft) = soft
        && soft < max_connections as u64 + NON_CLIENT_FILES
    {
        tracing::warn!(
            open_files = soft,
            max_connections,
            "the limit of open files is below MAX_CONNECTIONS + {NON_CLIENT_FILES}: connections beyond it are refused by \
             the kernel; raise the hard limit (LimitNOFILE, ulimit -n) or lower MAX_CONNECTIONS"
        );
    }
}

/// The public listener on `addr`, with [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `app` on `listener` until `shutdown`, then drains as described in the module doc.
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, shutdown: CancellationToken) {
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_address = Arc::new(PerAddress { max: limits.max_connections_per_address.max(1), open: Mutex::default() });
    let refusals = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
    let waiting = Arc::new(Waiting::default());
    // Every connection task holds a receiver; the sender's `closed` is "all have finished".
    let (close_tx, close_rx) = watch::channel(());

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    if !is_connection_error(&e) {
                        // Out of file descriptors, most likely: wait for some to close.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                            _ = shutdown.cancelled() => break,
                        }
                    }
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let slot = if is_trusted(peer.ip(), &limits.trusted_proxies) {
            Ok(None)
        } else {
            per_address.take(ClientAddress::of(peer.ip())).map(Some).ok_or(ShedReason::ConnectionsPerAddress)
        };
        let permit = match connections.clone().try_acquire_owned() {
            Ok(permit) => Ok(Some(permit)),
            // At the cap: the new connection takes the place of the longest-waiting one.
            Err(_) if slot.is_ok() && waiting.displace_oldest() => {
                ConnectionDisplaced.emit();
                Ok(None)
            }
            Err(_) => Err(ShedReason::Connections),
        };
        match (permit, slot) {
            (Ok(permit), Ok(slot)) => {
                let connection = Connection {
                    app: app.clone(),
                    peer,
                    header_read_timeout: limits.header_read_timeout,
                    shutdown: shutdown.clone(),
                    waiting: waiting.register(),
                };
                let connections = connections.clone();
                let close_rx = close_rx.clone();
                tokio::spawn(async move {
                    let permit = match permit {
                        Some(permit) => permit,
                        None => match tokio::time::timeout(DISPLACEMENT_DEADLINE, connections.acquire_owned()).await {
                            Ok(Ok(permit)) => permit,
                            _ => return,
                        },
                    };
                    connection.run(stream).await;
                    drop((permit, slot, close_rx));
                });
            }
            (permit, slot) => {
                let reason = permit.err().or(slot.err()).unwrap_or(ShedReason::Connections);
                RequestShed { reason }.emit();
                if let Ok(refusal) = refusals.clone().try_acquire_owned() {
                    tokio::spawn(refuse(stream, refusal));
                }
            }
        }
    }

    drop(close_rx);
    drop(listener);
    close_tx.closed().await;
}

struct Connection {
    app: Router,
    peer: SocketAddr,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
    waiting: WaitingEntry,
}

impl Connection {
    async fn run(self, mut stream: TcpStream) {
        let peer = self.peer;
        let displaced = self.waiting.close.clone();
        // Until its first request head is whole, a connection holds a small buffer and no more
        // (hyper's connection, with its 8 KiB read and write buffers, comes after): a slow
        // client costs about a kibibyte. The time limit is the header-read timeout.
        let head = tokio::select! {
            head = tokio::time::timeout(self.header_read_timeout, read_first_head(&mut stream)) => head,
            _ = displaced.cancelled() => return,
            _ = self.shutdown.cancelled() => return,
        };
        let head = match head {
            Ok(Ok(Some(head))) => head,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "connection ended before its first request head");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "no whole request head within the header-read timeout; closing");
                return;
            }
        };
        let entry = Arc::new(self.waiting);
        let on_request = entry.clone();
        let service = self
            .app
            .map_request(move |mut request: axum::http::Request<Incoming>| {
                on_request.busy();
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            })
            .map_response(move |response: axum::response::Response| {
                let entry = entry.clone();
                response.map(|inner| axum::body::Body::new(ResponseBody { inner, entry }))
            });
        let mut builder = http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(self.header_read_timeout);
        let stream = Rewind { head, read: 0, inner: stream };
        // Boxed: the task's own future stays small while it waits for the first head.
        let mut connection =
            Box::pin(builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service)));
        let mut draining = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = self.shutdown.cancelled(), if !draining => {
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                }
                // Displaced by a new connection while waiting for a request head: close now.
                _ = displaced.cancelled() => return,
            }
        }
    }
}

/// The most of a first request head read before hyper takes over (which reads the rest, up to
/// its own limit): past it, the head is handed over unfinished.
const FIRST_HEAD_MAX: usize = 16 * 1024;

/// Reads until the first request head is whole (its blank line has arrived) or
/// [`FIRST_HEAD_MAX`] bytes are in; `None` when the client closes first. The buffer starts at
/// 1 KiB and doubles as bytes arrive, so a client that trickles holds little.
async fn read_first_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt as _;
    let mut head = Vec::with_capacity(1024);
    loop {
        if head.len() == head.capacity() {
            head.reserve(head.len());
        }
        let searched = head.len().saturating_sub(3);
        if stream.read_buf(&mut head).await? == 0 {
            return Ok(None);
        }
        if head[searched..].windows(4).any(|w| w == b"\r\n\r\n") || head.len() >= FIRST_HEAD_MAX {
            return Ok(Some(head));
        }
    }
}

/// A stream that yields `head` (already read from `inner`) before what `inner` has next.
struct Rewind {
    head: Vec<u8>,
    read: usize,
    inner: TcpStream,
}

impl tokio::io::AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.read < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.read);
            buf.put_slice(&this.head[this.read..this.read + n]);
            this.read += n;
            if this.read == this.head.len() {
                this.head = Vec::new();
                this.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Rewind {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Answers one request of an over-cap connection with a 503 problem and closes it.
async fn refuse(stream: TcpStream, _refusal: OwnedSemaphorePermit) {
    let service = hyper::service::service_fn(|_request: axum::http::Request<Incoming>| async {
        Ok::<_, Infallible>(ApiError::Overloaded { retry_after_secs: 1 }.into_response())
    });
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(REFUSAL_DEADLINE).keep_alive(false);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, connection).await;
}

/// Errors of one connection (not of the listener), after which accepting goes on at once.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
