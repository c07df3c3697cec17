//! The HTTP side of `trellis-api` for tests: a client of its public listener, and the API as a
//! real process ([`Api`]).

use std::net::SocketAddr;

use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::process::{Process, READY_WITHIN, Spawn};

/// How long a request of [`Client`] may take: far above any answer a test waits for.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The password of every user the tests register.
pub const PASSWORD: &str = "correct horse battery staple";

/// The API's abuse limits opened wide (as `trellis-api` environment settings): tests register
/// many users and file many disputes, impersonation among them, from one address within
/// seconds. The tests of these limits set their own values.
pub const OPEN_LIMITS: &[(&str, &str)] = &[
    ("REGISTRATION_RATE_PER_ADDRESS", "1000000"),
    ("DISPUTE_P0_MIN_ACCOUNT_AGE", "0s"),
    ("DISPUTE_OPEN_LIMIT", "1000000"),
    ("DISPUTE_OPEN_LIMIT_P0", "1000000"),
    ("REFUSAL_DELAY", "0s"),
];

/// An answer: status, headers, and the body as JSON (`Null` when empty or not JSON).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `type` of a problem response, without the `urn:trellis:problem:` prefix.
    pub fn problem(&self) -> &str {
        self.body["type"].as_str().and_then(|t| t.strip_prefix("urn:trellis:problem:")).unwrap_or("")
    }
}

/// A registered user and the token their registration returned.
#[derive(Debug, Clone)]
pub struct User {
    pub id: Uuid,
    pub handle: String,
    pub token: String,
}

/// A client of the API's public listener.
#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
}

impl Client {
    /// A client of `addr` whose requests fail after [`REQUEST_TIMEOUT`] instead of hanging a
    /// test whose server stopped answering.
    pub fn new(addr: SocketAddr) -> Client {
        Client { addr, http: crate::process::client(REQUEST_TIMEOUT) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A request on `client` (another source address, say), with a bearer token and a JSON body.
    pub fn build_on(
        &self,
        client: &reqwest::Client,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> reqwest::RequestBuilder {
        let mut req = client.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        req
    }

    pub fn build(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> reqwest::RequestBuilder {
        self.build_on(&self.http, method, path, token, body)
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Response {
        self.try_send(req).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::send`] for a test whose API may be down or die mid-request: the transport's
    /// failure (no connection, a connection closed before the answer) as an error.
    pub async fn try_send(&self, req: reqwest::RequestBuilder) -> Result<Response, String> {
        let resp = req.send().await.map_err(|e| format!("request not answered: {e}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(|e| format!("body not read: {e}"))?;
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        Ok(Response { status, headers, body })
    }

    pub async fn request(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Response {
        self.send(self.build(method, path, token, body)).await
    }

    /// Registers `handle` with `display_name` (e-mail `<handle>@example.com`, password
    /// [`PASSWORD`]); 201 expected.
    pub async fn register_named(&self, handle: &str, display_name: &str) -> User {
        let body = json!({"handle": handle, "display_name": display_name, "email": format!("{handle}@example.com"), "password": PASSWORD});
        let r = self.request(Method::POST, "/v1/users", None, Some(body)).await;
        assert_eq!(r.status, 201, "registering {handle}: {:?}", r.body);
        User {
            id: r.body["user"]["id"].as_str().and_then(|id| id.parse().ok()).expect("the new user's id"),
            handle: handle.to_owned(),
            token: r.body["token"].as_str().expect("the new user's token").to_owned(),
        }
    }

    /// Registers `handle`, whose display name is the handle too.
    pub async fn register(&self, handle: &str) -> User {
        self.register_named(handle, handle).await
    }
}

/// `trellis-api` as a child process (killed when dropped) and a client of its public listener.
pub struct Api {
    pub process: Process,
    pub client: Client,
}

impl Api {
    /// How the tests start the API on `database_url` and `prefix`: [`OPEN_LIMITS`], and what the
    /// caller adds (settings or flags) before [`Api::start`].
    pub fn spawn(database_url: &str, prefix: &str) -> Spawn {
        Spawn::new("trellis-api").on(database_url, prefix).envs(OPEN_LIMITS.iter().copied())
    }

    /// Starts it and waits until its `/readyz` answers 200.
    pub async fn start(spawn: Spawn) -> Api {
        let mut process = spawn.spawn();
        process.wait_ready(READY_WITHIN).await;
        let client = Client::new(process.api());
        Api { process, client }
    }

    /// The admin listener (`/readyz` with every check, `/metrics`).
    pub fn admin(&self) -> SocketAddr {
        self.process.admin()
    }

    /// The admin `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.process.metrics().await
    }

    /// SIGKILL, and waits until it is gone.
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }
}

impl std::ops::Deref for Api {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}
