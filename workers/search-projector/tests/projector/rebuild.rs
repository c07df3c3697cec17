//! A rebuild under concurrent writes: `search_model::rebuild` runs, again and
//! again, while API mutations go on and a projector projects them; once the writes stop and
//! the projector has caught up, the model equals a fresh rebuild.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use trellis_testkit::TestDb;
use uuid::Uuid;

use crate::harness::*;

const OPERATIONS: usize = 240;

/// `OPERATIONS` mutations: registrations, profile updates, contact adds, updates and removes.
async fn write(api: &Api, mut users: Vec<User>, tag: &str, done: &AtomicUsize) -> Vec<User> {
    let mut rng = StdRng::seed_from_u64(23);
    let mut contacts: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    let labels = ["", "friend", "work", "family"];
    for step in 0..OPERATIONS {
        let o = rng.random_range(0..users.len());
        match rng.random_range(0..6) {
            0 => {
                let user = api.register(&format!("w{tag}{step}")).await;
                users.push(user);
            }
            1 => api.rename_me(&users[o], &format!("Person {step}")).await,
            2 | 3 => {
                let c = rng.random_range(0..users.len());
                if c != o {
                    api.put_contact(&users[o], users[c].id, labels[rng.random_range(0..labels.len())]).await;
                    contacts.entry(o).or_default().insert(c);
                }
            }
            _ => {
                let theirs = contacts.entry(o).or_default();
                if let Some(&c) = theirs.iter().nth(rng.random_range(0..theirs.len().max(1))) {
                    api.remove_contact(&users[o], users[c].id).await;
                    theirs.remove(&c);
                }
            }
        }
        done.fetch_add(1, Ordering::SeqCst);
    }
    users
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_under_concurrent_writes_ends_equal_to_a_fresh_rebuild() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start(&db, &prefix).await;
    let _projector = Replica::start(&db, &prefix, &["--batch-size", "16"]).await;
    let tag = &Uuid::new_v4().simple().to_string()[..6];
    let mut users = Vec::new();
    for i in 0..8 {
        users.push(api.register(&format!("s{tag}{i}")).await);
    }

    let done = AtomicUsize::new(0);
    let finished = AtomicBool::new(false);
    let writes = async {
        let users = write(&api, users, tag, &done).await;
        finished.store(true, Ordering::SeqCst);
        users
    };
    let rebuilds = async {
        // Rebuild until the writes stop; count the rebuilds during which writes happened.
        let (mut runs, mut overlapped) = (0u32, 0u32);
        loop {
            let before = done.load(Ordering::SeqCst);
            let progress =
                trellis_store::search_model::rebuild(&db.pool, trellis_store::search_model::RebuildScope::All, |_| {})
                    .await
                    .expect("rebuild");
            assert!(progress.users_done >= 8, "{progress:?}");
            runs += 1;
            let after = done.load(Ordering::SeqCst);
            if after > before && before > 0 && after < OPERATIONS {
                overlapped += 1;
            }
            if finished.load(Ordering::SeqCst) {
                break (runs, overlapped);
            }
        }
    };
    let (users, (runs, overlapped)) = tokio::join!(writes, rebuilds);
    assert!(overlapped >= 1, "no rebuild ran while writes went on ({runs} rebuilds)");

    caught_up(&db, &prefix).await;
    checkpoint_reaches_newest_event(&db).await;
    let projected = model(&db).await;
    assert_eq!(projected.directory.len(), users.len());
    assert!(!projected.contacts.is_empty(), "the writes made contacts");
    assert_eq!(projected, rebuilt_model(&db).await, "the model equals a fresh rebuild");
}
