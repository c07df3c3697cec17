//! The dispute processor's shadow candidate: the filings it received (`shadow.dispute_inputs`),
//! the primary's decisions it compares with, and its own decisions
//! (`shadow.dispute_decisions`). Nothing here writes outside the `shadow` schema.

use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;
use uuid::Uuid;

use trellis_domain::adjudication::Facts;

use crate::disputes::{self, FactsClock};

/// Records the filings the candidate received; one already recorded is left as it is.
pub async fn record_inputs(db: impl PgExecutor<'_>, ids: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO shadow.dispute_inputs (dispute_id) SELECT * FROM UNNEST($1::uuid[]) ON CONFLICT (dispute_id) DO NOTHING",
    )
    .bind(ids)
    .execute(db)
    .await?;
    Ok(())
}

/// The primary's first decision on a dispute.
#[derive(Debug, Clone)]
pub struct PrimaryDecision {
    /// `security.dispute_decisions.id`.
    pub id: i64,
    /// A moderator's (the processor never judged the dispute).
    pub by_moderator: bool,
    pub status: String,
    pub rule: String,
    pub reasons: serde_json::Value,
    pub decided_at: OffsetDateTime,
    /// The transaction that recorded it (as text); `None` for decisions recorded before the
    /// transaction was.
    pub xact: Option<String>,
    /// The clock and snapshot of its facts; `None` for a moderator's, and for decisions recorded
    /// before they were.
    pub facts: Option<FactsClock>,
}

/// A received filing that is ready to compare.
#[derive(Debug, Clone)]
pub struct Input {
    pub dispute_id: Uuid,
    pub received_at: OffsetDateTime,
    /// `None`: the primary has not decided it, and it is overdue.
    pub primary: Option<PrimaryDecision>,
}

#[derive(sqlx::FromRow)]
struct InputRow {
    dispute_id: Uuid,
    received_at: OffsetDateTime,
    decision_id: Option<i64>,
    by_moderator: Option<bool>,
    status: Option<String>,
    rule: Option<String>,
    reasons: Option<serde_json::Value>,
    decided_at: Option<OffsetDateTime>,
    xact: Option<String>,
    facts_at: Option<OffsetDateTime>,
    facts_snapshot: Option<String>,
}

/// Locks (skipping those another comparer holds) up to `limit` uncompared inputs received
/// since `since` that are ready: the primary has decided them, or they were received more than
/// `overdue_after` ago. Each comes with the primary's first decision on it.
pub async fn claim_ready(
    conn: &mut PgConnection,
    since: OffsetDateTime,
    overdue_after: std::time::Duration,
    limit: i64,
) -> Result<Vec<Input>, sqlx::Error> {
    let rows: Vec<InputRow> = sqlx::query_as(
        "SELECT i.dispute_id, i.received_at, f.id AS decision_id, f.decided_by IS NOT NULL AS by_moderator, f.status,
             f.rule, f.reasons, f.decided_at, f.xact::text AS xact, f.facts_at, f.facts_snapshot::text AS facts_snapshot
         FROM shadow.dispute_inputs i
         LEFT JOIN LATERAL (SELECT x.id, x.decided_by, x.status, x.rule, x.reasons, x.decided_at, x.xact, x.facts_at,
                                   x.facts_snapshot
                            FROM security.dispute_decisions x WHERE x.dispute_id = i.dispute_id
                            ORDER BY x.id LIMIT 1) f ON true
         WHERE i.compared_at IS NULL AND i.received_at >= $1 AND (f.id IS NOT NULL OR i.received_at < now() - make_interval(secs => $2))
         ORDER BY i.received_at, i.dispute_id
         LIMIT $3
         FOR UPDATE OF i SKIP LOCKED",
    )
    .bind(since)
    .bind(overdue_after.as_secs_f64())
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let primary = match (r.decision_id, r.status, r.rule, r.reasons, r.decided_at) {
                (Some(id), Some(status), Some(rule), Some(reasons), Some(decided_at)) => Some(PrimaryDecision {
                    id,
                    by_moderator: r.by_moderator.unwrap_or(false),
                    status,
                    rule,
                    reasons,
                    decided_at,
                    xact: r.xact,
                    facts: match (r.facts_at, r.facts_snapshot) {
                        (Some(at), Some(snapshot)) => Some(FactsClock { at, snapshot }),
                        _ => None,
                    },
                }),
                _ => None,
            };
            Input { dispute_id: r.dispute_id, received_at: r.received_at, primary }
        })
        .collect())
}

/// One automatic decision of a batch of the primary's, with its dispute's target.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BatchDecision {
    pub dispute_id: Uuid,
    pub target_id: Uuid,
    pub decided_at: OffsetDateTime,
}

/// The automatic decisions the transaction `xact` recorded, in the order it made them. A
/// batch's decisions are recorded by one statement between its facts' clock and a microsecond
/// per decision after its first (`record_auto_decisions`): `from` and `to` bound that range,
/// and so the index scan.
pub async fn batch_decisions(
    conn: &mut PgConnection,
    xact: &str,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Result<Vec<BatchDecision>, sqlx::Error> {
    sqlx::query_as(
        "SELECT x.dispute_id, d.target_id, x.decided_at
         FROM security.dispute_decisions x JOIN security.disputes d ON d.id = x.dispute_id
         WHERE x.decided_at BETWEEN $2 AND $3 AND x.xact = $1::xid8 AND x.decided_by IS NULL
         ORDER BY x.decided_at, x.id",
    )
    .bind(xact)
    .bind(from)
    .bind(to)
    .fetch_all(conn)
    .await
}

/// Of `ids` (disputes undecided in a batch's facts), those another transaction had already
/// taken when the batch locked the disputes it upheld with one of its own: a transaction that
/// was not visible in the batch's snapshot, started before `before` (the batch's first
/// decision) and decided them. The batch's `FOR UPDATE SKIP LOCKED` passed over those.
pub async fn taken_elsewhere(
    conn: &mut PgConnection,
    ids: &[Uuid],
    xact: &str,
    snapshot: &str,
    before: OffsetDateTime,
) -> Result<Vec<Uuid>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        "SELECT DISTINCT x.dispute_id FROM security.dispute_decisions x
         WHERE x.dispute_id = ANY($1) AND x.xact <> $2::xid8 AND NOT pg_visible_in_snapshot(x.xact, $3::pg_snapshot)
           AND coalesce(x.facts_at, x.decided_at) < $4",
    )
    .bind(ids)
    .bind(xact)
    .bind(snapshot)
    .bind(before)
    .fetch_all(conn)
    .await
}

/// One decision of the candidate's.
#[derive(Debug, Clone)]
pub struct CandidateDecision {
    pub dispute_id: Uuid,
    pub status: String,
    pub rule: String,
    pub rules_version: String,
    pub reasons: serde_json::Value,
    /// The primary's decision it was compared with.
    pub primary_decision_id: i64,
    /// The clock of the facts it judged (the primary's).
    pub facts_at: OffsetDateTime,
}

/// Records the candidate's decisions (a dispute already recorded keeps its first) and marks
/// `compared` as compared.
pub async fn record_outputs(
    conn: &mut PgConnection,
    decisions: &[CandidateDecision],
    compared: &[Uuid],
) -> Result<(), sqlx::Error> {
    if !decisions.is_empty() {
        let ids: Vec<Uuid> = decisions.iter().map(|d| d.dispute_id).collect();
        let statuses: Vec<&str> = decisions.iter().map(|d| d.status.as_str()).collect();
        let rules: Vec<&str> = decisions.iter().map(|d| d.rule.as_str()).collect();
        let versions: Vec<&str> = decisions.iter().map(|d| d.rules_version.as_str()).collect();
        let reasons: Vec<&serde_json::Value> = decisions.iter().map(|d| &d.reasons).collect();
        let primaries: Vec<i64> = decisions.iter().map(|d| d.primary_decision_id).collect();
        let facts_at: Vec<OffsetDateTime> = decisions.iter().map(|d| d.facts_at).collect();
        sqlx::query(
            "INSERT INTO shadow.dispute_decisions
                 (dispute_id, status, rule, rules_version, reasons, primary_decision_id, facts_at)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::bigint[],
                                  $7::timestamptz[])
             ON CONFLICT (dispute_id) DO NOTHING",
        )
        .bind(&ids)
        .bind(&statuses)
        .bind(&rules)
        .bind(&versions)
        .bind(&reasons)
        .bind(&primaries)
        .bind(&facts_at)
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query("UPDATE shadow.dispute_inputs SET compared_at = now() WHERE dispute_id = ANY($1)")
        .bind(compared)
        .execute(conn)
        .await?;
    Ok(())
}

/// A batch of the processor's whose facts are read again: its clock and snapshot, and its
/// transaction (`security.dispute_decisions.xact`, as text), whose own decisions came after
/// its facts.
#[derive(Debug, Clone, Copy)]
pub struct AsOf<'a> {
    pub clock: &'a FactsClock,
    pub xact: &'a str,
}

/// What [`gather_facts_as_of`] read.
#[derive(Debug)]
pub struct GatheredAsOf {
    pub facts: Vec<Facts>,
    /// The disputes whose facts read a trust score written after the batch's snapshot. Scores
    /// keep no history, so those facts cannot be read again as they were.
    pub rescored: Vec<Uuid>,
}

/// The facts of `ids` as a past batch of the processor read them: the processor's statement
/// (`disputes::gather_facts`), each table replaced by that table as the batch's snapshot saw
/// it, and the batch's clock. The two must agree on what they read: the dispute processor's
/// shadow tests replay its batches with the production rules and match every decision.
pub async fn gather_facts_as_of(
    conn: &mut PgConnection,
    ids: &[Uuid],
    as_of: AsOf<'_>,
) -> Result<GatheredAsOf, sqlx::Error> {
    let sql = facts_as_of_statement();
    let rows = disputes::facts_query(&sql, ids)
        .bind(as_of.clock.at)
        .bind(&as_of.clock.snapshot)
        .bind(as_of.xact)
        .fetch_all(conn)
        .await?;
    let rescored = rows
        .iter()
        .filter(|r| r.scores_seen == Some(false) || r.against_target.0.iter().any(|o| !o.score_seen))
        .map(|r| r.id)
        .collect();
    Ok(GatheredAsOf { facts: disputes::decode_facts(rows)?, rescored })
}

/// The facts statement as a past batch read them ($5 its clock, $6 its snapshot, $7 its
/// transaction). A decision or a filing is in them when its transaction is visible in the
/// snapshot (a row written before transactions were recorded, when it is older than the clock);
/// the batch's own decisions came after them. A user's status and role are read from the user
/// administration audit, which records every change of them in commit order: as the snapshot
/// saw them, they are what the earliest change it did not see changed them from, or, when it
/// saw every change, what they are now. (The batch's own suspensions came after its facts: its
/// in-batch overlay applies them.)
fn facts_as_of_statement() -> String {
    // The value before the earliest change of `actions` to user `u` that the snapshot did not
    // see, as `expr` of the audit row `a`; NULL when it saw every change. A snapshot does not
    // list its own transaction as in progress, so the batch's own changes are excluded by id.
    let before_unseen = |u: &str, actions: &str, expr: &str| {
        format!(
            "(SELECT {expr} FROM identity.user_admin_audit a
              WHERE a.user_id = {u}.id AND a.action IN ({actions})
                AND (a.xact = $7::xid8 OR NOT pg_visible_in_snapshot(a.xact, $6::pg_snapshot))
              ORDER BY a.id LIMIT 1)"
        )
    };
    let suspended = |u: &str| {
        format!(
            "coalesce({}, {u}.status = 'suspended')",
            before_unseen(u, "'suspend', 'reinstate'", "a.from_value = 'suspended'")
        )
    };
    let (reporter_suspended, target_suspended) = (suspended("ru"), suspended("tu"));
    let target_role = format!("coalesce({}, tu.role)", before_unseen("tu", "'grant_role'", "a.from_value"));
    format!(
        "WITH clock AS (SELECT $5::timestamptz AS now, $6::text AS snapshot),
         visible_decisions AS NOT MATERIALIZED (
             SELECT x.id, x.dispute_id, x.status, x.decided_at FROM security.dispute_decisions x
             WHERE x.xact IS DISTINCT FROM $7::xid8
               AND CASE WHEN x.xact IS NULL THEN x.decided_at < $5
                        ELSE pg_visible_in_snapshot(x.xact, $6::pg_snapshot) END
         ), disputes_as_of AS NOT MATERIALIZED (
             SELECT o.id, o.reporter_id, o.target_id, o.kind, o.created_at,
                 coalesce(v.status, 'pending') AS status, v.decided_at
             FROM security.disputes o
             LEFT JOIN LATERAL (SELECT x.status, x.decided_at FROM visible_decisions x WHERE x.dispute_id = o.id
                                ORDER BY x.decided_at DESC, x.id DESC LIMIT 1) v ON true
             WHERE CASE WHEN o.filed_xact IS NULL THEN o.created_at < $5
                        ELSE pg_visible_in_snapshot(o.filed_xact, $6::pg_snapshot) END
         )
         SELECT d.id, d.reporter_id, d.target_id, d.kind, d.created_at, clock.now, clock.snapshot,
             {reporter_suspended} AS reporter_suspended, {target_suspended} AS target_suspended,
             {target_role} AS target_role, rs.score AS reporter_score, ts.score AS target_score,
             (rs.user_id IS NULL OR shadow.xmin_visible_in(rs.xmin, $6::pg_snapshot))
                 AND (ts.user_id IS NULL OR shadow.xmin_visible_in(ts.xmin, $6::pg_snapshot)) AS scores_seen,
             (SELECT coalesce(jsonb_agg(jsonb_build_object('id', o.id, 'reporter_id', o.reporter_id,
                      'status', o.status, 'filed_at', o.created_at, 'decided_at', o.decided_at)), '[]')
                FROM disputes_as_of o
               WHERE o.target_id = d.target_id AND o.kind = d.kind AND o.reporter_id = d.reporter_id
                 AND o.id <> d.id
                 AND (o.status IN ('pending', 'needs_review') OR o.decided_at >= clock.now - make_interval(secs => $2)))
               AS same_reporter,
             (SELECT coalesce(jsonb_agg(jsonb_build_object('id', o.id, 'reporter_id', o.reporter_id,
                      'status', o.status, 'filed_at', o.created_at, 'decided_at', o.decided_at)), '[]')
                FROM disputes_as_of o
               WHERE o.reporter_id = d.reporter_id AND o.id <> d.id
                 AND o.created_at >= clock.now - make_interval(secs => $3))
               AS reporter_record,
             (SELECT coalesce(jsonb_agg(jsonb_build_object('id', o.id, 'reporter_id', o.reporter_id,
                      'status', o.status, 'filed_at', o.created_at, 'decided_at', o.decided_at,
                      'reporter_score', s.score,
                      'score_seen', s.user_id IS NULL OR shadow.xmin_visible_in(s.xmin, $6::pg_snapshot))), '[]')
                FROM disputes_as_of o LEFT JOIN score.user_scores s ON s.user_id = o.reporter_id
               WHERE o.target_id = d.target_id AND o.kind = d.kind AND o.id <> d.id
                 AND (o.status IN ('pending', 'needs_review') OR o.created_at >= clock.now - make_interval(secs => $4)))
               AS against_target
         FROM security.disputes d CROSS JOIN clock
         JOIN identity.users ru ON ru.id = d.reporter_id
         JOIN identity.users tu ON tu.id = d.target_id
         LEFT JOIN score.user_scores rs ON rs.user_id = d.reporter_id
         LEFT JOIN score.user_scores ts ON ts.user_id = d.target_id
         WHERE d.id = ANY($1)"
    )
}
