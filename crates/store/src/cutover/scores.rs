//! `shadow.score_runs` and `shadow.scores`: the score orchestrator's shadow candidate writes its
//! runs here (and nowhere else), and its comparer reads them back beside the primary's
//! `score.runs` and `score.user_scores`.

use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;
use trellis_domain::score::InputDigest;
use uuid::Uuid;

/// A candidate run that succeeded: its record and every user's output.
pub struct CandidateRun<'a> {
    pub id: Uuid,
    pub request_id: Option<Uuid>,
    pub algorithm: &'a str,
    pub host: &'a str,
    pub input_digest: InputDigest,
    pub started_at: OffsetDateTime,
    pub users: &'a [Uuid],
    pub trust: &'a [f64],
    pub scores: &'a [i32],
    pub edges: i64,
}

/// Writes a succeeded candidate run and its scores in one transaction.
pub async fn write_run(
    conn: &mut PgConnection,
    run: &CandidateRun<'_>,
    timeout: std::time::Duration,
) -> Result<(), sqlx::Error> {
    assert!(run.users.len() == run.trust.len() && run.users.len() == run.scores.len(), "one output per user");
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query(&format!("SET LOCAL statement_timeout = {}", timeout.as_millis())).execute(&mut *tx).await?;
    sqlx::query(
        "INSERT INTO shadow.score_runs (id, request_id, status, algorithm, host, input_digest, users, edges, started_at)
         VALUES ($1, $2, 'succeeded', $3, $4, $5, $6, $7, $8)",
    )
    .bind(run.id)
    .bind(run.request_id)
    .bind(run.algorithm)
    .bind(run.host)
    .bind(run.input_digest.as_i64())
    .bind(run.users.len() as i64)
    .bind(run.edges)
    .bind(run.started_at)
    .execute(&mut *tx)
    .await?;
    let mut copy = tx.copy_in_raw("COPY shadow.scores (run_id, user_id, trust, score) FROM STDIN").await?;
    let mut buf = String::with_capacity(1 << 20);
    for ((user, trust), score) in run.users.iter().zip(run.trust).zip(run.scores) {
        use std::fmt::Write as _;
        // `{:?}` of an f64 is its shortest exact round-trip text, as the primary writes it.
        let _ = writeln!(buf, "{}\t{user}\t{trust:?}\t{score}", run.id);
        if buf.len() > (1 << 20) - 128 {
            copy.send(buf.as_bytes()).await?;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        copy.send(buf.as_bytes()).await?;
    }
    copy.finish().await?;
    tx.commit().await
}

/// Records a candidate run that failed (the comparer never looks at it).
pub async fn record_failure(
    db: impl PgExecutor<'_>,
    id: Uuid,
    request_id: Option<Uuid>,
    algorithm: &str,
    host: &str,
    started_at: OffsetDateTime,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO shadow.score_runs (id, request_id, status, algorithm, host, error, started_at)
         VALUES ($1, $2, 'failed', $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(request_id)
    .bind(algorithm)
    .bind(host)
    .bind(error)
    .bind(started_at)
    .execute(db)
    .await?;
    Ok(())
}

/// Whether a candidate run whose snapshot began after `at` has succeeded: it serves a request
/// made at `at`.
pub async fn succeeded_since(db: impl PgExecutor<'_>, at: OffsetDateTime) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM shadow.score_runs WHERE status = 'succeeded' AND started_at > $1)")
        .bind(at)
        .fetch_one(db)
        .await
}

/// A candidate run as the comparer sees it.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct ShadowRun {
    pub id: Uuid,
    pub request_id: Option<Uuid>,
    pub status: String,
    pub algorithm: String,
    pub host: String,
    pub input_digest: Option<i64>,
    pub users: Option<i64>,
    pub edges: Option<i64>,
    pub error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
    pub comparison: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub compared_at: Option<OffsetDateTime>,
    pub primary_run_id: Option<Uuid>,
    pub max_trust_difference: Option<f64>,
}

const COLUMNS: &str = "id, request_id, status, algorithm, host, input_digest, users, edges, error, started_at,
    finished_at, comparison, compared_at, primary_run_id, max_trust_difference";

/// Every candidate run, oldest first.
pub async fn runs(db: impl PgExecutor<'_>) -> Result<Vec<ShadowRun>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM shadow.score_runs ORDER BY started_at, id")).fetch_all(db).await
}

/// The succeeded candidate runs not compared yet, oldest first.
pub async fn uncompared(db: impl PgExecutor<'_>) -> Result<Vec<ShadowRun>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM shadow.score_runs WHERE compared_at IS NULL AND status = 'succeeded' ORDER BY started_at"
    ))
    .fetch_all(db)
    .await
}

/// Locks an uncompared run for the caller's transaction, with how long ago (seconds, by the
/// database's clock) it finished; `None` when it is compared already or another comparer holds it.
pub async fn claim(conn: &mut PgConnection, id: Uuid) -> Result<Option<(ShadowRun, f64)>, sqlx::Error> {
    let row: Option<(Uuid, f64)> = sqlx::query_as(
        "SELECT id, extract(epoch FROM now() - finished_at)::float8 FROM shadow.score_runs
         WHERE id = $1 AND compared_at IS NULL FOR UPDATE SKIP LOCKED",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((id, waited)) = row else { return Ok(None) };
    let run = sqlx::query_as(&format!("SELECT {COLUMNS} FROM shadow.score_runs WHERE id = $1"))
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Some((run, waited)))
}

/// How a candidate run was settled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Settled {
    /// Compared with this primary run.
    Compared { primary_run_id: Uuid, max_trust_difference: Option<f64> },
    /// No primary run on the same input within the wait: recorded as missing.
    Missing,
    /// Its shadow period ended before it was compared: not recorded.
    PeriodEnded,
}

/// Marks a claimed run settled and deletes its scores (its comparisons are now the record).
pub async fn settle(conn: &mut PgConnection, id: Uuid, settled: Settled) -> Result<(), sqlx::Error> {
    let (comparison, primary, max_difference) = match settled {
        Settled::Compared { primary_run_id, max_trust_difference } => {
            ("compared", Some(primary_run_id), max_trust_difference)
        }
        Settled::Missing => ("missing", None, None),
        Settled::PeriodEnded => ("period_ended", None, None),
    };
    sqlx::query(
        "UPDATE shadow.score_runs SET comparison = $2, compared_at = now(), primary_run_id = $3,
             max_trust_difference = $4
         WHERE id = $1",
    )
    .bind(id)
    .bind(comparison)
    .bind(primary)
    .bind(max_difference)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM shadow.scores WHERE run_id = $1").bind(id).execute(&mut *conn).await?;
    Ok(())
}

/// The key of one score comparison recorded under `key_prefix` (a run's comparisons all start
/// with the run's key), if any: how a comparer that stopped between recording a run's
/// comparisons and settling the run finds out, so that it does not record them twice.
pub async fn recorded_key(db: impl PgExecutor<'_>, key_prefix: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT key FROM shadow.comparisons WHERE processor = 'score' AND starts_with(key, $1) ORDER BY id LIMIT 1",
    )
    .bind(key_prefix)
    .fetch_optional(db)
    .await
}

/// A primary run: its id and when it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimaryRun {
    pub id: Uuid,
    pub finished_at: OffsetDateTime,
}

/// One user on whom a candidate run and the primary run differ.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Mismatch {
    pub user_id: Uuid,
    pub primary_trust: f64,
    pub primary_score: i32,
    pub candidate_trust: f64,
    pub candidate_score: i32,
}

/// A candidate run's outputs against a primary run's, user by user.
#[derive(Debug, Clone, PartialEq)]
pub struct Compared {
    pub primary: PrimaryRun,
    /// Users whose score is equal and trust within the tolerance.
    pub matched: i64,
    pub mismatched: i64,
    /// The first mismatched users, by id (at most the limit asked for).
    pub first_mismatches: Vec<Mismatch>,
    /// Users the primary run computed but whose score is no longer stored (suspended, or removed
    /// by a later run): nothing to compare with.
    pub absent: i64,
    /// Users whose stored score a later primary run rewrote: the primary run's value cannot be
    /// proven any more.
    pub superseded: i64,
    /// The largest relative difference of trust among the matched users.
    pub max_trust_difference: Option<f64>,
}

/// Compares candidate run `candidate` with the latest succeeded primary run of the same input
/// (`input_digest` and user count), in one REPEATABLE READ snapshot; `None` when there is no such
/// primary run.
///
/// `score.user_scores` holds, for each user, the value the run in its `run_id` wrote, and runs
/// rewrite only what changed (one at a time, under the lease). So a stored row whose run
/// finished no later than primary run P is exactly P's output for that user (P computed it equal
/// and left it, or wrote it); a row of a later run is not, and a user without a row has none.
pub async fn compare(
    db: &sqlx::PgPool,
    candidate: Uuid,
    input_digest: i64,
    users: i64,
    trust_tolerance: f64,
    limit: i64,
) -> Result<Option<Compared>, sqlx::Error> {
    let mut tx = db.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    let primary: Option<(Uuid, OffsetDateTime)> = sqlx::query_as(
        "SELECT id, finished_at FROM score.runs
         WHERE status = 'succeeded' AND input_digest = $1 AND users = $2
         ORDER BY finished_at DESC LIMIT 1",
    )
    .bind(input_digest)
    .bind(users)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((primary_id, finished_at)) = primary else {
        return Ok(None);
    };
    let verdicts = "WITH verdicts AS (
        SELECT c.user_id, c.trust AS candidate_trust, c.score AS candidate_score,
               s.trust AS primary_trust, s.score AS primary_score,
               CASE WHEN s.user_id IS NULL THEN 'absent'
                    WHEN r.finished_at IS NULL OR r.finished_at > $2 THEN 'superseded'
                    WHEN s.score = c.score AND abs(s.trust - c.trust) <= $3 * greatest(abs(s.trust), abs(c.trust))
                        THEN 'matched'
                    ELSE 'mismatched' END AS verdict
        FROM shadow.scores c
        LEFT JOIN score.user_scores s ON s.user_id = c.user_id
        LEFT JOIN score.runs r ON r.id = s.run_id
        WHERE c.run_id = $1)";
    let (matched, mismatched, absent, superseded, max_trust_difference): (i64, i64, i64, i64, Option<f64>) =
        sqlx::query_as(&format!(
            "{verdicts}
             SELECT count(*) FILTER (WHERE verdict = 'matched'), count(*) FILTER (WHERE verdict = 'mismatched'),
                    count(*) FILTER (WHERE verdict = 'absent'), count(*) FILTER (WHERE verdict = 'superseded'),
                    max(abs(primary_trust - candidate_trust)
                        / NULLIF(greatest(abs(primary_trust), abs(candidate_trust)), 0)) FILTER (WHERE verdict = 'matched')
             FROM verdicts"
        ))
        .bind(candidate)
        .bind(finished_at)
        .bind(trust_tolerance)
        .fetch_one(&mut *tx)
        .await?;
    let first_mismatches = if mismatched > 0 {
        sqlx::query_as(&format!(
            "{verdicts}
             SELECT user_id, primary_trust, primary_score, candidate_trust, candidate_score FROM verdicts
             WHERE verdict = 'mismatched' ORDER BY user_id LIMIT $4"
        ))
        .bind(candidate)
        .bind(finished_at)
        .bind(trust_tolerance)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?
    } else {
        Vec::new()
    };
    tx.commit().await?;
    // Without matched users there is no difference of theirs to report.
    let max_trust_difference = if matched > 0 { Some(max_trust_difference.unwrap_or(0.0)) } else { None };
    Ok(Some(Compared {
        primary: PrimaryRun { id: primary_id, finished_at },
        matched,
        mismatched,
        first_mismatches,
        absent,
        superseded,
        max_trust_difference,
    }))
}
