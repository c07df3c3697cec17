//! One trace from the HTTP request to the workers' effects: the spans that a real `trellis-api`
//! process (request, outbox write, relay publish) and real worker processes (process spans)
//! export over OTLP, collected by the harness's OTLP receiver.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use trellis_testkit::otlp::{OtlpReceiver, Span};
use trellis_testkit::{Process, Spawn, eventually};

use crate::helpers::{Options, TestApp};

/// OTLP span kinds.
const SERVER: i32 = 2;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;

async fn traced_app(otlp: &OtlpReceiver) -> TestApp {
    TestApp::spawn_with(Options { process: true, env: otlp.env("trellis-api"), ..Options::default() }).await
}

/// A worker process (the executor of its processor: the cutover flags name the workers by
/// default) exporting its spans to `otlp`.
async fn traced_worker(app: &TestApp, otlp: &OtlpReceiver, name: &str) -> Process {
    traced_worker_with(app, otlp, name, &[]).await
}

async fn traced_worker_with(app: &TestApp, otlp: &OtlpReceiver, name: &str, extra: &[(&str, &str)]) -> Process {
    let env = otlp.env(name);
    let spawn = Spawn::new(name).on(&app.db.url, &app.prefix).envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    spawn.envs(extra.iter().copied()).ready().await
}

/// A caller's `traceparent`: a new trace id and the caller's span id.
fn caller() -> (String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let span_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    (trace_id, span_id)
}

/// Sets the `search.executor` cutover flag to `value` as an admin, through the API.
async fn set_search_executor(app: &TestApp, value: &str) {
    let root = app.register("root").await;
    app.grant_role(&root, "admin").await;
    let r = app
        .put("/v1/admin/flags/search.executor", Some(&root.token), json!({"value": value, "reason": "trace test"}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

/// alice adds bob as a contact with a caller's `traceparent`; returns the trace id and the id of
/// the `contact_added` event the request wrote.
async fn contact_added_in_a_callers_trace(app: &TestApp) -> (String, uuid::Uuid) {
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let (trace_id, caller_span) = caller();
    let put = app
        .build(Method::PUT, &format!("/v1/me/contacts/{}", bob.id), Some(&alice.token), Some(json!({"label": "x"})))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"));
    let r = app.send(put).await;
    assert!(r.status == 200 || r.status == 201, "{:?}", r.body);
    let event_id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM ops.outbox WHERE subject LIKE '%contact_added%' ORDER BY seq DESC LIMIT 1")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    (trace_id, event_id)
}

/// Whether a span is the search projector's process span of event `event_id`.
fn projector_process_span(event_id: uuid::Uuid) -> impl Fn(&Span) -> bool {
    let event_id = event_id.to_string();
    move |s: &Span| {
        s.kind == CONSUMER
            && s.attr("messaging.consumer.group.name") == Some(search_projector::CONSUMER)
            && s.attr("messaging.message.id") == Some(event_id.as_str())
    }
}

fn one<'a>(spans: &'a [Span], what: &str, pick: impl Fn(&Span) -> bool) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(found.len(), 1, "one {what} in {spans:#?}");
    found[0]
}

#[tokio::test]
async fn a_contact_add_is_one_trace_from_the_request_to_the_search_projector() {
    let otlp = OtlpReceiver::start().await.expect("the OTLP receiver");
    let app = traced_app(&otlp).await;
    let _projector = traced_worker(&app, &otlp, "search-projector").await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let (trace_id, caller_span) = caller();
    let put = app
        .build(Method::PUT, &format!("/v1/me/contacts/{}", bob.id), Some(&alice.token), Some(json!({"label": "x"})))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .header("tracestate", "caller=c1");
    let r = app.send(put).await;
    assert!(r.status == 200 || r.status == 201, "{:?}", r.body);

    // The outbox row carries the request's trace, and the caller's tracestate with it.
    let (event_id, traceparent, tracestate): (uuid::Uuid, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT id, traceparent, tracestate FROM ops.outbox WHERE subject LIKE '%contact_added%' ORDER BY seq DESC LIMIT 1",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    let traceparent = traceparent.expect("the row's traceparent");
    assert!(traceparent.starts_with(&format!("00-{trace_id}-")), "{traceparent}");
    assert_eq!(tracestate.as_deref(), Some("caller=c1"), "the row's tracestate");

    let projected = projector_process_span(event_id);
    let published =
        |s: &Span| s.kind == PRODUCER && s.attr("messaging.message.id") == Some(event_id.to_string().as_str());
    // Each process exports on its own schedule: wait for every span the assertions name.
    let spans = eventually("the request's spans and the projector's process span", Duration::from_secs(30), || {
        let spans = otlp.trace(&trace_id);
        let all = spans.iter().any(&projected)
            && spans.iter().any(published)
            && spans.iter().any(|s| s.kind == SERVER)
            && spans.iter().any(|s| s.name == "outbox write");
        async move { all.then_some(spans) }
    })
    .await;
    let request = one(&spans, "request span", |s| s.kind == SERVER);
    assert_eq!(request.parent_span_id, caller_span, "the caller's traceparent is honoured");
    assert_eq!(request.service, "trellis-api");
    let write = one(&spans, "outbox write", |s| s.name == "outbox write");
    assert_eq!(write.parent_span_id, request.span_id);
    assert_eq!(traceparent, format!("00-{trace_id}-{}-01", write.span_id), "the row carries the outbox write's span");
    let publish = one(&spans, "relay publish", published);
    assert_eq!(publish.parent_span_id, write.span_id);
    assert!(publish.links_to(&trace_id, &write.span_id), "{publish:?}");
    assert_eq!(publish.attr("messaging.system"), Some("nats"));
    let process = one(&spans, "projector process span", &projected);
    assert_eq!(process.service, "search-projector");
    assert_eq!(process.parent_span_id, write.span_id, "a child of the message's context");
    assert!(process.links_to(&trace_id, &write.span_id), "and linked to it: {process:?}");
    assert_eq!(process.attr("messaging.system"), Some("nats"));
    assert_eq!(process.attr("messaging.nats.message.delivery_count"), Some("1"));
    for span in [request, write, publish, process] {
        assert_eq!(span.trace_state, "caller=c1", "the caller's tracestate reaches {}", span.name);
    }
    assert!(process.attr("messaging.destination.name").is_some_and(|d| d.ends_with("contacts.contact_added")));

    // The projector's batch span is linked to the message.
    eventually("the projector's batch span, linked to the message", Duration::from_secs(30), || {
        let linked = otlp.spans().into_iter().any(|s| {
            s.name.starts_with("process batch")
                && s.attr("messaging.consumer.group.name") == Some(search_projector::CONSUMER)
                && s.links_to(&trace_id, &write.span_id)
        });
        async move { linked.then_some(()) }
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_dispute_filing_trace_reaches_the_dispute_processors_decision() {
    let otlp = OtlpReceiver::start().await.expect("the OTLP receiver");
    let app = traced_app(&otlp).await;
    let _processor = traced_worker(&app, &otlp, "dispute-processor").await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let (trace_id, caller_span) = caller();
    let file = app
        .build(
            Method::POST,
            "/v1/disputes",
            Some(&alice.token),
            Some(json!({"target_id": bob.id, "kind": "spam", "description": "details"})),
        )
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"));
    let r = app.send(file).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let dispute = r.body["id"].as_str().unwrap().to_owned();
    let spans =
        eventually("the dispute processor's decision span in the filing's trace", Duration::from_secs(30), || {
            let spans = otlp.trace(&trace_id);
            // Each process exports on its own schedule: wait for every span the assertions name.
            let all = spans.iter().any(|s| s.name == "dispute decision")
                && spans.iter().any(|s| s.kind == SERVER)
                && spans.iter().any(|s| s.name == "outbox write")
                && spans.iter().any(|s| s.kind == CONSUMER && s.service == "dispute-processor");
            async move { all.then_some(spans) }
        })
        .await;
    let request = one(&spans, "request span", |s| s.kind == SERVER);
    assert_eq!(request.parent_span_id, caller_span);
    let write = one(&spans, "outbox write", |s| s.name == "outbox write" && s.parent_span_id == request.span_id);
    let process = one(&spans, "dispute processor process span", |s| {
        s.kind == CONSUMER
            && s.attr("messaging.consumer.group.name").is_some_and(|g| g.starts_with("dispute-processor-"))
    });
    assert_eq!(
        (process.service.as_str(), process.parent_span_id.as_str()),
        ("dispute-processor", write.span_id.as_str())
    );
    let decision = one(&spans, "decision span", |s| s.name == "dispute decision");
    assert_eq!(decision.parent_span_id, process.span_id);
    assert_eq!(decision.attr("trellis.dispute.id"), Some(dispute.as_str()));

    // The processor's batch span (its own trace) is linked to the message.
    eventually("the dispute processor's batch span, linked to the message", Duration::from_secs(30), || {
        let linked = otlp.spans().into_iter().any(|s| {
            s.name.starts_with("process batch")
                && s.service == "dispute-processor"
                && s.attr("messaging.consumer.group.name").is_some_and(|g| g.starts_with("dispute-processor-"))
                && s.links_to(&trace_id, &write.span_id)
        });
        async move { linked.then_some(()) }
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_score_run_asked_for_through_the_api_records_the_requests_trace() {
    let otlp = OtlpReceiver::start().await.expect("the OTLP receiver");
    let app = traced_app(&otlp).await;
    let _orchestrator = traced_worker(&app, &otlp, "score-orchestrator").await;
    // No run ever succeeded: the orchestrator makes one at start-up; the request comes after it.
    eventually("the start-up run", Duration::from_secs(30), || async {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM score.runs WHERE status = 'succeeded'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
        (done > 0).then_some(())
    })
    .await;
    let admin = app.register("root").await;
    app.grant_role(&admin, "admin").await;
    let (trace_id, caller_span) = caller();
    let post = app
        .build(Method::POST, "/v1/admin/score-runs", Some(&admin.token), None)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"));
    let r = app.send(post).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let (trigger, status): (String, String) =
        eventually("a run with the request's trace", Duration::from_secs(30), || {
            let pool = app.db.pool.clone();
            let trace_id = trace_id.clone();
            async move {
                sqlx::query_as("SELECT trigger, status FROM score.runs WHERE trace_id = $1 AND status <> 'running'")
                    .bind(&trace_id)
                    .fetch_optional(&pool)
                    .await
                    .unwrap()
            }
        })
        .await;
    assert_eq!((trigger.as_str(), status.as_str()), ("manual", "succeeded"));
    let run = trellis_store::scores::latest_run(&app.db.pool).await.unwrap().expect("the run");
    assert_eq!(run.trace_id.as_deref(), Some(trace_id.as_str()), "the run record shows it");
    // The orchestrator's process span of the request is in the request's trace.
    eventually("the orchestrator's process span in the request's trace", Duration::from_secs(30), || {
        let found = otlp.trace(&trace_id).iter().any(|s| s.kind == CONSUMER && s.service == "score-orchestrator");
        async move { found.then_some(()) }
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn in_link_mode_a_process_span_starts_its_own_trace_linked_to_the_request() {
    let otlp = OtlpReceiver::start().await.expect("the OTLP receiver");
    let app = traced_app(&otlp).await;
    let _projector = traced_worker_with(&app, &otlp, "search-projector", &[("TRACE_CONSUMER_PARENT", "link")]).await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let (trace_id, caller_span) = caller();
    let put = app
        .build(Method::PUT, &format!("/v1/me/contacts/{}", bob.id), Some(&alice.token), Some(json!({"label": "x"})))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"));
    let r = app.send(put).await;
    assert!(r.status == 200 || r.status == 201, "{:?}", r.body);
    let write = eventually("the request's outbox write", Duration::from_secs(30), || {
        let write = otlp.trace(&trace_id).into_iter().find(|s| s.name == "outbox write");
        async move { write }
    })
    .await;
    let process = eventually("the projector's process span linked to the request", Duration::from_secs(30), || {
        let found = otlp
            .spans()
            .into_iter()
            .find(|s| s.kind == CONSUMER && s.service == "search-projector" && s.links_to(&trace_id, &write.span_id));
        async move { found }
    })
    .await;
    assert_ne!(process.trace_id, trace_id, "a trace of its own");
    assert_eq!(process.parent_span_id, "", "a root span");
    app.stop().await;
}

/// In the monolith executor `trellis-api` runs the search projector itself: the projector's
/// process span is in the request's trace, exported by `trellis-api`, a child of the outbox
/// write's context (the in-process consumer runs on the same runner as the worker).
#[tokio::test]
async fn in_the_monolith_executor_the_apis_own_projector_span_is_in_the_requests_trace() {
    let otlp = OtlpReceiver::start().await.expect("the OTLP receiver");
    let app = traced_app(&otlp).await;
    set_search_executor(&app, "monolith").await;
    let (trace_id, event_id) = contact_added_in_a_callers_trace(&app).await;
    let projected = projector_process_span(event_id);
    let spans = eventually("the API's own projector span in the request's trace", Duration::from_secs(30), || {
        let spans = otlp.trace(&trace_id);
        let all = spans.iter().any(&projected) && spans.iter().any(|s| s.name == "outbox write");
        async move { all.then_some(spans) }
    })
    .await;
    let write = one(&spans, "outbox write", |s| s.name == "outbox write");
    let process = one(&spans, "projector process span", &projected);
    assert_eq!(process.service, "trellis-api", "the API's in-process projector exported it");
    assert_eq!(process.parent_span_id, write.span_id, "a child of the message's context");
    assert!(process.links_to(&trace_id, &write.span_id), "and linked to it: {process:?}");
    app.stop().await;
}

/// During a shadow period with the worker as the primary, `trellis-api` runs the search
/// projector's candidate: the candidate's process span is in the request's trace too, exported
/// by `trellis-api`, beside the worker's.
#[tokio::test]
async fn in_a_shadow_period_the_candidates_process_span_is_in_the_requests_trace() {
    let otlp = OtlpReceiver::start().await.expect("the OTLP receiver");
    let app = traced_app(&otlp).await;
    let _projector = traced_worker(&app, &otlp, "search-projector").await;
    set_search_executor(&app, "shadow").await;
    // The candidate reads new messages only: write once its consumer exists.
    let topology = trellis_runtime::nats::Topology::new(&app.prefix).expect("the test's prefix");
    let candidate = topology.name(&trellis_runtime::cutover::candidate_spec(search_projector::consumer_spec()).name);
    let js = async_nats::jetstream::new(async_nats::connect(&app.nats_url).await.expect("NATS"));
    eventually("the candidate's consumer", Duration::from_secs(30), || {
        let (js, stream, candidate) = (js.clone(), topology.events_stream(), candidate.clone());
        async move {
            let stream = js.get_stream(stream).await.ok()?;
            stream.consumer_info(candidate).await.ok().map(|_| ())
        }
    })
    .await;

    let (trace_id, event_id) = contact_added_in_a_callers_trace(&app).await;
    let processed_by = |service: &'static str| {
        let event_id = event_id.to_string();
        move |s: &Span| {
            s.kind == CONSUMER && s.service == service && s.attr("messaging.message.id") == Some(event_id.as_str())
        }
    };
    let spans = eventually("the primary's and the candidate's process spans", Duration::from_secs(30), || {
        let spans = otlp.trace(&trace_id);
        let all = spans.iter().any(processed_by("trellis-api"))
            && spans.iter().any(processed_by("search-projector"))
            && spans.iter().any(|s| s.name == "outbox write");
        async move { all.then_some(spans) }
    })
    .await;
    let write = one(&spans, "outbox write", |s| s.name == "outbox write");
    let candidate_span = one(&spans, "the candidate's process span", processed_by("trellis-api"));
    assert_eq!(candidate_span.parent_span_id, write.span_id, "a child of the message's context");
    assert!(
        candidate_span.attr("messaging.consumer.group.name").is_some_and(|g| g.ends_with("-shadow")),
        "the candidate's group: {candidate_span:?}"
    );
    let primary = one(&spans, "the worker's process span", processed_by("search-projector"));
    assert_eq!(primary.attr("messaging.consumer.group.name"), Some(search_projector::CONSUMER));
    app.stop().await;
}
