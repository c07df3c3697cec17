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

/// Searchable users of the base tables: active and not hidden.
const BASE_USERS: &str = "SELECT u.id, u.handle, u.display_name, u.verified, s.score
    FROM identity.users u LEFT JOIN score.user_scores s ON s.user_id = u.id
    WHERE u.status = 'active' AND NOT EXISTS (SELECT 1 FROM security.hidden_users h WHERE h.user_id = u.id)";

/// The same users in the read model, which the search projector keeps.
const INDEXED_USERS: &str = "SELECT d.user_id AS id, d.handle, d.display_name, d.verified, d.score
    FROM search.directory d WHERE d.status = 'active' AND NOT d.hidden";

/// Active users whose handle equals or starts with `q`, or whose display name contains it or
/// (for 3 characters or more) has a word within one typo of it (trigram word similarity),
/// ranked exact handle, then prefix, then name, then higher score. `offset` pages. Hidden users
/// never appear. Over the base tables.
pub async fn users(db: impl PgExecutor<'_>, q: &str, offset: i64, limit: i64) -> Result<Vec<UserHit>, sqlx::Error> {
    ranked_users(db, BASE_USERS, q, offset, limit).await
}

/// The same search over the read model.
pub async fn index_users(
    db: impl PgExecutor<'_>,
    q: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<UserHit>, sqlx::Error> {
    ranked_users(db, INDEXED_USERS, q, offset, limit).await
}

/// One matching and ranking for both sources, so that they can only differ in freshness.
async fn ranked_users(
    db: impl PgExecutor<'_>,
    documents: &str,
    q: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<UserHit>, sqlx::Error> {
    let lowered = q.to_lowercase();
    let like = format!("{}%", escape_like(&lowered));
    let contains = format!("%{}%", escape_like(&lowered));
    sqlx::query_as(&format!(
        "SELECT c.id, c.handle, c.display_name, c.verified, c.score,
                CASE WHEN c.handle = $1 THEN 0 WHEN c.handle LIKE $2 THEN 1 ELSE 2 END AS rank
         FROM ({documents}) c
         WHERE c.handle LIKE $2 OR lower(c.display_name) LIKE $3
               OR (char_length($1) >= 3 AND $1 <% lower(c.display_name))
         ORDER BY rank, c.score DESC NULLS LAST, c.handle
         OFFSET $4 LIMIT $5"
    ))
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

/// One owner's contact documents in the read model.
const INDEXED_CONTACTS: &str = "SELECT contact_id, handle, display_name, label, circles, search_text
    FROM search.contacts WHERE owner_id = $1";

/// The same documents built from the base tables.
const BASE_CONTACTS: &str = "SELECT x.*,
        lower(x.handle || ' ' || x.display_name || ' ' || x.label || ' ' || array_to_string(x.circles, ' ')) AS search_text
    FROM (SELECT c.contact_id, u.handle, u.display_name, c.label,
                 COALESCE(array_agg(ci.name ORDER BY ci.name) FILTER (WHERE ci.name IS NOT NULL), '{}') AS circles
          FROM contacts.contacts c JOIN identity.users u ON u.id = c.contact_id
          LEFT JOIN circles.members m ON m.owner_id = c.owner_id AND m.user_id = c.contact_id
          LEFT JOIN circles.circles ci ON ci.id = m.circle_id
          WHERE c.owner_id = $1
          GROUP BY c.contact_id, u.handle, u.display_name, c.label) x";

/// The owner's contacts whose handle, name, label or circle names contain `q`, from the read model.
pub async fn index_contacts(
    db: impl PgExecutor<'_>,
    owner: Uuid,
    q: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<ContactHit>, sqlx::Error> {
    matching_contacts(db, INDEXED_CONTACTS, owner, q, offset, limit).await
}

/// The same over the base tables.
pub async fn contacts(
    db: impl PgExecutor<'_>,
    owner: Uuid,
    q: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<ContactHit>, sqlx::Error> {
    matching_contacts(db, BASE_CONTACTS, owner, q, offset, limit).await
}

async fn matching_contacts(
    db: impl PgExecutor<'_>,
    documents: &str,
    owner: Uuid,
    q: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<ContactHit>, sqlx::Error> {
    let contains = format!("%{}%", escape_like(&q.to_lowercase()));
    sqlx::query_as(&format!(
        "SELECT d.contact_id, d.handle, d.display_name, d.label, d.circles FROM ({documents}) d
         WHERE d.search_text LIKE $2 ORDER BY d.handle OFFSET $3 LIMIT $4"
    ))
    .bind(owner)
    .bind(&contains)
    .bind(offset)
    .bind(limit)
    .fetch_all(db)
    .await
}
