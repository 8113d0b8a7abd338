//! The `token-proxy` binary as an operator runs it: configuration errors, start-up, a MISS
//! then a HIT, SIGTERM and the drain before exit, and stdout free of secrets and tokens.

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
