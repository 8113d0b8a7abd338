//! The client listener's inbound protections: TLS with certificate reload, mTLS, the source
//! network allowlist (and trusted proxies' X-Forwarded-For), header-read and idle timeouts, and
//! start-up failures for unusable TLS files. Certificates are made by the test with rcgen.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use token_proxy::app::Application;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::helpers::*;

// ---------------------------------------------------------------------------------------------
// Certificates and files (the CA, leaves and temporary directories are in helpers/certs.rs)

/// The proxy's certificate files in `dir`, and the variables naming them.
fn write_server_files(dir: &TempDir, leaf: &Leaf) -> (String, String) {
    let key = dir.replace("key.pem", &leaf.key_pem);
    let cert = dir.replace("cert.pem", &leaf.cert_pem);
    (cert.display().to_string(), key.display().to_string())
}

/// A proxy (in front of its own mock-idp with client `app`) serving TLS with `leaf`, its files
/// in `dir`, plus the `extra` settings.
async fn tls_app(dir: &TempDir, leaf: &Leaf, extra: &[(&str, &str)]) -> TestApp {
    let (cert, key) = write_server_files(dir, leaf);
    let mut settings = vec![("TOKEN_PROXY_TLS_CERT_FILE", cert.as_str()), ("TOKEN_PROXY_TLS_KEY_FILE", key.as_str())];
    settings.extend_from_slice(extra);
    TestApp::embedded(vec![client("app", SECRET)], &settings).await
}

// ---------------------------------------------------------------------------------------------
// Clients

/// An HTTPS client trusting only `ca`, presenting `identity` if given.
fn https_client(ca: &Ca, identity: Option<&Leaf>) -> reqwest::Client {
    token_proxy::install_tls_provider();
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap()]);
    if let Some(leaf) = identity {
        builder = builder.identity(leaf.identity());
    }
    builder.build().unwrap()
}

fn https_url(addr: SocketAddr) -> String {
    format!("https://{addr}/oauth2/token")
}

/// client_secret_basic through `client`; the transport error if there is one.
async fn post_with(client: &reqwest::Client, url: &str, id: &str, secret: &str) -> Result<TokenReply, reqwest::Error> {
    let response = client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", shared::basic::encode(id, secret))
        .body("grant_type=client_credentials")
        .send()
        .await?;
    Ok(read(response).await)
}

/// A TLS handshake with the proxy trusting `cas`; the certificate it presented.
async fn presented_certificate(addr: SocketAddr, cas: &[&Ca]) -> CertificateDer<'static> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(ca.pem.as_bytes()).unwrap();
        roots.add(der).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await.unwrap().unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

const BASIC_REQUEST_BODY: &str = "grant_type=client_credentials";

/// A whole token request, written by hand.
fn raw_request() -> String {
    format!(
        "POST /oauth2/token HTTP/1.1\r\nHost: proxy\r\nAuthorization: {}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{BASIC_REQUEST_BODY}",
        shared::basic::encode("app", SECRET),
        BASIC_REQUEST_BODY.len()
    )
}

// ---------------------------------------------------------------------------------------------
// 1. TLS

#[tokio::test]
async fn tls_serves_tokens_over_https_and_nothing_over_plain_http() {
    let dir = TempDir::new("tls");
    let ca = Ca::new("test CA");
    let app = tls_app(&dir, &ca.server("proxy"), &[]).await;

    let reply = post_with(&https_client(&ca, None), &https_url(app.proxy.addr), "app", SECRET).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.raw);
    assert!(!reply.access_token().is_empty());
    assert_eq!(app.upstream_requests(), 1);

    // Plain HTTP to the TLS port: no HTTP answer at all, the connection just ends.
    let mut stream = TcpStream::connect(app.proxy.addr).await.unwrap();
    stream.write_all(raw_request().as_bytes()).await.unwrap();
    let (received, _) = read_until_closed(&mut stream, Duration::from_secs(3)).await.expect("the proxy hangs up");
    assert!(
        !received.starts_with(b"HTTP/"),
        "an HTTP answer on the TLS port: {:?}",
        String::from_utf8_lossy(&received)
    );
    assert!(!String::from_utf8_lossy(&received).contains("access_token"));
    // reqwest over plain HTTP fails the same way.
    assert!(post_with(&http(), &app.proxy.token_url(), "app", SECRET).await.is_err());
    assert_eq!(app.upstream_requests(), 1, "the plain-HTTP requests reached the upstream");
    assert!(
        app.proxy.metric("token_proxy_connections_refused_total{listener=\"client\",reason=\"tls_handshake\"}").await
            >= 2.0
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Certificate reload

#[tokio::test]
async fn replaced_certificate_files_are_served_without_a_restart() {
    let dir = TempDir::new("reload");
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let old = old_ca.server("proxy old");
    let app = tls_app(&dir, &old, &[]).await;
    let addr = app.proxy.addr;
    assert_eq!(presented_certificate(addr, &[&old_ca]).await, old.der);

    let new = new_ca.server("proxy new");
    write_server_files(&dir, &new);
    let replaced = Instant::now();
    loop {
        if presented_certificate(addr, &[&old_ca, &new_ca]).await == new.der {
            break;
        }
        assert!(replaced.elapsed() < Duration::from_millis(2500), "still the old certificate after 2.5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Clients trusting only the new CA get tokens now.
    let reply = post_with(&https_client(&new_ca, None), &https_url(addr), "app", SECRET).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.raw);

    // A certificate file that does not parse: the last good certificate stays, one warning.
    let broken = dir.replace("cert.pem", "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n");
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2200) {
        assert_eq!(presented_certificate(addr, &[&new_ca]).await, new.der);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = captured_logs();
    let warnings = logs
        .lines()
        .filter(|line| line.contains("WARN") && line.contains(&*broken.display().to_string()))
        .collect::<Vec<_>>();
    assert_eq!(warnings.len(), 1, "one warning per change of the files: {warnings:#?}");
    assert!(warnings[0].contains("TOKEN_PROXY_TLS_CERT_FILE"), "{}", warnings[0]);
    for leaf in [&old, &new] {
        let key_line = leaf.key_pem.lines().nth(1).unwrap();
        assert!(!logs.contains(key_line), "key material in the logs");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. mTLS

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_configured_ca() {
    let dir = TempDir::new("mtls");
    let (server_ca, client_ca, other_ca) = (Ca::new("server CA"), Ca::new("client CA"), Ca::new("other CA"));
    let client_ca_file = dir.replace("clients.pem", &client_ca.pem).display().to_string();
    let app = tls_app(&dir, &server_ca.server("proxy"), &[("TOKEN_PROXY_TLS_CLIENT_CA_FILE", &client_ca_file)]).await;
    let url = https_url(app.proxy.addr);

    let anonymous = post_with(&https_client(&server_ca, None), &url, "app", SECRET).await;
    assert!(anonymous.is_err(), "served without a client certificate: {anonymous:?}");
    let stranger = other_ca.client("stranger");
    let foreign = post_with(&https_client(&server_ca, Some(&stranger)), &url, "app", SECRET).await;
    assert!(foreign.is_err(), "served with a certificate from another CA: {foreign:?}");
    assert_eq!(app.upstream_requests(), 0);

    let service = client_ca.client("service-a");
    let reply = post_with(&https_client(&server_ca, Some(&service)), &url, "app", SECRET).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.raw);
    assert!(!reply.access_token().is_empty());
    assert_eq!(app.upstream_requests(), 1);
    assert!(
        app.proxy.metric("token_proxy_connections_refused_total{listener=\"client\",reason=\"tls_handshake\"}").await
            >= 2.0
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Source networks

#[tokio::test]
async fn connections_from_outside_the_allowed_networks_are_closed_unanswered() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[("TOKEN_PROXY_ALLOWED_NETWORKS", "10.0.0.0/8")]).await;
    let mut stream = TcpStream::connect(app.proxy.addr).await.unwrap();
    // The write may already fail: the proxy may have hung up.
    let _ = stream.write_all(raw_request().as_bytes()).await;
    let (received, _) = read_until_closed(&mut stream, Duration::from_secs(3)).await.expect("the proxy hangs up");
    assert!(received.is_empty(), "an answer: {:?}", String::from_utf8_lossy(&received));
    assert!(post_with(&http(), &app.proxy.token_url(), "app", SECRET).await.is_err());
    assert_eq!(app.upstream_requests(), 0);
    assert!(
        app.proxy.metric("token_proxy_connections_refused_total{listener=\"client\",reason=\"source\"}").await >= 2.0
    );

    let allowed =
        TestApp::embedded(vec![client("app", SECRET)], &[("TOKEN_PROXY_ALLOWED_NETWORKS", "127.0.0.0/8")]).await;
    let reply = allowed.post_basic("app", SECRET, None).await;
    assert_eq!(reply.status, 200, "{}", reply.raw);
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_source_is_checked() {
    let app = TestApp::embedded(
        vec![client("app", SECRET)],
        &[("TOKEN_PROXY_ALLOWED_NETWORKS", "10.0.0.0/8"), ("TOKEN_PROXY_TRUSTED_PROXIES", "127.0.0.1")],
    )
    .await;
    let post = |forwarded_for: Option<&'static str>| {
        let url = app.proxy.token_url();
        async move {
            let mut request = http()
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("authorization", shared::basic::encode("app", SECRET))
                .body(BASIC_REQUEST_BODY);
            if let Some(value) = forwarded_for {
                request = request.header("x-forwarded-for", value);
            }
            read(request.send().await.unwrap()).await
        }
    };

    let inside = post(Some("10.1.2.3")).await;
    assert_eq!(inside.status, 200, "{}", inside.raw);
    assert_eq!(app.upstream_requests(), 1);

    for (forwarded_for, what) in [(Some("192.0.2.1"), "an outside source"), (None, "the proxy itself as the source")] {
        let refused = post(forwarded_for).await;
        assert_eq!(refused.status, 403, "{what}: {}", refused.raw);
        assert_eq!(refused.error(), "access_denied", "{what}");
        assert!(refused.headers["content-type"].to_str().unwrap().starts_with("application/json"));
    }
    assert_eq!(app.upstream_requests(), 1, "a refused request reached the upstream");
}

// ---------------------------------------------------------------------------------------------
// 5. Timeouts

#[tokio::test]
async fn slow_request_heads_and_idle_keep_alive_connections_are_closed() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[("TOKEN_PROXY_HEADER_READ_TIMEOUT", "500ms")]).await;

    // Half a request head, then nothing.
    let mut slow = TcpStream::connect(app.proxy.addr).await.unwrap();
    slow.write_all(b"POST /oauth2/token HTTP/1.1\r\nHost: proxy\r\nContent-Type: appl").await.unwrap();
    let (received, after) = read_until_closed(&mut slow, Duration::from_secs(3)).await.expect("closed within 3 s");
    assert!(after >= Duration::from_millis(400), "closed after {after:?}, before the timeout");
    assert!(!String::from_utf8_lossy(&received).contains("access_token"));

    // One whole request answered, then silence on the keep-alive connection.
    let mut idle = TcpStream::connect(app.proxy.addr).await.unwrap();
    idle.write_all(raw_request().as_bytes()).await.unwrap();
    let response = read_one_response(&mut idle).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(!response.to_ascii_lowercase().contains("connection: close"), "{response}");
    let (received, after) = read_until_closed(&mut idle, Duration::from_secs(3)).await.expect("idle connection closed");
    assert!(after >= Duration::from_millis(400), "closed after {after:?}, before the timeout");
    assert!(received.is_empty(), "{:?}", String::from_utf8_lossy(&received));

    // A connection that never sends a byte is closed too.
    let mut silent = TcpStream::connect(app.proxy.addr).await.unwrap();
    read_until_closed(&mut silent, Duration::from_secs(3)).await.expect("silent connection closed");
}

// ---------------------------------------------------------------------------------------------
// 6. Unusable TLS files at start-up

#[tokio::test]
async fn unusable_tls_files_fail_start_up_with_one_line_naming_the_variable() {
    token_proxy::install_tls_provider();
    let dir = TempDir::new("bad-files");
    let ca = Ca::new("test CA");
    let leaf = ca.server("proxy");
    let other = ca.server("other");
    let cert = dir.replace("cert.pem", &leaf.cert_pem).display().to_string();
    let key = dir.replace("key.pem", &leaf.key_pem).display().to_string();
    let other_key = dir.replace("other-key.pem", &other.key_pem).display().to_string();
    let garbage = dir.replace("garbage.pem", "this is not PEM\n").display().to_string();
    let missing = dir.path("missing.pem").display().to_string();

    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[("TOKEN_PROXY_TLS_CERT_FILE", &missing), ("TOKEN_PROXY_TLS_KEY_FILE", &key)], "TOKEN_PROXY_TLS_CERT_FILE: "),
        (&[("TOKEN_PROXY_TLS_CERT_FILE", &garbage), ("TOKEN_PROXY_TLS_KEY_FILE", &key)], "TOKEN_PROXY_TLS_CERT_FILE: "),
        (&[("TOKEN_PROXY_TLS_CERT_FILE", &cert), ("TOKEN_PROXY_TLS_KEY_FILE", &garbage)], "TOKEN_PROXY_TLS_KEY_FILE: "),
        (
            &[("TOKEN_PROXY_TLS_CERT_FILE", &cert), ("TOKEN_PROXY_TLS_KEY_FILE", &other_key)],
            "TOKEN_PROXY_TLS_KEY_FILE: ",
        ),
        // The key where the certificate belongs.
        (&[("TOKEN_PROXY_TLS_CERT_FILE", &key), ("TOKEN_PROXY_TLS_KEY_FILE", &key)], "TOKEN_PROXY_TLS_CERT_FILE: "),
        (
            &[
                ("TOKEN_PROXY_TLS_CERT_FILE", &cert),
                ("TOKEN_PROXY_TLS_KEY_FILE", &key),
                ("TOKEN_PROXY_TLS_CLIENT_CA_FILE", &garbage),
            ],
            "TOKEN_PROXY_TLS_CLIENT_CA_FILE: ",
        ),
    ];
    for (overrides, prefix) in cases {
        let config = proxy_config("http://127.0.0.1:9/oauth2/token", overrides);
        let error = Application::build(config).await.expect_err("start-up must fail").to_string();
        assert!(error.starts_with(prefix), "{overrides:?}: {error}");
        assert!(!error.contains('\n'), "more than one line: {error}");
        for pem in [&leaf.key_pem, &other.key_pem] {
            assert!(!error.contains(pem.lines().nth(1).unwrap()), "key material in: {error}");
        }
    }
    let mismatch = proxy_config(
        "http://127.0.0.1:9/oauth2/token",
        &[("TOKEN_PROXY_TLS_CERT_FILE", &cert), ("TOKEN_PROXY_TLS_KEY_FILE", &other_key)],
    );
    let error = Application::build(mismatch).await.expect_err("mismatched key").to_string();
    assert!(error.contains("does not match"), "{error}");

    // The good pair starts.
    let good = proxy_config(
        "http://127.0.0.1:9/oauth2/token",
        &[("TOKEN_PROXY_TLS_CERT_FILE", &cert), ("TOKEN_PROXY_TLS_KEY_FILE", &key)],
    );
    assert!(Application::build(good).await.is_ok());
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown over TLS

#[tokio::test]
async fn stopping_lets_an_in_flight_https_request_finish() {
    let dir = TempDir::new("drain");
    let ca = Ca::new("test CA");
    let app = tls_app(&dir, &ca.server("proxy"), &[]).await;
    app.idp.idp.set_latency(Duration::from_millis(600));
    let TestApp { idp, proxy, .. } = app;
    let (addr, url) = (proxy.addr, https_url(proxy.addr));
    let client = https_client(&ca, None);
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { post_with(&client, &url, "app", SECRET).await }
    });
    eventually(Duration::from_secs(5), "the request to reach the upstream", async || idp.idp.requests_total() == 1)
        .await;
    tokio::time::timeout(Duration::from_secs(10), proxy.stop()).await.expect("drained within 10 s");
    let reply = in_flight.await.unwrap().expect("the in-flight request is answered");
    assert_eq!(reply.status, 200, "{}", reply.raw);
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting after the drain");
}
