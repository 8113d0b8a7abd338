//! The token endpoint, and the client that calls it; one per `[upstreams.NAME]` table with
//! several upstreams, so everything about calling an endpoint lives here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{ConfigError, Setting, Source};
use crate::metrics::Metrics;
use crate::upstream::{ExtraHeadersFrom, Upstream, UpstreamSetupError, parse_headers};

pub static UPSTREAM_URL: Setting = Setting {
    name: "TOKEN_PROXY_UPSTREAM_URL",
    default: None,
    help: "the token endpoint, e.g. https://DOMAIN.auth.REGION.amazoncognito.com/oauth2/token (required)",
};
pub static UPSTREAM_CONNECT_TIMEOUT: Setting = Setting {
    name: "TOKEN_PROXY_UPSTREAM_CONNECT_TIMEOUT",
    default: Some("2s"),
    help: "time to open a connection to the token endpoint",
};
pub static UPSTREAM_TIMEOUT: Setting = Setting {
    name: "TOKEN_PROXY_UPSTREAM_TIMEOUT",
    default: Some("10s"),
    help: "time for a whole upstream exchange; past it the caller gets 504",
};
pub static UPSTREAM_HEADERS_FILE: Setting = Setting {
    name: "TOKEN_PROXY_UPSTREAM_HEADERS_FILE",
    default: None,
    help: "file of `Name: value` lines added to every upstream request (e.g. a WAF origin-verify secret); re-read when it changes",
};

pub static UPSTREAM_HEADERS: Setting = Setting {
    name: "TOKEN_PROXY_UPSTREAM_HEADERS",
    default: None,
    help: "the same `Name: value` lines inline, one per line (for platforms that inject secrets only as environment variables, such as ECS); not with the file",
};

/// The token endpoint every request is sent to.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// Its URL, http or https, without credentials (required).
    pub url: reqwest::Url,
    /// Time to connect to it. Default 2 s.
    pub connect_timeout: Duration,
    /// Time for one whole exchange. Default 10 s.
    pub timeout: Duration,
    /// Extra headers, re-read when the file changes.
    pub headers_file: Option<PathBuf>,
    /// Extra headers given inline (parsed and checked; values are sensitive).
    pub headers: Option<http::HeaderMap>,
}

impl UpstreamSettings {
    pub(super) fn parse(source: &Source) -> Result<UpstreamSettings, ConfigError> {
        let settings = UpstreamSettings {
            url: parse_url(source)?,
            connect_timeout: source.duration(&UPSTREAM_CONNECT_TIMEOUT)?,
            timeout: source.duration(&UPSTREAM_TIMEOUT)?,
            headers_file: source.get(&UPSTREAM_HEADERS_FILE).map(PathBuf::from),
            // Never quoted in errors: the values are secrets.
            headers: match source.get(&UPSTREAM_HEADERS) {
                Some(text) => Some(parse_headers(&text).map_err(|e| source.error(&UPSTREAM_HEADERS, e))?),
                None => None,
            },
        };
        if settings.headers.is_some() && settings.headers_file.is_some() {
            return Err(source.error(
                &UPSTREAM_HEADERS,
                format!("cannot be combined with {} (give the headers in one place)", UPSTREAM_HEADERS_FILE.name),
            ));
        }
        if settings.timeout.is_zero() {
            return Err(source.error(&UPSTREAM_TIMEOUT, "must be more than zero"));
        }
        Ok(settings)
    }

    /// The client of the token endpoint (reads the headers file).
    pub fn client(&self, metrics: Arc<Metrics>) -> Result<Upstream, ConfigError> {
        let headers = match (&self.headers_file, &self.headers) {
            (Some(path), _) => ExtraHeadersFrom::File(path.clone()),
            (None, Some(headers)) => ExtraHeadersFrom::Inline(headers.clone()),
            (None, None) => ExtraHeadersFrom::None,
        };
        Upstream::new(self.url.clone(), self.connect_timeout, self.timeout, headers, metrics).map_err(|e| match e {
            UpstreamSetupError::HeadersFile(message) => UPSTREAM_HEADERS_FILE.error(message),
            UpstreamSetupError::Client(_) | UpstreamSetupError::NoCaCertificates => UPSTREAM_URL.error(e.to_string()),
        })
    }
}

fn parse_url(source: &Source) -> Result<reqwest::Url, ConfigError> {
    let value = source.required(&UPSTREAM_URL)?;
    let url = reqwest::Url::parse(&value).map_err(|e| source.error(&UPSTREAM_URL, format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(source.error(&UPSTREAM_URL, "must be an http:// or https:// URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(source.error(&UPSTREAM_URL, "must not carry credentials"));
    }
    Ok(url)
}
