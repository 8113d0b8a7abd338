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
async fn version_prints_the_package_version() {
    let (code, stdout, _) = run(&[], &["--version"]).await;
    assert_eq!(code, 0);
    assert_eq!(stdout.trim(), format!("token-proxy {}", env!("CARGO_PKG_VERSION")));
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

    let slow = in_flight.await.unwrap();
    assert_eq!((slow.status, slow.x_cache()), (200, "MISS"), "the request in flight was dropped: {}", slow.raw);
    let (status, logs) = process.exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}\n{logs}");
    assert!(!logs.contains(SECRET), "stdout contains the client secret");
    assert!(!logs.contains(slow.access_token()), "stdout contains a token");
}
