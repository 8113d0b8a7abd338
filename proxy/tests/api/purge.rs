//! The admin API: authenticated purges that take effect on every replica, L1 included,
//! within a second.

use std::time::{Duration, Instant};

use crate::helpers::*;

const TOKEN: &str = "admin-token-for-tests-0123456789";

/// Warms `id` on every replica and returns its token.
async fn warm(cluster: &TestCluster, id: &str) -> String {
    let token = post_basic(&cluster.urls()[0], id, SECRET, None).await.access_token().to_owned();
    for url in cluster.urls() {
        let reply = post_basic(&url, id, SECRET, None).await;
        assert_eq!(reply.access_token(), token);
    }
    token
}

#[tokio::test]
async fn a_client_purge_takes_effect_on_every_replica_within_a_second() {
    let cluster = TestCluster::start(
        3,
        vec![client("a", SECRET), client("b", SECRET)],
        &[("TOKEN_PROXY_ADMIN_TOKEN", TOKEN), ("TOKEN_PROXY_L1_MAX_AGE", "60s")],
    )
    .await;
    let (old_a, old_b) = (warm(&cluster, "a").await, warm(&cluster, "b").await);
    let issued = cluster.idp.idp.issued_total();

    let started = Instant::now();
    let (status, body) = purge(cluster.replicas[0].admin, Some(TOKEN), r#"{"client_id": "a"}"#).await;
    assert_eq!((status, body["purged"].as_str()), (200, Some("client")), "{body}");
    // Every replica, its L1 included (entries live 60 s there), stops serving the old token.
    let urls = cluster.urls();
    let mut took = Duration::ZERO;
    for url in &urls[1..] {
        loop {
            let reply = post_basic(url, "a", SECRET, None).await;
            if reply.access_token() != old_a {
                took = took.max(started.elapsed());
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(1), "{url} still served the purged token after 1 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    eprintln!("purge took effect on every replica after {took:?}");
    for url in &urls {
        assert_eq!(post_basic(url, "b", SECRET, None).await.access_token(), old_b, "b was purged too");
    }
    assert_eq!(cluster.idp.idp.issued_total(), issued + 1, "one new token for a, across the cluster");
}

#[tokio::test]
async fn purge_all_and_purge_one_scope() {
    let cluster = TestCluster::start(2, vec![client("a", SECRET)], &[("TOKEN_PROXY_ADMIN_TOKEN", TOKEN)]).await;
    let url = cluster.urls()[1].clone();
    let read = post_basic(&url, "a", SECRET, Some("api/read")).await.access_token().to_owned();
    let write = post_basic(&url, "a", SECRET, Some("api/write")).await.access_token().to_owned();

    let (status, _) = purge(cluster.replicas[0].admin, Some(TOKEN), r#"{"client_id": "a", "scope": "api/read"}"#).await;
    assert_eq!(status, 200);
    let url_ref = &url;
    eventually(Duration::from_secs(1), "the scope purge", async || {
        post_basic(url_ref, "a", SECRET, Some("api/read")).await.access_token() != read
    })
    .await;
    assert_eq!(post_basic(&url, "a", SECRET, Some("api/write")).await.access_token(), write);

    let (status, body) = purge(cluster.replicas[0].admin, Some(TOKEN), r#"{"all": true}"#).await;
    assert_eq!((status, body["purged"].as_str()), (200, Some("all")));
    eventually(Duration::from_secs(1), "the purge of everything", async || {
        post_basic(url_ref, "a", SECRET, Some("api/write")).await.access_token() != write
    })
    .await;
}

#[tokio::test]
async fn a_replica_without_redis_purges_its_own_cache() {
    let app = TestApp::embedded(vec![client("a", SECRET)], &[("TOKEN_PROXY_ADMIN_TOKEN", TOKEN)]).await;
    let old = post_basic(&app.proxy.token_url(), "a", SECRET, None).await.access_token().to_owned();
    assert_eq!(purge(app.proxy.admin, Some(TOKEN), r#"{"client_id": "a"}"#).await.0, 200);
    let reply = post_basic(&app.proxy.token_url(), "a", SECRET, None).await;
    assert_eq!(reply.x_cache(), "MISS");
    assert_ne!(reply.access_token(), old);
}

#[tokio::test]
async fn the_admin_api_needs_its_token_and_a_well_formed_request() {
    let app = TestApp::embedded(vec![client("a", SECRET)], &[("TOKEN_PROXY_ADMIN_TOKEN", TOKEN)]).await;
    let admin = app.proxy.admin;
    assert_eq!(purge(admin, None, r#"{"all": true}"#).await.0, 401);
    assert_eq!(purge(admin, Some("admin-token-for-tests-012345678"), r#"{"all": true}"#).await.0, 401);
    assert_eq!(purge(admin, Some(&format!("{TOKEN}x")), r#"{"all": true}"#).await.0, 401);
    for body in [
        "",
        "{}",
        r#"{"all": false}"#,
        r#"{"all": true, "client_id": "a"}"#,
        r#"{"client_id": ""}"#,
        r#"{"client": "a"}"#,
    ] {
        assert_eq!(purge(admin, Some(TOKEN), body).await.0, 400, "{body}");
    }
    assert_eq!(purge(admin, Some(TOKEN), r#"{"client_id": "a", "scope": "bad\"scope"}"#).await.0, 400);

    // Without a configured token the admin API does not exist.
    let off = TestApp::embedded(vec![client("a", SECRET)], &[]).await;
    assert_eq!(purge(off.proxy.admin, Some(TOKEN), r#"{"all": true}"#).await.0, 404);
    // And the client listener never offers it.
    let response = http().post(format!("http://{}/admin/purge", app.proxy.addr)).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 404);
}
