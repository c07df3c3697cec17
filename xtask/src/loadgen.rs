//! The abuse benchmark's load generator: HTTP/1.1 over TCP from chosen loopback source
//! addresses (Linux routes all of 127.0.0.0/8 to the loopback interface, so a socket bound to
//! 127.1.2.3 reaches a server on 127.0.0.1 and the server sees 127.1.2.3 as its peer). Requests
//! go over hyper's client connections, one request at a time per connection, without a pool.
//! Three shapes:
//!
//! - [`flood`]: closed-loop connections, each sending its next request as soon as the last one
//!   is answered, until a deadline (an attacker at full speed);
//! - [`steady`]: a fixed request rate over a few connections (a legitimate client), each
//!   request's latency measured from when it was due, so a server that stalls shows as
//!   latency rather than as fewer requests (no coordinated omission);
//! - [`slow_clients`]: connections that send a request's headers one byte at a time and never
//!   finish them.
//!
//! Each shape runs inside one current-thread tokio runtime; the caller gives each its own OS
//! thread, so the attack cannot delay the legitimate client's clock, and the attack's share of
//! the machine is at most one core.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Builds the `k`-th request of a load (`k` counts from 0 across all its connections).
pub type MakeRequest = Arc<dyn Fn(u64) -> Request<String> + Send + Sync>;

/// The addresses of 127.1.0.0/16 that [`Sources::rotating`] hands out, skipping those ending
/// in .0 and .255: 65,024.
const ROTATING_ADDRESSES: u64 = 256 * 254;

/// Where a load's connections come from.
#[derive(Clone)]
pub struct Sources {
    /// `None`: every connection from `first`; `Some(n)`: each connection from the next address
    /// of 127.1.0.0/16, for at most `n` requests.
    per_address: Option<u64>,
    first: Ipv4Addr,
    next: Arc<AtomicU64>,
}

impl Sources {
    /// Every connection from `address`, kept open for as many requests as it takes.
    pub fn one(address: Ipv4Addr) -> Self {
        Self { per_address: None, first: address, next: Arc::default() }
    }

    /// Each connection from the next address of 127.1.0.0/16, closed after `per_address`
    /// requests (the next one comes from a new address): many clients, few requests each.
    pub fn rotating(per_address: u64) -> Self {
        Self { per_address: Some(per_address.max(1)), first: Ipv4Addr::new(127, 1, 0, 1), next: Arc::default() }
    }

    /// Where the connections came from (how many addresses were used so far).
    pub fn describe(&self) -> String {
        match self.per_address {
            None => format!("from {}", self.first),
            Some(_) => format!(
                "from {} addresses of 127.1.0.0/16",
                crate::seed::thousands(self.next.load(Ordering::Relaxed).min(ROTATING_ADDRESSES))
            ),
        }
    }

    fn next_address(&self) -> Ipv4Addr {
        if self.per_address.is_none() {
            return self.first;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed) % ROTATING_ADDRESSES;
        Ipv4Addr::new(127, 1, (n / 254) as u8, (n % 254 + 1) as u8)
    }
}

/// A TCP connection to `target` from `source` (any port).
async fn connect(source: Ipv4Addr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// An HTTP/1.1 client connection; its I/O runs in a task of the current runtime, which ends
/// when the returned sender is dropped.
async fn http_connection(source: Ipv4Addr, target: SocketAddr) -> anyhow::Result<SendRequest<String>> {
    let stream = connect(source, target).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends one request and reads the whole response; its status.
async fn send(sender: &mut SendRequest<String>, request: Request<String>) -> anyhow::Result<u16> {
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    response.into_body().collect().await?;
    Ok(status)
}

/// What a load's requests got.
#[derive(Default, Debug, Clone)]
pub struct Tally {
    /// Answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer because their connection failed or closed mid-request (or,
    /// for a steady client, not in time), and connection attempts that failed.
    pub failed: u64,
    /// Requests still unanswered when the load ended (a flood's last request per connection).
    pub unanswered_at_end: u64,
}

impl Tally {
    pub fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }

    /// `401 ×12,345, 429 ×5`, most frequent first.
    pub fn describe_statuses(&self) -> String {
        let mut by_count: Vec<(&u16, &u64)> = self.statuses.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let text: Vec<String> =
            by_count.iter().map(|(status, n)| format!("{status} ×{}", crate::seed::thousands(**n))).collect();
        if text.is_empty() { "no answer".to_owned() } else { text.join(", ") }
    }

    fn merge(&mut self, other: Tally) {
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        self.failed += other.failed;
        self.unanswered_at_end += other.unanswered_at_end;
    }
}

/// `connections` closed-loop connections from `sources`, until `until`. A request still
/// unanswered at `until` is abandoned, and counted as such.
pub async fn flood(target: SocketAddr, sources: Sources, connections: u32, until: Instant, make: MakeRequest) -> Tally {
    let counter = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (sources, make, counter) = (sources.clone(), make.clone(), counter.clone());
            tokio::spawn(flood_connection(target, sources, until, make, counter))
        })
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        if let Ok(t) = task.await {
            tally.merge(t);
        }
    }
    tally
}

async fn flood_connection(
    target: SocketAddr,
    sources: Sources,
    until: Instant,
    make: MakeRequest,
    counter: Arc<AtomicU64>,
) -> Tally {
    let mut tally = Tally::default();
    let mut open: Option<SendRequest<String>> = None;
    let mut used = 0;
    while Instant::now() < until {
        if open.is_none() || sources.per_address.is_some_and(|n| used >= n) {
            open = None;
            match tokio::time::timeout_at(until, http_connection(sources.next_address(), target)).await {
                Err(_) => break,
                Ok(Ok(sender)) => (open, used) = (Some(sender), 0),
                Ok(Err(_)) => {
                    tally.failed += 1;
                    // Refused: no busy loop while the server does not accept.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(sender) = open.as_mut() else { continue };
        // A connection the server closed after its last answer is not a failed request.
        if sender.ready().await.is_err() {
            open = None;
            continue;
        }
        let request = make(counter.fetch_add(1, Ordering::Relaxed));
        match tokio::time::timeout_at(until, send(sender, request)).await {
            Err(_) => {
                tally.unanswered_at_end += 1;
                break;
            }
            Ok(Ok(status)) => {
                *tally.statuses.entry(status).or_default() += 1;
                used += 1;
            }
            Ok(Err(_)) => {
                tally.failed += 1;
                open = None;
            }
        }
    }
    tally
}

/// What a steady client saw.
#[derive(Default, Debug, Clone)]
pub struct Samples {
    /// Every request that fell due: the time from when it was due to its answer, or to its
    /// failure (at least the timeout for a request that was not answered in time), in ms.
    pub latencies_ms: Vec<f64>,
    pub tally: Tally,
    /// Requests answered 2xx within the timeout.
    pub served: u64,
}

impl Samples {
    pub fn due(&self) -> u64 {
        self.latencies_ms.len() as u64
    }

    /// The `q` quantile of all due requests' latencies (nearest rank), in ms.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        match sorted.len() {
            0 => f64::NAN,
            n => sorted[((n as f64 * q).ceil() as usize).clamp(1, n) - 1],
        }
    }

    /// The share of due requests served (2xx within the timeout), in percent.
    pub fn served_percent(&self) -> f64 {
        if self.due() == 0 { f64::NAN } else { 100.0 * self.served as f64 / self.due() as f64 }
    }

    fn merge(&mut self, other: Samples) {
        self.latencies_ms.extend(other.latencies_ms);
        self.tally.merge(other.tally);
        self.served += other.served;
    }
}

/// How a steady client behaves.
#[derive(Clone, Copy, Debug)]
pub struct Steady {
    pub source: Ipv4Addr,
    pub connections: u32,
    /// Requests per second, over all connections.
    pub rate: f64,
    /// Each connection is replaced by a new one after this many requests, as a population of
    /// clients keeps opening connections: an attack on connection slots shows only to a client
    /// that needs a new one.
    pub requests_per_connection: u64,
    /// A request not answered within this time of when it was due is not served.
    pub timeout: Duration,
}

/// `steady.rate` requests per second from `start` for `duration`, spread evenly over
/// `steady.connections` connections.
pub async fn steady(
    target: SocketAddr,
    steady: Steady,
    start: Instant,
    duration: Duration,
    make: MakeRequest,
) -> Samples {
    let counter = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..steady.connections)
        .map(|c| {
            let (make, counter) = (make.clone(), counter.clone());
            let first = start + Duration::from_secs_f64(f64::from(c) / steady.rate);
            tokio::spawn(steady_connection(target, steady, first, start + duration, make, counter))
        })
        .collect();
    let mut samples = Samples::default();
    for task in tasks {
        if let Ok(s) = task.await {
            samples.merge(s);
        }
    }
    samples
}

async fn steady_connection(
    target: SocketAddr,
    steady: Steady,
    first: Instant,
    end: Instant,
    make: MakeRequest,
    counter: Arc<AtomicU64>,
) -> Samples {
    let period = Duration::from_secs_f64(f64::from(steady.connections) / steady.rate);
    let mut samples = Samples::default();
    let mut open: Option<SendRequest<String>> = None;
    let mut used = 0;
    for k in 0.. {
        let due = first + period * k;
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due).await;
        let deadline = due + steady.timeout;
        if Instant::now() >= deadline {
            // Still behind with earlier requests: this one could not even be sent in time.
            samples.latencies_ms.push((Instant::now() - due).as_secs_f64() * 1000.0);
            samples.tally.failed += 1;
            continue;
        }
        let request = make(counter.fetch_add(1, Ordering::Relaxed));
        let attempt = async {
            let reusable = match open.as_mut() {
                Some(sender) => used < steady.requests_per_connection && sender.ready().await.is_ok(),
                None => false,
            };
            if !reusable {
                open = Some(http_connection(steady.source, target).await?);
                used = 0;
            }
            let sender = open.as_mut().expect("a connection was just opened");
            used += 1;
            send(sender, request).await
        };
        let outcome = tokio::time::timeout_at(deadline, attempt).await;
        samples.latencies_ms.push((Instant::now() - due).as_secs_f64() * 1000.0);
        match outcome {
            Ok(Ok(status)) => {
                *samples.tally.statuses.entry(status).or_default() += 1;
                if (200..300).contains(&status) {
                    samples.served += 1;
                }
            }
            Ok(Err(_)) | Err(_) => {
                samples.tally.failed += 1;
                open = None;
            }
        }
    }
    samples
}

/// What the slow clients managed.
#[derive(Default, Debug, Clone)]
pub struct SlowReport {
    /// Connections opened (the initial ones, and each reopened after the server closed one).
    pub opened: u64,
    /// Connections the server closed or answered (each is then reopened).
    pub closed_by_server: u64,
    /// Connection attempts that failed.
    pub failed: u64,
    /// Connections still open, headers unfinished, when the attack ended.
    pub open_at_end: u64,
}

/// `connections` connections from `sources`, each sending the headers of a request one byte
/// every `byte_every` and never finishing them, until `until`. A connection the server closes
/// (or answers: it will close it) is reopened at once.
pub async fn slow_clients(
    target: SocketAddr,
    sources: Sources,
    connections: u32,
    byte_every: Duration,
    until: Instant,
) -> SlowReport {
    let tasks: Vec<_> =
        (0..connections).map(|_| tokio::spawn(slow_connection(target, sources.clone(), byte_every, until))).collect();
    let mut report = SlowReport::default();
    for task in tasks {
        if let Ok(r) = task.await {
            report.opened += r.opened;
            report.closed_by_server += r.closed_by_server;
            report.failed += r.failed;
            report.open_at_end += r.open_at_end;
        }
    }
    report
}

async fn slow_connection(target: SocketAddr, sources: Sources, byte_every: Duration, until: Instant) -> SlowReport {
    const REQUEST_HEAD: &[u8] = b"GET /v1/me/contacts HTTP/1.1\r\nHost: 127.0.0.1\r\n";
    const ANOTHER_HEADER: &[u8] = b"X-Slow: 1\r\n";
    let mut report = SlowReport::default();
    'connections: while Instant::now() < until {
        let mut stream = match tokio::time::timeout_at(until, connect(sources.next_address(), target)).await {
            Err(_) => break,
            Ok(Ok(stream)) => stream,
            Ok(Err(_)) => {
                report.failed += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        report.opened += 1;
        let mut sent = 0usize;
        let mut answer = [0u8; 512];
        loop {
            let byte = match REQUEST_HEAD.get(sent) {
                Some(b) => *b,
                None => ANOTHER_HEADER[(sent - REQUEST_HEAD.len()) % ANOTHER_HEADER.len()],
            };
            if stream.write_all(&[byte]).await.is_err() {
                report.closed_by_server += 1;
                continue 'connections;
            }
            sent += 1;
            let next = Instant::now() + byte_every;
            tokio::select! {
                // Any answer (408, 431, ...) or a close: the server is done with this one.
                read = stream.read(&mut answer) => {
                    let _ = read;
                    report.closed_by_server += 1;
                    continue 'connections;
                }
                _ = tokio::time::sleep_until(next.min(until)) => {}
            }
            if Instant::now() >= until {
                report.open_at_end += 1;
                break 'connections;
            }
        }
    }
    report
}
