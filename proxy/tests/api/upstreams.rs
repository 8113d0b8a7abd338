//! Several token endpoints behind one deployment: `[upstreams.NAME]` tables in the configuration
//! file, two mock-idp user pools, three replicas on one real Redis.

use std::time::Duration;

use base64::Engine as _;
use mock_idp::RunningMockIdp;

use crate::helpers::{
    ROOT_SECRET, RedisServer, TestProxy, burst, client, config_with, eventually, http, post_basic, read, spawn_pool,
};

const SECRET: &str = "the-same-secret-at-both-pools";
const OTHER_SECRET: &str = "another-clients-secret-at-both-pools";
const ORDERS_ISSUER: &str = "https://cognito-idp.test/orders-pool";
const PARTNERS_ISSUER: &str = "https://login.test/partners";
const ADMIN_TOKEN: &str = "upstreams-admin-token-0123456789";

/// Two pools that both know `shared-client` with the same secret, and the replicas in front.
struct TwoPools {
    orders: RunningMockIdp,
    partners: RunningMockIdp,
    replicas: Vec<TestProxy>,
    _redis: RedisServer,
    file: std::path::PathBuf,
}

impl TwoPools {
    async fn start(replicas: usize) -> TwoPools {
        TwoPools::start_with(replicas, "").await
    }

    /// With `partners_settings` in the partners pool's table.
    async fn start_with(replicas: usize, partners_settings: &str) -> TwoPools {
        let redis = RedisServer::start().await;
        let clients = || vec![client("shared-client", SECRET), client("other-client", OTHER_SECRET)];
        let orders = spawn_pool(clients(), ORDERS_ISSUER).await;
        let partners = spawn_pool(clients(), PARTNERS_ISSUER).await;
        let dir = std::env::temp_dir().join(format!("tp-upstreams-{}-{}", std::process::id(), redis.port));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token-proxy.toml");
        let text = format!(
            "default_upstream = \"orders\"\n\n[upstreams.orders]\nurl = \"{}\"\n\n[upstreams.partners]\nurl = \"{}\"\ntimeout = \"5s\"\n{partners_settings}",
            orders.token_url(),
            partners.token_url()
        );
        std::fs::write(&file, text).unwrap();
        let redis_url = redis.url();
        let overrides = [
            ("TOKEN_PROXY_CONFIG", file.to_str().unwrap()),
            ("TOKEN_PROXY_REDIS_URL", redis_url.as_str()),
            ("TOKEN_PROXY_SECRET", ROOT_SECRET),
            ("TOKEN_PROXY_ADMIN_TOKEN", ADMIN_TOKEN),
        ];
        let mut spawned = Vec::new();
        for _ in 0..replicas {
            spawned.push(TestProxy::spawn(config_with(&overrides)).await);
        }
        TwoPools { orders, partners, replicas: spawned, _redis: redis, file }
    }

    /// `/NAME/oauth2/token` on every replica.
    fn urls(&self, name: &str) -> Vec<String> {
        self.replicas.iter().map(|r| format!("http://{}/{name}/oauth2/token", r.addr)).collect()
    }
}

impl Drop for TwoPools {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.file.parent().unwrap());
    }
}

/// The `iss` claim of a JWT access token: which pool issued it.
fn issuer(token: &str) -> String {
    let payload = token.split('.').nth(1).expect("a JWT");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url");
    let claims: serde_json::Value = serde_json::from_slice(&json).expect("JSON claims");
    claims["iss"].as_str().expect("an iss claim").to_owned()
}

#[tokio::test]
async fn the_same_credentials_at_two_pools_are_two_entries_that_never_cross() {
    let pools = TwoPools::start(3).await;
    let (orders_urls, partners_urls) = (pools.urls("orders"), pools.urls("partners"));
    for round in 0..5 {
        let (orders, partners) = tokio::join!(
            burst(&orders_urls, 30, "shared-client", SECRET, &[]),
            burst(&partners_urls, 30, "shared-client", SECRET, &[]),
        );
        for reply in &orders {
            assert_eq!(reply.status, 200, "{}", reply.raw);
            assert_eq!(issuer(reply.access_token()), ORDERS_ISSUER, "round {round}");
        }
        for reply in &partners {
            assert_eq!(reply.status, 200, "{}", reply.raw);
            assert_eq!(issuer(reply.access_token()), PARTNERS_ISSUER, "round {round}");
        }
    }
    assert_eq!(pools.orders.idp.issued_total(), 1, "one token at the orders pool for 150 requests");
    // Requests and upstream calls are counted per upstream (configured names: bounded labels).
    let mut partners_requests = 0.0;
    let mut partners_calls = 0.0;
    for replica in &pools.replicas {
        for outcome in ["hit", "miss", "coalesced"] {
            let series = format!("token_proxy_requests_total{{outcome=\"{outcome}\",upstream=\"partners\"}}");
            partners_requests += replica.metric(&series).await;
        }
        partners_calls +=
            replica.metric("token_proxy_upstream_requests_total{status_class=\"2xx\",upstream=\"partners\"}").await;
    }
    assert_eq!((partners_requests, partners_calls), (150.0, 1.0));
    assert_eq!(pools.partners.idp.issued_total(), 1, "one token at the partners pool for 150 requests");

    // `/oauth2/token` is the default upstream, orders: the same entry, a HIT on every replica.
    let via_name = post_basic(&orders_urls[0], "shared-client", SECRET, None).await;
    for replica in &pools.replicas {
        let via_default = post_basic(&replica.token_url(), "shared-client", SECRET, None).await;
        assert_eq!(via_default.access_token(), via_name.access_token());
        assert_eq!(via_default.x_cache(), "HIT");
    }
    assert_eq!(pools.orders.idp.issued_total(), 1);
}

#[tokio::test]
async fn an_unknown_upstream_is_a_404_and_calls_no_pool() {
    let pools = TwoPools::start(1).await;
    let reply = post_basic(&pools.urls("nowhere")[0], "shared-client", SECRET, None).await;
    assert_eq!(reply.status, 404, "{}", reply.raw);
    assert_eq!(reply.error(), "invalid_request");
    assert!(reply.headers["content-type"].to_str().unwrap().starts_with("application/json"));
    let get = http().get(&pools.urls("orders")[0]).send().await.unwrap();
    assert_eq!(get.status(), 405);
    assert_eq!(pools.orders.idp.requests_total() + pools.partners.idp.requests_total(), 0);
}

/// Plain token routes skip axum's router (`handler::ClientService`); the rest go through it.
/// Both ways must route alike: a percent-encoded name, the same upstream, the same entry.
#[tokio::test]
async fn a_percent_encoded_upstream_name_routes_like_the_plain_one() {
    let pools = TwoPools::start(1).await;
    let addr = pools.replicas[0].addr;
    let plain = post_basic(&format!("http://{addr}/partners/oauth2/token"), "shared-client", SECRET, None).await;
    assert_eq!((plain.status, plain.x_cache()), (200, "MISS"), "{}", plain.raw);
    let encoded = post_basic(&format!("http://{addr}/p%61rtners/oauth2/token"), "shared-client", SECRET, None).await;
    assert_eq!((encoded.status, encoded.x_cache()), (200, "HIT"), "{}", encoded.raw);
    assert_eq!(encoded.access_token(), plain.access_token());
    assert_eq!(issuer(plain.access_token()), PARTNERS_ISSUER);
    for path in ["/partners/oauth2/token/", "//oauth2/token", "/a/partners/oauth2/token", "/oauth2/token2"] {
        let reply = post_basic(&format!("http://{addr}{path}"), "shared-client", SECRET, None).await;
        assert_eq!(reply.status, 404, "{path}: {}", reply.raw);
    }
    assert_eq!(pools.partners.idp.issued_total(), 1);
    assert_eq!(pools.orders.idp.requests_total(), 0);
}

#[tokio::test]
async fn a_cold_burst_at_one_pool_costs_one_call_there_and_none_at_the_other() {
    let pools = TwoPools::start(3).await;
    let replies = burst(&pools.urls("partners"), 1_000, "shared-client", SECRET, &[]).await;
    assert!(replies.iter().all(|r| r.status == 200), "every request answered");
    let first = replies[0].access_token();
    assert!(replies.iter().all(|r| r.access_token() == first), "one token for all");
    assert_eq!(pools.partners.idp.requests_total(), 1, "exactly one call at the partners pool");
    assert_eq!(pools.orders.idp.requests_total(), 0, "none at the other");
}

#[tokio::test]
async fn a_purge_of_one_upstream_leaves_the_other_upstreams_entries() {
    let pools = TwoPools::start(2).await;
    let (orders_url, partners_url) = (&pools.urls("orders")[0], &pools.urls("partners")[0]);
    let orders_token = post_basic(orders_url, "shared-client", SECRET, None).await.access_token().to_owned();
    let partners_token = post_basic(partners_url, "shared-client", SECRET, None).await.access_token().to_owned();

    for (body, what) in [
        (r#"{"upstream": "orders"}"#, "upstream"),
        (r#"{"upstream": "orders", "client_id": "shared-client"}"#, "client"),
    ] {
        let (status, answer) = pools.replicas[0].purge(Some(ADMIN_TOKEN), body).await;
        assert_eq!((status, answer["purged"].as_str()), (200, Some(what)), "{answer}");
        let issued_before = pools.orders.idp.issued_total();
        // The purging replica applies it at once, the others on its announcement.
        for url in pools.urls("orders") {
            eventually(
                Duration::from_secs(3),
                &format!("{body}: the purged token no longer served at {url}"),
                async || post_basic(&url, "shared-client", SECRET, None).await.access_token() != orders_token,
            )
            .await;
        }
        assert_eq!(pools.orders.idp.issued_total(), issued_before + 1, "{body}: one new token for both replicas");
        for url in pools.urls("partners") {
            let reply = post_basic(&url, "shared-client", SECRET, None).await;
            assert_eq!(reply.access_token(), partners_token, "{body}: the other upstream keeps its entry");
        }
    }
    assert_eq!(pools.partners.idp.issued_total(), 1);
    let (status, _) = pools.replicas[0].purge(Some(ADMIN_TOKEN), r#"{"upstream": "nowhere"}"#).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn failed_authentications_are_throttled_per_upstream() {
    let pools = TwoPools::start(1).await;
    let (orders_url, partners_url) = (&pools.urls("orders")[0], &pools.urls("partners")[0]);
    // The default: 5 failures per client and source, then 429 for the rest of the window.
    // Like Cognito, the pools answer a wrong secret with 400 invalid_client.
    for _ in 0..5 {
        assert_eq!(post_basic(orders_url, "shared-client", "a-wrong-secret", None).await.error(), "invalid_client");
    }
    let throttled = post_basic(orders_url, "shared-client", "a-wrong-secret", None).await;
    assert_eq!(throttled.status, 429, "{}", throttled.raw);
    assert_eq!(pools.orders.idp.requests_total(), 5, "the throttled attempt never reached the pool");
    // The same client at the other upstream has failed nowhere yet: its attempts still go out.
    let at_partners = post_basic(partners_url, "shared-client", "a-wrong-secret", None).await;
    assert_eq!(at_partners.error(), "invalid_client", "{}", at_partners.raw);
    assert_eq!(pools.partners.idp.requests_total(), 1);
    // And the right secret at the partners pool is unaffected.
    assert_eq!(post_basic(partners_url, "shared-client", SECRET, None).await.status, 200);
}

#[tokio::test]
async fn a_spent_client_budget_refuses_upstream_calls_while_cached_tokens_keep_being_served() {
    let budget = "client_call_budget = 2\nclient_call_budget_window = \"3s\"\n";
    let pools = TwoPools::start_with(2, budget).await;
    let partners = pools.urls("partners");
    // Two calls, on two replicas: the budget is the cluster's, not a replica's.
    let read = post_basic(&partners[0], "shared-client", SECRET, Some("api/read")).await;
    let write = post_basic(&partners[1], "shared-client", SECRET, Some("api/write")).await;
    assert_eq!((read.status, write.status), (200, 200), "{} {}", read.raw, write.raw);

    // A third key of the same client would be a third call: refused, nothing sent upstream.
    let refused = post_basic(&partners[0], "shared-client", SECRET, None).await;
    assert_eq!(refused.status, 429, "{}", refused.raw);
    assert_eq!(refused.error(), "temporarily_unavailable");
    assert!(refused.raw.contains("budget"), "{}", refused.raw);
    assert_eq!(refused.x_cache(), "", "no cache status: nothing was looked up upstream");
    let retry_after: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3).contains(&retry_after), "retry after {retry_after} s");
    assert_eq!(pools.partners.idp.requests_total(), 2);

    // Its cached tokens are still served, on every replica; other clients and the other
    // upstream have budgets of their own (the orders pool has none).
    for url in &partners {
        let hit = post_basic(url, "shared-client", SECRET, Some("api/read")).await;
        assert_eq!((hit.status, hit.access_token()), (200, read.access_token()));
    }
    assert_eq!(post_basic(&partners[0], "other-client", OTHER_SECRET, None).await.status, 200);
    for scope in [None, Some("api/read"), Some("api/write")] {
        assert_eq!(post_basic(&pools.urls("orders")[0], "shared-client", SECRET, scope).await.status, 200);
    }
    let metric = "token_proxy_throttled_total{reason=\"client_budget\",upstream=\"partners\"}";
    assert_eq!(pools.replicas[0].metric(metric).await, 1.0, "counted for its upstream");
    let metric = "token_proxy_throttled_total{reason=\"client_budget\",upstream=\"orders\"}";
    assert_eq!(pools.replicas[0].metric(metric).await, 0.0);

    // The window slides: once the first call is older than the window, a call goes through.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let after = post_basic(&partners[0], "shared-client", SECRET, None).await;
    assert_eq!(after.status, 200, "{}", after.raw);
    assert_eq!(pools.partners.idp.requests_total(), 4, "two, then the other client, then this one");
}

/// Anyone who knows a client_id can send wrong secrets: those calls are the upstream refusing
/// the credentials, not the client's calls, and must not spend its budget (found in review).
#[tokio::test]
async fn wrong_secrets_do_not_spend_a_clients_budget() {
    let pools = TwoPools::start_with(1, "client_call_budget = 2\n").await;
    let partners = &pools.urls("partners")[0];
    for _ in 0..4 {
        let guess = post_basic(partners, "shared-client", "a-guessed-secret", None).await;
        assert_eq!(guess.error(), "invalid_client", "{}", guess.raw);
    }
    for scope in [Some("api/read"), Some("api/write")] {
        let reply = post_basic(partners, "shared-client", SECRET, scope).await;
        assert_eq!(reply.status, 200, "the budget is still whole: {}", reply.raw);
    }
    assert_eq!(post_basic(partners, "shared-client", SECRET, None).await.status, 429, "and then spent");
}

/// A token request for `shared-client` to `url` with `Host: host` (a client that cannot change
/// its path names the upstream by the host it calls).
async fn post_at_host(url: &str, host: &str) -> crate::helpers::TokenReply {
    let response = http()
        .post(url)
        .header("host", host)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", shared::basic::encode("shared-client", SECRET))
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    read(response).await
}

#[tokio::test]
async fn a_listed_host_routes_the_default_path_to_its_upstream_and_any_other_to_the_default() {
    let pools = TwoPools::start_with(2, "hosts = [\"login.partners.test\"]\n").await;
    let (first, second) = (pools.replicas[0].token_url(), pools.replicas[1].token_url());
    let by_host = post_at_host(&first, "login.partners.test").await;
    assert_eq!(by_host.status, 200, "{}", by_host.raw);
    assert_eq!(issuer(by_host.access_token()), PARTNERS_ISSUER, "the listed host reaches partners");
    // The same entry as /partners/oauth2/token, on any replica, whatever the case or the port.
    for host in ["LOGIN.Partners.Test:8443", "login.partners.test."] {
        let again = post_at_host(&second, host).await;
        assert_eq!((again.access_token(), again.x_cache()), (by_host.access_token(), "HIT"), "{host}");
    }
    let by_path = post_basic(&pools.urls("partners")[1], "shared-client", SECRET, None).await;
    assert_eq!(by_path.access_token(), by_host.access_token());

    // Any other host reaches the default; a named path ignores the host.
    let other = post_at_host(&first, "orders.test").await;
    assert_eq!(issuer(other.access_token()), ORDERS_ISSUER);
    let named = post_at_host(&pools.urls("orders")[0], "login.partners.test").await;
    assert_eq!(named.access_token(), other.access_token(), "/orders/oauth2/token stays orders");
    assert_eq!((pools.orders.idp.requests_total(), pools.partners.idp.requests_total()), (1, 1));
}
