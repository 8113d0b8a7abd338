#!/usr/bin/env python3
"""Runs `token-proxy --check` on the configuration the deployment files give the replicas.

    check_settings.py BINARY cdk TEMPLATE.json       # the token-proxy container of the task definition
    check_settings.py BINARY kubernetes RENDERED.yaml # the ConfigMap the token-proxy Deployment reads

Values only known at deploy time (CloudFormation tokens) and secrets become stand-ins of the
right form (a generated root secret is 44 alphanumerics, as Secrets Manager makes it); *_FILE
paths become files in a temporary directory. Exit status: the binary's.
"""
import json
import os
import secrets
import string
import subprocess
import sys
import tempfile

ALNUM = string.ascii_letters + string.digits
# Stand-ins for what CloudFormation resolves at deploy time.
DEPLOY_TIME = {
    "TOKEN_PROXY_REDIS_URL": "rediss://token-proxy.serverless.euw1.cache.amazonaws.com:6379",
    "TOKEN_PROXY_TRUSTED_PROXIES": "10.0.0.0/16",
    # With redisIamAuth: the stack's region (AWS::Region).
    "TOKEN_PROXY_REDIS_IAM_REGION": "eu-west-1",
}
# Stand-ins for secrets, as the platform would hand them over.
SECRET_VALUES = {
    "TOKEN_PROXY_SECRET": lambda: "".join(secrets.choice(ALNUM) for _ in range(44)),
    "TOKEN_PROXY_ADMIN_TOKEN": lambda: "".join(secrets.choice(ALNUM) for _ in range(40)),
    "TOKEN_PROXY_UPSTREAM_HEADERS": lambda: "X-Origin-Verify: " + secrets.token_hex(32),
    "TOKEN_PROXY_PREVIOUS_SECRETS": lambda: "".join(secrets.choice(ALNUM) for _ in range(44)),
}


def cdk_env(path):
    template = json.load(open(path))
    tds = [r for r in template["Resources"].values() if r["Type"] == "AWS::ECS::TaskDefinition"]
    container = next(c for td in tds for c in td["Properties"]["ContainerDefinitions"] if c["Name"] == "token-proxy")
    env = {}
    for e in container.get("Environment", []):
        value = e["Value"]
        if not isinstance(value, str):
            if e["Name"] not in DEPLOY_TIME:
                raise SystemExit(f"{e['Name']} is only known at deploy time and has no stand-in here")
            value = DEPLOY_TIME[e["Name"]]
        env[e["Name"]] = value
    for s in container.get("Secrets", []):
        env[s["Name"]] = SECRET_VALUES[s["Name"]]()
    return env


def kubernetes_env(path, directory):
    import yaml

    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "token-proxy")
    container = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "token-proxy")
    env = {}
    for src in container.get("envFrom", []):
        name = src["configMapRef"]["name"]
        env.update(next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)["data"])
    for e in container.get("env", []):
        env[e["name"]] = e["value"]
    for key, value in list(env.items()):
        if key.endswith("_FILE"):
            stand_in = SECRET_VALUES[key[: -len("_FILE")]]()
            local = os.path.join(directory, key.lower())
            with open(local, "w") as f:
                f.write(stand_in + "\n")
            env[key] = local
    return env


def main(argv):
    if len(argv) != 4 or argv[2] not in ("cdk", "kubernetes"):
        print(__doc__, file=sys.stderr)
        return 2
    binary, kind, path = argv[1:]
    with tempfile.TemporaryDirectory() as directory:
        env = cdk_env(path) if kind == "cdk" else kubernetes_env(path, directory)
        env = {k: v for k, v in env.items() if k.startswith("TOKEN_PROXY_")}
        env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
        print(f"{kind}: {len(env) - 1} TOKEN_PROXY_* variables")
        return subprocess.run([binary, "--check"], env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv))
