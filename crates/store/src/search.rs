//! User search over the base tables (`identity.users` and the scores).

use sqlx::PgExecutor;
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserHit {
    pub id: Uuid,
    pub handle: String,
    pub display_name: String,
    pub verified: bool,
    pub score: Option<i32>,
    /// 0 exact handle, 1 handle prefix, 2 name match.
    pub rank: i32,
}

/// Active users whose handle equals or starts with `q`, or whose display name contains it or
/// (for 3 characters or more) has a word within one typo of it (trigram word similarity),
/// ranked exact handle, then prefix, then name, then higher score. `offset` pages. Hidden users
/// never appear.
pub async fn users(db: impl PgExecutor<'_>, q: &str, offset: i64, limit: i64) -> Result<Vec<UserHit>, sqlx::Error> {
    let lowered = q.to_lowercase();
    let like = format!("{}%", escape_like(&lowered));
    let contains = format!("%{}%", escape_like(&lowered));
    sqlx::query_as(
        "SELECT u.id, u.handle, u.display_name, u.verified, s.score,
                CASE WHEN u.handle = $1 THEN 0 WHEN u.handle LIKE $2 THEN 1 ELSE 2 END AS rank
         FROM identity.users u LEFT JOIN score.user_scores s ON s.user_id = u.id
         WHERE u.status = 'active'
           AND NOT EXISTS (SELECT 1 FROM security.hidden_users h WHERE h.user_id = u.id)
           AND (u.handle LIKE $2 OR lower(u.display_name) LIKE $3
                OR (char_length($1) >= 3 AND $1 <% lower(u.display_name)))
         ORDER BY rank, s.score DESC NULLS LAST, u.handle
         OFFSET $4 LIMIT $5",
    )
    .bind(&lowered)
    .bind(&like)
    .bind(&contains)
    .bind(offset)
    .bind(limit)
    .fetch_all(db)
    .await
}

fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

/// The same search over the read model (`search.directory`), which the search projector keeps.
pub async fn index_users(
    db: impl PgExecutor<'_>,
    q: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<UserHit>, sqlx::Error> {
    let lowered = q.to_lowercase();
    let like = format!("{}%", escape_like(&lowered));
    let contains = format!("%{}%", escape_like(&lowered));
    sqlx::query_as(
        "SELECT d.user_id AS id, d.handle, d.display_name, d.verified, d.score,
                CASE WHEN d.handle = $1 THEN 0 WHEN d.handle LIKE $2 THEN 1 ELSE 2 END AS rank
         FROM search.directory d
         WHERE d.status = 'active' AND NOT d.hidden
           AND (d.handle LIKE $2 OR lower(d.display_name) LIKE $3
                OR (char_length($1) >= 3 AND $1 <% lower(d.display_name)))
         ORDER BY rank, d.score DESC NULLS LAST, d.handle
         OFFSET $4 LIMIT $5",
    )
    .bind(&lowered)
    .bind(&like)
    .bind(&contains)
    .bind(offset)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// What decides between the read model and the base tables.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Freshness {
    /// `occurred_at` of the newest event the projection applied.
    pub last_event_at: Option<OffsetDateTime>,
    /// When the projection last applied anything.
    pub checkpoint_updated_at: Option<OffsetDateTime>,
    /// `occurred_at` of the newest event written (the outbox is the record of every event).
    pub newest_event_at: Option<OffsetDateTime>,
    pub directory_empty: bool,
    pub users_exist: bool,
}

pub async fn freshness(db: impl PgExecutor<'_>) -> Result<Freshness, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.last_event_at, c.updated_at AS checkpoint_updated_at,
                (SELECT created_at FROM ops.outbox ORDER BY seq DESC LIMIT 1) AS newest_event_at,
                NOT EXISTS (SELECT 1 FROM search.directory) AS directory_empty,
                EXISTS (SELECT 1 FROM identity.users) AS users_exist
         FROM search.checkpoint c WHERE c.id = 1",
    )
    .fetch_one(db)
    .await
}

impl Freshness {
    /// How far the projection is behind the newest event (zero when it has applied it).
    pub fn lag(&self) -> time::Duration {
        match (self.newest_event_at, self.last_event_at) {
            (None, _) => time::Duration::ZERO,
            (Some(_), None) => time::Duration::MAX,
            (Some(newest), Some(applied)) => (newest - applied).max(time::Duration::ZERO),
        }
    }

    /// Whether search should answer from the read model.
    pub fn index_usable(&self, max_lag: std::time::Duration) -> bool {
        !(self.directory_empty && self.users_exist) && self.lag() <= max_lag
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ContactHit {
    pub contact_id: Uuid,
    pub handle: String,
    pub display_name: String,
    pub label: String,
    pub circles: Vec<String>,
}

/// The owner's contacts whose handle, name, label or circle names contain `q`, from the read model.
pub async fn index_contacts(
    db: impl PgExecutor<'_>,
    owner: Uuid,
    q: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<ContactHit>, sqlx::Error> {
    let contains = format!("%{}%", escape_like(&q.to_lowercase()));
    sqlx::query_as(
        "SELECT contact_id, handle, display_name, label, circles FROM search.contacts
         WHERE owner_id = $1 AND search_text LIKE $2 ORDER BY handle OFFSET $3 LIMIT $4",
    )
    .bind(owner)
    .bind(&contains)
    .bind(offset)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The same over the base tables.
pub async fn contacts(
    db: impl PgExecutor<'_>,
    owner: Uuid,
    q: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<ContactHit>, sqlx::Error> {
    let contains = format!("%{}%", escape_like(&q.to_lowercase()));
    sqlx::query_as(
        "SELECT * FROM (
             SELECT c.contact_id, u.handle, u.display_name, c.label,
                    COALESCE(array_agg(ci.name ORDER BY ci.name) FILTER (WHERE ci.name IS NOT NULL), '{}') AS circles
             FROM contacts.contacts c JOIN identity.users u ON u.id = c.contact_id
             LEFT JOIN circles.members m ON m.owner_id = c.owner_id AND m.user_id = c.contact_id
             LEFT JOIN circles.circles ci ON ci.id = m.circle_id
             WHERE c.owner_id = $1
             GROUP BY c.contact_id, u.handle, u.display_name, c.label) x
         WHERE lower(x.handle || ' ' || x.display_name || ' ' || x.label || ' ' || array_to_string(x.circles, ' ')) LIKE $2
         ORDER BY x.handle OFFSET $3 LIMIT $4",
    )
    .bind(owner)
    .bind(&contains)
    .bind(offset)
    .bind(limit)
    .fetch_all(db)
    .await
}
