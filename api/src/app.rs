//! Wiring: state, router, middleware, listeners, the relay and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hmac::{Hmac, Mac as _};
use opentelemetry::trace::TraceContextExt as _;
use sha2::Sha256;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use trellis_domain::flags::Executor;
use trellis_runtime::consumer::RunnerConfig;
use trellis_runtime::health::{self, Health, Severity};
use trellis_runtime::host::{Host, HostConfig};
use trellis_runtime::relay::{Relay, RelayConfig};
use trellis_runtime::trace;
use trellis_store::PoolConfig;
use trellis_store::page::CursorKey;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;

use crate::activity::ActivityTracker;
use crate::auth::HashingSlots;
use crate::config::Config;
use crate::error::{ApiError, ErrorCause, problem_response};
use crate::instrument::{RequestAnswered, RequestShed, ShedReason};
use crate::ratelimit::Limiters;
use crate::read_replicas::ReadReplicas;
use crate::token_cache::TokenCache;
use crate::{routes, serve, unit_of_work};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub config: Arc<Config>,
    pub limiters: Arc<Limiters>,
    pub hashing: Arc<HashingSlots>,
    /// Seals every list cursor (`trellis_store::page`).
    pub cursor_key: Arc<CursorKey>,
    /// Requests in flight, at most `MAX_IN_FLIGHT_REQUESTS`.
    pub in_flight: Arc<Semaphore>,
    pub health: Health,
    pub search_source: Arc<crate::routes::search::SearchSourceCache>,
    pub activity: Arc<ActivityTracker>,
    /// One reporter's dispute filings, one at a time in this process (before each takes a
    /// database connection and the reporter's advisory lock).
    pub filings: Arc<crate::keyed_mutex::KeyedMutex<trellis_domain::UserId>>,
    /// The read replicas of `DATABASE_READ_URL`; `None` without them.
    pub read_replicas: Option<Arc<ReadReplicas>>,
    /// Recently authenticated bearer tokens (`TOKEN_CACHE_TTL`; off when it is 0).
    pub token_cache: Arc<TokenCache>,
    /// Wakes this process's relay after a write with events commits; `None` without a relay
    /// (`NO_RELAY`). With a relay, the request connections do not notify the relays through
    /// the database (`trellis.outbox_notify = off`): every notifying commit takes one
    /// database-wide lock from before its WAL flush until it ends, which serialises them.
    pub relay_wake: Option<Arc<tokio::sync::Notify>>,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Trellis API",
        description = "Commands and queries of the Trellis trust network.\n\nWrites (POST, PUT, PATCH, DELETE) of a \
            signed-in caller accept an `Idempotency-Key` header (1-255 visible ASCII characters): the caller is \
            authenticated first, the first successful (2xx) response is stored for 24 h with the change it made and \
            replayed to a retry with the same key (`Idempotent-Replayed: true`); the same key with another request is \
            a 422, a retry while the first still runs a 409. Keys belong to the user, whichever of their tokens sends \
            them. Registration and sign-in ignore the header: a retry is processed again, with every check. A 500 \
            `outcome-unknown` means a change may have been made: repeat it with the same key to learn what happened.\n\n\
            Where the API reads from database replicas, a successful write answers with `Trellis-Commit-LSN` (its \
            commit's position, such as `16/B374D848`); your next reads with the same token through the same API process see the write. \
            Send the header back on a read (search, profiles, scores, contact and circle lists) to see the write \
            through any API process; a value that is not such a position is a 400 `invalid-commit-lsn`."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "identity"), (name = "contacts"), (name = "circles"), (name = "disputes"),
        (name = "moderation"), (name = "scores"), (name = "search"), (name = "admin")
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The API router with its OpenAPI document, before the middleware stack.
pub fn api_router() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi()).merge(routes::router()).split_for_parts()
}

/// The whole public application: routes, `/openapi.json`, health (the status only: check
/// names and errors are on the admin port) and the middleware stack.
pub fn app(state: AppState, console: Option<Router>) -> Router {
    let (api, openapi) = api_router();
    let console = console.map(|routes| {
        // The console's own answers (HTML) with the API's load shedding and request metrics.
        Router::new()
            .nest("/console", routes)
            .layer(middleware::from_fn_with_state(state.clone(), shed_load))
            .layer(middleware::from_fn(record_request))
    });
    let openapi_json: Arc<str> = openapi.to_json().expect("the OpenAPI document serialises").into();
    let request_id = HeaderName::from_static("x-request-id");
    let body_limit = state.config.body_limit_bytes;
    let health = state.health.clone();
    api.route(
        "/openapi.json",
        get(move || {
            let doc = openapi_json.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], doc.to_string()) }
        }),
    )
    .fallback(route_not_found)
    .method_not_allowed_fallback(method_not_allowed)
    .layer(middleware::from_fn_with_state(state.clone(), unit_of_work::layer))
    .layer(DefaultBodyLimit::max(body_limit))
    .layer(middleware::from_fn_with_state(state.clone(), shed_load))
    .layer(middleware::from_fn_with_state(state.clone(), delay_refusals))
    .layer(middleware::from_fn(record_request))
    .with_state(state)
    .merge(console.unwrap_or_default())
    .merge(trellis_runtime::admin::public_health_routes(health))
    .layer(PropagateRequestIdLayer::new(request_id.clone()))
    .layer(TraceLayer::new_for_http().make_span_with(request_span))
    .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

/// The span of one HTTP request: a new trace, or the child of the caller's W3C `traceparent`
/// (and `tracestate`) when it sends a valid one. Every outbox row the request writes carries
/// its context (see `trellis_runtime::trace`).
fn request_span(req: &Request) -> tracing::Span {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let id = header("x-request-id").unwrap_or("");
    let span = tracing::info_span!(
        parent: None,
        "request",
        otel.name = %format_args!("{} {}", req.method(), req.uri().path()),
        otel.kind = "server",
        method = %req.method(),
        uri = %req.uri().path(),
        request_id = %id,
    );
    let caller = header(trace::TRACEPARENT).and_then(|tp| trace::TraceHeaders::parse(tp, header(trace::TRACESTATE)));
    if let Some(caller) = caller {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(caller));
    }
    trace::started(span)
}

async fn route_not_found() -> Response {
    problem_response(StatusCode::NOT_FOUND, "route-not-found", Some("no such route".into()), Vec::new())
}

async fn method_not_allowed() -> Response {
    problem_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        Some("this route does not support that method".into()),
        Vec::new(),
    )
}

/// Load shedding: beyond `MAX_IN_FLIGHT_REQUESTS` a request is answered 503 at once, so that
/// a flood makes no queue that legitimate requests would wait behind.
async fn shed_load(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Ok(_permit) = state.in_flight.clone().try_acquire_owned() else {
        RequestShed { reason: ShedReason::InFlight }.emit();
        return ApiError::Overloaded { retry_after_secs: 1 }.into_response();
    };
    next.run(request).await
}

/// Holds a refused request's answer for `REFUSAL_DELAY`. It runs outside the in-flight cap
/// and the unit of work: a waiting refusal holds no permit, no transaction and no hashing slot,
/// only its connection, which an abusive client then cannot use for the next request meanwhile.
async fn delay_refusals(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if is_refusal(response.status()) && !state.config.refusal_delay.is_zero() {
        tokio::time::sleep(state.config.refusal_delay).await;
    }
    response
}

/// A refusal turns the request away before it reaches a resource: a malformed or invalid
/// request (400, 413, 422), no valid credentials (401), a limit (429), or shedding (503).
/// These are what a flood is made of, and what a well-behaved client does not send in a loop.
/// Answers about the resource itself (403, 404, 409, 412) are part of normal traffic and go at
/// once.
pub fn is_refusal(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_REQUEST
            | StatusCode::UNAUTHORIZED
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNPROCESSABLE_ENTITY
            | StatusCode::TOO_MANY_REQUESTS
            | StatusCode::SERVICE_UNAVAILABLE
    )
}

/// `trellis_http_request_duration_seconds{route,method,status_class}`, and the log line of
/// every server error with its cause.
async fn record_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let cause = response.extensions().get::<ErrorCause>().map(|c| &c.0 as &dyn std::fmt::Display);
    RequestAnswered { route, method, status: response.status(), duration: started.elapsed(), cause }.emit();
    response
}

/// A started API: its addresses and the task that ends when it has shut down.
pub struct Running {
    pub api_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub pool: PgPool,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits for the shutdown to finish.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("the API task panicked")?
    }
}

/// Connects, binds both listeners, starts the relay and the in-process processors, and serves
/// until `shutdown` is cancelled. The process is a [`Host`] executing for the `monolith` side:
/// the HTTP server is its intake, finished first within the grace period.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let common = &config.common;
    config.promotion.policy().map_err(anyhow::Error::msg)?;
    config.check().map_err(anyhow::Error::msg)?;
    config.search.shadow.config().map_err(anyhow::Error::msg)?;
    serve::raise_open_file_limit(config.max_connections);
    let cursor_key = cursor_key(&config)?;
    // The in-process processors' own pool (a bulkhead, like the relay's): idle unless a
    // cutover flag says `monolith` (or `shadow`, for a candidate).
    let host = Host::start(
        HostConfig {
            name: "trellis-api",
            pool_name: "trellis-api-processors",
            common: common.clone(),
            executor: Executor::Monolith,
            pool_size: 4,
            flag_poll: config.flag_poll,
            // Without NATS the API still takes writes: the outbox holds the events.
            nats: Severity::Degrading,
            runner: RunnerConfig::default(),
            batch_size: None,
            batch_window: None,
        },
        shutdown.clone(),
    )
    .await?;
    crate::instrument::register();

    let mut pool_config = PoolConfig::new("trellis-api");
    pool_config.max_connections = config.db_pool_size;
    pool_config.acquire_timeout = common.io_timeout;
    pool_config.statement_timeout = common.io_timeout;
    // A request's transaction (and the idempotency key it holds) ends with the request: when
    // its client stops talking, and when this process is gone even while a statement waits.
    pool_config.idle_in_transaction_timeout = Some(config.request_timeout);
    pool_config.client_check_interval = Some(Duration::from_secs(1));
    // This process's own relay is woken in-process (`AppState::relay_wake`).
    pool_config.outbox_notify = config.no_relay;
    let pool = trellis_store::connect_lazy(common.database_url.expose(), &pool_config)?;
    let read_replicas = match config.read_replicas().map_err(anyhow::Error::msg)? {
        None => None,
        Some(settings) => {
            let mut replica_pool = pool_config.clone();
            replica_pool.application_name = "trellis-api-read".into();
            let replicas = Arc::new(ReadReplicas::new(pool.clone(), &settings, &replica_pool)?);
            crate::instrument::register_read_replicas(&replicas.names());
            tracing::info!(replicas = ?replicas.names(), "lag-tolerant reads go to read replicas");
            Some(replicas)
        }
    };
    // Readiness is the requests' pool's: the processors' may be busy with a batch.
    host.health().add("database", Severity::Critical, health::database_check(pool.clone()));
    // Connected is not enough: on a cluster that lost its quorum the client stays connected to a
    // surviving node while the relay can publish nothing (the events stream has no leader).
    let (js, events) = (host.ctx().js.clone(), host.ctx().topology.events_stream());
    host.health().add("jetstream", Severity::Degrading, health::stream_check(js, events));

    let relay = (!config.no_relay)
        .then(|| -> anyhow::Result<Relay> {
            // The relay's own pool (the bulkhead): a listener connection plus one for batches.
            let relay_pool = Host::connect_pool(common, "trellis-api-relay", 3, common.batch_timeout)?;
            let relay_config = RelayConfig {
                batch_size: config.relay_batch_size,
                poll_interval: config.relay_poll_interval,
                min_batch_interval: config.relay_min_batch_interval,
                retention: config.outbox_retention,
                stream_poll_interval: config.stream_poll_interval,
                ..RelayConfig::default()
            };
            Ok(Relay::new(relay_pool, host.ctx().js.clone(), host.ctx().topology.clone(), relay_config))
        })
        .transpose()?;
    let state = AppState {
        pool: pool.clone(),
        config: Arc::new(config.clone()),
        limiters: Arc::new(Limiters::new(&config)),
        hashing: Arc::new(HashingSlots::new(config.password_hash_concurrency, config.password_hash_queue)),
        cursor_key: Arc::new(cursor_key),
        in_flight: Arc::new(Semaphore::new(config.max_in_flight_requests.max(1))),
        health: host.health().clone(),
        search_source: Arc::default(),
        activity: Arc::new(ActivityTracker::new(config.activity_max_tokens)),
        filings: Arc::default(),
        read_replicas: read_replicas.clone(),
        token_cache: Arc::new(TokenCache::new(config.token_cache_ttl, config.token_cache_entries)),
        relay_wake: relay.as_ref().map(Relay::waker),
    };
    let listener =
        serve::bind(config.api_addr).with_context(|| format!("cannot bind the API listener on {}", config.api_addr))?;
    let api_addr = listener.local_addr()?;

    if let Some(relay) = relay {
        let (declared, stop) = (host.streams_declared(), host.stop_token());
        host.spawn(async move {
            if declared.await {
                relay.run(stop).await;
            }
        });
    }
    host.spawn(crate::prune::run(pool.clone(), config.prune_interval, config.token_idle_timeout, host.stop_token()));
    {
        let (limiters, interval, stop) =
            (state.limiters.clone(), config.rate_limiter_prune_interval, host.stop_token());
        host.spawn(async move { limiters.prune(interval, stop).await });
    }
    {
        let (activity, pool, interval) = (state.activity.clone(), pool.clone(), config.activity_flush_interval);
        let stop = host.stop_token();
        host.spawn(async move { activity.run(pool, interval, stop).await });
    }
    if let Some(replicas) = read_replicas {
        host.spawn(replicas.poll(host.stop_token()));
    }
    if state.token_cache.enabled() {
        crate::instrument::register_token_cache();
        // A pool of its own: the LISTEN connection, on the primary, never taken from requests.
        let listen_pool = Host::connect_pool(common, "trellis-api-token-cache", 1, common.io_timeout)?;
        let (cache, stop) = (state.token_cache.clone(), host.stop_token());
        host.spawn(async move { cache.listen(listen_pool, stop).await });
    }
    crate::processors::install(&host, &config).await?;

    let grace = common.shutdown_grace;
    let limits = serve::Limits {
        header_read_timeout: config.header_read_timeout,
        max_connections: config.max_connections,
        max_connections_per_address: config.max_connections_per_address,
        trusted_proxies: config.trusted_proxies.as_slice().into(),
    };
    let console = match config.console {
        crate::console::ConsoleListener::Off => None,
        listener => {
            let ops = trellis_ops::dlq::Ctx {
                js: host.ctx().js.clone(),
                topology: host.ctx().topology.clone(),
                pool: pool.clone(),
            };
            let console = crate::console::Console::new(state.clone(), ops, host.task_tracker());
            if config.prometheus_url.is_none() {
                let (sampler, urls, stop) = (console.sampler.clone(), config.metrics_urls.clone(), host.stop_token());
                host.spawn(sampler.run(urls, config.console_sample_interval, stop));
            }
            let routes = crate::console::router(console);
            if listener == crate::console::ConsoleListener::Admin {
                let routes = Router::new().nest("/console", routes);
                let _ = host.admin_extension().set(routes);
                None
            } else {
                Some(routes)
            }
        }
    };
    let app = app(state, console);
    host.spawn_intake(async move {
        let mut server = tokio::spawn(serve::serve(listener, app, limits, shutdown.clone()));
        tokio::select! {
            _ = &mut server => return,
            _ = shutdown.cancelled() => {}
        }
        // In-flight requests get the grace period; then whatever is left is cut off.
        if tokio::time::timeout(grace, &mut server).await.is_err() {
            server.abort();
        }
    });
    let admin_addr = host.admin_addr();
    let task = tokio::spawn(host.run());
    // Once everything is started: whoever reads the addresses may wait for `/readyz`.
    trellis_runtime::admin::write_addr_file(common.addr_file.as_deref(), &[("api", api_addr), ("admin", admin_addr)])?;
    Ok(Running { api_addr, admin_addr, pool, task })
}

/// Shortest `CURSOR_KEY` accepted, in bytes.
const CURSOR_KEY_MIN_LEN: usize = 32;

/// The cursor key: `CURSOR_KEY`, or one derived from `DATABASE_URL` (see the flag's doc).
fn cursor_key(config: &Config) -> anyhow::Result<CursorKey> {
    if let Some(key) = &config.cursor_key {
        anyhow::ensure!(
            key.expose().len() >= CURSOR_KEY_MIN_LEN,
            "CURSOR_KEY must be at least {CURSOR_KEY_MIN_LEN} bytes (e.g. `openssl rand -base64 32`)"
        );
        return Ok(CursorKey::new(key.expose().as_bytes()));
    }
    let url = config.common.database_url.expose();
    let has_password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .is_some_and(|(userinfo, _)| userinfo.split_once(':').is_some_and(|(_, password)| !password.is_empty()));
    if !has_password {
        tracing::warn!(
            "CURSOR_KEY is not set and DATABASE_URL has no password: list cursors can be forged by anyone who knows \
             the database URL; set CURSOR_KEY in production"
        );
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(url.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(b"trellis cursor key v1");
    Ok(CursorKey::new(&mac.finalize().into_bytes()))
}
