//! Root-secret rotation: entries sealed under a previous secret are still read (no upstream
//! call for a rotation), new entries are sealed with the current one, and once a secret leaves
//! the ring its entries are misses, never errors.

use crate::helpers::*;

/// Base64 of 32 bytes "abcdefghijklmnopqrstuvwxyz123456".
const NEW_SECRET: &str = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY=";
/// Base64 of 32 bytes "zyxwvutsrqponmlkjihgfedcba654321".
const UNRELATED_SECRET: &str = "enl4d3Z1dHNycXBvbm1sa2ppaGdmZWRjYmE2NTQzMjE=";

const ID: &str = "rotating-client";
const SECRET: &str = "rotating-client-secret-1";

#[tokio::test]
async fn previous_secrets_are_read_and_removed_ones_are_misses() {
    let redis = RedisServer::start().await;
    let idp = spawn_idp(vec![client(ID, SECRET)]).await;
    let redis_url = redis.url();
    let replica = |secret: &'static str, previous: Option<&'static str>| {
        // Every read goes to Redis, so what is shown is Redis's content, not L1's. A generous
        // Redis deadline: on a loaded machine the default 250 ms can drop the write this test
        // then looks for (seen once: "one sealed entry", 0 found, while the suite ran beside
        // other builds).
        let mut overrides =
            vec![("TOKEN_PROXY_SECRET", secret), ("TOKEN_PROXY_L1_CAPACITY", "0"), ("TOKEN_PROXY_REDIS_TIMEOUT", "2s")];
        overrides.extend(previous.map(|previous| ("TOKEN_PROXY_PREVIOUS_SECRETS", previous)));
        let (redis_url, idp) = (&redis_url, &idp);
        async move { TestCluster::replica(redis_url, idp, &overrides).await }
    };

    let old = replica(ROOT_SECRET, None).await;
    let first = old.post_basic(ID, SECRET, None).await;
    assert_eq!(first.x_cache(), "MISS");
    let before = redis.dump().await;
    assert_eq!(before.len(), 1, "one sealed entry");

    // The rolled replica: new secret, the old one as previous. The old entry is a HIT.
    let rolled = replica(NEW_SECRET, Some(ROOT_SECRET)).await;
    let reply = rolled.post_basic(ID, SECRET, None).await;
    assert_eq!((reply.status, reply.x_cache()), (200, "HIT"), "{}", reply.raw);
    assert_eq!(reply.access_token(), first.access_token());
    assert_eq!(idp.idp.issued_total(), 1, "the rotation cost no upstream call");

    // A new key is written under the current secret only: readable by the rolled replica, and
    // by nothing that lacks the new secret.
    let scoped = rolled.post_basic(ID, SECRET, Some("api/read")).await;
    assert_eq!(scoped.x_cache(), "MISS");
    assert_eq!(rolled.post_basic(ID, SECRET, Some("api/read")).await.x_cache(), "HIT");
    assert_eq!(old.post_basic(ID, SECRET, Some("api/read")).await.x_cache(), "MISS");

    // The old secret removed from the ring: its entries are misses, answered from the upstream.
    let retired = replica(NEW_SECRET, Some(UNRELATED_SECRET)).await;
    let reply = retired.post_basic(ID, SECRET, None).await;
    assert_eq!((reply.status, reply.x_cache()), (200, "MISS"), "{}", reply.raw);
    assert_ne!(reply.access_token(), first.access_token());

    // A tampered entry under a previous secret's name is a miss too, never an error.
    let fresh_redis_entry = redis.dump().await;
    let client = redis.client().await;
    use fred::prelude::*;
    for (key, value) in &fresh_redis_entry {
        let mut value = value.to_vec();
        let last = value.len() - 1;
        value[last] ^= 1;
        let ttl: i64 = client.pttl(key.as_ref()).await.unwrap();
        if ttl > 0 {
            let () = client.set(key.as_ref(), value.as_slice(), Some(Expiration::PX(ttl)), None, false).await.unwrap();
        }
    }
    let issued = idp.idp.issued_total();
    let fresh = replica(UNRELATED_SECRET, Some(ROOT_SECRET)).await;
    let reply = fresh.post_basic(ID, SECRET, None).await;
    assert_eq!((reply.status, reply.x_cache()), (200, "MISS"), "{}", reply.raw);
    assert_eq!(idp.idp.issued_total(), issued + 1);
}
