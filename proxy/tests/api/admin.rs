//! The admin listener.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::helpers::*;

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = TestApp::with_redis(vec![client("app", SECRET)], &[]).await;
    let admin = format!("http://{}", app.proxy.admin);
    assert_eq!(http().get(format!("{admin}/healthz")).send().await.unwrap().status(), 200);
    let idp = app.idp.idp.clone();
    eventually(std::time::Duration::from_secs(5), "Redis connected", async || {
        let ready = get_json(&format!("{admin}/readyz")).await;
        ready["redis"] == "up" && ready["ready"] == true
    })
    .await;
    app.post_basic("app", SECRET, None).await;
    app.post_basic("app", SECRET, None).await;
    app.post_basic("app", SECRET, None).await;
    assert_eq!(idp.issued_total(), 1);
    assert_eq!(app.proxy.metric("token_proxy_requests_total{outcome=\"miss\"}").await, 1.0);
    assert_eq!(app.proxy.metric("token_proxy_requests_total{outcome=\"hit\"}").await, 2.0);
    assert_eq!(app.proxy.metric("token_proxy_upstream_calls_avoided_total").await, 2.0);
    assert_eq!(app.proxy.metric("token_proxy_upstream_requests_total{status_class=\"2xx\"}").await, 1.0);
    assert_eq!(app.proxy.metric("token_proxy_request_duration_seconds_count{outcome=\"hit\"}").await, 2.0);
    assert_eq!(app.proxy.metric("token_proxy_upstream_request_duration_seconds_count").await, 1.0);
    assert_eq!(app.proxy.metric("token_proxy_redis_errors_total").await, 0.0);
}

/// Every family on `/metrics`, after traffic of every kind, explains itself (`# HELP`) and says
/// its type; the process's own families are there, and `token_proxy_build_info` names what
/// `--version` prints.
#[tokio::test]
async fn every_metric_family_has_help_and_type_and_the_process_is_measured() {
    let app = TestApp::with_redis(vec![client("app", SECRET)], &[]).await;
    app.post_basic("app", SECRET, None).await;
    app.post_basic("app", SECRET, None).await;
    app.post_basic("app", "wrong-secret", None).await;
    app.post_form("grant_type=client_credentials&grant_type=client_credentials").await;
    let text = app.proxy.metrics().await;
    let mut undescribed = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let name = line.split(['{', ' ']).next().unwrap();
        let histogram = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|family| text.contains(&format!("# TYPE {family} histogram\n")));
        let family = histogram.unwrap_or(name);
        if !text.contains(&format!("# HELP {family} ")) || !text.contains(&format!("# TYPE {family} ")) {
            undescribed.push(family.to_owned());
        }
    }
    undescribed.dedup();
    assert!(undescribed.is_empty(), "families without HELP or TYPE: {undescribed:?}\n{text}");
    assert!(text.contains("# HELP token_proxy_requests_total "), "{text}");
    // A replica holds sockets open and megabytes resident; CPU time may still round to 0.
    assert!(app.proxy.metric("process_resident_memory_bytes").await > 1_000_000.0);
    assert!(app.proxy.metric("process_open_fds").await >= 4.0);
    assert!(app.proxy.metric("process_max_fds").await >= app.proxy.metric("process_open_fds").await);
    assert!(app.proxy.metric("process_cpu_seconds_total").await >= 0.0);
    // `token-proxy 0.1.0 (commit abc)`: the same version and commit as labels, value 1.
    let version = token_proxy::config::version();
    let words: Vec<&str> = version.split_whitespace().collect();
    let (number, commit) = (words[1], words[3].trim_end_matches(')'));
    let series = format!("token_proxy_build_info{{version=\"{number}\",commit=\"{commit}\"}}");
    assert_eq!(app.proxy.metric(&series).await, 1.0, "{text}");
}

#[tokio::test]
async fn a_stopped_replica_closes_its_listeners() {
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let proxy = TestProxy::spawn(proxy_config(&idp.token_url(), &[])).await;
    let admin = format!("http://{}/readyz", proxy.admin);
    let ready = get_json(&admin).await;
    assert_eq!(ready["redis"], "disabled");
    proxy.stop().await;
    assert!(http().get(&admin).send().await.is_err(), "the admin listener closes after draining");
}

// ---------------------------------------------------------------------------------------------
// The admin listener's own protections (issue 10, defect 6)

const ADMIN_TOKEN: &str = "admin-listener-token-0042";

#[tokio::test]
async fn half_open_connections_to_the_admin_listener_are_closed_after_the_header_timeout() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[("TOKEN_PROXY_HEADER_READ_TIMEOUT", "500ms")]).await;
    let opened = Instant::now();
    let mut half = TcpStream::connect(app.proxy.admin).await.unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: adm").await.unwrap();
    let mut silent = TcpStream::connect(app.proxy.admin).await.unwrap();
    for (what, stream) in [("half a request head", &mut half), ("nothing", &mut silent)] {
        let (received, _) = read_until_closed(stream, Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("a connection that sent {what} is still open after 3 s"));
        let after = opened.elapsed();
        assert!(after >= Duration::from_millis(400), "{what}: closed after {after:?}, before the timeout");
        assert!(received.is_empty(), "{what}: {:?}", String::from_utf8_lossy(&received));
    }
    assert_eq!(http().get(format!("http://{}/healthz", app.proxy.admin)).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn the_admin_listener_caps_its_connections() {
    let app = TestApp::embedded(
        vec![client("app", SECRET)],
        &[("TOKEN_PROXY_ADMIN_MAX_CONNECTIONS", "4"), ("TOKEN_PROXY_HEADER_READ_TIMEOUT", "20s")],
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(app.proxy.admin).await.unwrap());
    }
    let mut fifth = TcpStream::connect(app.proxy.admin).await.unwrap();
    let (received, _) = read_until_closed(&mut fifth, Duration::from_secs(3)).await.expect("the fifth is closed");
    assert!(received.is_empty(), "{:?}", String::from_utf8_lossy(&received));
    // The client listener is not affected.
    assert_eq!(app.post_basic("app", SECRET, None).await.status, 200);

    drop(held);
    let refused = "token_proxy_connections_refused_total{listener=\"admin\",reason=\"listener_full\"}";
    let mut value = 0.0;
    eventually(Duration::from_secs(5), "the admin listener to take connections again", async || {
        match http().get(format!("http://{}/metrics", app.proxy.admin)).send().await {
            Ok(response) => {
                let text = response.text().await.unwrap();
                value = text.lines().find_map(|l| l.strip_prefix(refused)?.trim().parse().ok()).unwrap_or(0.0);
                true
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(value >= 1.0, "{refused} = {value}");
}

#[tokio::test]
async fn admin_requests_without_the_right_token_are_refused_before_the_body_is_read() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[("TOKEN_PROXY_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    for authorization in ["", "Authorization: Bearer not-the-admin-token-at-all\r\n"] {
        let mut stream = TcpStream::connect(app.proxy.admin).await.unwrap();
        // A body of a megabyte is announced; 16 bytes of it ever come.
        let head = format!(
            "POST /admin/purge HTTP/1.1\r\nHost: admin\r\n{authorization}Content-Type: application/json\r\n\
             Content-Length: 1000000\r\n\r\n{{\"client_id\": \"a"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let (received, _) = read_until_closed(&mut stream, Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("no 401 within 3 s ({authorization:?})"));
        let text = String::from_utf8_lossy(&received);
        assert!(text.starts_with("HTTP/1.1 401"), "{text}");
        assert!(text.contains("\"error\":\"unauthorized\""), "{text}");
    }
    let (status, _) = app.purge(Some(ADMIN_TOKEN), r#"{"client_id": "app"}"#).await;
    assert_eq!(status, 200, "the right token still purges");
}

/// The real binary with at most `nofile` open files.
fn spawn_binary_with_nofile(nofile: u32, vars: &[(&str, &str)]) -> tokio::process::Child {
    tokio::process::Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg(env!("CARGO_BIN_EXE_token-proxy"))
        .env_clear()
        .envs(vars.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prlimit and the binary start")
}

/// Sends one GET on a kept-alive connection; the status and the body.
async fn get_on(stream: &mut TcpStream, path: &str) -> (u16, String) {
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").as_bytes()).await.unwrap();
    let response = read_one_response(stream).await;
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

#[tokio::test]
async fn running_out_of_file_descriptors_shows_in_readyz_and_metrics() {
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let url = idp.token_url();
    let mut child = spawn_binary_with_nofile(
        64,
        &[
            ("TOKEN_PROXY_UPSTREAM_URL", &url),
            ("TOKEN_PROXY_LISTEN", "127.0.0.1:0"),
            ("TOKEN_PROXY_ADMIN_LISTEN", "127.0.0.1:0"),
            ("TOKEN_PROXY_HEADER_READ_TIMEOUT", "60s"),
        ],
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut warned = false;
    let (client_addr, admin_addr) = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("the proxy exited before listening");
            let json: serde_json::Value = serde_json::from_str(&line).expect("logs are JSON lines");
            warned |= json["level"] == "WARN" && json["message"].as_str().unwrap_or("").contains("open-file limit");
            if json["message"] == "token-proxy listening" {
                let addr = |field: &str| json[field].as_str().unwrap().parse::<SocketAddr>().unwrap();
                return (addr("client"), addr("admin"));
            }
        }
    })
    .await
    .expect("the proxy starts within 20 s");
    assert!(warned, "no start-up warning about the open-file limit of 64");
    // Drain the logs, or the child blocks writing them.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    // One admin connection opened while there are descriptors to spare, kept alive.
    let mut admin = TcpStream::connect(admin_addr).await.unwrap();
    let (status, body) = get_on(&mut admin, "/readyz").await;
    assert_eq!(status, 200, "{body}");

    // Idle client connections until the process has no descriptor left to accept one more.
    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(TcpStream::connect(client_addr).await.unwrap());
    }
    let mut unready = String::new();
    eventually(Duration::from_secs(10), "/readyz to turn 503", async || {
        let (status, body) = get_on(&mut admin, "/readyz").await;
        unready = body;
        status == 503
    })
    .await;
    let json: serde_json::Value = serde_json::from_str(&unready).unwrap();
    assert_eq!(json["ready"], false, "{unready}");
    assert!(json["reason"].as_str().unwrap().contains("client listener"), "{unready}");
    let accept_errors = async |admin: &mut TcpStream| -> f64 {
        let (_, metrics) = get_on(admin, "/metrics").await;
        let series = "token_proxy_accept_errors_total{listener=\"client\"}";
        metrics.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
    };
    let errors = accept_errors(&mut admin).await;
    assert!(errors >= 1.0, "token_proxy_accept_errors_total = {errors}");
    // Still failing past the 2 s a failure is remembered: the loop keeps retrying and failing.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, body) = get_on(&mut admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let later = accept_errors(&mut admin).await;
    assert!(later > errors, "no accept retried: {errors} then {later}");
    eprintln!(
        "out of descriptors (nofile 64, 100 idle client connections): /readyz {unready}; \
         {errors} accept errors, {later} 2.5 s later"
    );

    // Descriptors free again: accepts succeed and the replica is ready again.
    drop(flood);
    eventually(Duration::from_secs(10), "/readyz to turn 200 again", async || {
        get_on(&mut admin, "/readyz").await.0 == 200
    })
    .await;
    let reply = post_basic(&format!("http://{client_addr}/oauth2/token"), "app", SECRET, None).await;
    assert_eq!(reply.status, 200, "{}", reply.raw);
    let _ = child.start_kill();
    let _ = child.wait().await;
}
