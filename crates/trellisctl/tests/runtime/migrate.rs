//! `trellisctl migrate down`: confirmed with `--yes`, to an applied version only, and with
//! `--drop-everything` as well to revert every migration, against a real database.

use trellis_testkit::TestDb;

use crate::helpers::{Ctl, run_ctl};

async fn ctl(db: &TestDb, args: &[&str]) -> Ctl {
    run_ctl(&["--database-url", &db.url], args, "migrate-tests").await
}

/// The applied migration versions.
async fn applied(db: &TestDb) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn migrate_down_needs_yes_and_reverting_everything_needs_drop_everything() {
    let db = TestDb::migrated().await.unwrap();
    let all = applied(&db).await;
    assert!(all.len() > 2);

    let out = ctl(&db, &["migrate", "down"]).await;
    assert!(!out.success() && out.stderr.contains("--yes"), "{out:?}");
    let to = all[all.len() - 3].to_string();
    let out = ctl(&db, &["migrate", "down", "--to", &to]).await;
    assert!(!out.success() && out.stderr.contains("reverting 2 migration(s)"), "{out:?}");
    for refused in [vec!["--to", "0", "--yes"], vec!["--to", "1", "--yes"], vec!["--to", "-5", "--yes"]] {
        let mut args = vec!["migrate", "down"];
        args.extend(refused.iter().copied());
        let out = ctl(&db, &args).await;
        assert!(!out.success(), "{args:?}: {out:?}");
    }
    assert_eq!(applied(&db).await, all, "nothing was reverted");

    let out = ctl(&db, &["migrate", "down", "--yes"]).await;
    assert!(out.success(), "{out:?}");
    assert_eq!(applied(&db).await, all[..all.len() - 1], "one migration reverted");
    let out = ctl(&db, &["migrate", "down", "--to", "0", "--yes", "--drop-everything"]).await;
    assert!(out.success(), "{out:?}");
    assert_eq!(applied(&db).await, Vec::<i64>::new());
    let out = ctl(&db, &["migrate", "up"]).await;
    assert!(out.success(), "{out:?}");
    assert_eq!(applied(&db).await, all);
}
