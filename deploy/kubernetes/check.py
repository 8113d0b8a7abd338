#!/usr/bin/env python3
"""Checks the properties token-proxy's Kubernetes manifests promise, on rendered YAML.

    check.py development RENDERED.yaml      # an overlay's `kubectl kustomize` output
    check.py production RENDERED.yaml
    check.py --self-test RENDERED.yaml      # each check fails on a manifest broken for it

Prints one line per failed property and exits 1 if there is any. Needs PyYAML.
"""
import copy
import os
import re
import sys

import yaml

SECRET_LIKE = re.compile(r"SECRET|TOKEN$|PASSWORD|HEADERS$")
DURATION = re.compile(r"^(\d+)(ms|s|m|h)$")
DEFAULTS = {"TOKEN_PROXY_DRAIN_DELAY": "5s", "TOKEN_PROXY_UPSTREAM_TIMEOUT": "10s"}
README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "README.md")


def documented_settings():
    """The TOKEN_PROXY_* variables of the README's configuration table."""
    with open(README) as f:
        return set(re.findall(r"^\| `(TOKEN_PROXY_[A-Z0-9_]+)` \|", f.read(), re.M))


def seconds(text):
    m = DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    n, unit = int(m.group(1)), m.group(2)
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def one(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found[0] if len(found) == 1 else None


def matches(selector, labels):
    """A label selector (matchLabels or a plain map) selects these labels; empty selects nothing here."""
    wanted = selector.get("matchLabels", selector) if selector else {}
    if not wanted or (selector and selector.get("matchExpressions")):
        return False
    return all(labels.get(k) == v for k, v in wanted.items())


def port_number(container, port):
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def check(docs, overlay):
    failures = []

    def need(condition, message):
        if not condition:
            failures.append(message)
        return condition

    for kind in ("Namespace", "ServiceAccount", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy"):
        need(any(d["kind"] == kind for d in docs), f"no {kind}")
    need(not any(d["kind"] == "Secret" for d in docs), "a Secret is rendered: secrets must be referenced, not written in the manifests")

    ns = next((d for d in docs if d["kind"] == "Namespace"), None)
    if ns:
        need(ns["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") == "restricted",
             "the namespace does not enforce the restricted Pod Security Standard")

    # Every workload: non-root, read-only, no capabilities, seccomp, requests and limits.
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet", "DaemonSet"):
            continue
        name = d["metadata"]["name"]
        pod = d["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        need(pod.get("automountServiceAccountToken") is False, f"{name}: automountServiceAccountToken is not false")
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            where = f"{name}/{c['name']}"
            csc = c.get("securityContext", {})
            need(csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot is not true")
            need(csc.get("runAsUser", psc.get("runAsUser", 1)) != 0, f"{where}: runs as uid 0")
            need(csc.get("readOnlyRootFilesystem") is True, f"{where}: the root filesystem is not read-only")
            need(csc.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation is not disallowed")
            need(csc.get("privileged") in (None, False), f"{where}: privileged")
            caps = csc.get("capabilities", {})
            need("ALL" in caps.get("drop", []), f"{where}: capabilities are not all dropped")
            need(not caps.get("add"), f"{where}: capabilities added")
            seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
            need(seccomp == "RuntimeDefault", f"{where}: seccomp profile is not RuntimeDefault")
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    need(r in res.get(part, {}), f"{where}: no {part}.{r}")
            for env in c.get("env", []):
                need(not (SECRET_LIKE.search(env["name"]) and "value" in env),
                     f"{where}: {env['name']} is a plain value; secrets come from a Secret by reference")

    dep = one(docs, "Deployment", "token-proxy")
    if not need(dep is not None, "no Deployment token-proxy"):
        return failures
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"].get("labels", {})
    need(matches(dep["spec"]["selector"], labels), "the Deployment's selector does not select its pods")
    c = next((c for c in pod["containers"] if c["name"] == "token-proxy"), None)
    if not need(c is not None, "no container token-proxy"):
        return failures

    # The configuration: the ConfigMaps the container reads, and no secret among them.
    config = dict(DEFAULTS)
    for src in c.get("envFrom", []):
        ref = src.get("configMapRef", {}).get("name")
        if ref:
            cm = one(docs, "ConfigMap", ref)
            if need(cm is not None, f"the container reads ConfigMap {ref}, which is not rendered"):
                config.update(cm.get("data", {}))
        need("secretRef" not in src, "envFrom a Secret: secrets are mounted as files (*_FILE), not environment values")
    for env in c.get("env", []):
        if "value" in env:
            config[env["name"]] = env["value"]
    settings = documented_settings()
    for key in config:
        need(key in settings or key in DEFAULTS, f"{key} is not a token-proxy setting (README, Configuration)")
    for key, value in config.items():
        need(not (SECRET_LIKE.search(key) and not key.endswith("_FILE")),
             f"{key} is set in plain configuration; it belongs in the Secret (use {key}_FILE)")
        need(not re.search(r"://[^/@]*:[^/@]*@", str(value)), f"{key} carries a password in a URL")

    # Secrets by reference: every *_FILE lies under a mounted Secret volume that names a key.
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"].rstrip("/"): volumes.get(m["name"], {}) for m in c.get("volumeMounts", [])}
    for key in ("TOKEN_PROXY_SECRET_FILE", "TOKEN_PROXY_ADMIN_TOKEN_FILE"):
        need(key in config, f"{key} is not set: the root secret and the admin token come from a Secret")
    for key, path in config.items():
        if not key.endswith("_FILE"):
            continue
        directory, _, filename = path.rpartition("/")
        vol = mounts.get(directory)
        if need(vol is not None and "secret" in vol, f"{key}={path} is not on a mounted Secret volume"):
            items = vol["secret"].get("items")
            need(items is None or any(i["path"] == filename for i in items),
                 f"{key}={path}: the Secret volume does not project {filename}")
            need(not any(m.get("subPath") for m in c.get("volumeMounts", []) if m["mountPath"].rstrip("/") == directory),
                 f"{key}: mounted with subPath (the file would never be updated)")

    # Listeners and probes: the admin listener on the pod address, probes on its port.
    listen = config.get("TOKEN_PROXY_LISTEN", "0.0.0.0:8080")
    admin = config.get("TOKEN_PROXY_ADMIN_LISTEN", "127.0.0.1:9090")
    admin_host, _, admin_port = admin.rpartition(":")
    need(admin_host in ("0.0.0.0", "[::]"), f"TOKEN_PROXY_ADMIN_LISTEN={admin}: probes cannot reach a loopback admin listener")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        p = c.get(probe, {}).get("httpGet")
        if need(p is not None, f"no HTTP {probe}"):
            need(p.get("path") == path, f"{probe} path is {p.get('path')}, not {path}")
            need(str(port_number(c, p.get("port"))) == admin_port, f"{probe} is not on the admin port {admin_port}")
    http_port = listen.rpartition(":")[2]
    need(str(port_number(c, "http")) == http_port, f"the container port http is not TOKEN_PROXY_LISTEN's {http_port}")

    # Shutdown: the grace period outlasts the drain delay and the longest upstream exchange,
    # or a preStop hook holds the pod.
    drain = seconds(config["TOKEN_PROXY_DRAIN_DELAY"])
    upstream = seconds(config["TOKEN_PROXY_UPSTREAM_TIMEOUT"])
    grace = pod.get("terminationGracePeriodSeconds", 30)
    need(grace > drain + upstream or "preStop" in c.get("lifecycle", {}),
         f"terminationGracePeriodSeconds {grace} is not longer than the drain delay ({drain}s) plus the upstream timeout ({upstream}s)")
    need(dep["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxUnavailable", 1) == 0,
         "a rolling update may take a replica out before its successor is ready (maxUnavailable is not 0)")

    # Redis: TLS in production, the in-cluster Service in development.
    redis = config.get("TOKEN_PROXY_REDIS_URL", "")
    if overlay == "production":
        need(redis.startswith("rediss://"), f"production TOKEN_PROXY_REDIS_URL is not TLS: {redis!r}")
    elif overlay == "development":
        host = re.match(r"^redis://([^:/]+)", redis)
        need(host is not None and one(docs, "Service", host.group(1)) is not None,
             f"development TOKEN_PROXY_REDIS_URL {redis!r} is not an in-cluster Service")

    # Service: selects the pods, exposes both listeners.
    svc = one(docs, "Service", "token-proxy")
    if need(svc is not None, "no Service token-proxy"):
        need(matches(svc["spec"].get("selector", {}), labels), "the Service does not select the token-proxy pods")
        ports = {p["name"]: port_number(c, p["targetPort"]) for p in svc["spec"]["ports"]}
        need(str(ports.get("http")) == http_port, "the Service's http port does not reach the client listener")
        need(str(ports.get("admin")) == admin_port, "the Service's admin port does not reach the admin listener")

    hpa = one(docs, "HorizontalPodAutoscaler", "token-proxy")
    if need(hpa is not None, "no HorizontalPodAutoscaler token-proxy"):
        ref = hpa["spec"]["scaleTargetRef"]
        need(ref.get("kind") == "Deployment" and ref.get("name") == "token-proxy", "the HPA does not scale the Deployment")
        need(hpa["spec"].get("minReplicas", 1) >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"].get("minReplicas", 1),
             "the HPA's bounds leave no room to scale")
        need(any(m.get("resource", {}).get("name") == "cpu" for m in hpa["spec"].get("metrics", [])), "the HPA has no CPU metric")
        if overlay == "production":
            need(hpa["spec"].get("minReplicas", 1) >= 2, "production runs fewer than two replicas")

    pdb = one(docs, "PodDisruptionBudget", "token-proxy")
    if need(pdb is not None, "no PodDisruptionBudget token-proxy"):
        need(matches(pdb["spec"].get("selector", {}), labels), "the PodDisruptionBudget does not select the token-proxy pods")
        need("maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"], "the PodDisruptionBudget sets no budget")
        if hpa and "minAvailable" in pdb["spec"]:
            need(pdb["spec"]["minAvailable"] < hpa["spec"].get("minReplicas", 1), "minAvailable blocks every node drain")

    np = one(docs, "NetworkPolicy", "token-proxy")
    if need(np is not None, "no NetworkPolicy token-proxy"):
        spec = np["spec"]
        need(matches(spec.get("podSelector", {}), labels), "the NetworkPolicy does not select the token-proxy pods")
        need(set(spec.get("policyTypes", [])) == {"Ingress", "Egress"}, "the NetworkPolicy does not govern both directions")
        for rule in spec.get("ingress", []):
            rule_ports = {str(port_number(c, p.get("port"))) for p in rule.get("ports", [])}
            if not rule.get("ports") or admin_port in rule_ports:
                peers = rule.get("from", [])
                need(bool(peers) and all(p.get("namespaceSelector", {}).get("matchLabels") or p.get("podSelector", {}).get("matchLabels") for p in peers),
                     "the admin port is open to every pod (NetworkPolicy ingress)")
        egress_ports = {str(p.get("port")) for r in spec.get("egress", []) for p in r.get("ports", [])}
        for port, what in (("53", "DNS"), ("443", "the token endpoint")):
            need(port in egress_ports, f"the NetworkPolicy allows no egress to {what} ({port})")
        redis_port = (re.search(r":(\d+)(?:/|$)", redis) or [None, "6379"])[1]
        need(redis_port in egress_ports, f"the NetworkPolicy allows no egress to Redis ({redis_port})")
        need(all(r.get("ports") for r in spec.get("egress", [])), "an egress rule allows every port")

    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        need(svc is not None and matches(sm["spec"].get("selector", {}), svc["metadata"].get("labels", {})),
             "the ServiceMonitor does not select the Service")
        for ep in sm["spec"].get("endpoints", []):
            need(ep.get("port") in {p["name"] for p in (svc or {"spec": {"ports": []}})["spec"]["ports"]},
                 f"the ServiceMonitor scrapes port {ep.get('port')}, which the Service does not have")
            need(ep.get("path", "/metrics") == "/metrics", "the ServiceMonitor does not scrape /metrics")
    return failures


def _deployment(docs):
    return one(docs, "Deployment", "token-proxy")


def _container(docs):
    return next(c for c in _deployment(docs)["spec"]["template"]["spec"]["containers"] if c["name"] == "token-proxy")


def _config(docs):
    ref = _container(docs)["envFrom"][0]["configMapRef"]["name"]
    return one(docs, "ConfigMap", ref)["data"]


def _netpol(docs):
    return one(docs, "NetworkPolicy", "token-proxy")["spec"]


# Each mutation breaks one promise; the check must notice every one of them.
MUTATIONS = {
    "root filesystem writable": lambda d: _container(d)["securityContext"].pop("readOnlyRootFilesystem"),
    "runs as root": lambda d: _container(d)["securityContext"].update(runAsNonRoot=False),
    "capabilities kept": lambda d: _container(d)["securityContext"]["capabilities"].update(drop=[]),
    "seccomp unconfined": lambda d: [_container(d)["securityContext"].pop("seccompProfile"),
                                     _deployment(d)["spec"]["template"]["spec"]["securityContext"].pop("seccompProfile")],
    "no memory limit": lambda d: _container(d)["resources"]["limits"].pop("memory"),
    "admin on loopback": lambda d: _config(d).update(TOKEN_PROXY_ADMIN_LISTEN="127.0.0.1:9090"),
    "readiness on the client port": lambda d: _container(d)["readinessProbe"]["httpGet"].update(port="http"),
    "liveness on /readyz": lambda d: _container(d)["livenessProbe"]["httpGet"].update(path="/readyz"),
    "grace shorter than the drain": lambda d: _deployment(d)["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=10),
    "secret in the ConfigMap": lambda d: _config(d).update(TOKEN_PROXY_SECRET="Y7pgAkl8shxrVmiXcpSBic4vsRd8WGVzgAHHOmOPIh4="),
    "password in the Redis URL": lambda d: _config(d).update(TOKEN_PROXY_REDIS_URL="rediss://:hunter2@redis.example:6379"),
    "secret file off the volume": lambda d: _config(d).update(TOKEN_PROXY_SECRET_FILE="/etc/secret"),
    "a Secret rendered": lambda d: d.append({"kind": "Secret", "metadata": {"name": "token-proxy"}, "data": {}}),
    "PDB selects nothing": lambda d: one(d, "PodDisruptionBudget", "token-proxy")["spec"].pop("selector"),
    "Service selects other pods": lambda d: one(d, "Service", "token-proxy")["spec"].update(selector={"app": "other"}),
    "HPA scales something else": lambda d: one(d, "HorizontalPodAutoscaler", "token-proxy")["spec"]["scaleTargetRef"].update(name="other"),
    "NetworkPolicy on every pod": lambda d: _netpol(d).update(podSelector={}),
    "admin port open to all": lambda d: _netpol(d)["ingress"][1].update({"from": [{"namespaceSelector": {}}]}),
    "no DNS egress": lambda d: _netpol(d).update(egress=_netpol(d)["egress"][1:]),
    "no Redis egress": lambda d: _netpol(d).update(egress=_netpol(d)["egress"][:2]),
    "ingress only": lambda d: _netpol(d).update(policyTypes=["Ingress"]),
    "maxUnavailable 1": lambda d: _deployment(d)["spec"]["strategy"]["rollingUpdate"].update(maxUnavailable=1),
    "a misspelt setting": lambda d: _config(d).update(TOKEN_PROXY_DRAIN_DELAYS="5s"),
    "namespace not restricted": lambda d: next(x for x in d if x["kind"] == "Namespace")["metadata"]["labels"].pop("pod-security.kubernetes.io/enforce"),
}


def self_test(docs, overlay):
    base = check(docs, overlay)
    if base:
        print("self-test: the unmodified manifests already fail:", *base, sep="\n  ")
        return 1
    missed = []
    for name, mutate in MUTATIONS.items():
        broken = copy.deepcopy(docs)
        mutate(broken)
        if not check(broken, overlay):
            missed.append(name)
    if overlay == "production":
        broken = copy.deepcopy(docs)
        _config(broken).update(TOKEN_PROXY_REDIS_URL="redis://redis.example:6379")
        if not check(broken, overlay):
            missed.append("plaintext Redis in production")
    for name in missed:
        print(f"self-test: the check did not notice: {name}")
    print(f"self-test: {len(MUTATIONS) - len(missed) + (overlay == 'production')} broken manifests caught, {len(missed)} missed")
    return 1 if missed else 0


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    mode, path = argv[1], argv[2]
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    if mode == "--self-test":
        overlay = "production" if any(
            str(d.get("data", {}).get("TOKEN_PROXY_REDIS_URL", "")).startswith("rediss://") for d in docs if d["kind"] == "ConfigMap"
        ) else "development"
        return self_test(docs, overlay)
    failures = check(docs, mode)
    for f in failures:
        print(f"{path}: {f}")
    kinds = sorted({d["kind"] for d in docs})
    print(f"{mode}: {len(docs)} objects ({', '.join(kinds)}), {len(failures)} failed properties")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
