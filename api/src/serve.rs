//! The public listener: HTTP/1.1 through hyper with a header-read timeout, caps on open
//! connections (in all and per client address) and graceful shutdown.
//!
//! `axum::serve` has no header-read timeout, so a client that opens connections and sends a
//! byte a minute holds them forever. Here a connection that has not sent a whole request head
//! within `HEADER_READ_TIMEOUT` is closed (an idle keep-alive connection too: hyper restarts
//! the timer when it waits for the next request). A connection beyond `MAX_CONNECTIONS`, or
//! beyond `MAX_CONNECTIONS_PER_ADDRESS` from one client address, is answered with a 503
//! problem and `Retry-After` and closed; at most [`REFUSALS_AT_ONCE`] such answers are written
//! at a time, and past that a connection is closed unanswered. Connections from a trusted proxy
//! count against `MAX_CONNECTIONS` only (their clients are told apart per request).
//!
//! HTTP/2 is not served: hyper-util's version detection before the first request has no
//! timeout. A proxy in front terminates HTTP/2.
//!
//! Shutdown is what `axum::serve`'s graceful shutdown does: stop accepting, let each
//! connection finish the request it is on (idle ones close), and return when all have closed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// Refusals (503 answers to connections over a cap) written at once.
pub const REFUSALS_AT_ONCE: usize = 64;

/// How long a refused connection may take to send its request head and read the answer.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(2);

/// The values of `trellis_api_requests_shed_total{reason}`.
pub const SHED_REASONS: [&str; 4] = ["connections", "connections_per_address", "in_flight", "password_hashing"];

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

/// Serves `app` on `listener` until `shutdown`, then drains as described in the module doc.
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, shutdown: CancellationToken) {
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_address = Arc::new(PerAddress { max: limits.max_connections_per_address.max(1), open: Mutex::default() });
    let refusals = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
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
            per_address.take(ClientAddress::of(peer.ip())).map(Some).ok_or("connections_per_address")
        };
        let permit = connections.clone().try_acquire_owned().map_err(|_| "connections");
        match (permit, slot) {
            (Ok(permit), Ok(slot)) => {
                let connection = Connection {
                    app: app.clone(),
                    peer,
                    header_read_timeout: limits.header_read_timeout,
                    shutdown: shutdown.clone(),
                };
                let close_rx = close_rx.clone();
                tokio::spawn(async move {
                    connection.run(stream).await;
                    drop((permit, slot, close_rx));
                });
            }
            (permit, slot) => {
                let reason = permit.err().or(slot.err()).unwrap_or("connections");
                metrics::counter!("trellis_api_requests_shed_total", "reason" => reason).increment(1);
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
}

impl Connection {
    async fn run(self, stream: TcpStream) {
        let peer = self.peer;
        let service = self.app.map_request(move |mut request: axum::http::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request
        });
        let mut builder = http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(self.header_read_timeout);
        let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        tokio::pin!(connection);
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
            }
        }
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
