//! Everything of the Stage B cutover in the database, removable in one piece: the flags and
//! their audit (`flags`), each processor's shadow candidate's tables (`disputes`, `scores`,
//! `search`), and here `shadow.comparisons` and the shadow periods the flag audit records: what
//! `trellisctl parity` reports and the promotion gate reads. Each processor's candidate writes its own outputs to
//! tables of the `shadow` schema; only the comparisons are shared.

pub mod disputes;
pub mod flags;
pub mod scores;
pub mod search;

use sqlx::PgExecutor;
use time::OffsetDateTime;
use trellis_domain::flags::{Executor, Flag};
use trellis_domain::shadow::{Comparison, ComparisonResult, FieldDiff, Tally, processor};

/// A shadow period of a flag: from its change to `shadow` until its next change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub started_at: OffsetDateTime,
    /// `None` while the flag still says `shadow`.
    pub ended_at: Option<OffsetDateTime>,
    /// The executor before `shadow`, which kept executing.
    pub primary: Executor,
}

impl Period {
    /// The side that processed the copy.
    pub fn candidate(&self) -> Executor {
        match self.primary {
            Executor::Monolith => Executor::Worker,
            _ => Executor::Monolith,
        }
    }
}

/// The latest shadow period of `flag`, if it ever was in `shadow`.
pub async fn latest_period(db: impl PgExecutor<'_>, flag: Flag) -> Result<Option<Period>, sqlx::Error> {
    let row: Option<(OffsetDateTime, Option<OffsetDateTime>, String)> = sqlx::query_as(
        "SELECT s.changed_at,
                (SELECT min(e.changed_at) FROM ops.feature_flag_audit e WHERE e.name = s.name AND e.id > s.id),
                s.from_value
         FROM ops.feature_flag_audit s WHERE s.name = $1 AND s.to_value = 'shadow' ORDER BY s.id DESC LIMIT 1",
    )
    .bind(flag.as_str())
    .fetch_optional(db)
    .await?;
    row.map(|(started_at, ended_at, primary)| {
        let primary = Executor::parse(&primary).map_err(|e| sqlx::Error::Decode(e.message.into()))?;
        Ok(Period { started_at, ended_at, primary })
    })
    .transpose()
}

/// Records comparisons of `flag`'s processor.
pub async fn record(db: impl PgExecutor<'_>, flag: Flag, comparisons: &[Comparison]) -> Result<(), sqlx::Error> {
    if comparisons.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = comparisons.iter().map(|c| c.key.as_str()).collect();
    let results: Vec<&str> = comparisons.iter().map(|c| c.result.as_str()).collect();
    let counts: Vec<i64> = comparisons.iter().map(|c| c.count).collect();
    let diffs: Vec<serde_json::Value> =
        comparisons.iter().map(|c| serde_json::to_value(&c.diffs).unwrap_or_default()).collect();
    sqlx::query(
        "INSERT INTO shadow.comparisons (processor, key, result, count, diffs)
         SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::bigint[], $5::jsonb[])",
    )
    .bind(processor(flag))
    .bind(&keys)
    .bind(&results)
    .bind(&counts)
    .bind(&diffs)
    .execute(db)
    .await?;
    Ok(())
}

/// The comparisons made during `period`.
pub async fn tally(db: impl PgExecutor<'_>, flag: Flag, period: &Period) -> Result<Tally, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT result, sum(count)::bigint FROM shadow.comparisons
         WHERE processor = $1 AND compared_at >= $2 AND ($3::timestamptz IS NULL OR compared_at < $3)
         GROUP BY result",
    )
    .bind(processor(flag))
    .bind(period.started_at)
    .bind(period.ended_at)
    .fetch_all(db)
    .await?;
    let mut tally = Tally::default();
    for (result, n) in rows {
        match ComparisonResult::parse(&result) {
            Some(ComparisonResult::Matched) => tally.matched = n,
            Some(ComparisonResult::Mismatched) => tally.mismatched = n,
            Some(ComparisonResult::Missing) => tally.missing = n,
            None => return Err(sqlx::Error::Decode(format!("unknown result {result:?}").into())),
        }
    }
    Ok(tally)
}

/// A recorded comparison.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub comparison: Comparison,
    pub compared_at: OffsetDateTime,
}

/// The first `limit` comparisons of `period` that did not match (mismatched or missing), in
/// the order they were made.
pub async fn first_differences(
    db: impl PgExecutor<'_>,
    flag: Flag,
    period: &Period,
    limit: i64,
) -> Result<Vec<Recorded>, sqlx::Error> {
    type Row = (String, String, i64, sqlx::types::Json<Vec<FieldDiff>>, OffsetDateTime);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT key, result, count, diffs, compared_at FROM shadow.comparisons
         WHERE processor = $1 AND result <> 'matched'
           AND compared_at >= $2 AND ($3::timestamptz IS NULL OR compared_at < $3)
         ORDER BY id LIMIT $4",
    )
    .bind(processor(flag))
    .bind(period.started_at)
    .bind(period.ended_at)
    .bind(limit)
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|(key, result, count, diffs, compared_at)| {
            let result = ComparisonResult::parse(&result)
                .ok_or_else(|| sqlx::Error::Decode(format!("unknown result {result:?}").into()))?;
            Ok(Recorded { comparison: Comparison { key, result, count, diffs: diffs.0 }, compared_at })
        })
        .collect()
}
