//! The `token-proxy` binary as an operator runs it: configuration errors, start-up, a MISS
//! then a HIT, SIGTERM, and stdout free of secrets and tokens.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

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

#[tokio::test]
async fn the_binary_serves_misses_then_hits_and_stops_on_sigterm() {
    const SECRET: &str = "binary-canary-secret";
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let mut child = Command::new(BIN)
        .env_clear()
        .env("TOKEN_PROXY_UPSTREAM_URL", idp.token_url())
        .env("TOKEN_PROXY_LISTEN", "127.0.0.1:0")
        .env("TOKEN_PROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .env("TOKEN_PROXY_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut logs = Vec::new();
    let client_addr = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("the proxy exited before listening");
            logs.push(line.clone());
            let json: serde_json::Value = serde_json::from_str(&line).expect("logs are JSON lines");
            if json["message"] == "token-proxy listening" {
                return json["client"].as_str().unwrap().to_owned();
            }
        }
    })
    .await
    .expect("the proxy starts within 20 s");

    let url = format!("http://{client_addr}/oauth2/token");
    let miss = post_basic(&url, "app", SECRET, None).await;
    let hit = post_basic(&url, "app", SECRET, None).await;
    assert_eq!((miss.x_cache(), hit.x_cache()), ("MISS", "HIT"));
    assert_eq!(idp.idp.issued_total(), 1);

    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("exits on SIGTERM").unwrap();
    assert!(status.success(), "{status:?}");
    while let Ok(Some(line)) = lines.next_line().await {
        logs.push(line);
    }
    let logs = logs.join("\n");
    assert!(logs.contains("shutting down"), "{logs}");
    assert!(!logs.contains(SECRET), "stdout contains the client secret");
    assert!(!logs.contains(miss.access_token()), "stdout contains a token");
}
