//! The on-call console: server-rendered HTML at `/console` for the operations `trellisctl`
//! offers (dead letters, cutover flags, score runs) and the moderators' queue.
//!
//! **Who may call it.** Anyone may load the sign-in page and the static assets. Signing in
//! takes a Trellis account whose role allows the console (`operator`, `read_only_operator`,
//! `admin`; `moderator` for the moderation queue only) and costs what `POST /v1/sessions`
//! costs, under the same per-address and per-account limits and hashing slots. Every other page
//! costs an anonymous caller one cookie parse (no cookie: a redirect to the sign-in page) or one
//! token lookup. Actions (replay, park, purge, flags, runs) need `operator` or `admin`, checked
//! on the server for every request; a `read_only_operator` sees the same pages without them.
//!
//! **Sessions.** Signing in issues a Trellis token (`identity.tokens`: revoked with the user's
//! other tokens on suspension or a password change) that lives `CONSOLE_SESSION_TTL` at most and
//! stops after `CONSOLE_IDLE_TIMEOUT` unused. It travels only in the `trellis_console` cookie:
//! `HttpOnly`, `SameSite=Strict`, `Path=/console`, and `Secure` when the request came over TLS
//! (`X-Forwarded-Proto: https` from the proxy that terminates it).
//!
//! **Forgery and injection.** Every form carries a CSRF token derived from the session's token
//! (a hash that only the cookie's holder can compute), checked on every POST along with the
//! `Origin` header; the pages are sent with a Content-Security-Policy that allows scripts and
//! styles from the console's own assets only (no inline script), may not be framed, and are
//! not cached. Every value shown is escaped by the templates.
//!
//! **Bounds.** Lists show at most [`pages::LIST_LIMIT`] rows; actions on "everything matching"
//! name the count they were confirmed for and refuse a selection that grew since; long actions
//! run in the background, record their progress in their audit row and can be cancelled.

mod pages;
pub mod rates;
mod session;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};

use trellis_ops::triggers::{Reading, Source};

use crate::app::AppState;
pub use session::Session;

/// Where the console is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsoleListener {
    /// At `/console` on the API's public listener.
    Public,
    /// At `/console` on the admin listener only.
    Admin,
    /// Nowhere.
    Off,
}

/// What every console handler can reach.
#[derive(Clone)]
pub struct Console {
    pub app: AppState,
    pub ops: trellis_ops::dlq::Ctx,
    /// Background actions (long replays and purges), finished before the process exits.
    pub tasks: tokio_util::task::TaskTracker,
    /// The throughput samples (without `PROMETHEUS_URL`).
    pub sampler: Arc<rates::Sampler>,
    /// The DLQ as the dead-letters page last read it (only what is new is read again).
    pub dead_letters: Arc<trellis_ops::dlq::Snapshot>,
    /// The stage triggers' last reading and when it was taken: read at most every
    /// [`TRIGGERS_TTL`], however often the overview is loaded.
    pub triggers: Arc<tokio::sync::Mutex<Option<TriggerReading>>>,
}

/// A reading of the stage triggers and when it was taken.
type TriggerReading = (std::time::Instant, Result<Vec<Reading>, String>);

/// How long a reading of the stage triggers is shown before it is taken again.
pub const TRIGGERS_TTL: std::time::Duration = std::time::Duration::from_secs(15);

impl Console {
    pub fn new(app: AppState, ops: trellis_ops::dlq::Ctx, tasks: tokio_util::task::TaskTracker) -> Self {
        Console { app, ops, tasks, sampler: Arc::default(), dead_letters: Arc::default(), triggers: Arc::default() }
    }

    /// The stage triggers, at most [`TRIGGERS_TTL`] old.
    pub async fn triggers(&self) -> Result<Vec<Reading>, String> {
        let mut cached = self.triggers.lock().await;
        if let Some((at, readings)) = cached.as_ref()
            && at.elapsed() < TRIGGERS_TTL
        {
            return readings.clone();
        }
        let config = &self.app.config;
        let source = match &config.prometheus_url {
            Some(url) => Source::Prometheus(url.clone()),
            None => Source::Direct(config.metrics_urls.clone()),
        };
        let readings = trellis_ops::triggers::read(&self.app.pool, &source).await.map_err(|e| format!("{e:#}"));
        *cached = Some((std::time::Instant::now(), readings.clone()));
        readings
    }
}

pub type ConsoleState = Arc<Console>;

/// The console's routes, to be nested at `/console`.
pub fn router(console: Console) -> Router {
    let state = Arc::new(console);
    Router::new()
        .route("/", get(pages::overview))
        .route("/sign-in", get(session::sign_in_page).post(session::sign_in))
        .route("/sign-out", post(session::sign_out))
        .route("/dead-letters", get(pages::dead_letters))
        .route("/dead-letters/confirm", post(pages::confirm_action))
        .route("/dead-letters/act", post(pages::act))
        .route("/dead-letters/actions/{id}", get(pages::action_page))
        .route("/dead-letters/actions/{id}/cancel", post(pages::cancel_action))
        .route("/dead-letters/{sequence}", get(pages::dead_letter))
        .route("/cutover", get(pages::cutover))
        .route("/cutover/{flag}", post(pages::set_flag))
        .route("/score-runs", get(pages::score_runs).post(pages::trigger_run))
        .route("/moderation", get(pages::moderation))
        .route("/moderation/{id}", post(pages::decide))
        .route("/assets/console.css", get(css))
        .route("/assets/console.js", get(js))
        .fallback(not_found)
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

/// No inline script or style, nothing from elsewhere, no framing, no caching of pages that
/// show operational data.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn security_headers(request: Request, next: Next) -> Response {
    let is_asset = request.uri().path().contains("/assets/");
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    if !is_asset {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", include_str!("assets/console.css"))
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", include_str!("assets/console.js"))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "public, max-age=300")], body).into_response()
}

async fn not_found() -> Response {
    error_page(StatusCode::NOT_FOUND, "Not found", "There is no such page in the console.")
}

/// The pages a session may see, in the navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Overview,
    DeadLetters,
    Cutover,
    ScoreRuns,
    Moderation,
}

impl Section {
    fn href(self) -> &'static str {
        match self {
            Section::Overview => "/console",
            Section::DeadLetters => "/console/dead-letters",
            Section::Cutover => "/console/cutover",
            Section::ScoreRuns => "/console/score-runs",
            Section::Moderation => "/console/moderation",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Section::Overview => "Overview",
            Section::DeadLetters => "Dead letters",
            Section::Cutover => "Cutover",
            Section::ScoreRuns => "Score runs",
            Section::Moderation => "Moderation",
        }
    }
}

/// A whole page: head, navigation (the sections this session may see), and `body`.
pub fn layout(
    session: Option<&Session>,
    current: Option<Section>,
    title: &str,
    head_refresh: bool,
    body: Markup,
) -> Markup {
    let sections: Vec<Section> = match session {
        None => Vec::new(),
        Some(s) => {
            let mut v = Vec::new();
            if s.role.can_view_operations() {
                v.extend([Section::Overview, Section::DeadLetters, Section::Cutover, Section::ScoreRuns]);
            }
            if s.role.can_moderate() {
                v.push(Section::Moderation);
            }
            v
        }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Trellis console" }
                link rel="stylesheet" href="/console/assets/console.css";
                @if head_refresh {
                    noscript { meta http-equiv="refresh" content="5"; }
                }
                script src="/console/assets/console.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    span.brand { "Trellis console" }
                    @if !sections.is_empty() {
                        nav aria-label="Console sections" {
                            ul {
                                @for s in &sections {
                                    li {
                                        @if Some(*s) == current {
                                            a href=(s.href()) aria-current="page" { (s.label()) }
                                        } @else {
                                            a href=(s.href()) { (s.label()) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    @if let Some(s) = session {
                        div.who {
                            span { "Signed in as " strong { (s.handle) } " (" (s.role.as_str()) ")" }
                            form.inline method="post" action="/console/sign-out" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main id="main" { (body) }
            }
        }
    }
}

/// An HTML error page (the console's answer to a browser; the JSON API answers problem+json).
pub fn error_page(status: StatusCode, title: &str, detail: &str) -> Response {
    let body = layout(
        None,
        None,
        title,
        false,
        html! {
            h1 { (title) }
            p.notice.bad role="alert" { (detail) }
            p { a href="/console" { "Back to the console" } }
        },
    );
    (status, Html(body.into_string())).into_response()
}

/// What a console handler answers with when something goes wrong.
pub enum PageError {
    /// Not signed in: to the sign-in page.
    SignIn,
    Forbidden(&'static str),
    NotFound(&'static str),
    BadRequest(String),
    Conflict(String),
    Unavailable(String),
}

impl From<sqlx::Error> for PageError {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "console: database error");
        PageError::Unavailable("the database did not answer; try again".into())
    }
}

impl From<anyhow::Error> for PageError {
    fn from(e: anyhow::Error) -> Self {
        tracing::error!(error = format!("{e:#}"), "console: operation failed");
        PageError::Unavailable(format!("{e:#}"))
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            PageError::SignIn => (StatusCode::SEE_OTHER, [(header::LOCATION, "/console/sign-in")]).into_response(),
            PageError::Forbidden(why) => error_page(StatusCode::FORBIDDEN, "Not allowed", why),
            PageError::NotFound(what) => error_page(StatusCode::NOT_FOUND, "Not found", what),
            PageError::BadRequest(why) => error_page(StatusCode::BAD_REQUEST, "Cannot do that", &why),
            PageError::Conflict(why) => error_page(StatusCode::CONFLICT, "Not done", &why),
            PageError::Unavailable(why) => error_page(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", &why),
        }
    }
}

pub type PageResult = Result<Response, PageError>;

/// A page's HTML response.
pub fn page(markup: Markup) -> PageResult {
    Ok(Html(markup.into_string()).into_response())
}

/// A redirect after a POST.
pub fn see_other(location: &str) -> PageResult {
    let location = HeaderValue::from_str(location).map_err(|_| PageError::BadRequest("bad redirect".into()))?;
    Ok((StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response())
}

/// A form or query string as its fields in order (repeated names kept).
#[derive(Debug, Default)]
pub struct Fields(pub Vec<(String, String)>);

impl Fields {
    pub fn parse(raw: &[u8]) -> Self {
        Fields(form_urlencoded::parse(raw).into_owned().collect())
    }

    /// The first value of `name`, trimmed, if it says something.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.trim()).filter(|v| !v.is_empty())
    }

    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}
