//! The client of the token endpoint.
//!
//! What goes upstream is built, never copied: a form body made from the normalized request,
//! an `Authorization` header when the client used Basic, a fixed `Accept` and `User-Agent`, and
//! the operator's extra headers (for example a WAF origin-verify secret). Nothing else from the
//! client's request is forwarded. What comes back is read with a size bound, and only the
//! headers a token client needs are kept: never `Set-Cookie` or hop-by-hop headers.
//!
//! Bodies are relayed and cached as they came, so they must be plain: the request asks for
//! `Accept-Encoding: identity`, and an answer in any other content coding is unreadable (a bad
//! gateway), never relayed without its header nor taken for JSON.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::error_code::ErrorCode;
use crate::metrics::{Metrics, UpstreamClass};

/// Largest upstream response body read; a larger one is a bad gateway.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Longest hold-back honoured from a `Retry-After`.
const MAX_HOLD_BACK: Duration = Duration::from_secs(60);
/// How often the extra-headers file is checked for changes.
const HEADERS_RELOAD_INTERVAL: Duration = Duration::from_secs(1);
const USER_AGENT: &str = concat!("token-proxy/", env!("CARGO_PKG_VERSION"));

/// An upstream answer, reduced to what is relayed.
#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub body: Bytes,
    pub content_type: Option<HeaderValue>,
    pub retry_after: Option<HeaderValue>,
    pub www_authenticate: Option<HeaderValue>,
}

impl UpstreamResponse {
    /// A 429 of the proxy's own, standing in for a call it did not make: an OAuth JSON body
    /// (`temporarily_unavailable`) and `Retry-After` in whole seconds, at least one.
    pub fn too_many_requests(description: &str, retry_after: Duration) -> UpstreamResponse {
        let body = shared::wire::OAuthError::new(ErrorCode::TemporarilyUnavailable.as_str(), description);
        UpstreamResponse {
            status: StatusCode::TOO_MANY_REQUESTS,
            body: body.to_json().into(),
            content_type: Some(HeaderValue::from_static("application/json;charset=UTF-8")),
            retry_after: Some(HeaderValue::from(retry_after.as_secs_f64().ceil().max(1.0) as u64)),
            www_authenticate: None,
        }
    }
}

/// Why no upstream answer arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("the token endpoint did not answer in time")]
    Timeout,
    #[error("could not connect to the token endpoint")]
    Connect,
    #[error("the token endpoint's answer was unreadable or too large")]
    BadResponse,
}

/// Why the upstream client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("{0}")]
    HeadersFile(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error(
        "no CA certificates found for the https upstream (the system store, or SSL_CERT_FILE / SSL_CERT_DIR when set): install ca-certificates or point SSL_CERT_FILE at a CA bundle"
    )]
    NoCaCertificates,
}

/// The token endpoint client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: reqwest::Client,
    url: reqwest::Url,
    extra_headers: Arc<ExtraHeaders>,
    /// After a 429 with `Retry-After`, no call is made before this instant.
    hold_until: Arc<Mutex<Option<Instant>>>,
    metrics: Arc<Metrics>,
}

impl Upstream {
    pub fn new(
        url: reqwest::Url,
        connect_timeout: Duration,
        timeout: Duration,
        headers: ExtraHeadersFrom,
        metrics: Arc<Metrics>,
    ) -> Result<Upstream, UpstreamSetupError> {
        let builder = reqwest::Client::builder();
        let builder = if url.scheme() == "https" {
            // The platform verifier refuses to start without roots, and reqwest says only
            // "builder error": say what is missing instead.
            if rustls_native_certs::load_native_certs().certs.is_empty() {
                return Err(UpstreamSetupError::NoCaCertificates);
            }
            builder
        } else {
            // Plain HTTP never verifies a certificate: no roots needed (an image without
            // ca-certificates can still reach a local mock).
            builder.tls_certs_only(Vec::new())
        };
        let client = builder
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            // Never follow a redirect: it would carry the client's credentials elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| UpstreamSetupError::Client(e.to_string()))?;
        let extra_headers = ExtraHeaders::load(headers)?;
        Ok(Upstream { client, url, extra_headers, hold_until: Arc::default(), metrics })
    }

    /// The token endpoint URL.
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// Posts a form body to the token endpoint. While the endpoint has asked us to wait
    /// (429 with `Retry-After`), answers 429 itself without calling it.
    pub async fn exchange(
        &self,
        form_body: String,
        authorization: Option<HeaderValue>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let started = Instant::now();
        if let Some(held) = self.held_back(started) {
            self.metrics.upstream_held_back();
            return Ok(held);
        }
        let result = self.send(form_body, authorization).await;
        if let Ok(response) = &result {
            self.note_retry_after(response);
        }
        let class = match &result {
            Ok(response) => UpstreamClass::of(response.status),
            Err(UpstreamError::Timeout) => UpstreamClass::Timeout,
            Err(_) => UpstreamClass::Error,
        };
        self.metrics.upstream_request(class, started.elapsed());
        if let Err(error) = &result {
            tracing::warn!(%error, "upstream exchange failed");
        }
        result
    }

    /// A synthesized 429 while a `Retry-After` is running, else `None`.
    fn held_back(&self, now: Instant) -> Option<UpstreamResponse> {
        let until = (*self.hold_until.lock().unwrap_or_else(|p| p.into_inner()))?;
        let left = until.checked_duration_since(now).filter(|d| !d.is_zero())?;
        Some(UpstreamResponse::too_many_requests(
            "the token endpoint asked for a pause (429 Retry-After); retry later",
            left,
        ))
    }

    fn note_retry_after(&self, response: &UpstreamResponse) {
        if response.status != StatusCode::TOO_MANY_REQUESTS {
            return;
        }
        // Only the delay-seconds form; an HTTP date would mean comparing clocks.
        let Some(secs) = response.retry_after.as_ref().and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok()) else {
            return;
        };
        let pause = Duration::from_secs(secs).min(MAX_HOLD_BACK);
        tracing::warn!(?pause, "the token endpoint answered 429; holding calls back");
        *self.hold_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + pause);
    }

    async fn send(
        &self,
        form_body: String,
        authorization: Option<HeaderValue>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let mut request = self
            .client
            .post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .header(header::ACCEPT_ENCODING, "identity")
            .headers(self.extra_headers.current());
        if let Some(authorization) = authorization {
            request = request.header(header::AUTHORIZATION, authorization);
        }
        let mut response = request.body(form_body).send().await.map_err(classify)?;
        if response.content_length().is_some_and(|n| n > MAX_RESPONSE_BYTES as u64) {
            return Err(UpstreamError::BadResponse);
        }
        let status = response.status();
        let headers = response.headers();
        if let Some(coding) = headers.get(header::CONTENT_ENCODING)
            && !coding.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity")
        {
            tracing::warn!(
                status = status.as_u16(),
                "the token endpoint answered in a content coding despite Accept-Encoding: identity"
            );
            return Err(UpstreamError::BadResponse);
        }
        let keep = |name: HeaderName| headers.get(name).cloned();
        let content_type = keep(header::CONTENT_TYPE);
        let retry_after = keep(header::RETRY_AFTER);
        let www_authenticate = keep(header::WWW_AUTHENTICATE);
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(UpstreamError::BadResponse);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(UpstreamResponse { status, body: body.freeze(), content_type, retry_after, www_authenticate })
    }
}

fn classify(error: reqwest::Error) -> UpstreamError {
    if error.is_timeout() {
        UpstreamError::Timeout
    } else if error.is_connect() {
        UpstreamError::Connect
    } else {
        UpstreamError::BadResponse
    }
}

/// Operator-configured headers added to every upstream request, re-read when the file changes
/// so that a secret such as a WAF origin-verify value can rotate without a restart.
#[derive(Debug)]
struct ExtraHeaders {
    path: Option<PathBuf>,
    /// The parsed headers and the file's modification time they were read at.
    current: RwLock<(Option<SystemTime>, HeaderMap)>,
}

/// Headers the proxy sets itself, or that would change the meaning of the request.
const RESERVED: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "accept-encoding",
    "transfer-encoding",
    "connection",
    "authorization",
    "te",
    "upgrade",
    "cookie",
    "expect",
];

/// Where the extra upstream headers come from.
#[derive(Debug, Clone, Default)]
pub enum ExtraHeadersFrom {
    #[default]
    None,
    /// A file, re-read when it changes (`TOKEN_PROXY_UPSTREAM_HEADERS_FILE`).
    File(PathBuf),
    /// Headers given inline (`TOKEN_PROXY_UPSTREAM_HEADERS`, for platforms that inject secrets
    /// only as environment variables), parsed by [`parse_headers`]; values are sensitive.
    Inline(HeaderMap),
}

impl ExtraHeaders {
    fn load(from: ExtraHeadersFrom) -> Result<Arc<ExtraHeaders>, UpstreamSetupError> {
        let (path, stamp, headers) = match from {
            ExtraHeadersFrom::File(path) => {
                let (stamp, headers) = read_headers_file(&path).map_err(UpstreamSetupError::HeadersFile)?;
                (Some(path), stamp, headers)
            }
            ExtraHeadersFrom::Inline(headers) => (None, None, headers),
            ExtraHeadersFrom::None => (None, None, HeaderMap::new()),
        };
        let extra = Arc::new(ExtraHeaders { path, current: RwLock::new((stamp, headers)) });
        if extra.path.is_some() {
            tokio::spawn(watch_headers_file(Arc::downgrade(&extra)));
        }
        Ok(extra)
    }

    fn current(&self) -> HeaderMap {
        self.current.read().unwrap_or_else(|p| p.into_inner()).1.clone()
    }

    fn reload_if_changed(&self) {
        let Some(path) = &self.path else { return };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified == self.current.read().unwrap_or_else(|p| p.into_inner()).0 {
            return;
        }
        match read_headers_file(path) {
            Ok(next) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
                tracing::info!(path = %path.display(), "reloaded upstream headers file");
            }
            // Keep the previous headers: a half-written file must not break every request.
            Err(error) => tracing::error!(path = %path.display(), %error, "ignoring unreadable upstream headers file"),
        }
    }
}

async fn watch_headers_file(extra: Weak<ExtraHeaders>) {
    let mut tick = tokio::time::interval(HEADERS_RELOAD_INTERVAL);
    loop {
        tick.tick().await;
        match extra.upgrade() {
            Some(extra) => extra.reload_if_changed(),
            None => return,
        }
    }
}

/// Reads and parses a headers file (see [`parse_headers`]), with its modification time.
fn read_headers_file(path: &Path) -> Result<(Option<SystemTime>, HeaderMap), String> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok((modified, parse_headers(&text)?))
}

/// Parses `Name: value` lines; blank lines and `#` comments are skipped. Errors never quote a
/// value (they are secrets).
pub fn parse_headers(text: &str) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line.split_once(':').ok_or_else(|| format!("line {}: expected `Name: value`", n + 1))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("line {}: invalid header name", n + 1))?;
        if RESERVED.contains(&name.as_str()) {
            return Err(format!("line {}: {name} is set by token-proxy itself", n + 1));
        }
        let mut value =
            HeaderValue::from_str(value.trim()).map_err(|_| format!("line {}: invalid header value", n + 1))?;
        value.set_sensitive(true);
        headers.append(name, value);
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("headers");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn parses_headers_and_refuses_reserved_names_without_echoing_values() {
        let dir = std::env::temp_dir().join(format!("tp-headers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = write(&dir, "# origin verify\nX-Origin-Verify: s3cr3t\n\nX-Other: a\n");
        let (_, headers) = read_headers_file(&path).unwrap();
        assert_eq!(headers["x-origin-verify"], "s3cr3t");
        assert!(headers["x-origin-verify"].is_sensitive());
        assert_eq!(headers.len(), 2);

        let path = write(&dir, "Authorization: hunter2\n");
        let err = read_headers_file(&path).unwrap_err();
        assert!(err.contains("authorization") && !err.contains("hunter2"));
        let path = write(&dir, "no colon hunter2\n");
        assert!(!read_headers_file(&path).unwrap_err().contains("hunter2"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
