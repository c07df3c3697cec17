//! `/v1/me/circles` and their members.

use serde_json::{Value, json};

use crate::helpers::TestApp;

fn strings(items: &[Value], key: &str) -> Vec<String> {
    items.iter().map(|i| i[key].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn creating_a_circle_answers_201_with_its_location() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let r = app.post("/v1/me/circles", Some(&alice.token), json!({"name": "  Close friends "})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap();
    assert_eq!(r.header("location"), Some(format!("/v1/me/circles/{id}").as_str()));
    assert_eq!(r.body["name"], "Close friends", "names are trimmed");
    assert_eq!(r.body["member_count"], 0);

    let fetched = app.get(r.header("location").unwrap(), Some(&alice.token)).await;
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.body, r.body, "GET shows what POST returned");
}

#[tokio::test]
async fn invalid_circle_names_are_validation_errors_on_the_name() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    for (name, code) in [("   ", "required"), (&"x".repeat(61) as &str, "too_long"), ("a\nb", "invalid_characters")] {
        let r = app.post("/v1/me/circles", Some(&alice.token), json!({"name": name})).await;
        assert_eq!((r.status, r.problem()), (422, "validation"), "{name:?}: {:?}", r.body);
        assert_eq!(
            (r.body["errors"][0]["field"].as_str(), r.body["errors"][0]["code"].as_str()),
            (Some("name"), Some(code))
        );
    }
    assert_eq!(app.get("/v1/me/circles", Some(&alice.token)).await.body["items"], json!([]));
    assert_eq!(app.post("/v1/me/circles", Some(&alice.token), json!({"name": "x".repeat(60)})).await.status, 201);
}

#[tokio::test]
async fn circle_names_are_unique_per_owner_case_insensitively() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    app.create_circle(&alice, "Friends").await;
    let r = app.post("/v1/me/circles", Some(&alice.token), json!({"name": "FRIENDS"})).await;
    assert_eq!((r.status, r.problem()), (409, "circle-name-taken"), "{:?}", r.body);
    assert_eq!(app.get("/v1/me/circles", Some(&alice.token)).await.body["items"].as_array().unwrap().len(), 1);

    // Another owner may use the same name.
    let r = app.post("/v1/me/circles", Some(&bob.token), json!({"name": "friends"})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
}

#[tokio::test]
async fn the_circle_list_pages_through_every_circle_oldest_first() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    app.create_circle(&bob, "Bob's own").await;
    let names = ["one", "two", "three", "four", "five"];
    let mut created = Vec::new();
    for name in names {
        created.push(app.create_circle(&alice, name).await);
    }
    let pages = app.pages("/v1/me/circles?limit=2", &alice.token).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    let all: Vec<Value> = pages.into_iter().flatten().collect();
    assert_eq!(strings(&all, "id"), created);
    assert_eq!(strings(&all, "name"), names);
}

#[tokio::test]
async fn an_unknown_or_malformed_circle_id_is_404_or_400() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let unknown = uuid::Uuid::now_v7();
    let r = app.get(&format!("/v1/me/circles/{unknown}"), Some(&alice.token)).await;
    assert_eq!((r.status, r.problem()), (404, "not-found"));
    let r = app.get("/v1/me/circles/not-a-uuid", Some(&alice.token)).await;
    assert_eq!((r.status, r.problem()), (400, "invalid-path"));
}

#[tokio::test]
async fn renaming_a_circle_answers_200_and_409_when_the_name_is_taken() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let friends = app.create_circle(&alice, "Friends").await;
    app.create_circle(&alice, "Work").await;
    let path = format!("/v1/me/circles/{friends}");

    let r = app.patch(&path, Some(&alice.token), json!({"name": "Best friends"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["name"], "Best friends");
    assert_eq!(app.get(&path, Some(&alice.token)).await.body["name"], "Best friends");

    let clash = app.patch(&path, Some(&alice.token), json!({"name": "work"})).await;
    assert_eq!((clash.status, clash.problem()), (409, "circle-name-taken"), "{:?}", clash.body);
    assert_eq!(app.get(&path, Some(&alice.token)).await.body["name"], "Best friends");

    // A circle may change the case of its own name.
    let recased = app.patch(&path, Some(&alice.token), json!({"name": "BEST FRIENDS"})).await;
    assert_eq!((recased.status, recased.body["name"].as_str()), (200, Some("BEST FRIENDS")));

    let invalid = app.patch(&path, Some(&alice.token), json!({"name": ""})).await;
    assert_eq!((invalid.status, invalid.problem()), (422, "validation"));
    let unknown =
        app.patch(&format!("/v1/me/circles/{}", uuid::Uuid::now_v7()), Some(&alice.token), json!({"name": "x"})).await;
    assert_eq!((unknown.status, unknown.problem()), (404, "not-found"));
}

#[tokio::test]
async fn deleting_a_circle_answers_204_then_404_and_its_members_stay_contacts() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    app.add_contact(&alice, &bob).await;
    let friends = app.create_circle(&alice, "Friends").await;
    let r = app.put(&format!("/v1/me/circles/{friends}/members/{}", bob.id), Some(&alice.token), json!({})).await;
    assert_eq!(r.status, 201);
    let path = format!("/v1/me/circles/{friends}");

    assert_eq!(app.delete(&path, Some(&alice.token)).await.status, 204);
    assert_eq!(app.get(&path, Some(&alice.token)).await.status, 404);
    let again = app.delete(&path, Some(&alice.token)).await;
    assert_eq!((again.status, again.problem()), (404, "not-found"));
    assert_eq!(app.get(&format!("{path}/members"), Some(&alice.token)).await.status, 404);
    assert_eq!(app.get("/v1/me/circles", Some(&alice.token)).await.body["items"], json!([]));
    let contacts = app.get("/v1/me/contacts", Some(&alice.token)).await;
    assert_eq!(strings(contacts.body["items"].as_array().unwrap(), "user_id"), [bob.id.as_str()]);
    // The name is free again.
    app.create_circle(&alice, "friends").await;
}

#[tokio::test]
async fn adding_a_contact_to_a_circle_answers_201_then_200_and_counts_them_once() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    app.add_contact(&alice, &bob).await;
    let circle = app.create_circle(&alice, "Friends").await;
    let path = format!("/v1/me/circles/{circle}/members/{}", bob.id);

    let first = app.put(&path, Some(&alice.token), json!({})).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert_eq!((first.body["id"].as_str(), first.body["member_count"].as_i64()), (Some(circle.as_str()), Some(1)));
    let second = app.put(&format!("/v1/me/circles/{circle}/members/bob"), Some(&alice.token), json!({})).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(second.body["member_count"], 1);
    assert_eq!(app.get(&format!("/v1/me/circles/{circle}"), Some(&alice.token)).await.body["member_count"], 1);
}

#[tokio::test]
async fn only_contacts_can_join_a_circle() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    // Bob vouching for alice does not make bob alice's contact.
    app.add_contact(&bob, &alice).await;
    let circle = app.create_circle(&alice, "Friends").await;

    let r = app.put(&format!("/v1/me/circles/{circle}/members/{}", bob.id), Some(&alice.token), json!({})).await;
    assert_eq!((r.status, r.problem()), (422, "not-a-contact"), "{:?}", r.body);
    let r = app.put(&format!("/v1/me/circles/{circle}/members/nobody"), Some(&alice.token), json!({})).await;
    assert_eq!((r.status, r.problem()), (404, "not-found"));
    let r = app.put(&format!("/v1/me/circles/{circle}/members/{}", alice.id), Some(&alice.token), json!({})).await;
    assert_eq!((r.status, r.problem()), (422, "not-a-contact"), "you are not your own contact");
    assert_eq!(app.get(&format!("/v1/me/circles/{circle}"), Some(&alice.token)).await.body["member_count"], 0);
}

#[tokio::test]
async fn circle_members_are_listed_by_user_id_with_pagination() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let circle = app.create_circle(&alice, "Friends").await;
    let mut expected = Vec::new();
    for handle in ["bob", "carol", "dave"] {
        let user = app.register(handle).await;
        app.add_contact(&alice, &user).await;
        let r = app.put(&format!("/v1/me/circles/{circle}/members/{handle}"), Some(&alice.token), json!({})).await;
        assert_eq!(r.status, 201);
        expected.push((user.id, handle.to_owned()));
    }
    // A contact outside the circle is not listed.
    let erin = app.register("erin").await;
    app.add_contact(&alice, &erin).await;
    expected.sort();

    let pages = app.pages(&format!("/v1/me/circles/{circle}/members?limit=2"), &alice.token).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
    let all: Vec<Value> = pages.into_iter().flatten().collect();
    let got: Vec<(String, String)> = strings(&all, "user_id").into_iter().zip(strings(&all, "handle")).collect();
    assert_eq!(got, expected);
    assert!(all.iter().all(|m| m["added_at"].is_string() && m["display_name"].is_string()));
}

#[tokio::test]
async fn removing_a_member_answers_204_then_404_and_keeps_the_contact() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let carol = app.register("carol").await;
    app.add_contact(&alice, &bob).await;
    app.add_contact(&alice, &carol).await;
    let circle = app.create_circle(&alice, "Friends").await;
    for user in [&bob, &carol] {
        let r = app.put(&format!("/v1/me/circles/{circle}/members/{}", user.id), Some(&alice.token), json!({})).await;
        assert_eq!(r.status, 201);
    }
    assert_eq!(app.get(&format!("/v1/me/circles/{circle}"), Some(&alice.token)).await.body["member_count"], 2);

    let path = format!("/v1/me/circles/{circle}/members/{}", bob.id);
    assert_eq!(app.delete(&path, Some(&alice.token)).await.status, 204);
    let again = app.delete(&path, Some(&alice.token)).await;
    assert_eq!((again.status, again.problem()), (404, "not-found"));

    assert_eq!(app.get(&format!("/v1/me/circles/{circle}"), Some(&alice.token)).await.body["member_count"], 1);
    let members = app.get(&format!("/v1/me/circles/{circle}/members"), Some(&alice.token)).await;
    assert_eq!(strings(members.body["items"].as_array().unwrap(), "user_id"), [carol.id.as_str()]);
    let contacts = app.get("/v1/me/contacts", Some(&alice.token)).await;
    assert_eq!(contacts.body["items"].as_array().unwrap().len(), 2, "leaving a circle is not losing the contact");
}
