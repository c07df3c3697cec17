//! `/v1/me/contacts`: add, relabel, list, remove, and every way it refuses.

use serde_json::{Value, json};

use crate::helpers::{Resp, TestApp};

fn ids(items: &[Value], key: &str) -> Vec<String> {
    items.iter().map(|i| i[key].as_str().unwrap().to_owned()).collect()
}

fn error_fields(r: &Resp) -> Vec<(String, String)> {
    r.body["errors"]
        .as_array()
        .map(|errs| {
            errs.iter()
                .map(|e| (e["field"].as_str().unwrap().to_owned(), e["code"].as_str().unwrap().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn adding_a_contact_answers_201_with_the_contact_and_only_the_owner_vouches() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;

    let r = app.put(&format!("/v1/me/contacts/{}", bob.id), Some(&alice.token), json!({"label": "  college  "})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["user_id"], bob.id.as_str());
    assert_eq!(r.body["handle"], "bob");
    assert_eq!(r.body["display_name"], "bob name");
    assert_eq!(r.body["label"], "college", "labels are trimmed");
    assert_eq!(r.body["created_at"], r.body["updated_at"]);

    let mine = app.get("/v1/me/contacts", Some(&alice.token)).await;
    assert_eq!(mine.status, 200);
    assert_eq!(ids(mine.body["items"].as_array().unwrap(), "user_id"), [bob.id.as_str()]);
    assert_eq!(mine.body["items"][0]["label"], "college");
    let theirs = app.get("/v1/me/contacts", Some(&bob.token)).await;
    assert_eq!(theirs.body["items"], json!([]), "a contact is a directed edge");
}

#[tokio::test]
async fn a_contact_can_be_added_by_handle_in_any_case() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let r = app.put("/v1/me/contacts/BOB", Some(&alice.token), json!({})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["user_id"], bob.id.as_str());
    assert_eq!(r.body["label"], "", "the label defaults to empty");
}

#[tokio::test]
async fn putting_a_new_label_answers_200_and_an_identical_put_changes_nothing() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let path = format!("/v1/me/contacts/{}", bob.id);

    let created = app.put(&path, Some(&alice.token), json!({"label": "college"})).await;
    assert_eq!(created.status, 201);
    let updated = app.put(&path, Some(&alice.token), json!({"label": "work"})).await;
    assert_eq!(updated.status, 200, "{:?}", updated.body);
    assert_eq!(updated.body["label"], "work");
    assert_eq!(updated.body["created_at"], created.body["created_at"]);
    assert_ne!(updated.body["updated_at"], created.body["updated_at"], "a relabel moves updated_at");

    let unchanged = app.put(&path, Some(&alice.token), json!({"label": "work"})).await;
    assert_eq!(unchanged.status, 200, "{:?}", unchanged.body);
    assert_eq!(unchanged.body["label"], "work");
    assert_eq!(unchanged.body["updated_at"], updated.body["updated_at"], "a no-op PUT leaves the row alone");

    let list = app.get("/v1/me/contacts", Some(&alice.token)).await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1, "updates never duplicate the edge");
}

#[tokio::test]
async fn the_contact_list_pages_through_every_contact_in_user_id_order() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let mut expected = Vec::new();
    for handle in ["bob", "carol", "dave", "erin", "frank"] {
        let user = app.register(handle).await;
        app.add_contact(&alice, &user).await;
        expected.push(user.id);
    }
    expected.sort();

    let pages = app.pages("/v1/me/contacts?limit=2", &alice.token).await;
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [2, 2, 1]);
    let seen: Vec<String> = pages.iter().flat_map(|p| ids(p, "user_id")).collect();
    assert_eq!(seen, expected, "every contact exactly once, ordered by user id");

    // A page that ends exactly at the last contact hands out no cursor to an empty page.
    let exact = app.pages("/v1/me/contacts?limit=5", &alice.token).await;
    assert_eq!(exact.len(), 1);
    assert_eq!(exact[0].len(), 5);
}

#[tokio::test]
async fn deleting_a_contact_answers_204_and_then_404() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let carol = app.register("carol").await;
    app.add_contact(&alice, &bob).await;
    app.add_contact(&alice, &carol).await;

    let path = format!("/v1/me/contacts/{}", bob.id);
    assert_eq!(app.delete(&path, Some(&alice.token)).await.status, 204);
    let again = app.delete(&path, Some(&alice.token)).await;
    assert_eq!((again.status, again.problem()), (404, "not-found"));
    let list = app.get("/v1/me/contacts", Some(&alice.token)).await;
    assert_eq!(ids(list.body["items"].as_array().unwrap(), "user_id"), [carol.id.as_str()]);

    let unknown = app.delete("/v1/me/contacts/nobody", Some(&alice.token)).await;
    assert_eq!((unknown.status, unknown.problem()), (404, "not-found"));
}

#[tokio::test]
async fn removing_a_contact_removes_them_from_every_circle_of_the_owner() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let carol = app.register("carol").await;
    app.add_contact(&alice, &bob).await;
    app.add_contact(&alice, &carol).await;
    let friends = app.create_circle(&alice, "Friends").await;
    let work = app.create_circle(&alice, "Work").await;
    for (circle, member) in [(&friends, &bob), (&friends, &carol), (&work, &bob)] {
        let r = app.put(&format!("/v1/me/circles/{circle}/members/{}", member.id), Some(&alice.token), json!({})).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
    // Bob also has alice in a circle of his own: that one is untouched.
    app.add_contact(&bob, &alice).await;
    let bobs = app.create_circle(&bob, "Family").await;
    let r = app.put(&format!("/v1/me/circles/{bobs}/members/{}", alice.id), Some(&bob.token), json!({})).await;
    assert_eq!(r.status, 201);

    assert_eq!(app.delete(&format!("/v1/me/contacts/{}", bob.id), Some(&alice.token)).await.status, 204);

    let members = app.get(&format!("/v1/me/circles/{friends}/members"), Some(&alice.token)).await;
    assert_eq!(ids(members.body["items"].as_array().unwrap(), "user_id"), [carol.id.as_str()]);
    let work_now = app.get(&format!("/v1/me/circles/{work}"), Some(&alice.token)).await;
    assert_eq!(work_now.body["member_count"], 0);
    let bobs_now = app.get(&format!("/v1/me/circles/{bobs}"), Some(&bob.token)).await;
    assert_eq!(bobs_now.body["member_count"], 1);

    // Adding bob back makes him a contact again, not a member again.
    app.add_contact(&alice, &bob).await;
    let work_now = app.get(&format!("/v1/me/circles/{work}"), Some(&alice.token)).await;
    assert_eq!(work_now.body["member_count"], 0);
}

#[tokio::test]
async fn you_cannot_add_yourself_as_a_contact() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    for key in [alice.id.as_str(), "alice", "Alice"] {
        let r = app.put(&format!("/v1/me/contacts/{key}"), Some(&alice.token), json!({"label": "me"})).await;
        assert_eq!((r.status, r.problem()), (422, "self-contact"), "{key}: {:?}", r.body);
    }
    let list = app.get("/v1/me/contacts", Some(&alice.token)).await;
    assert_eq!(list.body["items"], json!([]));
}

#[tokio::test]
async fn adding_an_unknown_user_is_404() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let unknown_id = uuid::Uuid::now_v7().to_string();
    for key in [unknown_id.as_str(), "nobody", "not-a-handle"] {
        let r = app.put(&format!("/v1/me/contacts/{key}"), Some(&alice.token), json!({"label": ""})).await;
        assert_eq!((r.status, r.problem()), (404, "not-found"), "{key}: {:?}", r.body);
    }
}

#[tokio::test]
async fn a_suspended_user_cannot_be_added_as_a_contact() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let mallory = app.register("mallory").await;
    app.suspend_in_db(&mallory).await;
    let r = app.put(&format!("/v1/me/contacts/{}", mallory.id), Some(&alice.token), json!({"label": ""})).await;
    assert_eq!((r.status, r.problem()), (422, "user-suspended"), "{:?}", r.body);
    let list = app.get("/v1/me/contacts", Some(&alice.token)).await;
    assert_eq!(list.body["items"], json!([]));
}

#[tokio::test]
async fn a_label_longer_than_100_characters_is_a_validation_error_on_the_label() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let path = format!("/v1/me/contacts/{}", bob.id);

    let r = app.put(&path, Some(&alice.token), json!({"label": "é".repeat(101)})).await;
    assert_eq!((r.status, r.problem()), (422, "validation"), "{:?}", r.body);
    assert_eq!(error_fields(&r), [("label".to_owned(), "too_long".to_owned())]);
    let r = app.put(&path, Some(&alice.token), json!({"label": "a\u{7}b"})).await;
    assert_eq!(error_fields(&r), [("label".to_owned(), "invalid_characters".to_owned())]);
    assert_eq!(app.get("/v1/me/contacts", Some(&alice.token)).await.body["items"], json!([]));

    // 100 characters (not bytes) is the limit, inclusive.
    let r = app.put(&path, Some(&alice.token), json!({"label": "é".repeat(100)})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
}

#[tokio::test]
async fn a_cursor_the_list_never_handed_out_is_400_invalid_cursor() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    // Not base64; base64 of JSON that is not a user id (`42`); base64 of a bare string.
    for cursor in ["not*a*cursor", "NDI", "ImFiYyI"] {
        let r = app.get(&format!("/v1/me/contacts?cursor={cursor}"), Some(&alice.token)).await;
        assert_eq!((r.status, r.problem()), (400, "invalid-cursor"), "{cursor}: {:?}", r.body);
    }
}

#[tokio::test]
async fn page_limits_outside_1_to_100_are_rejected() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    for limit in ["0", "101"] {
        let r = app.get(&format!("/v1/me/contacts?limit={limit}"), Some(&alice.token)).await;
        assert_eq!((r.status, r.problem()), (422, "validation"), "limit={limit}: {:?}", r.body);
        assert_eq!(error_fields(&r), [("limit".to_owned(), "out_of_range".to_owned())]);
    }
    for limit in ["1", "100"] {
        assert_eq!(app.get(&format!("/v1/me/contacts?limit={limit}"), Some(&alice.token)).await.status, 200);
    }
    let r = app.get("/v1/me/contacts?limit=many", Some(&alice.token)).await;
    assert_eq!((r.status, r.problem()), (400, "invalid-query"));
}
