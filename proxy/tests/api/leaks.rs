//! Secrets and tokens never appear in logs, metrics or error bodies.

use crate::helpers::*;

#[tokio::test]
async fn logs_and_metrics_never_contain_secrets_or_tokens() {
    const ID: &str = "canary-client";
    const SECRET: &str = "canary-secret-5f0c9b7e";
    let mut app = TestApp::with_redis(vec![client(ID, SECRET)], &[("TOKEN_PROXY_L1_CAPACITY", "0")]).await;
    let url = app.proxy.token_url();
    let mut tokens = Vec::new();
    tokens.push(post_basic(&url, ID, SECRET, None).await.access_token().to_owned());
    tokens.push(post_body(&url, ID, SECRET, Some("api/read")).await.access_token().to_owned());
    post_basic(&url, ID, SECRET, None).await;
    // Failure paths log too: a wrong secret, upstream errors, a rejected request, Redis down.
    post_basic(&url, ID, &format!("{SECRET}-wrong"), None).await;
    app.idp.idp.fail_next(1, 500);
    post_basic(&url, ID, SECRET, Some("api/write")).await;
    post_form(&url, &format!("grant_type=client_credentials&client_secret={SECRET}&client_secret=x")).await;
    app.redis_mut().kill();
    tokens.push(post_basic(&url, ID, SECRET, Some("api/write")).await.access_token().to_owned());

    let metrics = app.proxy.metrics().await;
    let logs = captured_logs();
    assert!(logs.contains("upstream exchange failed") || logs.contains("redis"), "logs were not captured");
    let basic = shared::basic::encode(ID, SECRET);
    let encoded_basic = basic.trim_start_matches("Basic ");
    for (what, text) in [("logs", &logs), ("metrics", &metrics)] {
        assert!(!text.contains(SECRET), "{what} contain the client secret");
        assert!(!text.contains(encoded_basic), "{what} contain the Basic credentials");
        for token in &tokens {
            assert!(!text.contains(token.as_str()), "{what} contain a token");
            let signature = token.rsplit('.').next().unwrap();
            assert!(!text.contains(signature), "{what} contain a token signature");
        }
    }
    assert!(!metrics.contains(ID), "metrics carry the client id as a label");
}
