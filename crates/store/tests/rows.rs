//! Rows decode straight into the domain's enums, and a stored value no enum has is a decode
//! error that names its column, not a string passed on. (sqlx 0.8's `try_from` loses the
//! conversion's own message: the column is what the error says.)

use trellis_domain::disputes::{DisputeKind, DisputeStatus, Priority};
use trellis_domain::identity::{Role, UserStatus};
use trellis_domain::score::RunStatus;
use trellis_domain::{DisputeId, UserId};
use trellis_store::disputes::NewDispute;
use trellis_store::identity::NewUser;
use trellis_testkit::TestDb;

async fn user(db: &TestDb, handle: &str) -> UserId {
    let id = UserId::new();
    let email = format!("{handle}@example.com");
    let new = NewUser { id, handle, display_name: handle, email: &email, password_hash: "-" };
    trellis_store::identity::insert_user(&mut db.pool.acquire().await.unwrap(), &new).await.unwrap();
    id
}

#[tokio::test]
async fn users_disputes_and_runs_read_back_as_domain_enums() {
    let db = TestDb::migrated().await.unwrap();
    let (alice, bob) = (user(&db, "alice").await, user(&db, "bob").await);
    let row = trellis_store::identity::find_by_id(&db.pool, alice).await.unwrap().unwrap();
    assert_eq!((row.role, row.status), (Role::User, UserStatus::Active));

    let id = DisputeId::new();
    let new =
        NewDispute { id, reporter: alice, target: bob, kind: DisputeKind::Spam, description: "ads", evidence: None };
    trellis_store::disputes::insert(&mut db.pool.acquire().await.unwrap(), &new).await.unwrap();
    let dispute = trellis_store::disputes::get(&db.pool, id).await.unwrap().unwrap();
    assert_eq!(
        (dispute.kind, dispute.priority, dispute.status),
        (DisputeKind::Spam, Priority::P2, DisputeStatus::Pending)
    );

    let run = uuid::Uuid::now_v7();
    let mut conn = db.pool.acquire().await.unwrap();
    trellis_store::scores::request_run(&mut *conn, "manual", None).await.unwrap();
    trellis_store::scores::start_pending_run(&mut conn, run, "test", "test").await.unwrap().expect("a pending request");
    assert_eq!(trellis_store::scores::get_run(&db.pool, run).await.unwrap().unwrap().status, RunStatus::Running);
}

#[tokio::test]
async fn a_stored_value_no_enum_has_is_a_decode_error_naming_its_column() {
    let db = TestDb::migrated().await.unwrap();
    let run = uuid::Uuid::now_v7();
    let mut conn = db.pool.acquire().await.unwrap();
    trellis_store::scores::request_run(&mut *conn, "manual", None).await.unwrap();
    trellis_store::scores::start_pending_run(&mut conn, run, "test", "test").await.unwrap().expect("a pending request");
    sqlx::query("UPDATE score.runs SET status = 'queued' WHERE id = $1").bind(run).execute(&db.pool).await.unwrap();
    let err = trellis_store::scores::get_run(&db.pool, run).await.unwrap_err();
    assert!(matches!(&err, sqlx::Error::ColumnDecode { index, .. } if index == "status"), "{err:?}");
}

#[tokio::test]
async fn a_run_records_its_first_requests_trace_and_links_the_coalesced_ones() {
    let db = TestDb::migrated().await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let [first, second, third] = ["a", "b", "c"].map(|c| c.repeat(32));
    for trace in [Some(first.as_str()), None, Some(second.as_str()), Some(third.as_str())] {
        trellis_store::scores::request_traced_run(&mut *conn, "manual", None, trace).await.unwrap();
    }
    let run = uuid::Uuid::now_v7();
    trellis_store::scores::start_pending_run(&mut conn, run, "test", "test").await.unwrap().expect("a pending request");
    let (trace_id, linked): (Option<String>, Option<Vec<String>>) =
        sqlx::query_as("SELECT trace_id, linked_trace_ids FROM score.runs WHERE id = $1")
            .bind(run)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(trace_id, Some(first));
    assert_eq!(linked, Some(vec![second, third]));

    // The next request starts afresh.
    trellis_store::scores::request_traced_run(&mut *conn, "manual", None, None).await.unwrap();
    let next = uuid::Uuid::now_v7();
    trellis_store::scores::start_pending_run(&mut conn, next, "test", "test")
        .await
        .unwrap()
        .expect("a pending request");
    let (trace_id, linked): (Option<String>, Option<Vec<String>>) =
        sqlx::query_as("SELECT trace_id, linked_trace_ids FROM score.runs WHERE id = $1")
            .bind(next)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((trace_id, linked), (None, None));
}
