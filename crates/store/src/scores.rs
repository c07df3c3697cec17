//! `score.user_scores`, `score.runs` and `score.scheduler`: what the API reads, and what the
//! score orchestrator loads and writes.

use futures::TryStreamExt;
use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;
use trellis_domain::UserId;
use trellis_domain::score::{InputDigest, RunStatus};
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserScoreRow {
    pub user_id: Uuid,
    pub trust: f64,
    pub score: i32,
    pub run_id: Uuid,
    /// When this value was last computed: the later of the row's own time (it is rewritten
    /// only when it changes) and the last successful run (which computes every active user).
    pub computed_at: OffsetDateTime,
}

pub async fn get(db: impl PgExecutor<'_>, user: UserId) -> Result<Option<UserScoreRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT s.user_id, s.trust, s.score, s.run_id,
                GREATEST(s.computed_at, (SELECT max(finished_at) FROM score.runs WHERE status = 'succeeded')) AS computed_at
         FROM score.user_scores s WHERE s.user_id = $1",
    )
    .bind(user.0)
    .fetch_optional(db)
    .await
}

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct RunRow {
    pub id: Uuid,
    pub trigger: String,
    pub requested_by: Option<Uuid>,
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    pub host: Option<String>,
    pub algorithm: Option<String>,
    pub users: Option<i64>,
    pub edges: Option<i64>,
    pub iterations: Option<i32>,
    pub residual: Option<f64>,
    pub scores_changed: Option<i64>,
    pub load_ms: Option<i64>,
    pub compute_ms: Option<i64>,
    pub write_ms: Option<i64>,
    pub error: Option<String>,
    /// The digest of the run's input ([`trellis_domain::score::InputDigest`]; none for runs
    /// recorded before digests), shown as 16 hex digits.
    #[serde(serialize_with = "digest_hex")]
    pub input_digest: Option<i64>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// The trace id of the request that asked for the run, if a traced request did.
    pub trace_id: Option<String>,
    /// The trace ids of the requests coalesced into the run.
    pub linked_trace_ids: Option<Vec<String>>,
}

const RUN_COLUMNS: &str = "id, trigger, requested_by, status, host, algorithm, users, edges, iterations, residual,
    scores_changed, load_ms, compute_ms, write_ms, error, input_digest, created_at, started_at, finished_at, trace_id,
    linked_trace_ids";

/// An input digest as operators see it: its 64 bits in hex.
pub fn digest_text(digest: i64) -> String {
    format!("{:016x}", digest as u64)
}

fn digest_hex<S: serde::Serializer>(digest: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match digest {
        Some(d) => s.serialize_str(&digest_text(*d)),
        None => s.serialize_none(),
    }
}

pub async fn get_run(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<RunRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {RUN_COLUMNS} FROM score.runs WHERE id = $1")).bind(id).fetch_optional(db).await
}

/// The newest run created at or after `since`, if any.
pub async fn first_run_since(db: impl PgExecutor<'_>, since: OffsetDateTime) -> Result<Option<RunRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {RUN_COLUMNS} FROM score.runs WHERE created_at >= $1 ORDER BY created_at LIMIT 1"))
        .bind(since)
        .fetch_optional(db)
        .await
}

/// Every run, in the order they started.
pub async fn runs(db: impl PgExecutor<'_>) -> Result<Vec<RunRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {RUN_COLUMNS} FROM score.runs ORDER BY started_at, id")).fetch_all(db).await
}

pub async fn latest_run(db: impl PgExecutor<'_>) -> Result<Option<RunRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {RUN_COLUMNS} FROM score.runs ORDER BY created_at DESC LIMIT 1"))
        .fetch_optional(db)
        .await
}

pub async fn last_success(db: impl PgExecutor<'_>) -> Result<Option<OffsetDateTime>, sqlx::Error> {
    sqlx::query_scalar("SELECT max(finished_at) FROM score.runs WHERE status = 'succeeded'").fetch_one(db).await
}

/// Whether a run that started after `at` has succeeded: its snapshot reflects everything
/// committed before `at`, so it serves a request made at `at`.
pub async fn succeeded_since(db: impl PgExecutor<'_>, at: OffsetDateTime) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM score.runs WHERE status = 'succeeded' AND started_at > $1)")
        .bind(at)
        .fetch_one(db)
        .await
}

/// Records that a run is wanted. Returns nothing: whoever holds (or next takes) the lease runs it.
pub async fn request_run(
    db: impl PgExecutor<'_>,
    trigger: &str,
    requested_by: Option<Uuid>,
) -> Result<(), sqlx::Error> {
    request_traced_run(db, trigger, requested_by, None).await
}

/// The most trace ids of coalesced requests a run keeps.
pub const MAX_LINKED_TRACES: i32 = 100;

/// [`request_run`] by a request of trace `trace_id`: the trace of the run's first request
/// becomes the run's, those of the requests coalesced into it its links (at most
/// [`MAX_LINKED_TRACES`]).
pub async fn request_traced_run(
    db: impl PgExecutor<'_>,
    trigger: &str,
    requested_by: Option<Uuid>,
    trace_id: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE score.scheduler SET run_pending = true,
             pending_trigger = CASE WHEN run_pending THEN pending_trigger ELSE $1 END,
             pending_requested_by = CASE WHEN run_pending THEN pending_requested_by ELSE $2 END,
             pending_since = CASE WHEN run_pending THEN pending_since ELSE now() END,
             pending_trace_id = CASE WHEN run_pending THEN pending_trace_id ELSE $3 END,
             pending_linked_trace_ids = CASE
                 WHEN NOT run_pending THEN NULL
                 WHEN $3 IS NULL OR cardinality(COALESCE(pending_linked_trace_ids, '{}')) >= $4
                     THEN pending_linked_trace_ids
                 ELSE array_append(COALESCE(pending_linked_trace_ids, '{}'), $3::text)
             END
         WHERE id = 1",
    )
    .bind(trigger)
    .bind(requested_by)
    .bind(trace_id)
    .bind(MAX_LINKED_TRACES)
    .execute(db)
    .await?;
    Ok(())
}

/// Takes the pending request, if any: `(trigger, requested_by)`.
/// Takes the pending run request and records the run that serves it, in one statement: a
/// process that dies right after cannot lose the request (the run it recorded is `running`, and
/// [`fail_abandoned_runs`] hands its request back). `None` when no request is pending.
pub async fn start_pending_run(
    conn: &mut PgConnection,
    id: Uuid,
    host: &str,
    algorithm: &str,
) -> Result<Option<(String, Option<Uuid>)>, sqlx::Error> {
    sqlx::query_as(
        "WITH old AS (
             SELECT pending_trigger, pending_requested_by, pending_trace_id, pending_linked_trace_ids
             FROM score.scheduler WHERE id = 1 AND run_pending FOR UPDATE
         ), taken AS (
             UPDATE score.scheduler s SET run_pending = false, pending_trigger = NULL, pending_requested_by = NULL,
                 pending_since = NULL, pending_trace_id = NULL, pending_linked_trace_ids = NULL
             FROM old WHERE s.id = 1
             RETURNING COALESCE(old.pending_trigger, 'manual') AS trigger, old.pending_requested_by AS requested_by,
                 old.pending_trace_id AS trace_id, old.pending_linked_trace_ids AS linked_trace_ids
         )
         INSERT INTO score.runs (id, trigger, requested_by, status, host, algorithm, started_at, trace_id,
             linked_trace_ids)
         SELECT $1, trigger, requested_by, 'running', $2, $3, now(), trace_id, linked_trace_ids FROM taken
         RETURNING trigger, requested_by",
    )
    .bind(id)
    .bind(host)
    .bind(algorithm)
    .fetch_optional(conn)
    .await
}

pub async fn is_run_pending(db: impl PgExecutor<'_>) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT run_pending FROM score.scheduler WHERE id = 1").fetch_one(db).await
}

/// Whether a lease holder has work: a pending request, or a run recorded `running` (in progress
/// under another replica's lease, or abandoned by a replica that died, which only the next lease
/// holder can tell apart and hand back as a pending request).
pub async fn needs_lease_holder(db: impl PgExecutor<'_>) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT (SELECT run_pending FROM score.scheduler WHERE id = 1)
             OR EXISTS (SELECT 1 FROM score.runs WHERE status = 'running')",
    )
    .fetch_one(db)
    .await
}

/// The one-run-at-a-time lease: a session advisory lock, so a replica that dies (its
/// connection closes) frees it at once.
pub const LEASE_KEY: i64 = 0x7472_656c_6c69_7331; // "trellis1"

pub async fn try_lease(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(LEASE_KEY).fetch_one(conn).await
}

pub async fn release_lease(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_unlock($1)").bind(LEASE_KEY).execute(conn).await?;
    Ok(())
}

/// Runs left `running` by a replica that died: only called with the lease held, when no run
/// can be running. Each is marked failed, and the request it was serving is pending again (unless
/// another one already is), so that the next run serves it.
pub async fn fail_abandoned_runs(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    type Abandoned = (String, Option<Uuid>, Option<String>, Option<Vec<String>>);
    let abandoned: Vec<Abandoned> = sqlx::query_as(
        "UPDATE score.runs SET status = 'failed', finished_at = now(),
             error = 'abandoned: the replica running it stopped before it finished'
         WHERE status = 'running' RETURNING trigger, requested_by, trace_id, linked_trace_ids",
    )
    .fetch_all(&mut *conn)
    .await?;
    if let Some((trigger, requested_by, trace_id, linked)) = abandoned.last() {
        sqlx::query(
            "UPDATE score.scheduler SET run_pending = true, pending_trigger = $1, pending_requested_by = $2,
                 pending_since = now(), pending_trace_id = $3, pending_linked_trace_ids = $4
             WHERE id = 1 AND NOT run_pending",
        )
        .bind(trigger)
        .bind(requested_by)
        .bind(trace_id)
        .bind(linked)
        .execute(conn)
        .await?;
    }
    Ok(abandoned.len() as u64)
}

pub async fn fail_run(db: impl PgExecutor<'_>, id: Uuid, error: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE score.runs SET status = 'failed', error = $2, finished_at = now() WHERE id = $1 AND status = 'running'",
    )
    .bind(id)
    .bind(error)
    .execute(db)
    .await?;
    Ok(())
}

/// Where the edges of a loaded graph go, as they stream in (20M edges are not kept twice).
pub trait GraphSink {
    /// Called once, before any edge: the node count and an estimate of the edge count.
    fn nodes(&mut self, count: usize, edge_estimate: usize);
    /// An edge between active users, in dense indices.
    fn edge(&mut self, from: u32, to: u32);
}

/// The nodes of one consistent snapshot, in dense indices `0..n` ordered by user id.
pub struct LoadedGraph {
    pub users: Vec<Uuid>,
    pub verified: Vec<bool>,
    /// Edges streamed to the sink.
    pub edges: usize,
    /// Upheld disputes in the last 365 days, per node.
    pub upheld: Vec<u32>,
    /// The digest of everything above (users, verified, edges, upheld counts): equal digests,
    /// equal inputs.
    pub input_digest: InputDigest,
    /// When the snapshot's transaction began (by the database's clock): everything committed
    /// before then is in it.
    pub snapshot_at: OffsetDateTime,
    /// The stored score and trust of each node that has one (all `None` for [`load_input`]).
    pub current: Vec<Option<(i32, f64)>>,
    /// Stored scores of users who are not active: to remove (empty for [`load_input`]).
    pub stale: Vec<Uuid>,
}

/// Loads the graph and the stored scores from one REPEATABLE READ snapshot with COPY, for a
/// run that writes what changed. User ids are mapped to dense indices here rather than joined
/// in SQL: a plain binary COPY of the contact table is the cheapest way to read 20M edges out
/// of PostgreSQL.
pub async fn load_graph(
    conn: &mut PgConnection,
    timeout: std::time::Duration,
    sink: &mut impl GraphSink,
) -> Result<LoadedGraph, sqlx::Error> {
    load(conn, timeout, sink, true).await
}

/// Loads the graph like [`load_graph`], without the stored scores: the input of a shadow
/// candidate's run, which writes all of its scores elsewhere.
pub async fn load_input(
    conn: &mut PgConnection,
    timeout: std::time::Duration,
    sink: &mut impl GraphSink,
) -> Result<LoadedGraph, sqlx::Error> {
    load(conn, timeout, sink, false).await
}

async fn load(
    conn: &mut PgConnection,
    timeout: std::time::Duration,
    sink: &mut impl GraphSink,
    with_current: bool,
) -> Result<LoadedGraph, sqlx::Error> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    sqlx::query(&format!("SET LOCAL statement_timeout = {}", timeout.as_millis())).execute(&mut *tx).await?;
    let edge_estimate: f64 = sqlx::query_scalar(
        "SELECT GREATEST(reltuples, 0)::float8 FROM pg_class WHERE oid = 'contacts.contacts'::regclass",
    )
    .fetch_one(&mut *tx)
    .await?;
    // The transaction's start: no later than its snapshot, so anything committed before it is in.
    let snapshot_at: OffsetDateTime = sqlx::query_scalar("SELECT now()").fetch_one(&mut *tx).await?;

    let mut digest = InputDigest::new();
    let mut users = Vec::new();
    let mut verified = Vec::new();
    copy_lines(
        &mut tx,
        "COPY (SELECT id, verified FROM identity.users WHERE status = 'active' ORDER BY id) TO STDOUT",
        |line| {
            let (id, v) = line.split_once('\t').ok_or("id\tverified")?;
            let id = Uuid::parse_str(id).map_err(|_| "uuid")?;
            digest.add_user(id, v == "t");
            users.push(id);
            verified.push(v == "t");
            Ok(())
        },
    )
    .await?;
    let n = users.len();
    let index: std::collections::HashMap<Uuid, u32> = users.iter().enumerate().map(|(i, u)| (*u, i as u32)).collect();
    // 5% headroom over the planner's estimate, so the edge list is allocated once.
    sink.nodes(n, (edge_estimate * 1.05) as usize);

    let mut edges = 0usize;
    copy_uuid_pairs(
        &mut tx,
        "COPY (SELECT owner_id, contact_id FROM contacts.contacts) TO STDOUT (FORMAT binary)",
        |a, b| {
            // Edges touching a suspended user are not in the graph.
            if let (Some(&from), Some(&to)) = (index.get(&a), index.get(&b)) {
                sink.edge(from, to);
                digest.add_edge(from, to);
                edges += 1;
            }
        },
    )
    .await?;

    let mut upheld = vec![0u32; n];
    copy_lines(
        &mut tx,
        "COPY (SELECT target_id, count(*) FROM security.disputes
               WHERE status = 'upheld' AND decided_at > now() - interval '365 days' GROUP BY target_id) TO STDOUT",
        |line| {
            let (id, k) = line.split_once('\t').ok_or("target\tcount")?;
            if let Some(&i) = index.get(&Uuid::parse_str(id).map_err(|_| "uuid")?) {
                let k = k.parse().map_err(|_| "count")?;
                digest.add_upheld(i, k);
                upheld[i as usize] = k;
            }
            Ok(())
        },
    )
    .await?;
    let mut current = vec![None; n];
    let mut stale = Vec::new();
    if with_current {
        copy_lines(&mut tx, "COPY (SELECT user_id, score, trust FROM score.user_scores) TO STDOUT", |line| {
            let mut parts = line.split('\t');
            let id = Uuid::parse_str(parts.next().ok_or("user")?).map_err(|_| "uuid")?;
            let score: i32 = parts.next().ok_or("score")?.parse().map_err(|_| "score")?;
            let trust: f64 = parts.next().ok_or("trust")?.parse().map_err(|_| "trust")?;
            match index.get(&id) {
                Some(&i) => current[i as usize] = Some((score, trust)),
                None => stale.push(id),
            }
            Ok(())
        })
        .await?;
    }
    tx.commit().await?;
    Ok(LoadedGraph { users, verified, edges, upheld, input_digest: digest, snapshot_at, current, stale })
}

/// Streams a binary `COPY … TO STDOUT` of rows of two non-null uuids into `each`.
async fn copy_uuid_pairs(
    conn: &mut PgConnection,
    statement: &str,
    mut each: impl FnMut(Uuid, Uuid),
) -> Result<(), sqlx::Error> {
    // Binary COPY: an 11-byte signature, a 4-byte flags field and a 4-byte header extension
    // length; then per row a 2-byte field count and, per field, a 4-byte length and the bytes;
    // a field count of -1 ends the data.
    const HEADER: usize = 11 + 4 + 4;
    const ROW: usize = 2 + 2 * (4 + 16);
    let bad = |what: &str| sqlx::Error::Protocol(format!("unexpected binary COPY data: {what}"));
    let mut stream = conn.copy_out_raw(statement).await?;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut header_done = false;
    let mut ended = false;
    while let Some(chunk) = stream.try_next().await? {
        buf.extend_from_slice(&chunk);
        let mut at = 0;
        if !header_done {
            if buf.len() < HEADER {
                continue;
            }
            if &buf[..11] != b"PGCOPY\n\xff\r\n\0" {
                return Err(bad("signature"));
            }
            let extension = u32::from_be_bytes(buf[15..19].try_into().expect("4 bytes")) as usize;
            at = HEADER + extension;
            header_done = true;
        }
        while buf.len() >= at + 2 {
            let fields = i16::from_be_bytes([buf[at], buf[at + 1]]);
            if fields == -1 {
                ended = true;
                at += 2;
                break;
            }
            if fields != 2 {
                return Err(bad("field count"));
            }
            if buf.len() < at + ROW {
                break;
            }
            let field = |offset: usize| -> Result<Uuid, sqlx::Error> {
                let len = i32::from_be_bytes(buf[offset..offset + 4].try_into().expect("4 bytes"));
                if len != 16 {
                    return Err(bad("uuid length"));
                }
                Ok(Uuid::from_bytes(buf[offset + 4..offset + 20].try_into().expect("16 bytes")))
            };
            let (a, b) = (field(at + 2)?, field(at + 22)?);
            each(a, b);
            at += ROW;
        }
        buf.drain(..at.min(buf.len()));
    }
    if !ended {
        return Err(bad("no end-of-data marker"));
    }
    Ok(())
}

/// Streams a `COPY … TO STDOUT` (text format) line by line into `each`.
async fn copy_lines(
    conn: &mut PgConnection,
    statement: &str,
    mut each: impl FnMut(&str) -> Result<(), &'static str>,
) -> Result<(), sqlx::Error> {
    let mut stream = conn.copy_out_raw(statement).await?;
    let mut partial: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.try_next().await? {
        partial.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(end) = partial[start..].iter().position(|&b| b == b'\n') {
            let line = std::str::from_utf8(&partial[start..start + end])
                .map_err(|e| sqlx::Error::Protocol(format!("COPY output is not UTF-8: {e}")))?;
            each(line).map_err(|what| sqlx::Error::Protocol(format!("unexpected COPY line ({what}): {line:?}")))?;
            start += end + 1;
        }
        partial.drain(..start);
    }
    Ok(())
}

/// One user's new value.
pub struct NewScore {
    pub user_id: Uuid,
    pub trust: f64,
    pub score: i32,
}

/// What a run writes, all in one transaction so that its results become visible together.
pub struct RunResult<'a> {
    pub run_id: Uuid,
    pub changed: &'a [NewScore],
    /// Users with a stored score who are no longer active (as of the snapshot).
    pub stale: &'a [Uuid],
    pub users: i64,
    pub edges: i64,
    pub iterations: i32,
    pub residual: f64,
    pub load_ms: i64,
    pub compute_ms: i64,
    /// The digest of the run's input.
    pub input_digest: InputDigest,
}

/// Writes the changed scores and removes the scores of users no longer active, in the caller's
/// transaction, whose statements may take `timeout` each from here on.
pub async fn write_scores(
    tx: &mut PgConnection,
    result: &RunResult<'_>,
    timeout: std::time::Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("SET LOCAL statement_timeout = {}", timeout.as_millis())).execute(&mut *tx).await?;
    sqlx::query(
        "CREATE TEMP TABLE score_new (user_id uuid NOT NULL, trust float8 NOT NULL, score int NOT NULL) ON COMMIT DROP",
    )
    .execute(&mut *tx)
    .await?;
    let mut copy = tx.copy_in_raw("COPY score_new FROM STDIN").await?;
    let mut buf = String::with_capacity(1 << 20);
    for s in result.changed {
        use std::fmt::Write as _;
        // `{:?}` of an f64 is its shortest exact round-trip text: no precision is lost.
        let _ = writeln!(buf, "{}\t{:?}\t{}", s.user_id, s.trust, s.score);
        if buf.len() > (1 << 20) - 128 {
            copy.send(buf.as_bytes()).await?;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        copy.send(buf.as_bytes()).await?;
    }
    copy.finish().await?;
    sqlx::query(
        "INSERT INTO score.user_scores (user_id, trust, score, run_id, computed_at)
         SELECT n.user_id, n.trust, n.score, $1, now() FROM score_new n
         JOIN identity.users u ON u.id = n.user_id AND u.status = 'active'
         ON CONFLICT (user_id) DO UPDATE SET trust = EXCLUDED.trust, score = EXCLUDED.score,
             run_id = EXCLUDED.run_id, computed_at = EXCLUDED.computed_at",
    )
    .bind(result.run_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "DELETE FROM score.user_scores WHERE user_id = ANY($1)
             OR user_id IN (SELECT id FROM identity.users WHERE status <> 'active')",
    )
    .bind(result.stale)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Marks the run succeeded with its figures, `write_ms` its write phase so far, in the
/// transaction that wrote its scores.
pub async fn mark_succeeded(tx: &mut PgConnection, result: &RunResult<'_>, write_ms: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE score.runs SET status = 'succeeded', users = $2, edges = $3, iterations = $4, residual = $5,
             scores_changed = $6, load_ms = $7, compute_ms = $8, write_ms = $9, input_digest = $10, finished_at = now()
         WHERE id = $1",
    )
    .bind(result.run_id)
    .bind(result.users)
    .bind(result.edges)
    .bind(result.iterations)
    .bind(result.residual)
    .bind(result.changed.len() as i64)
    .bind(result.load_ms)
    .bind(result.compute_ms)
    .bind(write_ms)
    .bind(result.input_digest.as_i64())
    .execute(tx)
    .await?;
    Ok(())
}

/// Mean wall-clock duration (seconds) of the runs that finished in the last 24 hours, as the
/// score-batch-duration stage trigger measures it; `None` without such a run.
pub async fn mean_run_seconds_last_day(db: impl PgExecutor<'_>) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT avg(extract(epoch FROM finished_at - started_at))::float8 FROM score.runs
         WHERE finished_at > now() - interval '24 hours' AND started_at IS NOT NULL",
    )
    .fetch_one(db)
    .await
}
