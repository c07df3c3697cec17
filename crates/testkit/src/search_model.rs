//! The search read model as the tests compare it: its documents in key order, and the same
//! model rebuilt from the base tables (the projection must equal a rebuild).

use uuid::Uuid;

use crate::TestDb;

/// A directory document without `projected_at`.
pub type DirectoryRow = (Uuid, String, String, bool, Option<i32>, String, bool);
/// A contact document without `projected_at`.
pub type ContactRow = (Uuid, Uuid, String, String, String, Vec<String>, String);
/// A name posting: term, user, score, handle, the document's words.
pub type PostingRow = (String, Uuid, Option<i32>, String, Vec<String>);

/// The read model's documents, in key order (without `projected_at`). The term dictionary
/// (`search.name_terms`, insert-only) is left out: words renamed away stay in it by design.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub directory: Vec<DirectoryRow>,
    pub contacts: Vec<ContactRow>,
    pub name_postings: Vec<PostingRow>,
}

pub async fn model(db: &TestDb) -> Model {
    let directory = sqlx::query_as(
        "SELECT user_id, handle, display_name, verified, score, status, hidden FROM search.directory ORDER BY user_id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("reading search.directory");
    let contacts = sqlx::query_as(
        "SELECT owner_id, contact_id, handle, display_name, label, circles, search_text
         FROM search.contacts ORDER BY owner_id, contact_id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("reading search.contacts");
    let name_postings =
        sqlx::query_as("SELECT term, user_id, score, handle, words FROM search.name_postings ORDER BY term, user_id")
            .fetch_all(&db.pool)
            .await
            .expect("reading search.name_postings");
    Model { directory, contacts, name_postings }
}

/// Empties the read model and rebuilds it from the base tables; returns the rebuilt model.
pub async fn rebuilt_model(db: &TestDb) -> Model {
    sqlx::query("TRUNCATE search.directory, search.contacts, search.name_postings")
        .execute(&db.pool)
        .await
        .expect("truncating the read model");
    trellis_store::search_model::rebuild(&db.pool, trellis_store::search_model::RebuildScope::All, |_| {})
        .await
        .expect("rebuilding the read model");
    model(db).await
}
