//! Tokens are RS256 JWTs that verify against the published JWKS and carry Cognito's claims.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use ring::signature::{RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents};
use serde_json::Value;

use crate::helpers::{TestApp, claims, spawn_app};

fn decode(part: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(part).unwrap()
}

/// Verifies `token` with the key the JWKS lists under the token's `kid`; returns its claims.
fn verify(token: &str, jwks: &Value) -> Result<Value, String> {
    let parts: Vec<&str> = token.split('.').collect();
    let [header, payload, signature] = parts[..] else { return Err(format!("{} parts", parts.len())) };
    let header: Value = serde_json::from_slice(&decode(header)).unwrap();
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["typ"], "JWT");
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .ok_or("no key with the token's kid")?;
    let n = decode(key["n"].as_str().unwrap());
    let e = decode(key["e"].as_str().unwrap());
    RsaPublicKeyComponents { n: &n, e: &e }
        .verify(
            &RSA_PKCS1_2048_8192_SHA256,
            format!("{header_b64}.{payload}", header_b64 = parts[0]).as_bytes(),
            &decode(signature),
        )
        .map_err(|_| "bad signature".to_owned())?;
    Ok(serde_json::from_slice(&decode(payload)).unwrap())
}

async fn jwks(app: &TestApp) -> Value {
    let reply = app.get("/.well-known/jwks.json").await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.body
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test]
async fn the_jwks_publishes_one_rs256_signing_key() {
    let app = spawn_app().await;
    let jwks = jwks(&app).await;
    assert_eq!(jwks, app.server.idp.jwks());
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    let key = &keys[0];
    assert_eq!((&key["kty"], &key["alg"], &key["use"]), (&"RSA".into(), &"RS256".into(), &"sig".into()));
    assert_eq!(key["kid"].as_str().unwrap().len(), 16);
    assert_eq!(key["kid"], app.server.idp.kid());
}

#[tokio::test]
async fn a_token_verifies_against_the_jwks_and_carries_the_claims() {
    let app = spawn_app().await;
    let before = now();
    let reply = app.token_basic("client-a", "secret-a", "&scope=api/read").await;
    let claims = verify(reply.access_token(), &jwks(&app).await).unwrap();

    assert_eq!(claims["sub"], "client-a");
    assert_eq!(claims["client_id"], "client-a");
    assert_eq!(claims["token_use"], "access");
    assert_eq!(claims["scope"], "api/read");
    assert_eq!(claims["iss"], mock_idp::DEFAULT_ISSUER);
    assert_eq!(claims["version"], 2);
    let iat = claims["iat"].as_u64().unwrap();
    assert!(iat >= before && iat <= now(), "iat {iat}");
    assert_eq!(claims["exp"].as_u64().unwrap(), iat + 3600);
    let jti = claims["jti"].as_str().unwrap();
    assert_eq!(jti.len(), 32);
    assert!(jti.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(claims.get("client_metadata").is_none());
}

#[tokio::test]
async fn a_tampered_token_does_not_verify() {
    let app = spawn_app().await;
    let reply = app.token_basic("client-b", "secret-b", "").await;
    let token = reply.access_token();
    let mut claims = claims(token);
    claims["scope"] = "api/read api/admin".into();
    let parts: Vec<&str> = token.split('.').collect();
    let forged = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(claims.to_string()), parts[2]);
    assert_eq!(verify(&forged, &jwks(&app).await), Err("bad signature".to_owned()));
}

#[tokio::test]
async fn aws_client_metadata_reaches_the_token() {
    let app = spawn_app().await;
    let reply = app.token_basic("client-a", "secret-a", "&aws_client_metadata=%7B%22tenant%22%3A%22t1%22%7D").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(claims(reply.access_token())["client_metadata"], r#"{"tenant":"t1"}"#);
}

#[tokio::test]
async fn the_token_lifetime_can_change_at_run_time() {
    let app = spawn_app().await;
    app.server.idp.set_token_lifetime(Duration::from_secs(5));
    let reply = app.token_basic("client-a", "secret-a", "").await;
    assert_eq!(reply.body["expires_in"], 5);
    let claims = claims(reply.access_token());
    assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 5);
}

#[tokio::test]
async fn the_issuer_is_configurable() {
    let mut config = mock_idp::Config::for_tests(vec![mock_idp::ClientConfig::new("c", "s", &["x"])]);
    config.issuer = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_test".to_owned();
    let server = mock_idp::spawn(config).await.unwrap();
    let app = TestApp { server, http: crate::helpers::http_client() };
    let reply = app.token_basic("c", "s", "").await;
    let claims = verify(reply.access_token(), &jwks(&app).await).unwrap();
    assert_eq!(claims["iss"], "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_test");
}
