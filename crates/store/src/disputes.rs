//! `security.disputes`.

use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;
use trellis_domain::adjudication::{Facts, Related};
use trellis_domain::disputes::{DisputeKind, DisputeStatus, Priority};
use trellis_domain::{DisputeId, UserId};
use uuid::Uuid;

use crate::page::Page;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DisputeRow {
    pub id: Uuid,
    pub reporter_id: Uuid,
    pub target_id: Uuid,
    #[sqlx(try_from = "String")]
    pub kind: DisputeKind,
    #[sqlx(try_from = "i16")]
    pub priority: Priority,
    #[sqlx(try_from = "String")]
    pub status: DisputeStatus,
    pub description: String,
    pub evidence: Option<String>,
    pub decision_rule: Option<String>,
    pub decision_reasons: Option<serde_json::Value>,
    pub rules_version: Option<String>,
    pub decided_by: Option<Uuid>,
    pub decision_note: Option<String>,
    pub decided_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

const COLUMNS: &str = "id, reporter_id, target_id, kind, priority, status, description, evidence, decision_rule,
    decision_reasons, rules_version, decided_by, decision_note, decided_at, created_at, updated_at";

pub struct NewDispute<'a> {
    pub id: DisputeId,
    pub reporter: UserId,
    pub target: UserId,
    pub kind: DisputeKind,
    pub description: &'a str,
    pub evidence: Option<&'a str>,
}

/// A reporter's open (pending or needs-review) disputes, in all and at P0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenDisputes {
    pub all: i64,
    pub p0: i64,
}

/// Counts `reporter`'s open disputes after taking a transaction-scoped advisory lock on the
/// reporter, so that concurrent filings of one reporter are counted one after another and a
/// limit checked against the count holds exactly. The lock is released at commit or rollback.
/// The count reads the reporter's disputes through `disputes_reporter_idx`: its cost grows with
/// what one reporter has filed, which these very limits keep small.
pub async fn lock_and_count_open(conn: &mut PgConnection, reporter: UserId) -> Result<OpenDisputes, sqlx::Error> {
    // The first key names the lock space ("filings per reporter"); the second the reporter.
    sqlx::query("SELECT pg_advisory_xact_lock(1953066613, hashtext($1::text))")
        .bind(reporter.0)
        .execute(&mut *conn)
        .await?;
    let (all, p0): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE priority = 0) FROM security.disputes
         WHERE reporter_id = $1 AND status IN ('pending', 'needs_review')",
    )
    .bind(reporter.0)
    .fetch_one(conn)
    .await?;
    Ok(OpenDisputes { all, p0 })
}

pub async fn insert(conn: &mut PgConnection, d: &NewDispute<'_>) -> Result<DisputeRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO security.disputes (id, reporter_id, target_id, kind, priority, description, evidence)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COLUMNS}"
    ))
    .bind(d.id.0)
    .bind(d.reporter.0)
    .bind(d.target.0)
    .bind(d.kind.as_str())
    .bind(d.kind.priority().rank())
    .bind(d.description)
    .bind(d.evidence)
    .fetch_one(conn)
    .await
}

pub async fn get(db: impl PgExecutor<'_>, id: DisputeId) -> Result<Option<DisputeRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM security.disputes WHERE id = $1"))
        .bind(id.0)
        .fetch_optional(db)
        .await
}

/// Locks the dispute row for a decision.
pub async fn get_for_update(conn: &mut PgConnection, id: DisputeId) -> Result<Option<DisputeRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM security.disputes WHERE id = $1 FOR UPDATE"))
        .bind(id.0)
        .fetch_optional(conn)
        .await
}

/// Disputes filed by `reporter`, newest first.
pub async fn list_by_reporter(
    db: impl PgExecutor<'_>,
    reporter: UserId,
    before: Option<Uuid>,
    limit: usize,
) -> Result<Page<DisputeRow>, sqlx::Error> {
    let rows: Vec<DisputeRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM security.disputes WHERE reporter_id = $1 AND ($2::uuid IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3"
    ))
    .bind(reporter.0)
    .bind(before)
    .bind(limit as i64 + 1)
    .fetch_all(db)
    .await?;
    Ok(Page::from_rows(rows, limit, |r| r.id))
}

/// The moderation queue key: priority, then age, then id.
pub type QueueKey = (i16, OffsetDateTime, Uuid);

/// Who reads the moderation queue: it shows them the disputes they may moderate
/// (`trellis_domain::disputes::may_moderate`, which the statement mirrors).
#[derive(Debug, Clone, Copy)]
pub struct QueueViewer {
    pub user: UserId,
    pub admin: bool,
}

/// Disputes for moderators, by priority then age, optionally filtered: never those against
/// `viewer` themselves, and those against a moderator or an admin only when `viewer` is an
/// admin (the target's role as it is now).
pub async fn list_queue(
    db: impl PgExecutor<'_>,
    viewer: QueueViewer,
    status: Option<DisputeStatus>,
    priority: Option<Priority>,
    after: Option<QueueKey>,
    limit: usize,
) -> Result<Page<DisputeRow>, sqlx::Error> {
    let (after_priority, after_created, after_id) = match after {
        Some((p, c, i)) => (Some(p), Some(c), Some(i)),
        None => (None, None, None),
    };
    let rows: Vec<DisputeRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM security.disputes d
         WHERE ($1::text IS NULL OR status = $1) AND ($2::smallint IS NULL OR priority = $2)
           AND ($3::smallint IS NULL OR (priority, created_at, id) > ($3, $4, $5))
           AND d.target_id <> $7
           AND ($8 OR EXISTS (SELECT 1 FROM identity.users t WHERE t.id = d.target_id AND t.role = 'user'))
         ORDER BY priority, created_at, id LIMIT $6"
    ))
    .bind(status.map(DisputeStatus::as_str))
    .bind(priority.map(Priority::rank))
    .bind(after_priority)
    .bind(after_created)
    .bind(after_id)
    .bind(limit as i64 + 1)
    .bind(viewer.user.0)
    .bind(viewer.admin)
    .fetch_all(db)
    .await?;
    Ok(Page::from_rows(rows, limit, |r| (r.priority.rank(), r.created_at, r.id)))
}

pub struct Decision<'a> {
    pub status: DisputeStatus,
    pub rule: &'a str,
    pub reasons: serde_json::Value,
    pub rules_version: &'a str,
    pub decided_by: Option<UserId>,
    pub note: Option<&'a str>,
}

/// Records a decision on one dispute (a moderator's), with its audit row.
pub async fn record_decision(
    conn: &mut PgConnection,
    id: DisputeId,
    d: &Decision<'_>,
) -> Result<DisputeRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "WITH decided AS (
             UPDATE security.disputes SET status = $2, decision_rule = $3, decision_reasons = $4, rules_version = $5,
                 decided_by = $6, decision_note = $7, decided_at = clock_timestamp(), updated_at = now()
             WHERE id = $1 RETURNING {COLUMNS}
         ), audited AS (
             INSERT INTO security.dispute_decisions
                 (dispute_id, status, rule, rules_version, reasons, decided_by, note, decided_at)
             SELECT id, status, decision_rule, rules_version, decision_reasons, decided_by, decision_note, decided_at
             FROM decided
         )
         SELECT {COLUMNS} FROM decided"
    ))
    .bind(id.0)
    .bind(d.status.as_str())
    .bind(d.rule)
    .bind(&d.reasons)
    .bind(d.rules_version)
    .bind(d.decided_by.map(|u| u.0))
    .bind(d.note)
    .fetch_one(conn)
    .await
}

/// Hides an upheld spam dispute's target from directory search (once: a user hidden by an
/// earlier dispute stays hidden by that one).
pub async fn hide_target(conn: &mut PgConnection, target: UserId, dispute: DisputeId) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO security.hidden_users (user_id, dispute_id) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING",
    )
    .bind(target.0)
    .bind(dispute.0)
    .execute(conn)
    .await?;
    Ok(())
}

/// Locks the disputes of `ids` that are still pending (in id order, so that concurrent batches
/// cannot deadlock on each other) and returns them. A dispute that another transaction decides
/// first is left out: PostgreSQL re-checks `status` once the lock is granted.
pub async fn lock_pending(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<DisputeRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM security.disputes WHERE id = ANY($1) AND status = 'pending' ORDER BY id FOR UPDATE"
    ))
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// Locks the disputes of `ids` that are still undecided (pending or needs_review), skipping
/// those another transaction holds: whoever holds one decides it.
pub async fn lock_undecided(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<DisputeRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM security.disputes
         WHERE id = ANY($1) AND status IN ('pending', 'needs_review') ORDER BY id FOR UPDATE SKIP LOCKED"
    ))
    .bind(ids)
    .fetch_all(conn)
    .await
}

#[derive(sqlx::FromRow)]
pub(crate) struct FactsRow {
    pub(crate) id: Uuid,
    reporter_id: Uuid,
    target_id: Uuid,
    kind: String,
    created_at: OffsetDateTime,
    now: OffsetDateTime,
    snapshot: String,
    reporter_suspended: bool,
    target_suspended: bool,
    target_role: String,
    reporter_score: Option<i32>,
    target_score: Option<i32>,
    /// Read as of a past snapshot only: whether the scores read are the ones it saw.
    #[sqlx(default)]
    pub(crate) scores_seen: Option<bool>,
    same_reporter: sqlx::types::Json<Vec<RelatedRow>>,
    reporter_record: sqlx::types::Json<Vec<RelatedRow>>,
    pub(crate) against_target: sqlx::types::Json<Vec<RelatedRow>>,
}

#[derive(serde::Deserialize)]
pub(crate) struct RelatedRow {
    id: Uuid,
    reporter_id: Uuid,
    status: DisputeStatus,
    #[serde(with = "time::serde::rfc3339")]
    filed_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    decided_at: Option<OffsetDateTime>,
    reporter_score: Option<i32>,
    /// As of a past snapshot: whether the score read is the one that snapshot saw.
    #[serde(default = "seen")]
    pub(crate) score_seen: bool,
}

fn seen() -> bool {
    true
}

impl From<RelatedRow> for Related {
    fn from(r: RelatedRow) -> Self {
        Related {
            id: r.id,
            reporter_id: r.reporter_id,
            status: r.status,
            filed_at: r.filed_at,
            decided_at: r.decided_at,
            reporter_score: r.reporter_score,
        }
    }
}

/// When and on what a batch's facts were read: the rules' clock (`now()`, the transaction's
/// start) and the MVCC snapshot of the statement that read them (`pg_current_snapshot()`, as
/// text). Recorded with every automatic decision, so that the facts can be read again as the
/// decision saw them (the shadow candidate does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactsClock {
    pub at: OffsetDateTime,
    pub snapshot: String,
}

/// What [`gather_facts`] read.
#[derive(Debug)]
pub struct Gathered {
    pub facts: Vec<Facts>,
    /// The statement's clock and snapshot; `None` when none of the ids is a dispute.
    pub clock: Option<FactsClock>,
}

/// The facts the adjudication rules need, for every dispute of `ids`, in one statement. Each
/// list holds what its rule's window could reach (the rules apply the windows exactly), plus
/// every undecided dispute, whose status a decision earlier in the same batch may change. The
/// shadow candidate reads the same facts as a past snapshot saw them with its own statement
/// (`shadow_disputes::gather_facts_as_of`), which must say the same of the tables as they are.
pub async fn gather_facts(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Gathered, sqlx::Error> {
    let rows = facts_query(FACTS, ids).fetch_all(conn).await?;
    let clock = rows.first().map(|r| FactsClock { at: r.now, snapshot: r.snapshot.clone() });
    Ok(Gathered { facts: decode_facts(rows)?, clock })
}

/// The facts statement (`$1` the disputes, `$2`–`$4` the rules' windows in seconds).
const FACTS: &str = "WITH clock AS (SELECT now() AS now, pg_current_snapshot()::text AS snapshot)
         SELECT d.id, d.reporter_id, d.target_id, d.kind, d.created_at, clock.now, clock.snapshot,
             ru.status = 'suspended' AS reporter_suspended, tu.status = 'suspended' AS target_suspended,
             tu.role AS target_role, rs.score AS reporter_score, ts.score AS target_score,
             (SELECT coalesce(jsonb_agg(jsonb_build_object('id', o.id, 'reporter_id', o.reporter_id,
                      'status', o.status, 'filed_at', o.created_at, 'decided_at', o.decided_at)), '[]')
                FROM security.disputes o
               WHERE o.target_id = d.target_id AND o.kind = d.kind AND o.reporter_id = d.reporter_id
                 AND o.id <> d.id
                 AND (o.status IN ('pending', 'needs_review') OR o.decided_at >= clock.now - make_interval(secs => $2)))
               AS same_reporter,
             (SELECT coalesce(jsonb_agg(jsonb_build_object('id', o.id, 'reporter_id', o.reporter_id,
                      'status', o.status, 'filed_at', o.created_at, 'decided_at', o.decided_at)), '[]')
                FROM security.disputes o
               WHERE o.reporter_id = d.reporter_id AND o.id <> d.id
                 AND o.created_at >= clock.now - make_interval(secs => $3))
               AS reporter_record,
             (SELECT coalesce(jsonb_agg(jsonb_build_object('id', o.id, 'reporter_id', o.reporter_id,
                      'status', o.status, 'filed_at', o.created_at, 'decided_at', o.decided_at,
                      'reporter_score', s.score)), '[]')
                FROM security.disputes o LEFT JOIN score.user_scores s ON s.user_id = o.reporter_id
               WHERE o.target_id = d.target_id AND o.kind = d.kind AND o.id <> d.id
                 AND (o.status IN ('pending', 'needs_review') OR o.created_at >= clock.now - make_interval(secs => $4)))
               AS against_target
         FROM security.disputes d CROSS JOIN clock
         JOIN identity.users ru ON ru.id = d.reporter_id
         JOIN identity.users tu ON tu.id = d.target_id
         LEFT JOIN score.user_scores rs ON rs.user_id = d.reporter_id
         LEFT JOIN score.user_scores ts ON ts.user_id = d.target_id
         WHERE d.id = ANY($1)";

/// A facts statement with the disputes and the rules' windows bound (`$1`–`$4`).
pub(crate) fn facts_query<'q>(
    sql: &'q str,
    ids: &'q [Uuid],
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, FactsRow, sqlx::postgres::PgArguments> {
    use trellis_domain::adjudication::{CORROBORATION_WINDOW, CREDIBILITY_WINDOW, DUPLICATE_WINDOW};
    let secs = |d: time::Duration| d.whole_seconds() as f64;
    sqlx::query_as::<_, FactsRow>(sql)
        .bind(ids)
        .bind(secs(DUPLICATE_WINDOW))
        .bind(secs(CREDIBILITY_WINDOW))
        .bind(secs(CORROBORATION_WINDOW))
}

/// The rules' facts of the rows of a facts statement.
pub(crate) fn decode_facts(rows: Vec<FactsRow>) -> Result<Vec<Facts>, sqlx::Error> {
    rows.into_iter()
        .map(|r| {
            let kind = DisputeKind::parse(&r.kind).map_err(|e| sqlx::Error::Decode(e.message.into()))?;
            let target_role = r.target_role.parse().map_err(|e: String| sqlx::Error::Decode(e.into()))?;
            Ok(Facts {
                dispute_id: r.id,
                reporter_id: r.reporter_id,
                target_id: r.target_id,
                kind,
                filed_at: r.created_at,
                now: r.now,
                reporter_suspended: r.reporter_suspended,
                target_suspended: r.target_suspended,
                target_role,
                target_score: r.target_score,
                reporter_score: r.reporter_score,
                same_reporter: r.same_reporter.0.into_iter().map(Related::from).collect(),
                reporter_record: r.reporter_record.0.into_iter().map(Related::from).collect(),
                against_target: r.against_target.0.into_iter().map(Related::from).collect(),
            })
        })
        .collect()
}

/// One automatic decision to record.
pub struct AutoDecision {
    pub id: Uuid,
    pub status: DisputeStatus,
    pub rule: &'static str,
    pub reasons: serde_json::Value,
}

/// What recording a decision returns: enough for the latency metric.
#[derive(Debug, sqlx::FromRow)]
pub struct Recorded {
    pub id: Uuid,
    #[sqlx(try_from = "i16")]
    pub priority: Priority,
    pub created_at: OffsetDateTime,
    pub decided_at: OffsetDateTime,
}

/// Records automatic decisions (locked by the caller) and their audit rows in one statement,
/// with the clock and snapshot of the facts they were judged on and (by default) the
/// transaction's id. `decided_at` is the statement's clock (as close to the commit as SQL can
/// get) plus one microsecond per decision before it in `decisions`: the decisions of a batch
/// are ordered as they were made, so that the record says which of them each one saw.
pub async fn record_auto_decisions(
    conn: &mut PgConnection,
    decisions: &[AutoDecision],
    rules_version: &str,
    facts: &FactsClock,
) -> Result<Vec<Recorded>, sqlx::Error> {
    if decisions.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = decisions.iter().map(|d| d.id).collect();
    let statuses: Vec<&str> = decisions.iter().map(|d| d.status.as_str()).collect();
    let rules: Vec<&str> = decisions.iter().map(|d| d.rule).collect();
    let reasons: Vec<&serde_json::Value> = decisions.iter().map(|d| &d.reasons).collect();
    sqlx::query_as(
        "WITH clock AS (SELECT clock_timestamp() AS t), decided AS (
             UPDATE security.disputes d SET status = u.status, decision_rule = u.rule, decision_reasons = u.reasons,
                 rules_version = $5, decided_by = NULL, decision_note = NULL,
                 decided_at = clock.t + (u.n - 1) * interval '1 microsecond', updated_at = now()
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[]) WITH ORDINALITY AS u(id, status, rule, reasons, n),
                 clock
             WHERE d.id = u.id
             RETURNING d.id, d.priority, d.created_at, d.decided_at, d.status, d.decision_rule, d.decision_reasons
         ), audited AS (
             INSERT INTO security.dispute_decisions
                 (dispute_id, status, rule, rules_version, reasons, decided_at, facts_at, facts_snapshot)
             SELECT id, status, decision_rule, $5, decision_reasons, decided_at, $6, $7::pg_snapshot FROM decided
         )
         SELECT id, priority, created_at, decided_at FROM decided",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&rules)
    .bind(&reasons)
    .bind(rules_version)
    .bind(facts.at)
    .bind(&facts.snapshot)
    .fetch_all(conn)
    .await
}

/// The age in seconds of the oldest pending dispute of each priority (rank 0 … 3) that has one.
pub async fn oldest_pending_age_seconds(db: impl PgExecutor<'_>) -> Result<Vec<(i16, f64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT p.priority::smallint, extract(epoch FROM now() - o.created_at)::float8
         FROM generate_series(0, 3) AS p(priority)
         CROSS JOIN LATERAL (SELECT created_at FROM security.disputes
                             WHERE status = 'pending' AND priority = p.priority
                             ORDER BY created_at LIMIT 1) o",
    )
    .fetch_all(db)
    .await
}

/// The ids of `ids` that are not disputes.
pub async fn missing(db: impl PgExecutor<'_>, ids: &[Uuid]) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT i FROM UNNEST($1::uuid[]) AS i WHERE NOT EXISTS (SELECT 1 FROM security.disputes d WHERE d.id = i)",
    )
    .bind(ids)
    .fetch_all(db)
    .await
}

/// The share of the processor's decisions (R1–R5) of the last `window` that R1–R4 made on
/// their own; `None` when there were none.
pub async fn auto_adjudication_ratio(
    db: impl PgExecutor<'_>,
    window: std::time::Duration,
) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT (count(*) FILTER (WHERE rule IN ('R1', 'R2', 'R3', 'R4')))::float8 / NULLIF(count(*), 0)
         FROM security.dispute_decisions
         WHERE rule IN ('R1', 'R2', 'R3', 'R4', 'R5') AND decided_at >= now() - make_interval(secs => $1)",
    )
    .bind(window.as_secs_f64())
    .fetch_one(db)
    .await
}

/// Disputes pending now, and those of them that have been pending for longer than `for_at_least`:
/// when the latter exceeds a depth, the queue has been deeper than it for that whole time.
pub async fn pending_depth(
    db: impl PgExecutor<'_>,
    for_at_least: std::time::Duration,
) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE created_at < now() - make_interval(secs => $1))
         FROM security.disputes WHERE status = 'pending'",
    )
    .bind(for_at_least.as_secs_f64())
    .fetch_one(db)
    .await
}
