//! The shared cache, and the store that talks to it.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::SecretString;

use super::{ConfigError, Setting, Source};
use crate::metrics::Metrics;
use crate::store::iam::{CredentialSource, IamAuth, IamService, IamTarget};
use crate::store::{Endpoint, EndpointError, RedisStore, Scheme, Sealing, StoreSettings, client_config};

pub static REDIS_URL: Setting = Setting {
    name: "TOKEN_PROXY_REDIS_URL",
    default: None,
    help: "redis://, rediss://, redis-cluster://, rediss-cluster://, redis-sentinel:// or rediss-sentinel:// URL \
           (valkey:// and valkeys:// too); unset = in-process cache only",
};
pub static REDIS_CA_FILE: Setting = Setting {
    name: "TOKEN_PROXY_REDIS_CA_FILE",
    default: None,
    help: "PEM bundle of the CAs trusted for Redis over TLS; unset = the system's roots",
};
pub static REDIS_CLIENT_CERT_FILE: Setting = Setting {
    name: "TOKEN_PROXY_REDIS_CLIENT_CERT_FILE",
    default: None,
    help: "PEM certificate chain presented to Redis over TLS (mTLS), with TOKEN_PROXY_REDIS_CLIENT_KEY_FILE",
};
pub static REDIS_CLIENT_KEY_FILE: Setting = Setting {
    name: "TOKEN_PROXY_REDIS_CLIENT_KEY_FILE",
    default: None,
    help: "PEM private key of TOKEN_PROXY_REDIS_CLIENT_CERT_FILE",
};
pub static REDIS_PASSWORD_FILE: Setting = Setting {
    name: "TOKEN_PROXY_REDIS_PASSWORD_FILE",
    default: None,
    help: "file holding the Redis password, for a URL without one (the user, if any, stays in the URL)",
};
pub static REDIS_IAM: Setting = Setting {
    name: "TOKEN_PROXY_REDIS_IAM",
    default: None,
    help: "elasticache-serverless, elasticache or memorydb: log in with IAM tokens signed with the AWS credentials \
           (environment, web identity, ECS task role, instance metadata) instead of a password",
};
pub static REDIS_IAM_USER: Setting = Setting {
    name: "TOKEN_PROXY_REDIS_IAM_USER",
    default: None,
    help: "with TOKEN_PROXY_REDIS_IAM: the ElastiCache or MemoryDB user id (ElastiCache: equal to its user name)",
};
pub static REDIS_IAM_CACHE: Setting = Setting {
    name: "TOKEN_PROXY_REDIS_IAM_CACHE",
    default: None,
    help: "with TOKEN_PROXY_REDIS_IAM: the serverless cache's name, the replication group id, or the MemoryDB \
           cluster's name (lower case)",
};
pub static REDIS_IAM_REGION: Setting = Setting {
    name: "TOKEN_PROXY_REDIS_IAM_REGION",
    default: None,
    help: "with TOKEN_PROXY_REDIS_IAM: the cache's region; unset = AWS_REGION, else AWS_DEFAULT_REGION",
};
pub static REDIS_TIMEOUT: Setting = Setting {
    name: "TOKEN_PROXY_REDIS_TIMEOUT",
    default: Some("250ms"),
    help: "deadline of one Redis command; past it the request carries on without Redis",
};
pub static REDIS_BREAKER_THRESHOLD: Setting = Setting {
    name: "TOKEN_PROXY_REDIS_BREAKER_THRESHOLD",
    default: Some("5"),
    help: "consecutive Redis failures that open the circuit breaker (degraded mode)",
};
pub static REDIS_BREAKER_COOLDOWN: Setting = Setting {
    name: "TOKEN_PROXY_REDIS_BREAKER_COOLDOWN",
    default: Some("2s"),
    help: "time the breaker stays open before one probe command is let through",
};

/// The shared cache. Absent, one replica runs alone on its in-process cache.
#[derive(Debug)]
pub struct RedisSettings {
    /// Where Redis is and how to reach it: the URL (a secret: it may carry a password), the
    /// password from its file, TLS.
    pub endpoint: Endpoint,
    /// Deadline of one command. Default 250 ms.
    pub timeout: Duration,
    /// Consecutive failures that open the breaker. Default 5.
    pub breaker_threshold: u32,
    /// Time the breaker stays open before a probe. Default 2 s.
    pub breaker_cooldown: Duration,
}

impl RedisSettings {
    /// The timing settings are checked even without a URL, so that a typo is not found only
    /// on the day Redis is added. Every file (CA, client certificate and key, password) is
    /// read and checked here, so `--check` finds them unusable too.
    pub(super) fn parse(source: &Source) -> Result<Option<RedisSettings>, ConfigError> {
        let timeout = source.duration(&REDIS_TIMEOUT)?;
        if timeout.is_zero() {
            return Err(source.error(&REDIS_TIMEOUT, "must be more than zero"));
        }
        let breaker_threshold: u32 = source.parse(&REDIS_BREAKER_THRESHOLD, "a whole number")?;
        if breaker_threshold == 0 {
            return Err(source.error(&REDIS_BREAKER_THRESHOLD, "must be at least 1"));
        }
        let breaker_cooldown = source.duration(&REDIS_BREAKER_COOLDOWN)?;
        let tls_files = [&REDIS_CA_FILE, &REDIS_CLIENT_CERT_FILE, &REDIS_CLIENT_KEY_FILE];
        let iam_settings = [&REDIS_IAM, &REDIS_IAM_USER, &REDIS_IAM_CACHE, &REDIS_IAM_REGION];
        let Some(url) = source.get(&REDIS_URL) else {
            if let Some(setting) = tls_files
                .into_iter()
                .chain([&REDIS_PASSWORD_FILE])
                .chain(iam_settings)
                .find(|s| source.get(s).is_some())
            {
                return Err(source.error(setting, format!("is set, but {} is not", REDIS_URL.name)));
            }
            return Ok(None);
        };
        // Never echo the URL, nor fred's parse error (it may quote it): it may carry a password.
        let scheme = Scheme::of(&url).ok_or_else(|| source.error(&REDIS_URL, EndpointError::Scheme.to_string()))?;
        let tls = if scheme.tls {
            Some(Arc::new(tls_config(source)?))
        } else {
            if let Some(setting) = tls_files.into_iter().find(|s| source.get(s).is_some()) {
                return Err(source.error(
                    setting,
                    format!("applies to TLS only, and {} is not a TLS URL (rediss://...)", REDIS_URL.name),
                ));
            }
            None
        };
        let password = match source.get(&REDIS_PASSWORD_FILE) {
            Some(path) => Some(read_password(source, &path)?),
            None => None,
        };
        let endpoint = Endpoint::new(&url, password, tls).map_err(|e| match e {
            EndpointError::PasswordTwice => source
                .error(&REDIS_PASSWORD_FILE, format!("{} has a password too; keep one of the two", REDIS_URL.name)),
            other => source.error(&REDIS_URL, other.to_string()),
        })?;
        let endpoint = match iam(source)? {
            Some(iam) => endpoint.with_iam(Arc::new(iam)).map_err(|e| source.error(&REDIS_IAM, e.to_string()))?,
            None => {
                if let Some(setting) = iam_settings.into_iter().find(|s| source.get(s).is_some()) {
                    return Err(source.error(setting, format!("is set, but {} is not", REDIS_IAM.name)));
                }
                endpoint
            }
        };
        Ok(Some(RedisSettings { endpoint, timeout, breaker_threshold, breaker_cooldown }))
    }

    /// The store, sealing its entries with `sealing`: its clients start connecting in the
    /// background.
    pub fn store(&self, sealing: Sealing, metrics: Arc<Metrics>) -> Result<RedisStore, ConfigError> {
        if let Some(iam) = self.endpoint.iam() {
            let target = iam.target();
            tracing::info!(
                service = ?target.service,
                user = %target.user,
                cache = %target.cache,
                region = %target.region,
                credentials = iam.source().describe(),
                "Redis logins use IAM tokens"
            );
        }
        let settings = StoreSettings {
            command_timeout: self.timeout,
            breaker_threshold: self.breaker_threshold,
            breaker_cooldown: self.breaker_cooldown,
            pipelined_reads: true,
        };
        RedisStore::connect_to(&self.endpoint, settings, sealing, metrics).map_err(|e| REDIS_URL.error(e.to_string()))
    }
}

/// IAM authentication, when `TOKEN_PROXY_REDIS_IAM` asks for it: what the token opens and
/// where the AWS credentials come from (the AWS variables, read through the same lookup).
fn iam(source: &Source) -> Result<Option<IamAuth>, ConfigError> {
    let Some(kind) = source.get(&REDIS_IAM) else { return Ok(None) };
    let service = match kind.trim() {
        "elasticache-serverless" => IamService::ElastiCacheServerless,
        "elasticache" => IamService::ElastiCache,
        "memorydb" => IamService::MemoryDb,
        other => {
            return Err(source.error(
                &REDIS_IAM,
                format!("expected elasticache-serverless, elasticache or memorydb, got {other:?}"),
            ));
        }
    };
    let user = source.required(&REDIS_IAM_USER)?.trim().to_owned();
    // ElastiCache and MemoryDB keep names in lowercase and sign the host so (as botocore
    // does): `My-Group` must sign as `my-group`. The user id is a query value, compared as is.
    let cache = source.required(&REDIS_IAM_CACHE)?.trim().to_ascii_lowercase();
    let aws = |name: &str| (source.lookup)(name).filter(|v| !v.trim().is_empty());
    let region = source
        .get(&REDIS_IAM_REGION)
        .or_else(|| aws("AWS_REGION"))
        .or_else(|| aws("AWS_DEFAULT_REGION"))
        .map(|r| r.trim().to_owned())
        .ok_or_else(|| source.error(&REDIS_IAM_REGION, "is required (or AWS_REGION, or AWS_DEFAULT_REGION)"))?;
    let credentials = CredentialSource::from_environment(aws, &region)
        .map_err(|cause| source.error(&REDIS_IAM, format!("no usable AWS credentials: {cause}")))?;
    let target = IamTarget { service, region, cache, user };
    Ok(Some(IamAuth::new(target, credentials)))
}

/// The TLS client configuration: the CA file's roots (the system's without one), and the
/// client certificate and key (both or neither). Each error names the file's setting.
fn tls_config(source: &Source) -> Result<rustls::ClientConfig, ConfigError> {
    let roots = match source.get(&REDIS_CA_FILE) {
        Some(path) => Some(read_certificates(source, &REDIS_CA_FILE, &path)?),
        None => None,
    };
    let identity = match (source.get(&REDIS_CLIENT_CERT_FILE), source.get(&REDIS_CLIENT_KEY_FILE)) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(source.error(&REDIS_CLIENT_CERT_FILE, format!("needs {}", REDIS_CLIENT_KEY_FILE.name)));
        }
        (None, Some(_)) => {
            return Err(source.error(&REDIS_CLIENT_KEY_FILE, format!("needs {}", REDIS_CLIENT_CERT_FILE.name)));
        }
        (Some(cert), Some(key)) => {
            let chain = read_certificates(source, &REDIS_CLIENT_CERT_FILE, &cert)?;
            let pem = std::fs::read(&key)
                .map_err(|e| source.error(&REDIS_CLIENT_KEY_FILE, format!("cannot read {key}: {e}")))?;
            // The parser's own errors may quote lines of the file: not one of them is shown.
            let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
                source
                    .error(&REDIS_CLIENT_KEY_FILE, format!("{key}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it"))
            })?;
            Some((chain, der))
        }
    };
    let key_path = source.get(&REDIS_CLIENT_KEY_FILE).unwrap_or_default();
    client_config(roots, identity).map_err(|e| match e {
        EndpointError::NoSystemRoots => source.error(&REDIS_CA_FILE, format!("is unset and {e}")),
        EndpointError::Tls(message) if message.contains("CA certificate") => {
            source.error(&REDIS_CA_FILE, format!("{}: {message}", source.get(&REDIS_CA_FILE).unwrap_or_default()))
        }
        other => source.error(&REDIS_CLIENT_KEY_FILE, format!("{key_path}: {other}")),
    })
}

/// The certificates of a PEM file; an error names `setting` and the path.
fn read_certificates(
    source: &Source,
    setting: &Setting,
    path: &str,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = std::fs::read(path).map_err(|e| source.error(setting, format!("cannot read {path}: {e}")))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| source.error(setting, format!("{path}: not a PEM certificate file")))?;
    if certificates.is_empty() {
        return Err(source.error(setting, format!("{path}: no PEM certificate in it")));
    }
    Ok(certificates)
}

/// The password in `path`: its first line, without the line end (a password may hold spaces).
fn read_password(source: &Source, path: &str) -> Result<SecretString, ConfigError> {
    let contents = std::fs::read_to_string(path)
        .map_err(|e| source.error(&REDIS_PASSWORD_FILE, format!("cannot read {path}: {e}")))?;
    let password = contents.lines().next().unwrap_or_default();
    if password.is_empty() {
        return Err(source.error(&REDIS_PASSWORD_FILE, format!("{path}: is empty (the password is its first line)")));
    }
    Ok(SecretString::from(password.to_owned()))
}
