//! The `token-proxy` binary as an operator runs it: configuration errors, `--check`,
//! `--version`, the configuration file and the environment over it, start-up, a MISS then a
//! HIT, SIGTERM and the drain before exit, and stdout free of secrets and tokens.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_token-proxy");

async fn run_expecting_failure(vars: &[(&str, &str)]) -> (i32, String) {
    let output = Command::new(BIN).env_clear().envs(vars.iter().copied()).output().await.unwrap();
    (output.status.code().unwrap_or(-1), String::from_utf8(output.stderr).unwrap())
}

#[tokio::test]
async fn bad_configuration_exits_non_zero_with_one_line_naming_the_variable() {
    let upstream = ("TOKEN_PROXY_UPSTREAM_URL", "http://127.0.0.1:1/oauth2/token");
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[], "TOKEN_PROXY_UPSTREAM_URL"),
        (&[upstream, ("TOKEN_PROXY_LISTEN", "nowhere")], "TOKEN_PROXY_LISTEN"),
        (&[upstream, ("TOKEN_PROXY_REDIS_URL", "redis://127.0.0.1:1")], "TOKEN_PROXY_SECRET"),
        (&[upstream, ("TOKEN_PROXY_SECRET", "dG9vIHNob3J0")], "TOKEN_PROXY_SECRET"),
    ];
    for (vars, variable) in cases {
        let (code, stderr) = run_expecting_failure(vars).await;
        assert_eq!(code, 2, "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(variable), "{stderr}");
        assert!(!stderr.contains("dG9vIHNob3J0"), "the secret was echoed");
    }
}

#[tokio::test]
async fn help_lists_every_setting() {
    let output = Command::new(BIN).arg("--help").output().await.unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    for setting in token_proxy::config::SETTINGS {
        assert!(text.contains(setting.name), "{}", setting.name);
    }
}

/// Runs the binary to its end with only `vars` and `args`: exit code, stdout, stderr.
async fn run(vars: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let output = Command::new(BIN).env_clear().envs(vars.iter().copied()).args(args).output().await.unwrap();
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
    (output.status.code().unwrap_or(-1), text(output.stdout), text(output.stderr))
}

/// A configuration file in a directory of its own, removed when dropped.
struct ConfigFile(std::path::PathBuf);

impl ConfigFile {
    fn new(name: &str, text: &str) -> ConfigFile {
        let dir = std::env::temp_dir().join(format!("tp-binary-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token-proxy.toml");
        std::fs::write(&path, text).unwrap();
        ConfigFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
    }
}

#[tokio::test]
async fn version_prints_the_package_version_and_the_commit() {
    let (code, stdout, _) = run(&[], &["--version"]).await;
    assert_eq!(code, 0);
    let commit = stdout.trim().strip_prefix(&format!("token-proxy {} (commit ", env!("CARGO_PKG_VERSION")));
    let commit = commit.and_then(|rest| rest.strip_suffix(')')).unwrap_or_else(|| panic!("{stdout}"));
    // A git checkout builds with its short hash; a build without git says so.
    assert!(commit == "unknown" || commit.len() >= 7 && commit.bytes().all(|b| b.is_ascii_hexdigit()), "{stdout}");
    // In a checkout, and unless the build was told its commit, it is HEAD's (whatever the
    // working tree holds), also after `git gc` packed the branch's ref.
    let repository = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if repository.join(".git").exists() && option_env!("TOKEN_PROXY_BUILD_COMMIT").is_none_or(str::is_empty) {
        let head = std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .current_dir(&repository)
            .output()
            .unwrap();
        if head.status.success() {
            assert_eq!(commit, String::from_utf8(head.stdout).unwrap().trim(), "{stdout}");
        }
    }
}

/// Secrets as flags would be readable by any user of the machine (`ps`): refused, with one line
/// naming the flag and where the secret goes instead, never echoing it.
#[tokio::test]
async fn secrets_given_as_flags_are_refused_with_one_line_pointing_at_the_environment() {
    let upstream = [("TOKEN_PROXY_UPSTREAM_URL", "http://127.0.0.1:1/oauth2/token")];
    let secret = "ZmxhZy1zZWNyZXQtY2FuYXJ5LWZsYWctc2VjcmV0LWNhbmFyeQ==";
    let inline = format!("--secret={secret}");
    let cases = [
        (vec!["--secret", secret], "TOKEN_PROXY_SECRET_FILE"),
        (vec![inline.as_str()], "TOKEN_PROXY_SECRET_FILE"),
        (vec!["--previous-secrets", secret], "TOKEN_PROXY_PREVIOUS_SECRETS_FILE"),
        (vec!["--admin-token", "flag-admin-token-canary"], "TOKEN_PROXY_ADMIN_TOKEN_FILE"),
        (vec!["--upstream-headers", "X-Origin-Verify: flag-canary"], "TOKEN_PROXY_UPSTREAM_HEADERS"),
        (vec!["--redis-url", "redis://:flag-password-canary@127.0.0.1:1"], "TOKEN_PROXY_REDIS_PASSWORD_FILE"),
        (
            vec![
                "--redis-url",
                "redis-sentinel://h:26379/0?sentinelServiceName=m&sentinelPassword=flag-password-canary",
            ],
            "TOKEN_PROXY_REDIS_PASSWORD_FILE",
        ),
        // A repeated flag would hide the first value from the check: refused whatever it holds.
        (vec!["--redis-url", "redis://:flag-password-canary@127.0.0.1:1", "--redis-url", "redis://h"], "given twice"),
    ];
    for (args, instead) in cases {
        for how in [&[][..], &["--check"][..]] {
            let all: Vec<&str> = how.iter().chain(&args).copied().collect();
            let (code, stdout, stderr) = run(&upstream, &all).await;
            assert_eq!(code, 2, "{args:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            let flag = args[0].split('=').next().unwrap();
            assert!(stderr.starts_with(&format!("token-proxy: {flag}: ")), "{stderr}");
            assert!(stderr.contains(instead), "{args:?}: {stderr}");
            for canary in ["ZmxhZy1zZWNyZXQ", "flag-admin-token-canary", "flag-canary", "flag-password-canary"] {
                assert!(!stderr.contains(canary) && !stdout.contains(canary), "{canary} printed: {stderr}");
            }
        }
    }
    // A Redis URL without a password is no secret: accepted as a flag (the missing root
    // secret is what stops this one).
    let (code, _, stderr) = run(&upstream, &["--check", "--redis-url", "redis://127.0.0.1:1"]).await;
    assert_eq!(code, 2);
    assert!(stderr.starts_with("token-proxy: TOKEN_PROXY_SECRET:"), "{stderr}");
    // The same secrets in the environment are fine.
    let mut vars = upstream.to_vec();
    vars.extend([("TOKEN_PROXY_SECRET", secret), ("TOKEN_PROXY_ADMIN_TOKEN", "flag-admin-token-canary")]);
    let (code, _, stderr) = run(&vars, &["--check"]).await;
    assert_eq!((code, stderr.as_str()), (0, ""));
}

/// Without CA certificates an https upstream cannot be verified: start-up (and `--check`) stops
/// with one line saying so, not reqwest's "builder error". An http upstream needs none.
#[tokio::test]
async fn no_ca_certificates_for_an_https_upstream_is_one_clear_line_and_exit_2() {
    let nowhere = std::env::temp_dir().join(format!("tp-no-ca-{}", std::process::id()));
    let nowhere = nowhere.to_str().unwrap();
    // Set, the two variables replace the system's store; pointing nowhere, they leave it empty.
    let no_roots = [("SSL_CERT_FILE", nowhere), ("SSL_CERT_DIR", nowhere)];
    let mut https = no_roots.to_vec();
    https.push(("TOKEN_PROXY_UPSTREAM_URL", "https://example.invalid/oauth2/token"));
    for how in [&[][..], &["--check"][..]] {
        let (code, _, stderr) = run(&https, how).await;
        assert_eq!(code, 2, "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("TOKEN_PROXY_UPSTREAM_URL: no CA certificates found"), "{stderr}");
        assert!(stderr.contains("install ca-certificates"), "{stderr}");
    }
    let mut http = no_roots.to_vec();
    http.push(("TOKEN_PROXY_UPSTREAM_URL", "http://127.0.0.1:1/oauth2/token"));
    let (code, _, stderr) = run(&http, &["--check"]).await;
    assert_eq!((code, stderr.as_str()), (0, ""));
    // With the system's store (this machine has one), the https upstream is fine.
    let (code, _, stderr) = run(&[https[2]], &["--check"]).await;
    assert_eq!((code, stderr.as_str()), (0, ""));
}

/// `token-proxy --health` asks the admin listener its configuration names (a wildcard bind on
/// loopback): exit 0 while the replica runs, 1 once it is gone.
#[tokio::test]
async fn health_asks_the_admin_listener_and_exits_0_or_1() {
    let idp = spawn_idp(vec![client("app", "health-canary-secret")]).await;
    let process = Process::start(&idp.token_url(), &[("TOKEN_PROXY_DRAIN_DELAY", "0")]).await;
    let port = process.admin.port().to_string();
    let (loopback, wildcard) = (format!("127.0.0.1:{port}"), format!("0.0.0.0:{port}"));
    let (toml, ipv6_wildcard) = (format!("admin_listen = \"{loopback}\"\n"), format!("[::]:{port}"));
    for (vars, args) in [
        (vec![("TOKEN_PROXY_ADMIN_LISTEN", loopback.as_str())], vec!["--health"]),
        (vec![("TOKEN_PROXY_ADMIN_LISTEN", wildcard.as_str())], vec!["--health"]),
        (vec![], vec!["--health", "--admin-listen", wildcard.as_str()]),
        (vec![("TOKEN_PROXY_CONFIG_TOML", toml.as_str())], vec!["--health"]),
        // Not listening on ::1: asked on 127.0.0.1 next.
        (vec![("TOKEN_PROXY_ADMIN_LISTEN", ipv6_wildcard.as_str())], vec!["--health"]),
    ] {
        let (code, _, stderr) = run(&vars, &args).await;
        assert_eq!((code, stderr.as_str()), (0, ""), "{vars:?} {args:?}");
    }
    // A configuration error is unhealthy too: exit 1, as Docker reserves 2.
    let (code, _, stderr) = run(&[("TOKEN_PROXY_ADMIN_LISTEN", "nowhere")], &["--health"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("TOKEN_PROXY_ADMIN_LISTEN"), "{stderr}");
    // The client listener is no admin listener: its /healthz is a 404.
    let client = process.client.to_string();
    let (code, _, stderr) = run(&[("TOKEN_PROXY_ADMIN_LISTEN", &client)], &["--health"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("404"), "{stderr}");
    process.sigterm();
    let (status, _) = process.exit(Duration::from_secs(10)).await;
    assert!(status.success());
    let (code, _, stderr) = run(&[("TOKEN_PROXY_ADMIN_LISTEN", &loopback)], &["--health"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("unhealthy"), "{stderr}");
}

/// `--check` binds nothing: the addresses it is given are taken, yet it says the configuration
/// is valid; and it reads the files a start would read (a TLS certificate that is not one
/// fails it).
#[tokio::test]
async fn check_validates_everything_without_binding() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let valid = [
        ("TOKEN_PROXY_UPSTREAM_URL", "http://127.0.0.1:1/oauth2/token"),
        ("TOKEN_PROXY_LISTEN", address.as_str()),
        ("TOKEN_PROXY_ADMIN_LISTEN", address.as_str()),
    ];
    let (code, stdout, stderr) = run(&valid, &["--check"]).await;
    assert_eq!((code, stderr.as_str()), (0, ""), "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");

    let not_a_certificate = ConfigFile::new("check-tls", "not a certificate");
    let mut with_tls = valid.to_vec();
    with_tls.extend([
        ("TOKEN_PROXY_TLS_CERT_FILE", not_a_certificate.path()),
        ("TOKEN_PROXY_TLS_KEY_FILE", not_a_certificate.path()),
    ]);
    let (code, _, stderr) = run(&with_tls, &["--check"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("TOKEN_PROXY_TLS_CERT_FILE"), "{stderr}");

    let (code, _, stderr) = run(&[("TOKEN_PROXY_LISTEN", "nowhere")], &["--check"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    drop(taken);
}

/// Secrets a file holds, valid ones, in every file of the next test: none may be printed.
const FILE_SECRETS: &str = r#"
secret = "ZmlsZS1zZWNyZXQtY2FuYXJ5LWZpbGUtc2VjcmV0LWNhbmFyeQ=="
admin_token = "file-admin-token-canary"
redis_url = "redis://:file-redis-password-canary@127.0.0.1:1"
"#;

#[tokio::test]
async fn a_bad_key_or_value_in_the_file_exits_2_with_one_line_naming_the_file_and_the_key() {
    let upstream = "upstream_url = \"http://127.0.0.1:1/oauth2/token\"\n";
    let cases = [
        ("listen = \"nowhere\"", "listen"),
        ("no_such_setting = 1", "no_such_setting"),
        ("upstream_timeout = \"soon\"", "upstream_timeout"),
        ("[upstreams.\"bad name\"]\nurl = \"https://x/oauth2/token\"", "upstreams"),
        // Found while building (the file is read), not while parsing: named the same way.
        ("tls_cert_file = \"/nonexistent/cert.pem\"\ntls_key_file = \"/nonexistent/key.pem\"", "tls_cert_file"),
    ];
    for (line, key) in cases {
        let file = ConfigFile::new(key, &format!("{upstream}{FILE_SECRETS}{line}\n"));
        for how in [&[][..], &["--check"][..]] {
            let (code, stdout, stderr) = run(&[("TOKEN_PROXY_CONFIG", file.path())], how).await;
            assert_eq!(code, 2, "{line}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(stderr.contains(&format!("{}: {key}", file.path())), "{stderr}");
            for canary in ["ZmlsZS1zZWNyZXQtY2FuYXJ5", "file-admin-token-canary", "file-redis-password-canary"] {
                assert!(!stderr.contains(canary) && !stdout.contains(canary), "{canary} printed: {stderr}");
            }
        }
    }
    // A secret that is bad is named by its key, never quoted; so is a file that is not TOML.
    for (text, key) in [
        ("secret = \"c2VjcmV0LWNhbmFyeQ==\"\n", "secret"),
        ("admin_token = \"short-canary\"\n", "admin_token"),
        ("redis_url = \"tcp://:password-canary@x\"\n", "redis_url"),
        ("secret = \"unterminated-canary\n", ""),
    ] {
        let file = ConfigFile::new(&format!("secret-{key}"), &format!("{upstream}{text}"));
        let (code, _, stderr) = run(&[("TOKEN_PROXY_CONFIG", file.path())], &["--check"]).await;
        assert_eq!(code, 2, "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(format!("{}: {key}", file.path()).trim_end_matches(": ")), "{stderr}");
        for canary in ["c2VjcmV0LWNhbmFyeQ", "short-canary", "password-canary", "unterminated-canary"] {
            assert!(!stderr.contains(canary), "{canary} printed: {stderr}");
        }
    }
}

/// An operator keeps the settings in a file (`--config`) and overrides some in the
/// environment: here the file's `listen` is not an address at all, and the environment's wins.
#[tokio::test]
async fn the_binary_runs_from_a_config_file_with_the_environment_over_it() {
    const SECRET: &str = "config-file-canary-secret";
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let file = ConfigFile::new(
        "serve",
        &format!(
            r#"
            upstream_url = "{}"
            listen = "not an address: the environment overrides it"
            admin_token = "file-admin-token-canary"
            drain_delay = "0s"
            allowed_networks = ["127.0.0.0/8", "::1"]
            "#,
            idp.token_url()
        ),
    );
    // An empty TOKEN_PROXY_UPSTREAM_URL counts as unset: the file's is used.
    let process = Process::start("", &[("TOKEN_PROXY_CONFIG", file.path()), ("TOKEN_PROXY_LOG", "trace")]).await;
    let url = process.token_url();
    let miss = post_basic(&url, "app", SECRET, None).await;
    let hit = post_basic(&url, "app", SECRET, None).await;
    assert_eq!((miss.x_cache(), hit.x_cache()), ("MISS", "HIT"));
    // The file's admin token turned the admin API on: without the token, 401 (off is 404).
    let purge = reqwest::Client::new().post(format!("http://{}/admin/purge", process.admin)).send().await.unwrap();
    assert_eq!(purge.status(), 401);

    process.sigterm();
    let (status, logs) = process.exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    assert!(!logs.contains("file-admin-token-canary"), "stdout contains the admin token");
    assert!(!logs.contains(SECRET), "stdout contains the client secret");
    assert!(!logs.contains(miss.access_token()), "stdout contains a token");
}

/// A running `token-proxy` process, its JSON log lines read as they come.
struct Process {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    logs: Vec<String>,
    client: SocketAddr,
    admin: SocketAddr,
}

impl Process {
    /// Starts the binary against `upstream` on loopback port 0 and waits until it listens.
    async fn start(upstream: &str, vars: &[(&str, &str)]) -> Process {
        let mut child = Command::new(BIN)
            .env_clear()
            .env("TOKEN_PROXY_UPSTREAM_URL", upstream)
            .env("TOKEN_PROXY_LISTEN", "127.0.0.1:0")
            .env("TOKEN_PROXY_ADMIN_LISTEN", "127.0.0.1:0")
            .envs(vars.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut logs = Vec::new();
        let (client, admin) = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let line = lines.next_line().await.unwrap().expect("the proxy exited before listening");
                logs.push(line.clone());
                let json: serde_json::Value = serde_json::from_str(&line).expect("logs are JSON lines");
                if json["message"] == "token-proxy listening" {
                    let address = |field: &str| json[field].as_str().unwrap().parse::<SocketAddr>().unwrap();
                    return (address("client"), address("admin"));
                }
            }
        })
        .await
        .expect("the proxy starts within 20 s");
        Process { child, lines, logs, client, admin }
    }

    fn token_url(&self) -> String {
        format!("http://{}/oauth2/token", self.client)
    }

    fn sigterm(&self) {
        let pid = self.child.id().unwrap().to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    }

    /// Waits for the exit (at most `within`), then returns its status and every log line.
    async fn exit(mut self, within: Duration) -> (std::process::ExitStatus, String) {
        let status = tokio::time::timeout(within, self.child.wait()).await.expect("exits on SIGTERM").unwrap();
        while let Ok(Some(line)) = self.lines.next_line().await {
            self.logs.push(line);
        }
        (status, self.logs.join("\n"))
    }
}

#[tokio::test]
async fn the_binary_serves_misses_then_hits_and_stops_on_sigterm() {
    const SECRET: &str = "binary-canary-secret";
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    // No drain delay: SIGTERM stops at once.
    let process =
        Process::start(&idp.token_url(), &[("TOKEN_PROXY_LOG", "trace"), ("TOKEN_PROXY_DRAIN_DELAY", "0")]).await;

    let url = process.token_url();
    let miss = post_basic(&url, "app", SECRET, None).await;
    let hit = post_basic(&url, "app", SECRET, None).await;
    assert_eq!((miss.x_cache(), hit.x_cache()), ("MISS", "HIT"));
    assert_eq!(idp.idp.issued_total(), 1);

    process.sigterm();
    let (status, logs) = process.exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    assert!(logs.contains("shutting down"), "{logs}");
    assert!(!logs.contains(SECRET), "stdout contains the client secret");
    assert!(!logs.contains(miss.access_token()), "stdout contains a token");
}

/// `TOKEN_PROXY_ACCESS_LOG=true`: one JSON line per token request, with the client, the
/// outcome (X-Cache in lower case, or `rejected`), the status the client got, the upstream's
/// when this request called it, the latency and the source; never a secret or a token, and no
/// other line says the client, the outcome and the status together.
#[tokio::test]
async fn the_access_log_is_one_json_line_per_token_request() {
    const SECRET: &str = "access-log-canary-secret";
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let process = Process::start(
        &idp.token_url(),
        &[("TOKEN_PROXY_ACCESS_LOG", "true"), ("TOKEN_PROXY_LOG", "debug"), ("TOKEN_PROXY_DRAIN_DELAY", "0")],
    )
    .await;
    let url = process.token_url();
    let miss = post_basic(&url, "app", SECRET, None).await;
    let hit = post_body(&url, "app", SECRET, None).await;
    let wrong = post_basic(&url, "app", "access-log-wrong-secret", None).await;
    let malformed = post_form(&url, "grant_type=client_credentials&grant_type=client_credentials").await;
    let answers: Vec<u16> = [&miss, &hit, &wrong, &malformed].iter().map(|r| r.status).collect();
    assert_eq!(answers, [200, 200, 400, 400]);
    process.sigterm();
    let (status, logs) = process.exit(Duration::from_secs(10)).await;
    assert!(status.success());

    let lines: Vec<serde_json::Value> = logs.lines().map(|l| serde_json::from_str(l).expect("JSON lines")).collect();
    let access: Vec<&serde_json::Value> = lines.iter().filter(|l| l["target"] == "token_proxy::access").collect();
    assert_eq!(access.len(), 4, "{logs}");
    let field = |line: &serde_json::Value, name: &str| line[name].clone();
    let expected = [
        (Some("app"), "miss", 200, Some(200)),
        (Some("app"), "hit", 200, None),
        // mock-idp answers a wrong secret as Cognito does: 400 invalid_client, relayed.
        (Some("app"), "miss", 400, Some(400)),
        // Refused by the proxy before it knew the client.
        (None, "rejected", 400, None),
    ];
    for (line, (client_id, outcome, status, upstream_status)) in access.iter().zip(expected) {
        assert_eq!(field(line, "client_id"), client_id.map_or(serde_json::Value::Null, Into::into), "{line}");
        assert_eq!(field(line, "outcome"), outcome, "{line}");
        assert_eq!(field(line, "status"), status, "{line}");
        assert_eq!(
            field(line, "upstream_status"),
            upstream_status.map_or(serde_json::Value::Null, Into::into),
            "{line}"
        );
        assert_eq!(field(line, "source"), "127.0.0.1", "{line}");
        assert!(field(line, "latency_ms").as_f64().is_some_and(|ms| ms >= 0.0), "{line}");
        assert!(field(line, "timestamp").is_string(), "{line}");
        // One upstream without a name: no upstream field.
        assert!(field(line, "upstream").is_null(), "{line}");
    }
    let others = lines.iter().filter(|l| l["target"] != "token_proxy::access");
    for line in others {
        let says = |name: &str| !line[name].is_null();
        assert!(!(says("client_id") && says("outcome") && says("status")), "not the access log, yet: {line}");
    }
    assert!(!logs.contains(SECRET) && !logs.contains("access-log-wrong-secret"), "a secret is logged");
    assert!(!logs.contains(miss.access_token()), "a token is logged");
}

/// With named upstreams the access log names the one each request reached; a route to no
/// upstream is one `rejected` 404 line that repeats nothing of the request but its source.
#[tokio::test]
async fn the_access_log_names_the_upstream_and_logs_a_route_to_none() {
    const SECRET: &str = "access-log-named-canary-secret";
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let file = ConfigFile::new(
        "access-named",
        &format!(
            "access_log = true\ndrain_delay = \"0s\"\ndefault_upstream = \"orders\"\n[upstreams.orders]\nurl = \"{}\"\n",
            idp.token_url()
        ),
    );
    let process = Process::start("", &[("TOKEN_PROXY_CONFIG", file.path())]).await;
    let named = format!("http://{}/orders/oauth2/token", process.client);
    let nowhere = format!("http://{}/no-such-pool/oauth2/token", process.client);
    assert_eq!(post_basic(&named, "app", SECRET, None).await.x_cache(), "MISS");
    assert_eq!(post_basic(&process.token_url(), "app", SECRET, None).await.x_cache(), "HIT");
    assert_eq!(post_basic(&nowhere, "app", SECRET, None).await.status, 404);
    process.sigterm();
    let (status, logs) = process.exit(Duration::from_secs(10)).await;
    assert!(status.success());
    let access: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["target"] == "token_proxy::access")
        .collect();
    let seen: Vec<(&str, &str, u64)> = access
        .iter()
        .map(|l| (l["upstream"].as_str().unwrap_or("-"), l["outcome"].as_str().unwrap(), l["status"].as_u64().unwrap()))
        .collect();
    assert_eq!(seen, [("orders", "miss", 200), ("orders", "hit", 200), ("-", "rejected", 404)], "{logs}");
    assert!(access[2]["client_id"].is_null() && access[2]["source"] == "127.0.0.1", "{}", access[2]);
    assert!(!logs.contains("no-such-pool"), "the caller's route is repeated in the logs");
}

/// The access log is a layer of its own: JSON lines even when the other logs are text, and
/// shown even when the filter lets nothing else through.
#[tokio::test]
async fn the_access_log_is_json_whatever_the_log_format_and_filter() {
    const SECRET: &str = "access-log-text-canary-secret";
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    // Text logs carry no "listening" line to wait for: the client port is chosen here.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let client = format!("127.0.0.1:{port}");
    let child = Command::new(BIN)
        .env_clear()
        .envs([
            ("TOKEN_PROXY_UPSTREAM_URL", idp.token_url().as_str()),
            ("TOKEN_PROXY_LISTEN", client.as_str()),
            ("TOKEN_PROXY_ADMIN_LISTEN", "127.0.0.1:0"),
            ("TOKEN_PROXY_ACCESS_LOG", "true"),
            ("TOKEN_PROXY_LOG_FORMAT", "text"),
            ("TOKEN_PROXY_LOG", "error"),
            ("TOKEN_PROXY_DRAIN_DELAY", "0"),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://{client}/oauth2/token");
    eventually(Duration::from_secs(20), "the proxy listening", async || {
        tokio::net::TcpStream::connect(&client).await.is_ok()
    })
    .await;
    let miss = post_basic(&url, "app", SECRET, None).await;
    assert_eq!(miss.x_cache(), "MISS");
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await.unwrap().unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    // `error` lets no other line through: the access log's is the only one, and it is JSON.
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let line: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
    assert_eq!((line["client_id"].as_str(), line["outcome"].as_str()), (Some("app"), Some("miss")), "{line}");
    assert!(!stdout.contains(SECRET) && !stdout.contains(miss.access_token()));
}

/// A rolling deploy fails no request: on SIGTERM `/readyz` turns 503 at once, so the load
/// balancer takes the replica out, while both listeners keep serving new connections for the
/// drain delay; a request still in flight when they stop accepting is answered; then exit 0.
#[tokio::test]
async fn on_sigterm_readyz_turns_503_while_both_listeners_keep_serving_for_the_drain_delay() {
    const SECRET: &str = "drain-canary-secret";
    let idp = spawn_idp(vec![client("app", SECRET), client("slow", SECRET)]).await;
    let process = Process::start(&idp.token_url(), &[("TOKEN_PROXY_DRAIN_DELAY", "3s")]).await;
    let (url, admin) = (process.token_url(), process.admin);
    assert_eq!(post_basic(&url, "app", SECRET, None).await.status, 200);
    // Every request on a new connection: the listener itself must still accept.
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(20)).build().unwrap();
    let readyz = async |client: &reqwest::Client| client.get(format!("http://{admin}/readyz")).send().await;
    assert_eq!(readyz(&fresh).await.unwrap().status(), 200);

    // An upstream slower than the drain delay: the next MISS is still in flight when the
    // listeners stop accepting.
    idp.idp.set_latency(Duration::from_secs(5));
    process.sigterm();
    eventually(Duration::from_secs(2), "/readyz answering 503", async || {
        readyz(&fresh).await.is_ok_and(|r| r.status() == 503)
    })
    .await;
    let in_flight = tokio::spawn({
        let url = url.clone();
        async move { post_basic(&url, "slow", SECRET, None).await }
    });

    // Draining: not ready, yet both listeners serve, and every answer closes its connection.
    let body = readyz(&fresh).await.expect("the admin listener still accepts").text().await.unwrap();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["ready"], false);
    for _ in 0..5 {
        let response = fresh
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("authorization", shared::basic::encode("app", SECRET))
            .body("grant_type=client_credentials")
            .send()
            .await
            .expect("the client listener still accepts while draining");
        assert_eq!(response.headers()["connection"], "close");
        let reply = read(response).await;
        assert_eq!((reply.status, reply.x_cache()), (200, "HIT"), "{}", reply.raw);
        let metrics = fresh.get(format!("http://{admin}/metrics")).send().await.expect("admin still accepts");
        assert_eq!(metrics.status(), 200);
    }
    // The router's answers too (a wrong method, an unknown path), not only the token routes'.
    let base = url.trim_end_matches("/oauth2/token");
    for request in [fresh.get(&url), fresh.post(format!("{base}/nowhere"))] {
        let response = request.send().await.expect("the client listener still accepts while draining");
        assert!([404, 405].contains(&response.status().as_u16()), "{}", response.status());
        let connection = response.headers().get("connection").and_then(|v| v.to_str().ok());
        assert_eq!(connection, Some("close"), "a {} answer while draining", response.status());
    }

    let slow = in_flight.await.unwrap();
    assert_eq!((slow.status, slow.x_cache()), (200, "MISS"), "the request in flight was dropped: {}", slow.raw);
    let (status, logs) = process.exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}\n{logs}");
    assert!(!logs.contains(SECRET), "stdout contains the client secret");
    assert!(!logs.contains(slow.access_token()), "stdout contains a token");
}

/// The access log's lines in `logs`, parsed.
fn access_lines(logs: &str) -> Vec<serde_json::Value> {
    logs.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON lines"))
        .filter(|l| l["target"] == "token_proxy::access")
        .collect()
}

/// Requests no upstream sees (no default upstream, a wrong method, a wrong path) are each one
/// `rejected` line with their source and status, like a route to an unknown name.
#[tokio::test]
async fn the_access_log_has_a_line_for_every_wrong_route_and_method() {
    let idp = spawn_idp(vec![client("app", "access-log-routes-canary-secret")]).await;
    let file = ConfigFile::new(
        "access-routes",
        &format!("access_log = true\ndrain_delay = \"0s\"\n[upstreams.orders]\nurl = \"{}\"\n", idp.token_url()),
    );
    let process = Process::start("", &[("TOKEN_PROXY_CONFIG", file.path())]).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", process.client);
    let no_default = http.post(format!("{base}/oauth2/token")).send().await.unwrap().status();
    let wrong_method = http.get(format!("{base}/orders/oauth2/token")).send().await.unwrap().status();
    let wrong_path = http.post(format!("{base}/elsewhere")).send().await.unwrap().status();
    assert_eq!([no_default, wrong_method, wrong_path].map(|s| s.as_u16()), [404, 405, 404]);
    process.sigterm();
    let (status, logs) = process.exit(Duration::from_secs(10)).await;
    assert!(status.success());
    let access = access_lines(&logs);
    let seen: Vec<(&str, u64, &str)> = access
        .iter()
        .map(|l| (l["outcome"].as_str().unwrap(), l["status"].as_u64().unwrap(), l["source"].as_str().unwrap()))
        .collect();
    let refused = |status| ("rejected", status, "127.0.0.1");
    assert_eq!(seen, [refused(404), refused(405), refused(404)], "{logs}");
    assert!(!logs.contains("elsewhere"), "the caller's route is repeated in the logs");
}

/// A client that hangs up while the upstream is slow: hyper drops the request, and it is still
/// one `aborted` access line (status 499, as nginx logs it) and one count in the metrics.
#[tokio::test]
async fn a_request_the_client_abandons_is_one_aborted_line_and_one_count() {
    use tokio::io::AsyncWriteExt;
    const SECRET: &str = "access-log-abort-canary-secret";
    let idp = spawn_idp(vec![client("quitter", SECRET)]).await;
    let process =
        Process::start(&idp.token_url(), &[("TOKEN_PROXY_ACCESS_LOG", "true"), ("TOKEN_PROXY_DRAIN_DELAY", "0")]).await;
    idp.idp.set_latency(Duration::from_secs(30));
    let body = "grant_type=client_credentials";
    let request = format!(
        "POST /oauth2/token HTTP/1.1\r\nhost: {}\r\nauthorization: {}\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n{body}",
        process.client,
        shared::basic::encode("quitter", SECRET),
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(process.client).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    eventually(Duration::from_secs(10), "the upstream call", async || idp.idp.requests_total() == 1).await;
    drop(stream);

    let metrics = format!("http://{}/metrics", process.admin);
    let aborted = async || {
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        text.lines().any(|l| l.starts_with("token_proxy_requests_total{outcome=\"aborted\"") && l.ends_with(" 1"))
    };
    eventually(Duration::from_secs(10), "requests_total{outcome=\"aborted\"} 1", aborted).await;
    process.sigterm();
    let (status, logs) = process.exit(Duration::from_secs(10)).await;
    assert!(status.success());
    let access = access_lines(&logs);
    assert_eq!(access.len(), 1, "{logs}");
    assert_eq!((access[0]["client_id"].as_str(), access[0]["outcome"].as_str()), (Some("quitter"), Some("aborted")));
    assert_eq!(access[0]["status"], 499, "{}", access[0]);
    assert!(access[0]["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{}", access[0]);
    assert!(!logs.contains(SECRET), "a secret is logged");
}

/// A client id with a quote, a newline and a control character is one JSON line that says it
/// exactly: the caller cannot forge a second line.
#[tokio::test]
async fn a_hostile_client_id_is_one_json_line() {
    const HOSTILE: &str = "evil\"id\n{\"target\":\"token_proxy::access\",\"outcome\":\"hit\"}\u{1}";
    let idp = spawn_idp(vec![client("app", "access-log-hostile-canary-secret")]).await;
    let process =
        Process::start(&idp.token_url(), &[("TOKEN_PROXY_ACCESS_LOG", "true"), ("TOKEN_PROXY_DRAIN_DELAY", "0")]).await;
    let form = shared::form::encode_pairs([
        ("grant_type", "client_credentials"),
        ("client_id", HOSTILE),
        ("client_secret", "access-log-hostile-wrong-secret"),
    ]);
    // mock-idp knows no such client: its 400 invalid_client is relayed.
    assert_eq!(post_form(&process.token_url(), &form).await.status, 400);
    process.sigterm();
    let (status, logs) = process.exit(Duration::from_secs(10)).await;
    assert!(status.success());
    let access = access_lines(&logs);
    assert_eq!(access.len(), 1, "{logs}");
    assert_eq!(access[0]["client_id"], HOSTILE, "{}", access[0]);
    assert_eq!((access[0]["outcome"].as_str(), access[0]["status"].as_u64()), (Some("miss"), Some(400)));
}
