//! ElastiCache and MemoryDB IAM authentication: the Redis password is a SigV4-presigned
//! `GET http://CACHE/?Action=connect&User=USER` (plus `ResourceType=ServerlessCache` for an
//! ElastiCache Serverless cache), valid 15 minutes, made from AWS credentials.
//!
//! A token is signed afresh for every login (signing is a few HMACs), so every (re)connect
//! presents a token minted that moment. The credentials are fetched by a task of their own
//! ([`IamAuth::start`]), before they expire and again after a failure, never inside a login: a
//! login only signs with the cached ones (or waits briefly for the first), so a slow endpoint
//! cannot make fred's login deadline cancel the fetch, and a failed refresh leaves credentials
//! that are still valid in use. fred asks for a token on each connection (`credential-provider`),
//! and the store sends `AUTH` again with a new one every [`IamAuth::reauth_every`] on every open
//! connection (`store::reauthenticate`, which reports a refusal): AWS closes an IAM connection
//! after 12 hours unless it re-authenticates. The hit-read connection, which logs in
//! on its own, asks on each connection too and is made again after
//! [`IamAuth::connection_max_age`].
//!
//! Credentials come from the first source the environment names, in the AWS SDKs' order:
//! the environment's keys, EKS web identity (`AssumeRoleWithWebIdentity`), the ECS (or EKS Pod
//! Identity) container endpoint, then EC2 instance metadata (IMDSv2). No AWS SDK: the four
//! sources are small HTTP exchanges over the proxy's own reqwest, and the signing is below.
//!
//! Secrets: the secret key, the session token and every token are `SecretString`s; no error
//! here quotes one, nor an answer body (it may hold credentials).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::error::{Error as FredError, ErrorKind as FredErrorKind};
use fred::types::config::{CredentialProvider, Server};
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::refusals::{Link, Refusal, Refusals};

/// How long a token is valid, as AWS requires (`X-Amz-Expires`).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(900);
/// fred re-sends `AUTH` with a new token this often: far inside AWS's 12-hour connection limit.
pub const REAUTH_EVERY: Duration = Duration::from_secs(10 * 60);
/// The hit-read connection is made again (with a new token) after this: AWS closes IAM
/// connections after 12 hours.
pub const CONNECTION_MAX_AGE: Duration = Duration::from_secs(11 * 3600);
/// Credentials are fetched again this long before they expire (as the AWS SDKs do).
const CREDENTIALS_MARGIN: Duration = Duration::from_secs(5 * 60);
/// How often credentials that a source gives with less than [`CREDENTIALS_MARGIN`] left are
/// fetched again.
const REFRESH_INSIDE_MARGIN: Duration = Duration::from_secs(5);
/// Credentials sign logins until this close to their expiry, also after a failed refresh.
const STILL_VALID_FOR: Duration = Duration::from_secs(30);
/// After a failed fetch the next is tried after this, doubling up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(500);
/// The longest wait between fetches while they fail: a recovered endpoint is seen this soon.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How long a login waits for credentials when none are usable: well inside fred's one-second
/// connection deadline, so that the login fails with this module's cause rather than a timeout.
const FIRST_CREDENTIALS_WAIT: Duration = Duration::from_millis(500);
/// Deadline of one exchange with a credentials endpoint.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

/// Which service signs the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IamService {
    /// A node-based ElastiCache replication group.
    ElastiCache,
    /// An ElastiCache Serverless cache (`ResourceType=ServerlessCache`).
    ElastiCacheServerless,
    MemoryDb,
}

impl IamService {
    /// The SigV4 signing name.
    fn signing_name(self) -> &'static str {
        match self {
            IamService::ElastiCache | IamService::ElastiCacheServerless => "elasticache",
            IamService::MemoryDb => "memorydb",
        }
    }
}

/// What a token opens: one user of one cache, in one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IamTarget {
    pub service: IamService,
    pub region: String,
    /// The replication group id, the serverless cache's name, or the MemoryDB cluster's name.
    pub cache: String,
    /// The user id (for IAM users, ElastiCache requires it to equal the user name).
    pub user: String,
}

/// AWS credentials. `Debug` shows the access key id only.
#[derive(Clone)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: SecretString,
    pub session_token: Option<SecretString>,
    /// When temporary credentials stop working; `None` for long-term keys.
    pub expires: Option<SystemTime>,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// The token for `target`, signed with `credentials` at time `at`: the presigned URL without
/// its `http://`. Pure: the same inputs give the same token (known-answer tests below, checked
/// against `proxy/tests/vectors/iam_presign.py`).
pub fn presign(target: &IamTarget, credentials: &AwsCredentials, at: SystemTime) -> SecretString {
    let stamp = amz_date(at);
    let day = &stamp[..8];
    let scope = format!("{day}/{}/{}/aws4_request", target.region, target.service.signing_name());
    let credential = format!("{}/{scope}", credentials.access_key_id);
    let expires = TOKEN_LIFETIME.as_secs().to_string();
    let mut params: Vec<(&str, &str)> = vec![("Action", "connect"), ("User", &target.user)];
    if target.service == IamService::ElastiCacheServerless {
        params.push(("ResourceType", "ServerlessCache"));
    }
    params.extend([
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
        ("X-Amz-Credential", &credential),
        ("X-Amz-Date", &stamp),
        ("X-Amz-Expires", &expires),
        ("X-Amz-SignedHeaders", "host"),
    ]);
    if let Some(session) = &credentials.session_token {
        params.push(("X-Amz-Security-Token", session.expose_secret()));
    }
    let mut encoded: Vec<(String, String)> = params.iter().map(|(k, v)| (uri_encode(k), uri_encode(v))).collect();
    encoded.sort();
    let query = encoded.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
    let empty_body = hex::encode(Sha256::digest(b""));
    let canonical = format!("GET\n/\n{query}\nhost:{}\n\nhost\n{empty_body}", target.cache);
    let to_sign = format!("AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}", hex::encode(Sha256::digest(canonical.as_bytes())));
    let secret = format!("AWS4{}", credentials.secret_access_key.expose_secret());
    let mut key = hmac(secret.as_bytes(), day.as_bytes());
    for part in [target.region.as_str(), target.service.signing_name(), "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    let signature = hex::encode(hmac(&key, to_sign.as_bytes()));
    SecretString::from(format!("{}/?{query}&X-Amz-Signature={signature}", target.cache))
}

fn hmac(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// SigV4's encoding: every byte but the unreserved ones (RFC 3986) as `%XX`.
fn uri_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `YYYYMMDDTHHMMSSZ` (UTC).
fn amz_date(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// The proleptic Gregorian date of a day number since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = i64::from(if month > 2 { month - 3 } else { month + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// An ISO 8601 UTC time as AWS writes credential expiries: `2026-12-06T09:00:00Z`, with or
/// without fractions of a second. Any other offset (`+02:00`) is refused rather than misread
/// as UTC.
fn parse_expiry(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let zone = match text[19..].strip_prefix('.') {
        Some(fraction) => fraction.trim_start_matches(|c: char| c.is_ascii_digit()),
        None => &text[19..],
    };
    if zone != "Z" || (b[19] == b'.' && !b[20].is_ascii_digit()) {
        return None;
    }
    let num = |range: std::ops::Range<usize>| text.get(range)?.parse::<u32>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// The STS endpoint of `region`: the China regions are in their own partition's domain.
fn sts_url(region: &str) -> String {
    let suffix = if region.starts_with("cn-") { "amazonaws.com.cn" } else { "amazonaws.com" };
    format!("https://sts.{region}.{suffix}")
}

/// Where credentials come from: the first the environment names.
#[derive(Clone)]
pub enum CredentialSource {
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`.
    Environment(AwsCredentials),
    /// EKS IAM roles for service accounts: the token file exchanged at STS for the role.
    WebIdentity { token_file: String, role_arn: String, session_name: String, sts_url: String },
    /// The ECS task role (or EKS Pod Identity): a local endpoint, with an authorization token
    /// (given, or re-read from its file on every fetch) when the platform sets one.
    Container { url: String, authorization: Option<SecretString>, authorization_file: Option<String> },
    /// EC2 instance metadata, IMDSv2 (session token first).
    InstanceMetadata { endpoint: String },
}

impl std::fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

impl CredentialSource {
    /// The source the AWS variables (read through `env`) name, in the SDKs' order. STS is
    /// the one of `AWS_REGION`, as in the SDKs, else of `region` (the cache's). Errors name the
    /// variable; they never quote a secret.
    pub fn from_environment(env: impl Fn(&str) -> Option<String>, region: &str) -> Result<CredentialSource, String> {
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(access_key_id), Some(secret)) => {
                return Ok(CredentialSource::Environment(AwsCredentials {
                    access_key_id: access_key_id.trim().to_owned(),
                    secret_access_key: SecretString::from(secret.trim().to_owned()),
                    session_token: env("AWS_SESSION_TOKEN").map(|t| SecretString::from(t.trim().to_owned())),
                    expires: None,
                }));
            }
            (Some(_), None) => return Err("AWS_ACCESS_KEY_ID is set, but AWS_SECRET_ACCESS_KEY is not".to_owned()),
            (None, Some(_)) => return Err("AWS_SECRET_ACCESS_KEY is set, but AWS_ACCESS_KEY_ID is not".to_owned()),
            (None, None) => {}
        }
        if let Some(token_file) = env("AWS_WEB_IDENTITY_TOKEN_FILE") {
            let role_arn = env("AWS_ROLE_ARN").ok_or("AWS_WEB_IDENTITY_TOKEN_FILE is set, but AWS_ROLE_ARN is not")?;
            let sts_url = env("AWS_ENDPOINT_URL_STS")
                .or_else(|| env("AWS_ENDPOINT_URL"))
                .unwrap_or_else(|| sts_url(env("AWS_REGION").as_deref().map_or(region, str::trim)));
            let session_name = env("AWS_ROLE_SESSION_NAME").unwrap_or_else(|| "token-proxy".to_owned());
            return Ok(CredentialSource::WebIdentity { token_file, role_arn, session_name, sts_url });
        }
        let container = match (env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"), env("AWS_CONTAINER_CREDENTIALS_FULL_URI"))
        {
            (Some(relative), _) => Some(format!("http://169.254.170.2{relative}")),
            (None, Some(full)) => {
                if !container_url_allowed(&full) {
                    return Err("AWS_CONTAINER_CREDENTIALS_FULL_URI must be https://, or http:// to a loopback \
                                address or the ECS/EKS credentials address"
                        .to_owned());
                }
                Some(full)
            }
            (None, None) => None,
        };
        if let Some(url) = container {
            return Ok(CredentialSource::Container {
                url,
                authorization: env("AWS_CONTAINER_AUTHORIZATION_TOKEN").map(SecretString::from),
                authorization_file: env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"),
            });
        }
        if env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Err("no AWS credentials: none in the environment, no web identity or container \
                        credentials, and AWS_EC2_METADATA_DISABLED=true"
                .to_owned());
        }
        let endpoint = env("AWS_EC2_METADATA_SERVICE_ENDPOINT").unwrap_or_else(|| "http://169.254.169.254".to_owned());
        Ok(CredentialSource::InstanceMetadata { endpoint: endpoint.trim_end_matches('/').to_owned() })
    }

    /// For the start-up log line and errors.
    pub fn describe(&self) -> &'static str {
        match self {
            CredentialSource::Environment(_) => "the environment (AWS_ACCESS_KEY_ID)",
            CredentialSource::WebIdentity { .. } => "web identity (AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ROLE_ARN)",
            CredentialSource::Container { .. } => "the container credentials endpoint (ECS task role)",
            CredentialSource::InstanceMetadata { .. } => "EC2 instance metadata (IMDSv2)",
        }
    }

    /// Fresh credentials from this source.
    async fn fetch(&self, http: &reqwest::Client) -> Result<AwsCredentials, String> {
        match self {
            CredentialSource::Environment(credentials) => Ok(credentials.clone()),
            CredentialSource::WebIdentity { token_file, role_arn, session_name, sts_url } => {
                // Re-read every time: Kubernetes rotates the projected token.
                let token = std::fs::read_to_string(token_file)
                    .map_err(|e| format!("cannot read the web identity token file {token_file}: {e}"))?;
                let form = [
                    ("Action", "AssumeRoleWithWebIdentity"),
                    ("Version", "2011-06-15"),
                    ("RoleArn", role_arn.as_str()),
                    ("RoleSessionName", session_name.as_str()),
                    ("WebIdentityToken", token.trim()),
                ];
                let body = form.iter().map(|(k, v)| format!("{k}={}", uri_encode(v))).collect::<Vec<_>>().join("&");
                let answer = http
                    .post(format!("{}/", sts_url.trim_end_matches('/')))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| format!("STS AssumeRoleWithWebIdentity: {}", without_url(&e)))?;
                let status = answer.status();
                let text = answer.text().await.map_err(|e| format!("STS: {}", without_url(&e)))?;
                if !status.is_success() {
                    let code = xml_value(&text, "Code").unwrap_or("no error code");
                    return Err(format!("STS AssumeRoleWithWebIdentity answered {status} ({code})"));
                }
                let field = |name: &str| {
                    xml_value(&text, name)
                        .ok_or_else(|| format!("STS AssumeRoleWithWebIdentity: no {name} in the answer"))
                };
                Ok(AwsCredentials {
                    access_key_id: field("AccessKeyId")?.to_owned(),
                    secret_access_key: SecretString::from(field("SecretAccessKey")?.to_owned()),
                    session_token: Some(SecretString::from(field("SessionToken")?.to_owned())),
                    expires: Some(
                        parse_expiry(field("Expiration")?)
                            .ok_or("STS: an Expiration that is not a UTC time (YYYY-MM-DDTHH:MM:SSZ)")?,
                    ),
                })
            }
            CredentialSource::Container { url, authorization, authorization_file } => {
                let mut request = http.get(url);
                let from_file = match authorization_file {
                    Some(path) => Some(
                        std::fs::read_to_string(path)
                            .map_err(|e| format!("cannot read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE {path}: {e}"))?,
                    ),
                    None => None,
                };
                if let Some(value) = from_file.as_deref().or(authorization.as_ref().map(|a| a.expose_secret())) {
                    request = request.header("authorization", value.trim());
                }
                let answer = request.send().await.map_err(|e| format!("container credentials: {}", without_url(&e)))?;
                json_credentials("container credentials endpoint", answer).await
            }
            CredentialSource::InstanceMetadata { endpoint } => {
                let session = http
                    .put(format!("{endpoint}/latest/api/token"))
                    .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
                    .send()
                    .await
                    .map_err(|e| format!("instance metadata: {}", without_url(&e)))?;
                if !session.status().is_success() {
                    return Err(format!("instance metadata: the session token request answered {}", session.status()));
                }
                let session = session.text().await.map_err(|e| format!("instance metadata: {}", without_url(&e)))?;
                let roles_url = format!("{endpoint}/latest/meta-data/iam/security-credentials/");
                let roles = http
                    .get(&roles_url)
                    .header("x-aws-ec2-metadata-token", session.trim())
                    .send()
                    .await
                    .map_err(|e| format!("instance metadata: {}", without_url(&e)))?;
                if !roles.status().is_success() {
                    return Err(format!(
                        "instance metadata: no instance role ({} for iam/security-credentials/)",
                        roles.status()
                    ));
                }
                let roles = roles.text().await.map_err(|e| format!("instance metadata: {}", without_url(&e)))?;
                let role = roles.lines().next().map(str::trim).filter(|r| !r.is_empty());
                let role = role.ok_or("instance metadata: the instance has no role")?;
                let answer = http
                    .get(format!("{roles_url}{role}"))
                    .header("x-aws-ec2-metadata-token", session.trim())
                    .send()
                    .await
                    .map_err(|e| format!("instance metadata: {}", without_url(&e)))?;
                json_credentials("instance metadata", answer).await
            }
        }
    }
}

/// Whether a full container credentials URL may receive the authorization token: what the AWS
/// SDKs allow (HTTPS, loopback, the ECS and EKS Pod Identity addresses).
fn container_url_allowed(url: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(url) else { return false };
    let Some(host) = url.host_str() else { return false };
    match url.scheme() {
        "https" => true,
        "http" => match host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
            Ok(ip) => {
                ip.is_loopback()
                    || ["169.254.170.2", "169.254.170.23", "fd00:ec2::23"].contains(&ip.to_string().as_str())
            }
            Err(_) => host == "localhost",
        },
        _ => false,
    }
}

/// A reqwest error without its URL (an endpoint's query could carry anything).
fn without_url(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else if error.is_decode() || error.is_body() {
        "unreadable answer"
    } else {
        "request failed"
    };
    kind.to_owned()
}

/// The text of the first `<name>…</name>` in an STS answer.
fn xml_value<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    Some(xml[start..end].trim())
}

/// Credentials in the JSON form of the container and instance metadata endpoints.
async fn json_credentials(what: &str, answer: reqwest::Response) -> Result<AwsCredentials, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Json {
        access_key_id: String,
        secret_access_key: String,
        token: Option<String>,
        expiration: Option<String>,
    }
    let status = answer.status();
    if !status.is_success() {
        return Err(format!("{what} answered {status}"));
    }
    let body = answer.bytes().await.map_err(|e| format!("{what}: {}", without_url(&e)))?;
    // serde's message could quote the body: only say that it did not parse.
    let json: Json = serde_json::from_slice(&body).map_err(|_| format!("{what}: not a credentials document"))?;
    let expires = match json.expiration {
        Some(text) => Some(
            parse_expiry(&text)
                .ok_or_else(|| format!("{what}: an Expiration that is not a UTC time (YYYY-MM-DDTHH:MM:SSZ)"))?,
        ),
        None => None,
    };
    Ok(AwsCredentials {
        access_key_id: json.access_key_id,
        secret_access_key: SecretString::from(json.secret_access_key),
        session_token: json.token.map(SecretString::from),
        expires,
    })
}

/// Signs the tokens of one deployment: its target, its credential source and the credentials
/// that [`IamAuth::start`]'s refresher keeps. Reports failures to the store's refusals (once
/// per cause, and readiness).
pub struct IamAuth {
    target: IamTarget,
    source: CredentialSource,
    http: OnceLock<reqwest::Client>,
    /// The credentials logins sign with: set by the refresher alone, read by every login.
    credentials: watch::Sender<Option<AwsCredentials>>,
    /// The clock tokens are signed at (the system's; a test fixes it to know the token).
    pub clock: fn() -> SystemTime,
    /// How often the store sends `AUTH` with a new token on each connection. Default
    /// [`REAUTH_EVERY`].
    pub reauth_every: Duration,
    /// Age at which the hit-read connection is made again. Default [`CONNECTION_MAX_AGE`].
    pub connection_max_age: Duration,
    refusals: OnceLock<Arc<Refusals>>,
    /// Why the last fetch failed, while no usable credentials are cached: the refusal, told
    /// once, and what a login that finds no credentials answers.
    failing: Mutex<Option<String>>,
    /// A failed refresh was warned about while the cached credentials still served: one
    /// warning until a fetch succeeds again.
    warned: AtomicBool,
}

impl std::fmt::Debug for IamAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IamAuth").field("target", &self.target).field("source", &self.source).finish_non_exhaustive()
    }
}

impl IamAuth {
    pub fn new(target: IamTarget, source: CredentialSource) -> IamAuth {
        IamAuth {
            target,
            source,
            http: OnceLock::new(),
            credentials: watch::Sender::new(None),
            clock: SystemTime::now,
            reauth_every: REAUTH_EVERY,
            connection_max_age: CONNECTION_MAX_AGE,
            refusals: OnceLock::new(),
            failing: Mutex::new(None),
            warned: AtomicBool::new(false),
        }
    }

    /// The HTTP client of the credential endpoints, made on first use: after start-up has
    /// installed the process's TLS provider, which reqwest needs.
    fn http(&self) -> Result<&reqwest::Client, String> {
        if let Some(http) = self.http.get() {
            return Ok(http);
        }
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(Duration::from_secs(1))
            // Credential endpoints never redirect; a redirect would carry the authorization
            // header elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot create the AWS credentials client ({e})"))?;
        Ok(self.http.get_or_init(|| http))
    }

    pub fn target(&self) -> &IamTarget {
        &self.target
    }

    pub fn source(&self) -> &CredentialSource {
        &self.source
    }

    /// Starts the refresher, reporting failures to `refusals`. The credentials are fetched in
    /// this task and nowhere else: fred runs the credential provider inside its connection
    /// setup, under a one-second deadline, and a fetch (up to three exchanges of up to
    /// [`FETCH_TIMEOUT`] each) made there was cancelled whenever the endpoint took longer,
    /// every time, with nothing cached and nothing said (issue 12).
    pub(crate) fn start(self: &Arc<Self>, refusals: Arc<Refusals>) {
        let _ = self.refusals.set(refusals);
        tokio::spawn(refresh(Arc::downgrade(self)));
    }

    /// A token signed now. Waits at most [`FIRST_CREDENTIALS_WAIT`] for credentials when
    /// none are usable (at start-up, or after they expired).
    pub async fn token(&self) -> Result<SecretString, String> {
        let mut updates = self.credentials.subscribe();
        let wait = updates.wait_for(|c| c.as_ref().is_some_and(|c| still_valid(c, SystemTime::now())));
        let credentials = match tokio::time::timeout(FIRST_CREDENTIALS_WAIT, wait).await {
            Ok(Ok(credentials)) => credentials.clone(),
            _ => None,
        };
        match credentials {
            Some(credentials) => Ok(presign(&self.target, &credentials, (self.clock)())),
            None => Err(self
                .failing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .unwrap_or_else(|| format!("no credentials from {} yet", self.source.describe()))),
        }
    }

    /// One fetch from the source.
    async fn fetch(&self) -> Result<AwsCredentials, String> {
        let fresh = self.source.fetch(self.http()?).await?;
        if fresh.expires.is_some_and(|at| at <= SystemTime::now()) {
            return Err(format!("the credentials from {} have already expired", self.source.describe()));
        }
        Ok(fresh)
    }

    fn fetched(&self, fresh: AwsCredentials) {
        self.credentials.send_replace(Some(fresh));
        self.warned.store(false, Ordering::Relaxed);
        if self.failing.lock().unwrap_or_else(PoisonError::into_inner).take().is_some()
            && let Some(refusals) = self.refusals.get()
        {
            refusals.accepted(Link::Credentials);
        }
    }

    /// A fetch failed: the cached credentials go on serving while they are still valid (one
    /// warning); without them no login can be made, which is the refusal.
    fn fetch_failed(&self, cause: String) {
        let now = SystemTime::now();
        let cached = self.credentials.borrow().clone().filter(|c| still_valid(c, now));
        if let Some(cached) = cached {
            if !self.warned.swap(true, Ordering::Relaxed) {
                let left = cached.expires.and_then(|at| at.duration_since(now).ok()).unwrap_or_default();
                tracing::warn!(
                    access_key_id = %cached.access_key_id,
                    "the AWS credentials could not be refreshed ({cause}); the cached ones are used while they \
                     are valid ({} s left), and the refresh is retried",
                    left.as_secs()
                );
            }
            return;
        }
        let mut failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        if failing.as_deref() == Some(cause.as_str()) {
            return;
        }
        *failing = Some(cause.clone());
        drop(failing);
        match self.refusals.get() {
            Some(refusals) => refusals.refused(Link::Credentials, Refusal::Credentials(cause)),
            None => tracing::error!("no IAM token for Redis: {cause}"),
        }
    }
}

/// Whether `credentials` may still sign a login at `now`: not within [`STILL_VALID_FOR`] of
/// their expiry (a token signed later would outlive them).
fn still_valid(credentials: &AwsCredentials, now: SystemTime) -> bool {
    credentials.expires.is_none_or(|at| now + STILL_VALID_FOR < at)
}

/// When credentials fetched at `now` are fetched again: [`CREDENTIALS_MARGIN`] before they
/// expire, as the AWS SDKs do, or every [`REFRESH_INSIDE_MARGIN`] when the source gives less
/// than that; never for long-term keys.
fn refresh_after(credentials: &AwsCredentials, now: SystemTime) -> Option<Duration> {
    let left = credentials.expires?.duration_since(now).unwrap_or_default();
    Some(left.saturating_sub(CREDENTIALS_MARGIN).max(REFRESH_INSIDE_MARGIN))
}

/// The refresher: fetches, then sleeps until the next refresh is due, or after a failure
/// retries with a backoff. Ends with its [`IamAuth`], or after fetching long-term keys.
async fn refresh(iam: Weak<IamAuth>) {
    let mut backoff = RETRY_MIN;
    loop {
        let Some(auth) = iam.upgrade() else { return };
        let wait = match auth.fetch().await {
            Ok(fresh) => {
                backoff = RETRY_MIN;
                let next = refresh_after(&fresh, SystemTime::now());
                auth.fetched(fresh);
                match next {
                    Some(next) => next,
                    None => return,
                }
            }
            Err(cause) => {
                auth.fetch_failed(cause);
                let wait = backoff;
                backoff = (backoff * 2).min(RETRY_MAX);
                wait
            }
        };
        drop(auth);
        tokio::time::sleep(wait).await;
    }
}

/// [`IamAuth`] as fred's credential provider: a token for every login.
#[derive(Debug, Clone)]
pub(crate) struct IamLogin(pub(crate) Arc<IamAuth>);

impl CredentialProvider for IamLogin {
    fn fetch<'a, 'b, 'c>(
        &'a self,
        _server: Option<&'b Server>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(Option<String>, Option<String>), FredError>> + Send + 'c>,
    >
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        Box::pin(async move {
            // Not an `Auth` error: the store would take it for Redis refusing the login. The
            // cause is already reported (see `IamAuth::token`).
            let token = self.0.token().await.map_err(|_| FredError::new(FredErrorKind::Unknown, "no IAM token"))?;
            Ok((Some(self.0.target.user.clone()), Some(token.expose_secret().to_owned())))
        })
    }

    /// None: the store re-authenticates itself (`store::reauthenticate`), so that a refusal
    /// is seen.
    fn refresh_interval(&self) -> Option<Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's documented example keys (not real ones), as in `iam_presign.py`.
    fn example_credentials(session: Option<&str>) -> AwsCredentials {
        AwsCredentials {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: SecretString::from("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
            session_token: session.map(SecretString::from),
            expires: None,
        }
    }

    /// 2026-12-06T08:00:00Z.
    fn signing_time() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_796_544_000)
    }

    fn target(service: IamService, region: &str, cache: &str, user: &str) -> IamTarget {
        IamTarget { service, region: region.into(), cache: cache.into(), user: user.into() }
    }

    #[test]
    fn tokens_match_the_independently_computed_vectors() {
        // Expected values: `python3 proxy/tests/vectors/iam_presign.py` (standard library only).
        let serverless = presign(
            &target(IamService::ElastiCacheServerless, "eu-west-1", "token-cache", "token-proxy"),
            &example_credentials(Some("FwoGZXIvYXdzEXAMPLE/session+token==")),
            signing_time(),
        );
        assert_eq!(
            serverless.expose_secret(),
            "token-cache/?Action=connect&ResourceType=ServerlessCache&User=token-proxy&\
             X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20261206%2Feu-west-1%2F\
             elasticache%2Faws4_request&X-Amz-Date=20261206T080000Z&X-Amz-Expires=900&\
             X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLE%2Fsession%2Btoken%3D%3D&X-Amz-SignedHeaders=host&\
             X-Amz-Signature=053128be910d64ef36885a8135b37ceb29f0cd386556818ae4a8de6c7a7373e8"
        );
        let group = presign(
            &target(IamService::ElastiCache, "us-east-1", "my-group", "proxy user"),
            &example_credentials(None),
            signing_time(),
        );
        assert_eq!(
            group.expose_secret(),
            "my-group/?Action=connect&User=proxy%20user&X-Amz-Algorithm=AWS4-HMAC-SHA256&\
             X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20261206%2Fus-east-1%2Felasticache%2Faws4_request&\
             X-Amz-Date=20261206T080000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&\
             X-Amz-Signature=1fb42b8cb2d91618e57f8e1fa4e92de85e84ac25e9a3c6874a026fcd798576bc"
        );
        let memorydb = presign(
            &target(IamService::MemoryDb, "us-west-2", "tokens", "token-proxy"),
            &example_credentials(None),
            signing_time(),
        );
        assert!(
            memorydb.expose_secret().ends_with(
                "%2Fus-west-2%2Fmemorydb%2Faws4_request&X-Amz-Date=20261206T080000Z&X-Amz-Expires=900&\
                 X-Amz-SignedHeaders=host&\
                 X-Amz-Signature=62c4eccdd65838638a9977fcc75b565706928b400230307a03ff3f501316c76b"
            ),
            "{}",
            memorydb.expose_secret()
        );
    }

    #[test]
    fn credentials_are_refreshed_before_the_margin_and_used_until_shortly_before_expiry() {
        let now = signing_time();
        let valid_for =
            |secs| AwsCredentials { expires: Some(now + Duration::from_secs(secs)), ..example_credentials(None) };
        assert_eq!(refresh_after(&valid_for(3600), now), Some(Duration::from_secs(3300)));
        assert_eq!(refresh_after(&valid_for(240), now), Some(REFRESH_INSIDE_MARGIN), "inside the margin");
        assert_eq!(refresh_after(&example_credentials(None), now), None, "long-term keys");
        assert!(still_valid(&valid_for(240), now), "a failed refresh leaves these in use");
        assert!(!still_valid(&valid_for(20), now));
    }

    #[test]
    fn dates_round_trip_through_the_calendar() {
        assert_eq!(amz_date(signing_time()), "20261206T080000Z");
        assert_eq!(amz_date(UNIX_EPOCH), "19700101T000000Z");
        assert_eq!(amz_date(UNIX_EPOCH + Duration::from_secs(951_782_400)), "20000229T000000Z");
        assert_eq!(parse_expiry("2026-12-06T08:00:00Z"), Some(signing_time()));
        assert_eq!(parse_expiry("2026-12-06T08:00:00.123Z"), Some(signing_time()));
        assert_eq!(parse_expiry("2000-02-29T00:00:00Z"), Some(UNIX_EPOCH + Duration::from_secs(951_782_400)));
        for bad in [
            "",
            "2026-13-06T08:00:00Z",
            "yesterday",
            "2026-12-06 08:00:00",
            "2026-12-06T08:00:00",
            "2026-12-06T10:00:00+02:00",
            "2026-12-06T10:00:00.5+02:00",
            "2026-12-06T08:00:00.Z",
            "2026-12-06T08:00:00ZZ",
        ] {
            assert_eq!(parse_expiry(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_environment_names_one_source_in_the_sdks_order() {
        let source = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
            CredentialSource::from_environment(
                move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
                "eu-west-1",
            )
        };
        let keys =
            source(&[("AWS_ACCESS_KEY_ID", "AKID"), ("AWS_SECRET_ACCESS_KEY", "secret-canary"), ("AWS_ROLE_ARN", "r")]);
        assert!(matches!(keys, Ok(CredentialSource::Environment(ref c)) if c.access_key_id == "AKID"));
        assert!(!format!("{keys:?}").contains("secret-canary"));
        assert!(source(&[("AWS_ACCESS_KEY_ID", "AKID")]).unwrap_err().contains("AWS_SECRET_ACCESS_KEY"));
        let web = source(&[("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"), ("AWS_ROLE_ARN", "arn:aws:iam::1:role/r")]);
        assert!(
            matches!(web, Ok(CredentialSource::WebIdentity { ref sts_url, .. }) if sts_url == "https://sts.eu-west-1.amazonaws.com")
        );
        assert!(source(&[("AWS_WEB_IDENTITY_TOKEN_FILE", "/t")]).unwrap_err().contains("AWS_ROLE_ARN"));
        // STS is AWS_REGION's, as in the SDKs, in its partition's domain.
        let sts_of = |region: &str| match source(&[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"),
            ("AWS_ROLE_ARN", "arn:aws:iam::1:role/r"),
            ("AWS_REGION", region),
        ]) {
            Ok(CredentialSource::WebIdentity { sts_url, .. }) => sts_url,
            other => panic!("{other:?}"),
        };
        assert_eq!(sts_of("us-east-2"), "https://sts.us-east-2.amazonaws.com");
        assert_eq!(sts_of("cn-north-1"), "https://sts.cn-north-1.amazonaws.com.cn");
        assert_eq!(sts_url("cn-northwest-1"), "https://sts.cn-northwest-1.amazonaws.com.cn");
        let ecs = source(&[("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/credentials/x")]);
        assert!(
            matches!(ecs, Ok(CredentialSource::Container { ref url, .. }) if url == "http://169.254.170.2/v2/credentials/x")
        );
        assert!(source(&[("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:9/creds")]).is_ok());
        assert!(source(&[("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://evil.example/creds")]).is_err());
        assert!(
            matches!(source(&[]), Ok(CredentialSource::InstanceMetadata { ref endpoint }) if endpoint == "http://169.254.169.254")
        );
        assert!(source(&[("AWS_EC2_METADATA_DISABLED", "true")]).is_err());
    }
}
