//! Invariant 7: every malformed request gets a 4xx with an OAuth JSON error, and costs no
//! upstream call (counted at mock-idp).

use crate::helpers::*;

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: String,
    status: u16,
    error: &'static str,
}

fn case(name: &'static str, body: &str, status: u16, error: &'static str) -> Case {
    Case {
        name,
        method: "POST",
        path: "/oauth2/token",
        headers: vec![("content-type", "application/x-www-form-urlencoded".into())],
        body: body.to_owned(),
        status,
        error,
    }
}

fn with_header(mut c: Case, name: &'static str, value: &str) -> Case {
    c.headers.retain(|(n, _)| *n != name);
    c.headers.push((name, value.to_owned()));
    c
}

#[tokio::test]
async fn malformed_requests_get_oauth_errors_and_cost_no_upstream_call() {
    let app = TestApp::embedded(vec![client("app", "s3cr3t-value")], &[]).await;
    let good = "grant_type=client_credentials&client_id=app&client_secret=s3cr3t-value";
    let basic = shared::basic::encode("app", "s3cr3t-value");
    let cases = vec![
        Case { method: "GET", ..case("GET on the token path", "", 405, "invalid_request") },
        Case { method: "PUT", ..case("PUT on the token path", good, 405, "invalid_request") },
        Case { path: "/oauth2/token/", ..case("trailing slash", good, 404, "invalid_request") },
        Case { path: "/oauth2/authorize", ..case("another path", good, 404, "invalid_request") },
        Case { path: "/", ..case("root", good, 404, "invalid_request") },
        with_header(
            case("JSON body", r#"{"grant_type":"client_credentials"}"#, 400, "invalid_request"),
            "content-type",
            "application/json",
        ),
        with_header(
            case("latin1 charset", good, 400, "invalid_request"),
            "content-type",
            "application/x-www-form-urlencoded; charset=latin1",
        ),
        Case { headers: vec![], ..case("no content type", good, 400, "invalid_request") },
        case("repeated parameter", &format!("{good}&scope=a&scope=b"), 400, "invalid_request"),
        case("repeated empty parameter", &format!("{good}&scope=&scope=a"), 400, "invalid_request"),
        case("repeated grant_type", &format!("{good}&grant_type=client_credentials"), 400, "invalid_request"),
        case(
            "broken percent-encoding",
            "grant_type=client_credentials&client_id=a%zz&client_secret=s3cr3t-value",
            400,
            "invalid_request",
        ),
        case("not UTF-8", "grant_type=client_credentials&client_id=%ff&client_secret=s", 400, "invalid_request"),
        case("empty parameter name", &format!("{good}&=x"), 400, "invalid_request"),
        case("missing grant_type", "client_id=app&client_secret=s3cr3t-value", 400, "invalid_request"),
        case("empty grant_type", "grant_type=&client_id=app&client_secret=s3cr3t-value", 400, "invalid_request"),
        case("no credentials", "grant_type=client_credentials", 401, "invalid_client"),
        case("no secret", "grant_type=client_credentials&client_id=app", 401, "invalid_client"),
        case("empty secret", "grant_type=client_credentials&client_id=app&client_secret=", 401, "invalid_client"),
        with_header(
            case(
                "Basic plus body secret",
                "grant_type=client_credentials&client_secret=s3cr3t-value",
                400,
                "invalid_request",
            ),
            "authorization",
            &basic,
        ),
        with_header(
            case("Basic plus other client_id", "grant_type=client_credentials&client_id=other", 400, "invalid_request"),
            "authorization",
            &basic,
        ),
        with_header(
            case("Basic not base64", "grant_type=client_credentials", 400, "invalid_request"),
            "authorization",
            "Basic %%%",
        ),
        with_header(
            case("Basic without colon", "grant_type=client_credentials", 400, "invalid_request"),
            "authorization",
            "Basic YXBw",
        ),
        with_header(
            case("Bearer scheme", "grant_type=client_credentials", 400, "invalid_request"),
            "authorization",
            "Bearer abc",
        ),
        with_header(
            case("Basic with empty secret", "grant_type=client_credentials", 401, "invalid_client"),
            "authorization",
            "Basic YXBwOg==",
        ),
        case("scope with quote", &format!("{good}&scope=a%22b"), 400, "invalid_scope"),
        case("scope too long", &format!("{good}&scope={}", "a".repeat(2100)), 400, "invalid_scope"),
        case(
            "too many scopes",
            &format!("{good}&scope={}", (0..70).map(|i| format!("s{i}")).collect::<Vec<_>>().join("+")),
            400,
            "invalid_scope",
        ),
        case(
            "too many parameters",
            &format!("{good}&{}", (0..40).map(|i| format!("p{i}=1")).collect::<Vec<_>>().join("&")),
            400,
            "invalid_request",
        ),
        case("body too large", &format!("{good}&pad={}", "x".repeat(9000)), 413, "invalid_request"),
        with_header(case("headers too large", good, 431, "invalid_request"), "x-padding", &"p".repeat(9000)),
        Case {
            path: "/oauth2/token?client_id=app&client_secret=s3cr3t-value",
            ..case("query credentials", "grant_type=client_credentials", 400, "invalid_request")
        },
        Case { path: "/oauth2/token?scope=api/read", ..case("query scope", good, 400, "invalid_request") },
    ];
    for c in &cases {
        let url = format!("http://{}{}", app.proxy.addr, c.path);
        let mut request = http().request(c.method.parse().unwrap(), &url).body(c.body.clone());
        for (name, value) in &c.headers {
            request = request.header(*name, value.as_str());
        }
        let reply = read(request.send().await.unwrap()).await;
        assert_eq!(reply.status, c.status, "{}: {}", c.name, reply.raw);
        assert_eq!(reply.error(), c.error, "{}", c.name);
        assert!(reply.body["error_description"].is_string(), "{}", c.name);
        assert!(reply.headers["content-type"].to_str().unwrap().starts_with("application/json"), "{}", c.name);
        assert_eq!(reply.headers["cache-control"], "no-store", "{}", c.name);
        assert!(!reply.raw.contains("s3cr3t-value"), "{}: error body quotes a credential: {}", c.name, reply.raw);
    }
    assert_eq!(app.upstream_requests(), 0, "a rejected request reached the upstream");
    let rejected = app.proxy.metric("token_proxy_requests_total{outcome=\"rejected\"}").await;
    assert_eq!(rejected, cases.len() as f64);
}

#[tokio::test]
async fn query_parameters_work_in_compatibility_mode() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[("TOKEN_PROXY_ALLOW_QUERY_PARAMS", "true")]).await;
    let url = format!("{}?client_id=app&client_secret={SECRET}", app.proxy.token_url());
    let first = post_form(&url, "grant_type=client_credentials").await;
    assert_eq!((first.status, first.x_cache()), (200, "MISS"), "{}", first.raw);
    // The same credentials in the body share the entry.
    let body = app.post_body("app", SECRET, None).await;
    assert_eq!(body.x_cache(), "HIT");
    let repeated = post_form(&url, "grant_type=client_credentials&client_id=app").await;
    assert_eq!(repeated.status, 400);
}

#[tokio::test]
async fn basic_with_matching_body_client_id_is_accepted() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[]).await;
    let reply = read(
        http()
            .post(app.proxy.token_url())
            .header("content-type", "application/x-www-form-urlencoded; charset=utf-8")
            .header("authorization", shared::basic::encode("app", SECRET))
            .body("grant_type=client_credentials&client_id=app")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.raw);
}
