//! Configuration: the clients mock-idp knows, token lifetime, issuer, signing key, and where to
//! listen. The binary reads it from `MOCK_IDP_*` environment variables through
//! [`Config::from_lookup`], which takes a lookup function so tests never touch the process
//! environment; tests of other crates usually start from [`Config::for_tests`].

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::keys::SigningKey;

/// Address used when `MOCK_IDP_LISTEN` is unset.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9000";
/// Issuer (`iss` claim) used when `MOCK_IDP_ISSUER` is unset.
pub const DEFAULT_ISSUER: &str = "http://localhost/mock-idp";
/// Token lifetime used when `MOCK_IDP_TOKEN_LIFETIME` is unset: Cognito's default of one hour.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Scopes of the default `demo-client` and of every generated load-test client.
pub const DEFAULT_SCOPES: [&str; 2] = ["api/read", "api/write"];

/// More generated clients than this is a typo, not a load test.
const MAX_GENERATED_CLIENTS: usize = 1_000_000;

/// One app client, as Cognito calls it: an id, its secret and the scopes it may request.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub client_id: String,
    pub client_secret: String,
    /// Scopes this client may request; a request without `scope` gets all of them.
    #[serde(default)]
    pub scopes: Vec<String>,
}

impl ClientConfig {
    /// A client with the given scopes (each a single scope name, no spaces).
    pub fn new(client_id: &str, client_secret: &str, scopes: &[&str]) -> ClientConfig {
        ClientConfig {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

/// The secret is never printed.
impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("client_id", &self.client_id)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// Everything mock-idp needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on. `MOCK_IDP_LISTEN`, default `127.0.0.1:9000`.
    pub listen: SocketAddr,
    /// The known clients. From `MOCK_IDP_CLIENTS`, `MOCK_IDP_CLIENTS_FILE` and
    /// `MOCK_IDP_GENERATED_CLIENTS` together; `demo-client`/`demo-secret` when none is given.
    pub clients: Vec<ClientConfig>,
    /// Lifetime of issued tokens (`expires_in`, whole seconds). `MOCK_IDP_TOKEN_LIFETIME` in
    /// seconds, default 3600.
    pub token_lifetime: Duration,
    /// The `iss` claim. `MOCK_IDP_ISSUER`, default `http://localhost/mock-idp`.
    pub issuer: String,
    /// Delay before answering every token request. `MOCK_IDP_LATENCY_MS`, default 0.
    pub latency: Duration,
    /// The RS256 signing key. `MOCK_IDP_SIGNING_KEY_FILE` (PEM, PKCS#8 or PKCS#1), default the
    /// embedded development key, which is public and therefore only fit for tests.
    pub signing_key: SigningKey,
    /// `tracing` filter for the binary's logs. `MOCK_IDP_LOG`, default `info`.
    pub log_filter: String,
    /// Keep every issued access token, so that a test can look for them where they must not be
    /// (logs, metrics, a cache's storage): [`MockIdp::issued_tokens`](crate::MockIdp::issued_tokens).
    /// On in [`Config::for_tests`]; off when read from the environment, since a long load test
    /// would keep millions of them.
    pub record_tokens: bool,
}

/// A configuration value that cannot be used. The message names the variable or field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// An environment variable has a value that cannot be used.
    #[error("{var}: {reason}")]
    Invalid { var: &'static str, reason: String },
    /// The client list given in code (not through the environment) is inconsistent.
    #[error("invalid client list: {0}")]
    Clients(String),
}

impl ConfigError {
    fn invalid(var: &'static str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { var, reason: reason.into() }
    }
}

impl Config {
    /// Reads the configuration through `lookup` (`|name| std::env::var(name).ok()` in the
    /// binary). An empty value counts as unset, so `MOCK_IDP_X=` in a compose file means the
    /// default.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |var: &str| lookup(var).filter(|value| !value.trim().is_empty());

        let listen = match get("MOCK_IDP_LISTEN") {
            Some(value) => value
                .trim()
                .parse()
                .map_err(|_| ConfigError::invalid("MOCK_IDP_LISTEN", format!("`{value}` is not an IP:port address")))?,
            None => default_listen(),
        };

        let mut clients = Vec::new();
        let mut seen = HashSet::new();
        if let Some(value) = get("MOCK_IDP_CLIENTS") {
            let parsed =
                parse_inline_clients(&value).map_err(|reason| ConfigError::invalid("MOCK_IDP_CLIENTS", reason))?;
            add_clients("MOCK_IDP_CLIENTS", parsed, &mut clients, &mut seen)?;
        }
        if let Some(path) = get("MOCK_IDP_CLIENTS_FILE") {
            let parsed = read_clients_file(Path::new(&path))
                .map_err(|reason| ConfigError::invalid("MOCK_IDP_CLIENTS_FILE", reason))?;
            add_clients("MOCK_IDP_CLIENTS_FILE", parsed, &mut clients, &mut seen)?;
        }
        if let Some(value) = get("MOCK_IDP_GENERATED_CLIENTS") {
            let count: usize = parse_number("MOCK_IDP_GENERATED_CLIENTS", &value)?;
            if count > MAX_GENERATED_CLIENTS {
                return Err(ConfigError::invalid(
                    "MOCK_IDP_GENERATED_CLIENTS",
                    format!("at most {MAX_GENERATED_CLIENTS}"),
                ));
            }
            add_clients("MOCK_IDP_GENERATED_CLIENTS", generated_clients(count), &mut clients, &mut seen)?;
        }
        if clients.is_empty() {
            clients.push(ClientConfig::new("demo-client", "demo-secret", &DEFAULT_SCOPES));
        }

        let token_lifetime = match get("MOCK_IDP_TOKEN_LIFETIME") {
            Some(value) => {
                let secs: u64 = parse_number("MOCK_IDP_TOKEN_LIFETIME", &value)?;
                if secs == 0 {
                    return Err(ConfigError::invalid("MOCK_IDP_TOKEN_LIFETIME", "must be at least 1 second"));
                }
                Duration::from_secs(secs)
            }
            None => DEFAULT_TOKEN_LIFETIME,
        };

        let latency = match get("MOCK_IDP_LATENCY_MS") {
            Some(value) => Duration::from_millis(parse_number("MOCK_IDP_LATENCY_MS", &value)?),
            None => Duration::ZERO,
        };

        let issuer = get("MOCK_IDP_ISSUER").map_or_else(|| DEFAULT_ISSUER.to_owned(), |v| v.trim().to_owned());

        let signing_key = match get("MOCK_IDP_SIGNING_KEY_FILE") {
            Some(path) => {
                let pem = std::fs::read_to_string(&path).map_err(|err| {
                    ConfigError::invalid("MOCK_IDP_SIGNING_KEY_FILE", format!("cannot read {path}: {err}"))
                })?;
                SigningKey::from_pem(&pem)
                    .map_err(|err| ConfigError::invalid("MOCK_IDP_SIGNING_KEY_FILE", format!("{path}: {err}")))?
            }
            None => SigningKey::embedded(),
        };

        let log_filter = get("MOCK_IDP_LOG").unwrap_or_else(|| "info".to_owned());
        // Checked here so that a typo fails start-up with the variable's name, not later.
        tracing_subscriber::EnvFilter::try_new(&log_filter)
            .map_err(|err| ConfigError::invalid("MOCK_IDP_LOG", err.to_string()))?;

        Ok(Config { listen, clients, token_lifetime, issuer, latency, signing_key, log_filter, record_tokens: false })
    }

    /// A configuration for in-process tests: port 0 on loopback, one-hour tokens, no latency,
    /// the embedded key, issued tokens recorded.
    pub fn for_tests(clients: Vec<ClientConfig>) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            clients,
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            issuer: DEFAULT_ISSUER.to_owned(),
            latency: Duration::ZERO,
            signing_key: SigningKey::embedded(),
            log_filter: "info".to_owned(),
            record_tokens: true,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9000))
}

fn parse_number<T: std::str::FromStr>(var: &'static str, value: &str) -> Result<T, ConfigError> {
    value.trim().parse().map_err(|_| ConfigError::invalid(var, format!("`{value}` is not a non-negative whole number")))
}

/// Checks one client and returns why it is unusable. Shared by the environment parser and
/// [`crate::MockIdp::new`], so a client list built in code gets the same rules.
pub(crate) fn check_client(client: &ClientConfig) -> Result<(), String> {
    if client.client_id.is_empty() {
        return Err("a client has an empty client_id".to_owned());
    }
    if client.client_secret.is_empty() {
        return Err(format!("client `{}` has an empty client_secret", client.client_id));
    }
    // A scope containing whitespace could never be requested: `scope` is space-separated.
    if let Some(bad) = client.scopes.iter().find(|s| s.is_empty() || s.contains(char::is_whitespace)) {
        return Err(format!("client `{}` has an invalid scope `{bad}`", client.client_id));
    }
    Ok(())
}

/// Checks a whole client list: each client, and no client_id twice.
pub(crate) fn check_clients(clients: &[ClientConfig]) -> Result<(), String> {
    let mut seen = HashSet::new();
    for client in clients {
        check_client(client)?;
        if !seen.insert(client.client_id.as_str()) {
            return Err(format!("client_id `{}` is configured twice", client.client_id));
        }
    }
    Ok(())
}

fn add_clients(
    var: &'static str,
    new: Vec<ClientConfig>,
    clients: &mut Vec<ClientConfig>,
    seen: &mut HashSet<String>,
) -> Result<(), ConfigError> {
    for client in new {
        check_client(&client).map_err(|reason| ConfigError::invalid(var, reason))?;
        if !seen.insert(client.client_id.clone()) {
            return Err(ConfigError::invalid(var, format!("client_id `{}` is configured twice", client.client_id)));
        }
        clients.push(client);
    }
    Ok(())
}

/// Parses `id:secret:scope1 scope2;id2:secret2:scope3`. Only the first two `:` separate
/// fields, so scopes may contain `:` (e.g. `https://api.example.com/read`). Surrounding
/// whitespace and empty entries (a trailing `;`) are ignored.
fn parse_inline_clients(value: &str) -> Result<Vec<ClientConfig>, String> {
    let mut clients = Vec::new();
    for (index, entry) in value.split(';').map(str::trim).enumerate() {
        if entry.is_empty() {
            continue;
        }
        let mut fields = entry.splitn(3, ':');
        let (Some(client_id), Some(client_secret)) = (fields.next(), fields.next()) else {
            // The entry is not echoed: it would contain the secret if only a `:` is missing
            // further on.
            return Err(format!("entry {} is not `id:secret:scopes`", index + 1));
        };
        let scopes = fields.next().unwrap_or("").split_whitespace().map(str::to_owned).collect();
        clients.push(ClientConfig {
            client_id: client_id.trim().to_owned(),
            client_secret: client_secret.trim().to_owned(),
            scopes,
        });
    }
    Ok(clients)
}

fn read_clients_file(path: &Path) -> Result<Vec<ClientConfig>, String> {
    let text = std::fs::read_to_string(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    serde_json::from_str(&text).map_err(|err| {
        format!("{}: expected a JSON array of {{\"client_id\", \"client_secret\", \"scopes\"}}: {err}", path.display())
    })
}

/// `load-client-{i}` / `load-secret-{i}` for `i` in `0..count`: many distinct cache keys for
/// load tests without writing a client file.
fn generated_clients(count: usize) -> Vec<ClientConfig> {
    (0..count)
        .map(|i| ClientConfig {
            client_id: format!("load-client-{i}"),
            client_secret: format!("load-secret-{i}"),
            scopes: DEFAULT_SCOPES.iter().map(|s| (*s).to_owned()).collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    fn var_of(err: ConfigError) -> &'static str {
        match err {
            ConfigError::Invalid { var, .. } => var,
            other => panic!("expected an environment error, got {other}"),
        }
    }

    #[test]
    fn defaults_without_any_variable() {
        let config = from(&[]).unwrap();
        assert_eq!(config.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.clients, vec![ClientConfig::new("demo-client", "demo-secret", &DEFAULT_SCOPES)]);
        assert_eq!(config.token_lifetime, Duration::from_secs(3600));
        assert_eq!(config.issuer, DEFAULT_ISSUER);
        assert_eq!(config.latency, Duration::ZERO);
        assert_eq!(config.log_filter, "info");
        assert_eq!(config.signing_key.kid(), SigningKey::embedded().kid());
        assert!(!config.record_tokens, "the binary must not keep every token it issues");
        assert!(Config::for_tests(vec![]).record_tokens);
    }

    #[test]
    fn parses_inline_clients() {
        let config =
            from(&[("MOCK_IDP_CLIENTS", " a:sa:api/read api/write ; b:s:b:https://x.example/read;c:sc;")]).unwrap();
        assert_eq!(
            config.clients,
            vec![
                ClientConfig::new("a", "sa", &["api/read", "api/write"]),
                // Only the first two `:` separate fields.
                ClientConfig::new("b", "s", &["b:https://x.example/read"]),
                ClientConfig::new("c", "sc", &[]),
            ]
        );
    }

    #[test]
    fn parses_a_clients_file_and_generated_clients_together() {
        let dir = std::env::temp_dir().join(format!("mock-idp-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("clients.json");
        std::fs::write(
            &path,
            r#"[{"client_id":"file-a","client_secret":"sa","scopes":["x/y"]},
                {"client_id":"file-b","client_secret":"sb"}]"#,
        )
        .unwrap();
        let config = from(&[
            ("MOCK_IDP_CLIENTS", "inline:si:s1"),
            ("MOCK_IDP_CLIENTS_FILE", path.to_str().unwrap()),
            ("MOCK_IDP_GENERATED_CLIENTS", "3"),
        ])
        .unwrap();
        let ids: Vec<&str> = config.clients.iter().map(|c| c.client_id.as_str()).collect();
        assert_eq!(ids, ["inline", "file-a", "file-b", "load-client-0", "load-client-1", "load-client-2"]);
        assert_eq!(config.clients[1].scopes, ["x/y"]);
        assert!(config.clients[2].scopes.is_empty());
        assert_eq!(config.clients[4], ClientConfig::new("load-client-1", "load-secret-1", &DEFAULT_SCOPES));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_the_scalar_settings() {
        let config = from(&[
            ("MOCK_IDP_LISTEN", "0.0.0.0:9100"),
            ("MOCK_IDP_TOKEN_LIFETIME", "120"),
            ("MOCK_IDP_LATENCY_MS", "25"),
            ("MOCK_IDP_ISSUER", "https://cognito-idp.test/pool"),
            ("MOCK_IDP_LOG", "debug,mock_idp=trace"),
        ])
        .unwrap();
        assert_eq!(config.listen, "0.0.0.0:9100".parse().unwrap());
        assert_eq!(config.token_lifetime, Duration::from_secs(120));
        assert_eq!(config.latency, Duration::from_millis(25));
        assert_eq!(config.issuer, "https://cognito-idp.test/pool");
        assert_eq!(config.log_filter, "debug,mock_idp=trace");
    }

    #[test]
    fn empty_values_mean_the_default() {
        let config = from(&[("MOCK_IDP_LISTEN", ""), ("MOCK_IDP_CLIENTS", " ")]).unwrap();
        assert_eq!(config.listen, default_listen());
        assert_eq!(config.clients[0].client_id, "demo-client");
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases: &[(&str, &str)] = &[
            ("MOCK_IDP_LISTEN", "localhost"),
            ("MOCK_IDP_CLIENTS", "no-secret-here"),
            ("MOCK_IDP_CLIENTS", "a:s:x;a:t:y"),
            ("MOCK_IDP_CLIENTS", ":secret:x"),
            ("MOCK_IDP_CLIENTS", "id::x"),
            ("MOCK_IDP_CLIENTS_FILE", "/nonexistent/clients.json"),
            ("MOCK_IDP_GENERATED_CLIENTS", "-1"),
            ("MOCK_IDP_GENERATED_CLIENTS", "ten"),
            ("MOCK_IDP_TOKEN_LIFETIME", "0"),
            ("MOCK_IDP_TOKEN_LIFETIME", "1h"),
            ("MOCK_IDP_LATENCY_MS", "1.5"),
            ("MOCK_IDP_SIGNING_KEY_FILE", "/nonexistent/key.pem"),
            ("MOCK_IDP_LOG", "info,[[["),
        ];
        for (var, value) in cases {
            let err = from(&[(var, value)]).expect_err(&format!("{var}={value} must be refused"));
            let message = err.to_string();
            assert!(message.starts_with(&format!("{var}: ")), "{message}");
            assert!(!message.contains('\n'), "one line: {message}");
            assert_eq!(var_of(err), *var);
        }
    }

    #[test]
    fn a_client_id_repeated_across_sources_is_refused() {
        let err = from(&[("MOCK_IDP_CLIENTS", "load-client-1:x:y"), ("MOCK_IDP_GENERATED_CLIENTS", "2")]).unwrap_err();
        assert_eq!(var_of(err), "MOCK_IDP_GENERATED_CLIENTS");
    }

    #[test]
    fn errors_never_echo_a_secret() {
        let err = from(&[("MOCK_IDP_CLIENTS", "ok:s:x;brokensecret")]).unwrap_err();
        assert!(!err.to_string().contains("brokensecret"), "{err}");
        assert!(err.to_string().contains("entry 2"), "{err}");
    }

    #[test]
    fn a_bad_signing_key_file_is_refused() {
        let path = std::env::temp_dir().join(format!("mock-idp-bad-key-{}.pem", std::process::id()));
        std::fs::write(&path, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        let err = from(&[("MOCK_IDP_SIGNING_KEY_FILE", path.to_str().unwrap())]).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(var_of(err), "MOCK_IDP_SIGNING_KEY_FILE");
    }

    #[test]
    fn reads_the_signing_key_file() {
        let path = std::env::temp_dir().join(format!("mock-idp-key-{}.pem", std::process::id()));
        std::fs::write(&path, crate::keys::EMBEDDED_KEY_PEM).unwrap();
        let config = from(&[("MOCK_IDP_SIGNING_KEY_FILE", path.to_str().unwrap())]).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(config.signing_key.kid(), SigningKey::embedded().kid());
    }

    #[test]
    fn debug_never_shows_secrets() {
        let config = from(&[("MOCK_IDP_CLIENTS", "a:hunter2:x")]).unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains("PRIVATE"), "{debug}");
    }

    #[test]
    fn check_clients_refuses_duplicates_and_bad_scopes() {
        let a = ClientConfig::new("a", "s", &["x"]);
        assert!(check_clients(&[a.clone(), ClientConfig::new("b", "s", &[])]).is_ok());
        assert!(check_clients(&[a.clone(), a.clone()]).unwrap_err().contains("twice"));
        assert!(check_clients(&[ClientConfig::new("a", "s", &["x y"])]).is_err());
        assert!(check_clients(&[ClientConfig::new("a", "s", &[""])]).is_err());
    }
}
