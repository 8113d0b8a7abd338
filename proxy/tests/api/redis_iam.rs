//! ElastiCache / MemoryDB IAM authentication against a real `redis-server` over TLS. Redis
//! cannot check a SigV4 signature, so each test makes the ACL user's password the token the
//! replica must present: the replica signs at a fixed clock (a test hook), so the token depends
//! only on the credentials, and the test computes it with the same pure function whose output
//! is pinned against an independent computation (`store::iam` unit tests,
//! `tests/vectors/iam_presign.py`). Credentials come from fakes of the AWS endpoints on
//! loopback (ECS container credentials, IMDSv2, STS web identity), which the tests rotate.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use mock_idp::RunningMockIdp;
use secrecy::{ExposeSecret, SecretString};
use token_proxy::store::iam::{AwsCredentials, IamService, IamTarget, presign};

use crate::helpers::*;

const USER: &str = "iam-user";
const CACHE: &str = "token-cache";
const REGION: &str = "eu-west-1";
const CONTAINER_AUTHORIZATION: &str = "container-authorization-canary-0042";
const IMDS_SESSION: &str = "imds-session-token-canary-0042";

/// The replicas' signing clock: 2026-12-06T08:00:00Z.
fn fixed_clock() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_796_544_000)
}

/// Temporary credentials number `n` (registered as canaries).
fn credentials(n: u32) -> AwsCredentials {
    let secret = format!("iam-secret-access-key-canary-{n:04}");
    let session = format!("iam-session-token-canary-{n:04}");
    register_secret("an AWS secret access key", &secret);
    register_secret("an AWS session token", &session);
    AwsCredentials {
        access_key_id: format!("ASIATESTKEY{n:04}"),
        secret_access_key: SecretString::from(secret),
        session_token: Some(SecretString::from(session)),
        expires: None,
    }
}

/// The token a replica signing with `credentials` presents (registered as a canary).
fn token(credentials: &AwsCredentials) -> String {
    let target = IamTarget {
        service: IamService::ElastiCacheServerless,
        region: REGION.into(),
        cache: CACHE.into(),
        user: USER.into(),
    };
    let token = presign(&target, credentials, fixed_clock()).expose_secret().to_owned();
    register_secret("an IAM token", &token);
    token
}

/// Fakes of the AWS credential endpoints, serving whatever credentials the test sets.
#[derive(Clone)]
struct FakeAws {
    current: Arc<Mutex<Option<AwsCredentials>>>,
    /// How long the credentials served are valid from the moment they are served.
    valid_for: Arc<Mutex<Duration>>,
    /// How long the ECS endpoint takes to answer.
    delay: Arc<Mutex<Duration>>,
    /// Credentials documents served (or refused) so far.
    fetches: Arc<AtomicUsize>,
}

impl FakeAws {
    async fn start(initial: Option<AwsCredentials>) -> (FakeAws, String) {
        let fake = FakeAws {
            current: Arc::new(Mutex::new(initial)),
            valid_for: Arc::new(Mutex::new(Duration::from_secs(60))),
            delay: Arc::new(Mutex::new(Duration::ZERO)),
            fetches: Arc::new(AtomicUsize::new(0)),
        };
        let app = axum::Router::new()
            .route("/ecs/credentials", get(ecs))
            .route("/latest/api/token", put(imds_session))
            .route("/latest/meta-data/iam/security-credentials/", get(imds_role))
            .route("/latest/meta-data/iam/security-credentials/test-role", get(imds_credentials))
            .route("/sts/", post(sts))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (fake, url)
    }

    fn set(&self, credentials: Option<AwsCredentials>) {
        *self.current.lock().unwrap() = credentials;
    }

    fn set_valid_for(&self, valid_for: Duration) {
        *self.valid_for.lock().unwrap() = valid_for;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// The current credentials as the JSON of the ECS and instance metadata endpoints, valid
    /// [`FakeAws::valid_for`] (a minute unless set: inside the replica's five-minute margin,
    /// so it fetches them again every few seconds).
    fn json(&self) -> Result<String, StatusCode> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let valid_for = *self.valid_for.lock().unwrap();
        let current = self.current.lock().unwrap().clone().ok_or(StatusCode::FORBIDDEN)?;
        Ok(serde_json::json!({
            "AccessKeyId": current.access_key_id,
            "SecretAccessKey": current.secret_access_key.expose_secret(),
            "Token": current.session_token.as_ref().map(|t| t.expose_secret().to_owned()),
            "Expiration": iso8601(SystemTime::now() + valid_for),
        })
        .to_string())
    }
}

fn iso8601(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).unwrap().as_secs();
    // Days to a civil date (the same calendar arithmetic as any; a second implementation
    // would only repeat it): good from 2000 to 2099, which is all a test needs.
    let (mut days, rest) = (secs / 86_400, secs % 86_400);
    let mut year = 1970;
    loop {
        let length = if year % 4 == 0 { 366 } else { 365 };
        if days < length {
            break;
        }
        days -= length;
        year += 1;
    }
    let months = [31, if year % 4 == 0 { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut month = 0;
    while days >= months[month] {
        days -= months[month];
        month += 1;
    }
    format!("{year}-{:02}-{:02}T{:02}:{:02}:{:02}Z", month + 1, days + 1, rest / 3600, rest % 3600 / 60, rest % 60)
}

async fn ecs(State(fake): State<FakeAws>, headers: HeaderMap) -> Result<String, StatusCode> {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(CONTAINER_AUTHORIZATION) {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let delay = *fake.delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    fake.json()
}

async fn imds_session(headers: HeaderMap) -> Result<&'static str, StatusCode> {
    headers.get("x-aws-ec2-metadata-token-ttl-seconds").ok_or(StatusCode::BAD_REQUEST)?;
    Ok(IMDS_SESSION)
}

fn imds_checked(headers: &HeaderMap) -> Result<(), StatusCode> {
    match headers.get("x-aws-ec2-metadata-token").and_then(|v| v.to_str().ok()) {
        Some(IMDS_SESSION) => Ok(()),
        _ => Err(StatusCode::UNAUTHORIZED),
    }
}

async fn imds_role(headers: HeaderMap) -> Result<&'static str, StatusCode> {
    imds_checked(&headers)?;
    Ok("test-role\n")
}

async fn imds_credentials(State(fake): State<FakeAws>, headers: HeaderMap) -> Result<String, StatusCode> {
    imds_checked(&headers)?;
    fake.json()
}

async fn sts(State(fake): State<FakeAws>, body: String) -> Result<String, StatusCode> {
    let form: Vec<(String, String)> = url_form(&body);
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if field("Action") != Some("AssumeRoleWithWebIdentity")
        || field("RoleArn") != Some("arn:aws:iam::123456789012:role/token-proxy")
        || field("WebIdentityToken") != Some("projected-service-account-token")
    {
        return Err(StatusCode::FORBIDDEN);
    }
    let current = fake.current.lock().unwrap().clone().ok_or(StatusCode::FORBIDDEN)?;
    Ok(format!(
        "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>\
         <AccessKeyId>{}</AccessKeyId><SecretAccessKey>{}</SecretAccessKey><SessionToken>{}</SessionToken>\
         <Expiration>{}</Expiration></Credentials></AssumeRoleWithWebIdentityResult>\
         </AssumeRoleWithWebIdentityResponse>",
        current.access_key_id,
        current.secret_access_key.expose_secret(),
        current.session_token.as_ref().unwrap().expose_secret(),
        iso8601(SystemTime::now() + Duration::from_secs(60)),
    ))
}

/// A form body's pairs, percent-decoded.
fn url_form(body: &str) -> Vec<(String, String)> {
    let decode = |text: &str| {
        let bytes = text.replace('+', " ").into_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() + 1 {
                out.push(u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap(), 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    };
    body.split('&').filter_map(|pair| pair.split_once('=')).map(|(k, v)| (decode(k), decode(v))).collect()
}

/// A replica on the TLS Redis `redis`, logging in with IAM tokens from `aws` (the AWS
/// variables), signing at [`fixed_clock`], sending `AUTH` again every `reauth_every`.
async fn iam_replica(
    idp: &RunningMockIdp,
    tls: &RedisTls,
    redis: &TlsRedis,
    aws: &[(&str, String)],
    reauth_every: Duration,
) -> TestProxy {
    iam_replica_on(idp, tls, redis.url(), aws, reauth_every).await
}

/// [`iam_replica`] on any TLS URL.
async fn iam_replica_on(
    idp: &RunningMockIdp,
    tls: &RedisTls,
    url: String,
    aws: &[(&str, String)],
    reauth_every: Duration,
) -> TestProxy {
    let mut settings: Vec<(&str, String)> = vec![
        ("TOKEN_PROXY_REDIS_URL", url),
        ("TOKEN_PROXY_SECRET", ROOT_SECRET.to_owned()),
        ("TOKEN_PROXY_REDIS_IAM", "elasticache-serverless".to_owned()),
        ("TOKEN_PROXY_REDIS_IAM_USER", USER.to_owned()),
        ("TOKEN_PROXY_REDIS_IAM_CACHE", CACHE.to_owned()),
        ("AWS_REGION", REGION.to_owned()),
    ];
    settings.extend(tls.proxy_settings(false));
    settings.extend(aws.iter().cloned());
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut config = proxy_config(&idp.token_url(), &settings);
    let iam = config.redis.as_mut().and_then(|redis| redis.endpoint.iam_mut()).expect("IAM is configured");
    iam.clock = fixed_clock;
    iam.reauth_every = reauth_every;
    TestProxy::spawn(config).await
}

fn set_password(redis: &TlsRedis, token: &str) {
    redis.server.call(&["ACL", "SETUSER", USER, "on", "resetpass", &format!(">{token}"), "~*", "&*", "+@all"]).unwrap();
}

async fn readyz(proxy: &TestProxy) -> serde_json::Value {
    get_json(&format!("http://{}/readyz", proxy.admin)).await
}

/// Failed logins of [`USER`] in Redis's ACL log.
fn failed_logins(redis: &TlsRedis) -> usize {
    let log = redis.server.call(&["ACL", "LOG"]).unwrap();
    let text: Vec<String> = log.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
    text.windows(2).filter(|w| w[0] == "username" && w[1] == USER).count()
}

/// Open connections logged in as [`USER`].
fn connections_of_user(redis: &TlsRedis) -> usize {
    let list = String::from_utf8(redis.server.call(&["CLIENT", "LIST"]).unwrap().concat()).unwrap();
    list.lines().filter(|line| line.contains(&format!(" user={USER} "))).count()
}

async fn redis_entries(redis: &TlsRedis) -> usize {
    redis.server.dump().await.iter().filter(|(key, _)| key.starts_with(b"tp:{") && !key.ends_with(b":lock")).count()
}

// ---------------------------------------------------------------------------------------------

/// The ECS task role: every login presents a token signed with the credentials of that moment,
/// and the store sends `AUTH` again on its timer with a new one. Rotated credentials show first
/// as refused re-authentications (Redis still expects the old token), then, once Redis expects the
/// new token, every connection made again (the hit reads' included) logs in with it.
#[tokio::test]
async fn iam_tokens_follow_rotated_credentials_on_every_login_and_on_reauthentication() {
    let tls = RedisTls::new("iam-rotation");
    let redis = TlsRedis::start(&tls, "no", &[]).await;
    let (first, second) = (credentials(1), credentials(2));
    set_password(&redis, &token(&first));
    let (aws, aws_url) = FakeAws::start(Some(first.clone())).await;
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let settings = [
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", format!("{aws_url}/ecs/credentials")),
        ("AWS_CONTAINER_AUTHORIZATION_TOKEN", CONTAINER_AUTHORIZATION.to_owned()),
    ];
    let proxy = iam_replica(&idp, &tls, &redis, &settings, Duration::from_millis(300)).await;
    eventually(Duration::from_secs(10), "Redis up", async || readyz(&proxy).await["redis"] == "up").await;
    assert_eq!(proxy.post_basic("app", SECRET, None).await.x_cache(), "MISS");
    assert_eq!(redis_entries(&redis).await, 1, "the entry went to Redis");
    // Re-authentication with the same credentials: the same token, accepted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(failed_logins(&redis), 0);

    // The credentials rotate; Redis still expects the old token: the next re-authentications
    // (new token) are refused, while the connections stay logged in.
    aws.set(Some(second.clone()));
    eventually(Duration::from_secs(10), "a re-authentication with the new token", async || failed_logins(&redis) > 0)
        .await;
    // Redis now expects the new token: re-authentications succeed again.
    set_password(&redis, &token(&second));
    redis.server.call(&["ACL", "LOG", "RESET"]).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(failed_logins(&redis), 0, "re-authentication with the new token is accepted");

    // Every connection is dropped: each logs in again, with the new token (the old one is
    // refused now), the hit-read connection included.
    redis.server.call(&["CLIENT", "KILL", "USER", USER]).unwrap();
    eventually(Duration::from_secs(10), "every connection back", async || {
        let reply = proxy.post_basic("app", SECRET, Some("api/read")).await;
        assert_eq!(reply.status, 200);
        readyz(&proxy).await["redis"] == "up" && connections_of_user(&redis) >= 3
    })
    .await;
    eventually(Duration::from_secs(10), "the new entry in Redis", async || redis_entries(&redis).await == 2).await;
    assert_eq!(failed_logins(&redis), 0);
    // The refused re-authentications were a refusal, said once.
    let lines = refusal_lines(redis.tls_port);
    assert!(lines.len() == 1 && lines[0].contains("WRONGPASS"), "{lines:#?}");

    // The credentials endpoint fails: once the cached credentials are too close to their
    // expiry to sign with (40 s valid, used until 30 s before), no token can be made, and
    // readiness says so (a new connection could not log in); once it answers again, readiness
    // follows.
    aws.set_valid_for(Duration::from_secs(40));
    tokio::time::sleep(Duration::from_secs(6)).await;
    aws.set(None);
    eventually(Duration::from_secs(25), "no IAM token in /readyz", async || {
        readyz(&proxy).await["redis_refusal"].as_str().is_some_and(|r| r.contains("no IAM token"))
    })
    .await;
    assert_eq!(readyz(&proxy).await["redis"], "down");
    aws.set(Some(second.clone()));
    eventually(Duration::from_secs(15), "Redis up again", async || readyz(&proxy).await["redis"] == "up").await;
    assert_eq!(refusal_lines(redis.tls_port).len(), 2, "each said once: {:?}", refusal_lines(redis.tls_port));
}

/// EC2 instance metadata (IMDSv2: a session token, the role, its credentials) and EKS web
/// identity (the projected token exchanged at STS): each gives the credentials the token is
/// signed with.
#[tokio::test]
async fn instance_metadata_and_web_identity_credentials_sign_the_login() {
    let tls = RedisTls::new("iam-sources");
    let redis = TlsRedis::start(&tls, "no", &[]).await;
    let dir = TempDir::new("iam-web-identity");
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let web_identity = [
        ("AWS_WEB_IDENTITY_TOKEN_FILE", dir.write("token", "projected-service-account-token\n")),
        ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/token-proxy".to_owned()),
    ];
    for (n, source) in [(3, "imds"), (4, "web identity")] {
        let credentials = credentials(n);
        set_password(&redis, &token(&credentials));
        let (_aws, aws_url) = FakeAws::start(Some(credentials)).await;
        let settings: Vec<(&str, String)> = if source == "imds" {
            vec![("AWS_EC2_METADATA_SERVICE_ENDPOINT", aws_url)]
        } else {
            let mut settings = web_identity.to_vec();
            settings.push(("AWS_ENDPOINT_URL_STS", format!("{aws_url}/sts")));
            settings
        };
        let proxy = iam_replica(&idp, &tls, &redis, &settings, Duration::from_secs(600)).await;
        eventually(Duration::from_secs(10), source, async || readyz(&proxy).await["redis"] == "up").await;
        let reply = proxy.post_basic("app", SECRET, Some(if n == 3 { "api/read" } else { "api/write" })).await;
        assert_eq!((reply.status, reply.x_cache()), (200, "MISS"), "{source}");
        assert_eq!(redis_entries(&redis).await, n as usize - 2, "{source}: the entry went to Redis");
        assert_eq!(failed_logins(&redis), 0, "{source}");
    }
}

/// The lines saying the Redis at `port` refuses this replica, or that no token could be made.
fn refusal_lines(port: u16) -> Vec<String> {
    let server = format!("127.0.0.1:{port}");
    captured_logs()
        .lines()
        .filter(|line| {
            (line.contains("Redis refuses this replica") || line.contains("Redis cannot be logged in to"))
                && line.contains(&server)
        })
        .map(str::to_owned)
        .collect()
}

/// A token Redis refuses (an expired one, a role without `elasticache:Connect`: to Redis,
/// `WRONGPASS`), and no credentials at all: each is one line naming the cause, `/readyz` says
/// Redis is down with the cause, and requests are served from the upstream.
#[tokio::test]
async fn a_refused_token_and_missing_credentials_are_each_one_clear_line_and_redis_down() {
    let tls = RedisTls::new("iam-refused");
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    for (case, cause) in [("refused", "WRONGPASS"), ("no credentials", "no IAM token: container credentials")] {
        let redis = TlsRedis::start(&tls, "no", &[]).await;
        // Redis expects a token of other credentials than those the replica gets.
        set_password(&redis, &token(&credentials(5)));
        let (aws, aws_url) = FakeAws::start((case == "refused").then(|| credentials(6))).await;
        let settings = [
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", format!("{aws_url}/ecs/credentials")),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", CONTAINER_AUTHORIZATION.to_owned()),
        ];
        let proxy = iam_replica(&idp, &tls, &redis, &settings, Duration::from_secs(600)).await;
        eventually(Duration::from_secs(10), "the refusal in the log", async || {
            !refusal_lines(redis.tls_port).is_empty()
        })
        .await;
        let ready = readyz(&proxy).await;
        assert_eq!(ready["redis"], "down", "{case}: {ready}");
        assert!(ready["redis_refusal"].as_str().is_some_and(|r| r.contains(cause)), "{case}: {ready}");
        let reply = proxy.post_basic("app", SECRET, None).await;
        assert_eq!(reply.status, 200, "{case}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let lines = refusal_lines(redis.tls_port);
        eprintln!("{case}, as logged: {}", lines[0]);
        assert_eq!(lines.len(), 1, "{case}: said once: {lines:#?}");
        assert!(lines[0].contains(cause), "{case}: {}", lines[0]);
        // The cause goes away (the role gets its credentials; the right ones): Redis is used
        // again, without a restart.
        aws.set(Some(credentials(5)));
        eventually(Duration::from_secs(15), "Redis up again", async || readyz(&proxy).await["redis"] == "up").await;
    }
}

/// IAM needs TLS, no password, no Sentinel, and its user, cache and region: each mistake is
/// one line naming the setting.
#[test]
fn iam_misconfiguration_is_one_line_naming_the_setting() {
    let base = [
        ("TOKEN_PROXY_UPSTREAM_URL", "http://127.0.0.1:9/oauth2/token"),
        ("TOKEN_PROXY_SECRET", ROOT_SECRET),
        ("TOKEN_PROXY_REDIS_URL", "rediss://cache.example:6379"),
        ("TOKEN_PROXY_REDIS_IAM", "elasticache"),
        ("TOKEN_PROXY_REDIS_IAM_USER", USER),
        ("TOKEN_PROXY_REDIS_IAM_CACHE", CACHE),
        ("AWS_REGION", REGION),
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "iam-config-secret-canary-0042"),
    ];
    let error = |changes: &[(&'static str, &'static str)]| {
        let mut vars: Vec<(&str, &str)> = base.to_vec();
        for (name, value) in changes {
            vars.retain(|(n, _)| n != name);
            if !value.is_empty() {
                vars.push((name, value));
            }
        }
        token_proxy::config::Config::from_lookup(|name| {
            vars.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v).to_owned())
        })
        .err()
        .map(|e| e.to_string())
    };
    if error(&[]).is_some_and(|e| e.contains("system has no trusted root")) {
        eprintln!("skipped: this machine has no system roots for rediss://");
        return;
    }
    assert_eq!(error(&[]), None);
    // The cache name is signed in lowercase, as AWS keeps it (and botocore signs it).
    let mixed_case: Vec<(&str, &str)> = base
        .iter()
        .map(|&(k, v)| if k == "TOKEN_PROXY_REDIS_IAM_CACHE" { (k, "Token-Cache") } else { (k, v) })
        .collect();
    let config = token_proxy::config::Config::from_lookup(|name| {
        mixed_case.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v).to_owned())
    })
    .unwrap();
    let target = config.redis.as_ref().and_then(|redis| redis.endpoint.iam()).unwrap().target().clone();
    assert_eq!((target.cache.as_str(), target.user.as_str()), ("token-cache", USER));
    for (changes, variable, words) in [
        (&[("TOKEN_PROXY_REDIS_URL", "redis://cache.example:6379")][..], "TOKEN_PROXY_REDIS_IAM", "TLS"),
        (&[("TOKEN_PROXY_REDIS_URL", "rediss://proxy:pw@cache.example:6379")][..], "TOKEN_PROXY_REDIS_IAM", "password"),
        (
            &[("TOKEN_PROXY_REDIS_URL", "rediss-sentinel://cache.example:26379?sentinelServiceName=m")][..],
            "TOKEN_PROXY_REDIS_IAM",
            "Sentinel",
        ),
        (&[("TOKEN_PROXY_REDIS_IAM", "elasticcache")][..], "TOKEN_PROXY_REDIS_IAM", "memorydb"),
        (&[("TOKEN_PROXY_REDIS_IAM_USER", "")][..], "TOKEN_PROXY_REDIS_IAM_USER", "required"),
        (&[("TOKEN_PROXY_REDIS_IAM_CACHE", "")][..], "TOKEN_PROXY_REDIS_IAM_CACHE", "required"),
        (&[("AWS_REGION", "")][..], "TOKEN_PROXY_REDIS_IAM_REGION", "AWS_REGION"),
        (&[("AWS_SECRET_ACCESS_KEY", "")][..], "TOKEN_PROXY_REDIS_IAM", "AWS_SECRET_ACCESS_KEY"),
        (&[("TOKEN_PROXY_REDIS_IAM", "")][..], "TOKEN_PROXY_REDIS_IAM_USER", "TOKEN_PROXY_REDIS_IAM is not"),
    ] {
        let message = error(changes).unwrap_or_else(|| panic!("{changes:?} accepted"));
        assert!(message.contains(variable) && message.contains(words), "{changes:?}: {message}");
        assert!(!message.contains("canary") && !message.contains(":pw@"), "{message}");
        assert_eq!(message.lines().count(), 1, "{message}");
    }
}

/// ElastiCache Serverless is always cluster mode: on a TLS Redis Cluster every master's
/// connection logs in with the token, entries land on several masters, and re-authentication
/// reaches every master (fred sends `AUTH` to every node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_tls_cluster_every_node_logs_in_and_reauthenticates_with_the_token() {
    let cluster = TlsRedisCluster::start("iam-cluster").await;
    let (first, second) = (credentials(7), credentials(8));
    let password = format!(">{}", token(&first));
    for port in cluster.ports() {
        let set = cluster.tls.cli(port, &["ACL", "SETUSER", USER, "on", &password, "~*", "&*", "+@all"]);
        assert!(set.status.success());
    }
    let (aws, aws_url) = FakeAws::start(Some(first)).await;
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let settings = [
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", format!("{aws_url}/ecs/credentials")),
        ("AWS_CONTAINER_AUTHORIZATION_TOKEN", CONTAINER_AUTHORIZATION.to_owned()),
        ("TOKEN_PROXY_REDIS_TIMEOUT", "2s".to_owned()),
    ];
    let proxy = iam_replica_on(&idp, &cluster.tls, cluster.url(), &settings, Duration::from_millis(300)).await;
    eventually(Duration::from_secs(15), "Redis up", async || readyz(&proxy).await["redis"] == "up").await;
    for n in 0..12 {
        let reply =
            post_basic_with(&proxy.token_url(), "app", SECRET, &[("aws_client_metadata", &format!("k{n}"))]).await;
        assert_eq!((reply.status, reply.x_cache()), (200, "MISS"));
    }
    let counts = cluster.key_counts();
    // A master and its replica hold the same keys: three nodes or more means two masters or more.
    assert!(counts.iter().filter(|&&n| n > 0).count() >= 3, "entries on more than one master: {counts:?}");

    // Rotated credentials, Redis still expecting the old token: every master sees the
    // re-authentication with the new one (and refuses it).
    aws.set(Some(second));
    let refused_on = |cluster: &TlsRedisCluster| {
        cluster
            .ports()
            .into_iter()
            .filter(|&port| {
                let log = cluster.tls.cli(port, &["ACL", "LOG"]);
                String::from_utf8_lossy(&log.stdout).lines().any(|line| line.trim() == USER)
            })
            .count()
    };
    eventually(Duration::from_secs(10), "re-authentication on every master", async || refused_on(&cluster) >= 3).await;
}

/// The AWS variables of the ECS task role, at the fake's container endpoint.
fn ecs_settings(aws_url: &str) -> [(&'static str, String); 2] {
    [
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", format!("{aws_url}/ecs/credentials")),
        ("AWS_CONTAINER_AUTHORIZATION_TOKEN", CONTAINER_AUTHORIZATION.to_owned()),
    ]
}

/// Drops every connection of [`USER`] and waits until the replica has logged in again on all
/// of them (commands, subscription, hit reads) and Redis is up.
async fn every_connection_logs_in_again(proxy: &TestProxy, redis: &TlsRedis) {
    redis.server.call(&["CLIENT", "KILL", "USER", USER]).unwrap();
    eventually(Duration::from_secs(15), "every connection logged in again", async || {
        let reply = proxy.post_basic("app", SECRET, Some("api/read")).await;
        assert_eq!(reply.status, 200);
        readyz(proxy).await["redis"] == "up" && connections_of_user(redis) >= 3
    })
    .await;
}

/// A credentials endpoint slower than fred's one-second login deadline (IMDS and STS may
/// take seconds): the credentials are fetched apart from the logins, which cannot cancel the
/// fetch, so the replica still logs in. Credentials valid for an hour are fetched once, however
/// many logins and re-authentications use them.
#[tokio::test]
async fn a_slow_credentials_endpoint_still_logs_in_and_valid_credentials_are_fetched_once() {
    let tls = RedisTls::new("iam-slow");
    let redis = TlsRedis::start(&tls, "no", &[]).await;
    let first = credentials(9);
    set_password(&redis, &token(&first));
    let (aws, aws_url) = FakeAws::start(Some(first)).await;
    aws.set_valid_for(Duration::from_secs(3600));
    *aws.delay.lock().unwrap() = Duration::from_millis(1500);
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let proxy = iam_replica(&idp, &tls, &redis, &ecs_settings(&aws_url), Duration::from_millis(300)).await;
    // Up: the command connection logged in and answers.
    eventually(Duration::from_secs(20), "Redis up", async || readyz(&proxy).await["redis"] == "up").await;
    every_connection_logs_in_again(&proxy, &redis).await;
    assert_eq!(failed_logins(&redis), 0);
    assert_eq!(aws.fetches(), 1, "credentials valid for an hour are fetched once");
}

/// Credentials inside the refresh margin (four minutes left) whose endpoint then fails: the
/// cached credentials still work, so logins go on with them, with one warning and Redis up.
#[tokio::test]
async fn a_failed_refresh_keeps_using_credentials_that_are_still_valid() {
    let tls = RedisTls::new("iam-stale");
    let redis = TlsRedis::start(&tls, "no", &[]).await;
    let first = credentials(10);
    set_password(&redis, &token(&first));
    let (aws, aws_url) = FakeAws::start(Some(first)).await;
    aws.set_valid_for(Duration::from_secs(240));
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let proxy = iam_replica(&idp, &tls, &redis, &ecs_settings(&aws_url), Duration::from_millis(300)).await;
    eventually(Duration::from_secs(10), "Redis up", async || readyz(&proxy).await["redis"] == "up").await;
    aws.set(None);
    let fetched = aws.fetches();
    eventually(Duration::from_secs(20), "two refreshes refused", async || aws.fetches() >= fetched + 2).await;
    every_connection_logs_in_again(&proxy, &redis).await;
    assert_eq!(failed_logins(&redis), 0);
    assert!(refusal_lines(redis.tls_port).is_empty(), "{:?}", refusal_lines(redis.tls_port));
    let warnings: Vec<String> =
        captured_logs().lines().filter(|l| l.contains("ASIATESTKEY0010")).map(str::to_owned).collect();
    assert_eq!(warnings.len(), 1, "one warning: {warnings:#?}");
    assert!(warnings[0].contains("the cached ones are used"), "{}", warnings[0]);
    assert!(warnings[0].contains("container credentials endpoint answered 403"), "{}", warnings[0]);
}

/// A re-authentication Redis refuses (here the user's password changes under the replica): one
/// line naming the cause, and `/readyz` says Redis is down (a new connection could not log in)
/// until a re-authentication is accepted again.
#[tokio::test]
async fn a_refused_reauthentication_is_one_clear_line_and_redis_down_until_accepted() {
    let tls = RedisTls::new("iam-reauth");
    let redis = TlsRedis::start(&tls, "no", &[]).await;
    let first = credentials(11);
    set_password(&redis, &token(&first));
    let (aws, aws_url) = FakeAws::start(Some(first.clone())).await;
    aws.set_valid_for(Duration::from_secs(3600));
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let proxy = iam_replica(&idp, &tls, &redis, &ecs_settings(&aws_url), Duration::from_millis(300)).await;
    eventually(Duration::from_secs(10), "Redis up", async || readyz(&proxy).await["redis"] == "up").await;
    set_password(&redis, &token(&credentials(12)));
    eventually(Duration::from_secs(10), "the refused re-authentication in /readyz", async || {
        readyz(&proxy).await["redis_refusal"].as_str().is_some_and(|r| r.contains("WRONGPASS"))
    })
    .await;
    assert_eq!(readyz(&proxy).await["redis"], "down");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lines = refusal_lines(redis.tls_port);
    assert_eq!(lines.len(), 1, "said once: {lines:#?}");
    assert!(lines[0].contains("WRONGPASS"), "{}", lines[0]);
    set_password(&redis, &token(&first));
    eventually(Duration::from_secs(10), "Redis up again", async || readyz(&proxy).await["redis"] == "up").await;
}
