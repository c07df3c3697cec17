//! The browser harness against pages served here, under the console's strict
//! Content-Security-Policy (no inline script): the accessibility check finds what it must and
//! nothing on an accessible page, forms post what was typed, screenshots are PNGs, and nothing
//! of the browser outlives it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, State};
use axum::http::HeaderValue;
use axum::http::header::CONTENT_SECURITY_POLICY;
use axum::response::{Html, Response};
use axum::routing::get;
use trellis_testkit::browser::Browser;
use trellis_testkit::eventually;

/// The policy the console serves its pages with.
const CSP: &str = "default-src 'self'; script-src 'self'";

/// What the form posted, in order.
type Posted = Arc<Mutex<Vec<String>>>;

/// A page in a valid, accessible frame around `body`.
fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head>\n\
         <body><main><h1>{title}</h1>\n{body}\n</main></body></html>"
    ))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Serves the test pages on a loopback port; their base URL and what the form posted.
async fn serve() -> (String, Posted) {
    let posted = Posted::default();
    let app = Router::new()
        .route(
            "/unlabelled",
            get(|| async { page("Search", "<form action=\"/search\"><input type=\"text\" name=\"q\"></form>") }),
        )
        .route(
            "/accessible",
            get(|| async {
                page(
                    "Search",
                    // The inline script must not run: the policy forbids it.
                    "<form action=\"/search\"><label for=\"q\">Query</label> \
                     <input id=\"q\" type=\"text\" name=\"q\"> <button type=\"submit\">Search</button></form>\n\
                     <script>document.body.dataset.inline = \"ran\";</script>",
                )
            }),
        )
        .route(
            "/greet",
            get(|| async {
                page(
                    "Greeting",
                    "<form id=\"greet\" method=\"post\" action=\"/greet\">\
                     <label for=\"name\">Name</label> <input id=\"name\" type=\"text\" name=\"name\"> \
                     <button type=\"submit\">Greet</button></form>",
                )
            })
            .post(|State(posted): State<Posted>, Form(form): Form<Vec<(String, String)>>| async move {
                let name = form.into_iter().find(|(k, _)| k == "name").map(|(_, v)| v).unwrap_or_default();
                posted.lock().unwrap().push(name.clone());
                page("Greeted", &format!("<p id=\"greeting\">Hello, {}!</p>", escape(&name)))
            }),
        )
        .layer(axum::middleware::map_response(|mut response: Response| async move {
            response.headers_mut().insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
            response
        }))
        .with_state(posted.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding a loopback port");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serving the test pages") });
    (format!("http://{addr}"), posted)
}

#[tokio::test]
async fn an_unlabelled_input_is_a_serious_violation() {
    let (base, _) = serve().await;
    let browser = Browser::start().await.unwrap();
    browser.goto(&format!("{base}/unlabelled")).await.unwrap();

    let serious = browser.serious_violations().await.unwrap();
    let label = serious.iter().find(|v| v.id == "label");
    let label = label.unwrap_or_else(|| panic!("no `label` violation among {serious:#?}"));
    assert_eq!(label.targets, ["input"], "{label}");
    assert!(label.is_serious(), "{label}");
}

#[tokio::test]
async fn an_accessible_page_has_no_serious_violation_and_its_inline_script_does_not_run() {
    let (base, _) = serve().await;
    let browser = Browser::start().await.unwrap();
    browser.goto(&format!("{base}/accessible")).await.unwrap();

    // The policy is in force (the page's inline script was refused) and axe ran all the same.
    let inline = browser.client().execute("return document.body.dataset.inline ?? null;", Vec::new()).await.unwrap();
    assert_eq!(inline, serde_json::Value::Null, "the page's inline script ran: the CSP is not in force");
    let serious = browser.serious_violations().await.unwrap();
    assert!(serious.is_empty(), "serious violations on an accessible page:\n{serious:#?}");
    // Again on the same page (axe is injected once).
    assert!(browser.serious_violations().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_submitted_form_posts_what_was_typed_and_the_next_page_shows_it() {
    let (base, posted) = serve().await;
    let browser = Browser::start().await.unwrap();
    browser.goto(&format!("{base}/greet")).await.unwrap();

    browser.fill("#name", "Ada <Lovelace>").await.unwrap();
    browser.submit("form#greet").await.unwrap();

    browser.wait_for("#greeting").await.unwrap();
    assert_eq!(browser.text_of("#greeting").await.unwrap(), "Hello, Ada <Lovelace>!");
    assert_eq!(*posted.lock().unwrap(), ["Ada <Lovelace>"]);
    assert_eq!(browser.current_url().await.unwrap(), format!("{base}/greet"));
    assert_eq!(browser.client().title().await.unwrap(), "Greeted");

    // Once more through a click on the button.
    browser.goto(&format!("{base}/greet")).await.unwrap();
    browser.fill("#name", "Grace").await.unwrap();
    browser.click("button[type=submit]").await.unwrap();
    browser.wait_for("#greeting").await.unwrap();
    assert_eq!(browser.text_of("#greeting").await.unwrap(), "Hello, Grace!");
    assert_eq!(*posted.lock().unwrap(), ["Ada <Lovelace>", "Grace"]);
}

#[tokio::test]
async fn a_screenshot_is_a_png_of_the_window() {
    let (base, _) = serve().await;
    let browser = Browser::start().await.unwrap();
    browser.goto(&format!("{base}/accessible")).await.unwrap();

    let path = browser.screenshot("testkit-browser-accessible").await.unwrap();
    assert_eq!(path, trellis_testkit::browser::screenshot_dir().join("testkit-browser-accessible.png"));
    let png = std::fs::read(&path).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", path.display());
    // The header chunk's width: the window's 1280 pixels.
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    assert_eq!(width, 1280, "{}", path.display());

    assert!(browser.screenshot("../outside").await.is_err());
}

#[tokio::test]
async fn dropping_the_browser_ends_chromedriver_and_chromium() {
    let browser = Browser::start().await.unwrap();
    let group = browser.pid() as i32;
    let members = || {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // pid (comm) state ppid pgrp …: the fields after the command's closing parenthesis.
            let Some((_, rest)) = stat.rsplit_once(')') else { continue };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.first() != Some(&"Z") && fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(group) {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        pids
    };
    let running = members();
    assert!(running.len() > 1, "chromedriver started no Chromium in its group: {running:?}");

    drop(browser);
    eventually("the browser's processes to be gone", Duration::from_secs(10), || {
        let left = members();
        async move { left.is_empty().then_some(()) }
    })
    .await;
}
