#!/usr/bin/env python3
"""Independent computation of the ElastiCache / MemoryDB IAM tokens pinned in
proxy/src/store/iam.rs (known-answer tests). Standard library only, written from AWS's
Signature Version 4 query-string (presigned URL) description, not from the Rust code:

  GET http://CACHE/?Action=connect&User=USER[&ResourceType=ServerlessCache]
  presigned for SERVICE (elasticache or memorydb) in REGION, X-Amz-Expires=900,
  signed headers: host; payload: the empty body's SHA-256; the token is the URL without http://.

Run: python3 proxy/tests/vectors/iam_presign.py
"""
import hashlib
import hmac
import urllib.parse

# AWS's documented example credentials (not real ones).
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLE/session+token=="
AT = "20261206T080000Z"


def enc(text):
    return urllib.parse.quote(text, safe="-_.~")


def hm(key, msg):
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def token(service, region, cache, user, serverless, session_token):
    date = AT[:8]
    scope = f"{date}/{region}/{service}/aws4_request"
    params = [("Action", "connect"), ("User", user)]
    if serverless:
        params.append(("ResourceType", "ServerlessCache"))
    params += [
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
        ("X-Amz-Credential", f"{ACCESS_KEY}/{scope}"),
        ("X-Amz-Date", AT),
        ("X-Amz-Expires", "900"),
        ("X-Amz-SignedHeaders", "host"),
    ]
    if session_token:
        params.append(("X-Amz-Security-Token", session_token))
    query = "&".join(f"{k}={v}" for k, v in sorted((enc(k), enc(v)) for k, v in params))
    canonical = "\n".join(["GET", "/", query, f"host:{cache}", "", "host", hashlib.sha256(b"").hexdigest()])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", AT, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = hm(hm(hm(hm(("AWS4" + SECRET_KEY).encode(), date), region), service), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{cache}/?{query}&X-Amz-Signature={signature}"


print(token("elasticache", "eu-west-1", "token-cache", "token-proxy", True, SESSION_TOKEN))
print(token("elasticache", "us-east-1", "my-group", "proxy user", False, None))
print(token("memorydb", "us-west-2", "tokens", "token-proxy", False, None))
