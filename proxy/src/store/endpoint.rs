//! Where Redis is and how to reach it: the URL's scheme (one server, Cluster or Sentinel; with
//! or without TLS), the password when it does not sit in the URL, and the TLS client
//! configuration (the CAs trusted, the client certificate for mTLS), or IAM authentication in
//! place of a password (`iam.rs`).
//!
//! fred parses the URL; this module only maps the accepted schemes onto fred's and gives fred
//! a rustls configuration of our own instead of its default (which reads the system's roots on
//! every URL parse and cannot take a private CA or a client certificate). The configured files
//! are read by the configuration section, which hands over the parsed certificates; only the
//! system's roots are loaded here, when no CA is given.

use std::sync::Arc;

use fred::prelude::Config;
use fred::types::config::{CredentialProvider, TlsConfig, TlsConnector, TlsHostMapping};
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};

use super::iam::{IamAuth, IamLogin};

/// The URL schemes accepted, for messages.
pub const SCHEMES: &str = "redis://, rediss://, redis-cluster://, rediss-cluster://, redis-sentinel:// or \
                           rediss-sentinel:// (valkey and valkeys work as redis and rediss)";

/// How the servers are organised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One server (a primary, ElastiCache's primary endpoint, or a proxy in front of many).
    Single,
    /// A Redis Cluster: the URL names one or more nodes, the rest is discovered.
    Cluster,
    /// Sentinels that name the primary of a service (`?sentinelServiceName=`).
    Sentinel,
}

/// What a URL's scheme says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme {
    pub topology: Topology,
    pub tls: bool,
}

impl Scheme {
    /// The scheme of `url`, if it is one of [`SCHEMES`].
    pub fn of(url: &str) -> Option<Scheme> {
        let (name, _) = url.split_once("://")?;
        let (base, topology) = match name.split_once('-') {
            None => (name, Topology::Single),
            Some((base, "cluster")) => (base, Topology::Cluster),
            Some((base, "sentinel")) => (base, Topology::Sentinel),
            Some(_) => return None,
        };
        let tls = match base {
            "redis" | "valkey" => false,
            "rediss" | "valkeys" => true,
            _ => return None,
        };
        Some(Scheme { topology, tls })
    }

    /// fred's name for the same thing without TLS (TLS is configured apart, see [`Endpoint`]).
    fn plain_fred_scheme(self) -> &'static str {
        match self.topology {
            Topology::Single => "redis",
            Topology::Cluster => "redis-cluster",
            Topology::Sentinel => "redis-sentinel",
        }
    }
}

/// Why an endpoint cannot be used. Never quotes the URL: it may hold a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("must start with {SCHEMES}")]
    Scheme,
    #[error("invalid Redis URL ({0})")]
    Url(String),
    #[error("TLS settings apply only to a TLS URL (rediss://, rediss-cluster://, rediss-sentinel://)")]
    TlsWithoutTlsUrl,
    #[error("the password is given twice: in the URL and apart; keep one")]
    PasswordTwice,
    #[error("the system has no trusted root certificates (install ca-certificates, or name a CA file)")]
    NoSystemRoots,
    #[error("{0}")]
    Tls(String),
    #[error("IAM authentication needs a TLS URL (rediss://, rediss-cluster://): AWS refuses IAM tokens in the clear")]
    IamWithoutTls,
    #[error("IAM authentication replaces the password: the URL must carry no user nor password, and no password file")]
    IamWithPassword,
    #[error("IAM authentication is for ElastiCache and MemoryDB, which have no Sentinel")]
    IamWithSentinel,
}

/// How to reach Redis: a URL, a password given apart (optional), and TLS.
#[derive(Clone)]
pub struct Endpoint {
    url: SecretString,
    scheme: Scheme,
    password: Option<SecretString>,
    tls: Option<Arc<ClientConfig>>,
    /// IAM authentication: a fresh token as the password of every login.
    iam: Option<Arc<IamAuth>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL, nor the password.
        f.debug_struct("Endpoint")
            .field("scheme", &self.scheme)
            .field("tls", &self.tls.is_some())
            .field("iam", &self.iam.is_some())
            .finish()
    }
}

impl Endpoint {
    /// An endpoint from its URL alone; over TLS it trusts the system's roots.
    pub fn from_url(url: &str) -> Result<Endpoint, EndpointError> {
        let scheme = Scheme::of(url).ok_or(EndpointError::Scheme)?;
        let tls = if scheme.tls { Some(Arc::new(client_config(None, None)?)) } else { None };
        Endpoint::new(url, None, tls)
    }

    /// An endpoint: `password` (e.g. from a file) replaces none in the URL; `tls` is required
    /// by a TLS scheme (see [`client_config`]) and refused by a plain one.
    pub fn new(
        url: &str,
        password: Option<SecretString>,
        tls: Option<Arc<ClientConfig>>,
    ) -> Result<Endpoint, EndpointError> {
        let scheme = Scheme::of(url).ok_or(EndpointError::Scheme)?;
        let tls = match (scheme.tls, tls) {
            (false, Some(_)) => return Err(EndpointError::TlsWithoutTlsUrl),
            (true, None) => Some(Arc::new(client_config(None, None)?)),
            (_, tls) => tls,
        };
        let endpoint = Endpoint { url: SecretString::from(url.to_owned()), scheme, password, tls, iam: None };
        let parsed = endpoint.plain_config()?;
        if parsed.password.is_some() && endpoint.password.is_some() {
            return Err(EndpointError::PasswordTwice);
        }
        Ok(endpoint)
    }

    /// The same endpoint logging in with IAM tokens: over TLS, and with no password nor user
    /// of its own (the token's user is the login's).
    pub fn with_iam(mut self, iam: Arc<IamAuth>) -> Result<Endpoint, EndpointError> {
        if !self.scheme.tls {
            return Err(EndpointError::IamWithoutTls);
        }
        if self.scheme.topology == Topology::Sentinel {
            return Err(EndpointError::IamWithSentinel);
        }
        let parsed = self.plain_config()?;
        if self.password.is_some() || parsed.password.is_some() || parsed.username.is_some() {
            return Err(EndpointError::IamWithPassword);
        }
        self.iam = Some(iam);
        Ok(self)
    }

    /// IAM authentication, when the endpoint uses it.
    pub fn iam(&self) -> Option<&Arc<IamAuth>> {
        self.iam.as_ref()
    }

    /// IAM authentication, to adjust before the store is built (tests fix its clock and
    /// shorten its intervals); `None` once it is shared, or without IAM.
    pub fn iam_mut(&mut self) -> Option<&mut IamAuth> {
        self.iam.as_mut().and_then(Arc::get_mut)
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The URL as given (a secret: it may carry a password).
    pub fn url(&self) -> &SecretString {
        &self.url
    }

    /// The TLS configuration, for connections made outside fred (the hit reads).
    pub(crate) fn tls(&self) -> Option<&Arc<ClientConfig>> {
        self.tls.as_ref()
    }

    /// fred's configuration without TLS: the URL under fred's plain scheme.
    fn plain_config(&self) -> Result<Config, EndpointError> {
        let url = self.url.expose_secret();
        let rest = url.split_once("://").map_or("", |(_, rest)| rest);
        // fred's parse errors may quote the URL, which may hold a password: keep only the kind.
        Config::from_url(&format!("{}://{rest}", self.scheme.plain_fred_scheme()))
            .map_err(|e| EndpointError::Url(format!("{:?}", e.kind())))
    }

    /// fred's configuration: the URL's servers and credentials, the password given apart, and
    /// our TLS configuration. Cluster nodes are verified under the name or address each one
    /// announces (`CLUSTER SLOTS`).
    pub(crate) fn fred_config(&self) -> Result<Config, EndpointError> {
        let mut config = self.plain_config()?;
        if let Some(password) = &self.password {
            config.password = Some(password.expose_secret().to_owned());
        }
        config.credential_provider =
            self.iam.as_ref().map(|iam| Arc::new(IamLogin(Arc::clone(iam))) as Arc<dyn CredentialProvider>);
        config.tls = self.tls.as_ref().map(|tls| TlsConfig {
            connector: TlsConnector::Rustls(tokio_rustls::TlsConnector::from(Arc::clone(tls))),
            hostnames: TlsHostMapping::None,
        });
        Ok(config)
    }
}

/// A rustls client configuration for Redis: trusting `roots` (the system's when `None`), and
/// presenting `identity` (a certificate chain and its key) when given (mTLS). The ring provider,
/// the workspace's one.
pub fn client_config(
    roots: Option<Vec<CertificateDer<'static>>>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, EndpointError> {
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Some(roots) => {
            for root in roots {
                store.add(root).map_err(|e| EndpointError::Tls(format!("not a usable CA certificate: {e}")))?;
            }
        }
        None => {
            // Certificates the system has that cannot be parsed are skipped, as browsers do.
            let system = rustls_native_certs::load_native_certs();
            let (added, _ignored) = store.add_parsable_certificates(system.certs);
            if added == 0 {
                return Err(EndpointError::NoSystemRoots);
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| EndpointError::Tls(e.to_string()))?
        .with_root_certificates(store);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
            EndpointError::Tls(match e {
                rustls::Error::InconsistentKeys(_) => "the key does not match the certificate".to_owned(),
                other => format!("not a usable client certificate and key: {other}"),
            })
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scheme_maps_to_its_topology_and_tls() {
        use Topology::*;
        for (url, topology, tls) in [
            ("redis://h:6379", Single, false),
            ("rediss://h:6380", Single, true),
            ("redis-cluster://h:7000", Cluster, false),
            ("rediss-cluster://h:7000", Cluster, true),
            ("redis-sentinel://h:26379?sentinelServiceName=m", Sentinel, false),
            ("rediss-sentinel://h:26379?sentinelServiceName=m", Sentinel, true),
            ("valkey://h", Single, false),
            ("valkeys://h", Single, true),
            ("valkeys-cluster://h:7000", Cluster, true),
            ("valkey-sentinel://h?sentinelServiceName=m", Sentinel, false),
        ] {
            assert_eq!(Scheme::of(url), Some(Scheme { topology, tls }), "{url}");
            let endpoint = Endpoint::new(url, None, None);
            // TLS without a CA needs system roots, which a build machine may lack.
            if let Ok(endpoint) = endpoint {
                assert_eq!(endpoint.fred_config().unwrap().tls.is_some(), tls, "{url}");
            }
        }
        for bad in ["http://h", "redis+unix:///tmp/r.sock", "rediss-proxy://h", "h:6379", "redis-cluster-x://h"] {
            assert_eq!(Scheme::of(bad), None, "{bad}");
            assert_eq!(Endpoint::new(bad, None, None).err(), Some(EndpointError::Scheme), "{bad}");
        }
    }

    #[test]
    fn a_password_is_given_once_and_replaces_none_in_the_url() {
        let apart = Some(SecretString::from("from-a-file"));
        let endpoint = Endpoint::new("redis://proxy@cache:6379/2", apart.clone(), None).unwrap();
        let config = endpoint.fred_config().unwrap();
        assert_eq!((config.username.as_deref(), config.password.as_deref()), (Some("proxy"), Some("from-a-file")));
        assert_eq!(config.database, Some(2));
        assert_eq!(
            Endpoint::new("redis://:in-the-url@cache:6379", apart, None).err(),
            Some(EndpointError::PasswordTwice)
        );
        let shown = format!("{endpoint:?}");
        assert!(!shown.contains("from-a-file") && !shown.contains("cache"), "{shown}");
    }

    #[test]
    fn tls_is_refused_on_a_plain_url_and_a_bad_url_is_never_quoted() {
        let tls = Arc::new(client_config(Some(Vec::new()), None).unwrap());
        assert_eq!(
            Endpoint::new("redis://cache:6379", None, Some(Arc::clone(&tls))).err(),
            Some(EndpointError::TlsWithoutTlsUrl)
        );
        let endpoint = Endpoint::new("rediss-cluster://cache:7000?node=cache2:7001", None, Some(tls)).unwrap();
        let config = endpoint.fred_config().unwrap();
        assert!(config.tls.is_some() && config.server.is_clustered());
        let error = Endpoint::new("redis://:hunter2-canary@cache:notaport", None, None).unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }
}
