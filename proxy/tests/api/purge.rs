//! The admin API: authenticated purges that take effect on every replica, L1 included,
//! within a second.

use std::time::{Duration, Instant};

use fred::prelude::*;

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
    let (status, body) = cluster.replicas[0].purge(Some(TOKEN), r#"{"client_id": "a"}"#).await;
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

    let (status, _) = cluster.replicas[0].purge(Some(TOKEN), r#"{"client_id": "a", "scope": "api/read"}"#).await;
    assert_eq!(status, 200);
    let url_ref = &url;
    eventually(Duration::from_secs(1), "the scope purge", async || {
        post_basic(url_ref, "a", SECRET, Some("api/read")).await.access_token() != read
    })
    .await;
    assert_eq!(post_basic(&url, "a", SECRET, Some("api/write")).await.access_token(), write);

    let (status, body) = cluster.replicas[0].purge(Some(TOKEN), r#"{"all": true}"#).await;
    assert_eq!((status, body["purged"].as_str()), (200, Some("all")));
    eventually(Duration::from_secs(1), "the purge of everything", async || {
        post_basic(url_ref, "a", SECRET, Some("api/write")).await.access_token() != write
    })
    .await;
}

#[tokio::test]
async fn a_replica_without_redis_purges_its_own_cache() {
    let app = TestApp::embedded(vec![client("a", SECRET)], &[("TOKEN_PROXY_ADMIN_TOKEN", TOKEN)]).await;
    let old = app.post_basic("a", SECRET, None).await.access_token().to_owned();
    assert_eq!(app.purge(Some(TOKEN), r#"{"client_id": "a"}"#).await.0, 200);
    let reply = app.post_basic("a", SECRET, None).await;
    assert_eq!(reply.x_cache(), "MISS");
    assert_ne!(reply.access_token(), old);
}

#[tokio::test]
async fn the_admin_api_needs_its_token_and_a_well_formed_request() {
    let app = TestApp::embedded(vec![client("a", SECRET)], &[("TOKEN_PROXY_ADMIN_TOKEN", TOKEN)]).await;
    assert_eq!(app.purge(None, r#"{"all": true}"#).await.0, 401);
    assert_eq!(app.purge(Some("admin-token-for-tests-012345678"), r#"{"all": true}"#).await.0, 401);
    assert_eq!(app.purge(Some(&format!("{TOKEN}x")), r#"{"all": true}"#).await.0, 401);
    for body in [
        "",
        "{}",
        r#"{"all": false}"#,
        r#"{"all": true, "client_id": "a"}"#,
        r#"{"client_id": ""}"#,
        r#"{"client": "a"}"#,
    ] {
        assert_eq!(app.purge(Some(TOKEN), body).await.0, 400, "{body}");
    }
    assert_eq!(app.purge(Some(TOKEN), r#"{"client_id": "a", "scope": "bad\"scope"}"#).await.0, 400);

    // Without a configured token the admin API does not exist.
    let off = TestApp::embedded(vec![client("a", SECRET)], &[]).await;
    assert_eq!(off.purge(Some(TOKEN), r#"{"all": true}"#).await.0, 404);
    // And the client listener never offers it.
    let response = http().post(format!("http://{}/admin/purge", app.proxy.addr)).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 404);
}

/// Issue 10, defect 1: purge epochs lived only in one Redis hash; when Redis lost it, they fell
/// back to 0 and the pre-purge token came back.
#[tokio::test]
async fn a_purge_outlives_redis_restarting_empty() {
    let mut app = TestApp::with_redis(
        vec![client("a", SECRET)],
        &[("TOKEN_PROXY_ADMIN_TOKEN", TOKEN), ("TOKEN_PROXY_L1_MAX_AGE", "60s")],
    )
    .await;
    let purged = app.post_basic("a", SECRET, None).await.access_token().to_owned();
    assert_eq!(app.purge(Some(TOKEN), r#"{"client_id": "a"}"#).await.0, 200);
    let after = app.post_basic("a", SECRET, None).await;
    assert_ne!(after.access_token(), purged);

    app.redis_mut().restart().await;
    // Long enough for the replica to notice the empty Redis (it looks once a second).
    for _ in 0..4 {
        let reply = app.post_basic("a", SECRET, None).await;
        assert_eq!(reply.status, 200);
        assert_ne!(reply.access_token(), purged, "the purged token came back after Redis restarted empty");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }

    // A purge repeated after the loss still takes effect.
    let current = app.post_basic("a", SECRET, None).await.access_token().to_owned();
    assert_eq!(app.purge(Some(TOKEN), r#"{"client_id": "a"}"#).await.0, 200);
    let reply = app.post_basic("a", SECRET, None).await;
    assert_ne!(reply.access_token(), current, "a purge repeated after the loss changed nothing");
    assert_ne!(reply.access_token(), purged);
}

/// Issue 10, defect 1: the purge hash deleted (or evicted) while the entries stay: a replica
/// started afterwards must not find the pre-purge entry under the old epochs.
#[tokio::test]
async fn a_purge_outlives_the_loss_of_its_hash_for_a_replica_started_afterwards() {
    let cluster = TestCluster::start(1, vec![client("a", SECRET)], &[("TOKEN_PROXY_ADMIN_TOKEN", TOKEN)]).await;
    let url = cluster.urls()[0].clone();
    let purged = post_basic(&url, "a", SECRET, None).await.access_token().to_owned();
    assert_eq!(cluster.replicas[0].purge(Some(TOKEN), r#"{"client_id": "a"}"#).await.0, 200);
    assert_ne!(post_basic(&url, "a", SECRET, None).await.access_token(), purged);

    let redis = cluster.redis.client().await;
    let removed: i64 = redis.del("tp:purge").await.unwrap();
    assert_eq!(removed, 1, "the purge state is the hash tp:purge");
    let late = TestCluster::replica(&cluster.redis.url(), &cluster.idp, &[]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for url in [late.token_url(), url] {
        for _ in 0..3 {
            let reply = post_basic(&url, "a", SECRET, None).await;
            assert_ne!(reply.access_token(), purged, "{url} served the purged token once its hash was gone");
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    }
}

/// Issue 10, defect 10: purge state must stay bounded: client ids are bounded in size, and
/// purges of distinct clients are bounded in number.
#[tokio::test]
async fn purge_state_is_bounded() {
    let app = TestApp::with_redis(vec![client("a", SECRET)], &[("TOKEN_PROXY_ADMIN_TOKEN", TOKEN)]).await;
    let long = format!(r#"{{"client_id": "{}"}}"#, "x".repeat(10_000));
    let (status, body) = app.purge(Some(TOKEN), &long).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_request")), "{body}");
    // A body larger than any purge request is refused before it is parsed.
    let huge = format!(r#"{{"client_id": "{}"}}"#, "x".repeat(100_000));
    assert_eq!(app.purge(Some(TOKEN), &huge).await.0, 413);
    let fields: i64 = app.redis().client().await.custom(fred::cmd!("HLEN"), vec!["tp:purge"]).await.unwrap();
    assert!(fields <= 3, "a refused purge wrote {fields} fields");
}

/// Issue 10, defect 10: at most `max_tagged` client epochs are kept; those older than the
/// retention (the longest a token lives) make room first, and purging everything always works.
#[tokio::test]
async fn client_purges_are_bounded_in_number_and_age() {
    let redis = RedisServer::start().await;
    let store = direct_store(&redis).await;
    let day = Duration::from_secs(24 * 3600);
    let purge = async |field: &str, retention| store.purge(field, retention, 3).await.expect("Redis answers");
    let first = purge("aa", day).await.expect("room for 3");
    assert!(purge("bb", day).await.is_some() && purge("cc", day).await.is_some());
    assert_eq!(purge("dd", day).await, None, "a fourth client is refused");
    let again = purge("aa", day).await.expect("a purged client can be purged again");
    assert!(again > first, "epochs only go up: {first} then {again}");
    assert!(purge("all", day).await.is_some(), "purging everything is never refused");

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(purge("dd", Duration::from_millis(50)).await.is_some(), "expired epochs made room");
    let state = store.purge_state(None).await.unwrap().expect("the hash");
    let mut fields: Vec<_> = state.fields.keys().cloned().collect();
    fields.sort();
    assert_eq!(fields, ["all", "dd"]);
}

/// Issue 10, defect 1: a failover to a replica that missed the purge leaves Redis with an older
/// generation; replicas that remember the newer one write it back and never serve the token.
#[tokio::test]
async fn a_generation_redis_holds_older_is_written_back_by_the_replicas() {
    let cluster = TestCluster::start(2, vec![client("a", SECRET)], &[("TOKEN_PROXY_ADMIN_TOKEN", TOKEN)]).await;
    let urls = cluster.urls();
    let purged = post_basic(&urls[0], "a", SECRET, None).await.access_token().to_owned();
    assert_eq!(cluster.replicas[0].purge(Some(TOKEN), r#"{"client_id": "a"}"#).await.0, 200);
    let redis = cluster.redis.client().await;
    let fields: Vec<String> = redis.custom(fred::cmd!("HKEYS"), vec!["tp:purge"]).await.unwrap();
    let client_field = fields.iter().find(|f| !["all", "v"].contains(&f.as_str())).expect("the client's field").clone();
    let purged_epoch: String = redis.custom(fred::cmd!("HGET"), vec!["tp:purge", client_field.as_str()]).await.unwrap();

    // What a replica that missed the purge holds: the field gone, another version. Then the
    // same epoch written in another number format, which the scripts and the replicas must
    // both count as absent (after review: Lua took "P.0" for P while the replicas dropped it).
    for damaged in [None, Some(format!("{purged_epoch}.0"))] {
        match &damaged {
            None => {
                let _: i64 = redis.custom(fred::cmd!("HDEL"), vec!["tp:purge", client_field.as_str()]).await.unwrap();
            }
            Some(value) => {
                let _: i64 = redis
                    .custom(fred::cmd!("HSET"), vec!["tp:purge", client_field.as_str(), value.as_str()])
                    .await
                    .unwrap();
            }
        }
        let _: i64 = redis.custom(fred::cmd!("HSET"), vec!["tp:purge", "v", "1"]).await.unwrap();
        for _ in 0..4 {
            for url in &urls {
                assert_ne!(post_basic(url, "a", SECRET, None).await.access_token(), purged, "{url} ({damaged:?})");
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        let restored: Option<String> =
            redis.custom(fred::cmd!("HGET"), vec!["tp:purge", client_field.as_str()]).await.unwrap();
        assert_eq!(restored.as_deref(), Some(purged_epoch.as_str()), "the replicas wrote the generation back");
    }
}

/// After review of issue 10: a purge hash written by an earlier release (`{all: 1}`, no
/// version), of another type, or holding numbers past 2^53 (where adding one stops changing a
/// Lua number) must neither keep replicas from using Redis nor make a purge do nothing.
#[tokio::test]
async fn a_purge_hash_from_an_earlier_release_or_damaged_is_repaired() {
    let cluster = TestCluster::start(1, vec![client("a", SECRET)], &[("TOKEN_PROXY_ADMIN_TOKEN", TOKEN)]).await;
    let redis = cluster.redis.client().await;
    let set_hash = async |pairs: &[&str]| {
        let _: i64 = redis.del("tp:purge").await.unwrap();
        let mut args = vec!["tp:purge"];
        args.extend_from_slice(pairs);
        let _: i64 = redis.custom(fred::cmd!("HSET"), args).await.unwrap();
    };

    // An earlier release's hash: a replica started now still uses Redis.
    set_hash(&["all", "1"]).await;
    let late = TestCluster::replica(&cluster.redis.url(), &cluster.idp, &[]).await;
    let ready = get_json(&format!("http://{}/readyz", late.admin)).await;
    assert_eq!(ready["purges"], "synced", "{ready}");
    // The running replica remembers a newer `all` and writes it back within its second.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let first = post_basic(&cluster.urls()[0], "a", SECRET, None).await;
    let shared = post_basic(&late.token_url(), "a", SECRET, None).await;
    assert_eq!((shared.x_cache(), shared.access_token()), ("HIT", first.access_token()), "{}", shared.raw);

    // Numbers past 2^53: a purge of everything still changes the token.
    set_hash(&["all", "18014398509481984", "v", "18014398509481984"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = post_basic(&late.token_url(), "a", SECRET, None).await.access_token().to_owned();
    assert_eq!(cluster.replicas[0].purge(Some(TOKEN), r#"{"all": true}"#).await.0, 200);
    let url = late.token_url();
    eventually(Duration::from_secs(2), "the purge of everything", async || {
        post_basic(&url, "a", SECRET, None).await.access_token() != before
    })
    .await;

    // Another type at tp:purge: no Redis error, and purges work.
    let _: i64 = redis.del("tp:purge").await.unwrap();
    let _: () = redis.set("tp:purge", "planted", None, None, false).await.unwrap();
    let (status, body) = cluster.replicas[0].purge(Some(TOKEN), r#"{"client_id": "a"}"#).await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    for replica in [&cluster.replicas[0], &late] {
        assert_eq!(replica.metric("token_proxy_redis_errors_total").await, 0.0);
    }
}

/// After review of issue 10: when a replica writes back a generation Redis lost, it announces
/// it, so a replica started after the loss (which never knew the generation) adopts it at once.
#[tokio::test]
async fn a_replica_started_after_a_partial_loss_gets_the_written_back_generation() {
    let cluster = TestCluster::start(1, vec![client("a", SECRET)], &[("TOKEN_PROXY_ADMIN_TOKEN", TOKEN)]).await;
    let url = cluster.urls()[0].clone();
    let purged = post_basic(&url, "a", SECRET, None).await.access_token().to_owned();
    assert_eq!(cluster.replicas[0].purge(Some(TOKEN), r#"{"client_id": "a"}"#).await.0, 200);
    let redis = cluster.redis.client().await;
    let fields: Vec<String> = redis.custom(fred::cmd!("HKEYS"), vec!["tp:purge"]).await.unwrap();
    let client_field = fields.iter().find(|f| !["all", "v"].contains(&f.as_str())).expect("the client's field").clone();
    // A lagging failover: the field is gone, the rest is there.
    let _: i64 = redis.custom(fred::cmd!("HDEL"), vec!["tp:purge", client_field.as_str()]).await.unwrap();
    let _: i64 = redis.custom(fred::cmd!("HSET"), vec!["tp:purge", "v", "1"]).await.unwrap();
    let late = TestCluster::replica(&cluster.redis.url(), &cluster.idp, &[]).await;
    // The first replica notices within its second and writes back; the announcement reaches
    // the late one; from then on neither serves the purged token.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for _ in 0..3 {
        for url in [late.token_url(), url.clone()] {
            assert_ne!(post_basic(&url, "a", SECRET, None).await.access_token(), purged, "{url}");
        }
    }
}

/// A key's epoch is the latest of the fields that cover it (a client everywhere, the client at
/// one upstream, ...): a new purge must land above every epoch in the hash, or after a failover
/// to a server whose clock is behind it would not move the key (found in review).
#[tokio::test]
async fn a_purge_lands_above_every_epoch_in_the_hash() {
    let redis = RedisServer::start().await;
    let store = direct_store(&redis).await;
    let day = Duration::from_secs(24 * 3600);
    let first = store.purge("aa", day, 10).await.expect("Redis answers").expect("room");
    // An epoch from a clock an hour ahead, as a server before a failover would have written.
    let ahead = first + 3_600_000_000;
    let _: i64 = redis
        .client()
        .await
        .custom(fred::cmd!("HSET"), vec!["tp:purge".to_owned(), "bb".to_owned(), ahead.to_string()])
        .await
        .unwrap();
    for field in ["cc", "aa", "all"] {
        let epoch = store.purge(field, day, 10).await.unwrap().expect("room");
        assert!(epoch > ahead, "{field}: {epoch} is not above {ahead}");
    }
}

/// A store on `redis`, used directly, once it answers.
async fn direct_store(redis: &RedisServer) -> token_proxy::store::RedisStore {
    let settings = token_proxy::store::StoreSettings {
        command_timeout: Duration::from_secs(1),
        breaker_threshold: 5,
        breaker_cooldown: Duration::from_secs(1),
        pipelined_reads: true,
    };
    let store = crate::helpers::connect_store(&redis.url(), settings, &shared::keys::Keys::random());
    crate::helpers::eventually(Duration::from_secs(5), "the store connected", async || {
        store.purge_state(None).await.is_ok()
    })
    .await;
    store
}
