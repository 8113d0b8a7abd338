//! Validates the cluster that `docker compose up` starts, without Docker: docker-compose.yml
//! parses, its services and images are the intended ones, every file it mounts exists, the
//! HAProxy config names the replicas and checks `/readyz` often enough to take a draining
//! replica out within the drain delay, Prometheus scrapes every replica's
//! admin port, Grafana is provisioned with the dashboard (whose metric names exist), every
//! `TOKEN_PROXY_*` variable set is a real setting and the whole configuration is accepted by
//! `Config::from_lookup`, and the process-level runner (`loadtest/run`) reads the same files.
//! With `haproxy` installed, `haproxy -c` checks both the compose and the runner's variant of
//! the HAProxy config (through `loadtest/run check`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use token_proxy::config::{Config, SETTINGS};
use token_proxy::metrics::Metrics;
use yaml_rust2::{Yaml, YamlLoader};

// ---- helpers ------------------------------------------------------------------------------------

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the proxy crate sits in the workspace").to_path_buf()
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml(relative: &str) -> Yaml {
    let mut docs = YamlLoader::load_from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: not YAML: {e}"));
    assert_eq!(docs.len(), 1, "{relative}: expected one YAML document");
    docs.remove(0)
}

fn compose() -> Yaml {
    yaml("docker-compose.yml")
}

fn service<'a>(doc: &'a Yaml, name: &str) -> &'a Yaml {
    let s = &doc["services"][name];
    assert!(s.as_hash().is_some(), "docker-compose.yml has no service {name:?}");
    s
}

fn text(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn strings(y: &Yaml) -> Vec<String> {
    match y {
        Yaml::Array(items) => items.iter().map(|i| text(i).expect("a list of strings")).collect(),
        Yaml::BadValue | Yaml::Null => Vec::new(),
        other => vec![text(other).expect("a string or a list of strings")],
    }
}

/// Resolves compose interpolation the way `docker compose` does with nothing set in the host
/// environment: `${VAR:-default}` and `${VAR-default}` give the default, `$$` is a `$`. A
/// variable without a default would make the stack depend on the host: refused.
fn interpolate(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('{') {
            let end = inner.find('}').unwrap_or_else(|| panic!("unclosed ${{ in {value:?}"));
            let expr = &inner[..end];
            let default = expr.split_once(":-").or_else(|| expr.split_once('-')).map(|(_, d)| d).unwrap_or_else(|| {
                panic!("{value:?}: ${{{expr}}} has no default, so compose needs it set on the host")
            });
            out.push_str(default);
            rest = &inner[end + 1..];
        } else {
            panic!("{value:?}: use ${{VAR:-default}}, not a bare $VAR");
        }
    }
    out.push_str(rest);
    out
}

/// `KEY=VALUE` lines of a compose env file (`#` comments, blank lines).
fn env_file(relative: &str) -> Vec<(String, String)> {
    read(relative)
        .lines()
        .map(str::trim_start)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{relative}: not KEY=VALUE: {l:?}"));
            assert!(
                !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{relative}: bad variable name {k:?}"
            );
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn env_files_of(svc: &Yaml) -> Vec<String> {
    match &svc["env_file"] {
        Yaml::Array(items) => {
            items.iter().map(|i| text(i).or_else(|| text(&i["path"])).expect("env_file entries are paths")).collect()
        }
        other => strings(other),
    }
}

/// A service's environment as the container sees it: its env files, then `environment`.
fn environment_of(svc: &Yaml) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for file in env_files_of(svc) {
        env.extend(env_file(&file));
    }
    match &svc["environment"] {
        Yaml::Hash(map) => {
            for (k, v) in map {
                env.insert(text(k).expect("variable name"), interpolate(&text(v).unwrap_or_default()));
            }
        }
        Yaml::Array(items) => {
            for item in items {
                let item = text(item).expect("KEY=VALUE");
                let (k, v) = item.split_once('=').expect("KEY=VALUE");
                env.insert(k.to_owned(), interpolate(v));
            }
        }
        _ => {}
    }
    env
}

/// Bind mounts of a service: (host path relative to the repository, container path).
fn bind_mounts(svc: &Yaml) -> Vec<(String, String)> {
    let mut mounts = Vec::new();
    for volume in svc["volumes"].as_vec().map(Vec::as_slice).unwrap_or_default() {
        let (source, target) = match volume {
            Yaml::String(short) => {
                let mut parts = short.splitn(3, ':');
                let source = parts.next().unwrap_or_default().to_owned();
                let target = parts.next().unwrap_or_else(|| panic!("volume {short:?} has no target")).to_owned();
                (source, target)
            }
            long => {
                if text(&long["type"]).as_deref() != Some("bind") {
                    continue;
                }
                (text(&long["source"]).expect("bind source"), text(&long["target"]).expect("bind target"))
            }
        };
        if source.starts_with("./") || source.starts_with("../") || source.starts_with('/') || source == "." {
            assert!(source.starts_with("./"), "{source:?}: mount files of this repository, by ./relative path");
            mounts.push((source.trim_start_matches("./").to_owned(), target));
        }
    }
    mounts
}

fn mount_source(svc: &Yaml, target: &str) -> String {
    bind_mounts(svc)
        .into_iter()
        .find(|(_, t)| t == target)
        .map(|(s, _)| s)
        .unwrap_or_else(|| panic!("nothing is mounted at {target}"))
}

fn port_of(address: &str) -> u16 {
    address.parse::<SocketAddr>().unwrap_or_else(|_| panic!("{address:?} is not IP:port")).port()
}

/// Host and port of an http:// or redis:// URL.
fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority.rsplit_once(':').unwrap_or_else(|| panic!("{url:?} names no port"));
    (host.to_owned(), port.parse().unwrap_or_else(|_| panic!("{url:?}: bad port")))
}

const SERVICES: [&str; 7] = ["haproxy", "token-proxy", "redis", "mock-idp", "prometheus", "grafana", "k6"];
const HAPROXY_CFG_IN_CONTAINER: &str = "/usr/local/etc/haproxy/haproxy.cfg";

fn token_proxy_env() -> BTreeMap<String, String> {
    environment_of(service(&compose(), "token-proxy"))
}

// ---- tests --------------------------------------------------------------------------------------

#[test]
fn the_services_and_images_are_the_intended_ones() {
    let doc = compose();
    let names: BTreeSet<String> =
        doc["services"].as_hash().expect("services").keys().map(|k| text(k).unwrap()).collect();
    assert_eq!(names, SERVICES.iter().map(|s| (*s).to_owned()).collect(), "services of docker-compose.yml");

    let image = |name: &str| text(&service(&doc, name)["image"]).unwrap_or_default();
    assert!(image("haproxy").starts_with("haproxy:"), "the official haproxy image: {}", image("haproxy"));
    assert!(image("redis").starts_with("redis:7"), "Redis 7: {}", image("redis"));
    assert!(image("prometheus").starts_with("prom/prometheus:"), "{}", image("prometheus"));
    assert!(image("grafana").starts_with("grafana/grafana"), "{}", image("grafana"));
    assert!(image("k6").starts_with("grafana/k6:"), "{}", image("k6"));

    // token-proxy and mock-idp: built from this repository's Dockerfile, the proxy from its
    // default (last) stage, the mock from its own target: the proxy's image holds no mock.
    let stages = dockerfile_stages();
    for (name, target) in [("token-proxy", None), ("mock-idp", Some("mock-idp"))] {
        let build = &service(&doc, name)["build"];
        let (context, dockerfile) = match build {
            Yaml::String(context) => (context.clone(), "Dockerfile".to_owned()),
            b => (text(&b["context"]).expect("build.context"), text(&b["dockerfile"]).unwrap_or("Dockerfile".into())),
        };
        assert_eq!(context, ".", "{name} is built from the repository root");
        assert_eq!(dockerfile, "Dockerfile");
        assert!(root().join(&dockerfile).is_file());
        assert_eq!(text(&build["target"]).as_deref(), target, "{name}: build.target");
        if let Some(target) = target {
            assert!(stages.iter().any(|(stage, _)| stage == target), "no stage {target} in the Dockerfile");
        }
    }
    assert_ne!(image("token-proxy"), image("mock-idp"), "the mock has an image of its own");
    // Each image's ENTRYPOINT is its binary: no override needed.
    assert!(service(&doc, "mock-idp")["entrypoint"].is_badvalue());
    assert!(service(&doc, "token-proxy")["entrypoint"].is_badvalue());
    // The mock's health check uses curl: its stage installs it.
    let mock_check = strings(&service(&doc, "mock-idp")["healthcheck"]["test"]);
    let mock_stage = &stages.iter().find(|(stage, _)| stage == "mock-idp").expect("a mock-idp stage").1;
    if mock_check.iter().any(|word| word == "curl") {
        assert!(mock_stage.contains("curl"), "compose checks mock-idp with curl, which its image lacks");
    }

    let proxy = service(&doc, "token-proxy");
    let replicas = proxy["deploy"]["replicas"].as_i64().expect("token-proxy: deploy.replicas");
    assert_eq!(replicas, 3, "three token-proxy replicas");
    assert!(proxy["container_name"].is_badvalue(), "a container_name would allow only one replica");
    assert!(proxy["ports"].is_badvalue(), "replicas publish no host port: HAProxy is the way in");

    // Only k6 waits for a profile: `docker compose up` starts everything else.
    for name in SERVICES {
        let profiles = strings(&service(&doc, name)["profiles"]);
        if name == "k6" {
            assert_eq!(profiles, ["loadtest"]);
        } else {
            assert!(profiles.is_empty(), "{name} must start with a plain `docker compose up`");
        }
    }
}

#[test]
fn every_file_compose_mounts_or_reads_exists() {
    let doc = compose();
    let mut checked = 0;
    for name in SERVICES {
        let svc = service(&doc, name);
        for (source, target) in bind_mounts(svc) {
            assert!(root().join(&source).exists(), "{name}: {source} (mounted at {target}) is missing");
            checked += 1;
        }
        for file in env_files_of(svc) {
            assert!(root().join(&file).is_file(), "{name}: env_file {file} is missing");
            checked += 1;
        }
    }
    assert!(checked >= 8, "expected the config mounts and env files, found {checked}");
}

/// The Dockerfile's stages in order: `(name, its instructions without comments)`.
fn dockerfile_stages() -> Vec<(String, String)> {
    let mut stages: Vec<(String, String)> = Vec::new();
    for line in read("Dockerfile").lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        if let Some(from) = line.strip_prefix("FROM ") {
            let name = from.split_once(" AS ").map_or("", |(_, name)| name.trim());
            stages.push((name.to_owned(), String::new()));
        }
        if let Some((_, instructions)) = stages.last_mut() {
            instructions.push_str(line);
            instructions.push('\n');
        }
    }
    stages
}

#[test]
fn the_dockerfile_builds_a_minimal_non_root_proxy_image_that_checks_its_own_health() {
    let stages = dockerfile_stages();
    let names: Vec<&str> = stages.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        ["builder", "mock-idp-builder", "mock-idp", "runtime"],
        "the stages, the proxy's last (the default)"
    );
    let stage = |name: &str| &stages.iter().find(|(n, _)| n == name).unwrap().1;
    assert!(stage("builder").starts_with("FROM rust:1-bookworm AS builder"), "{}", stage("builder"));
    assert!(stage("builder").contains("cargo build --release --locked -p token-proxy "));
    assert!(!stage("builder").contains("-p mock-idp") && stage("mock-idp-builder").contains("-p mock-idp"));
    // The commit reaches --version and build_info through proxy/build.rs: there is no .git.
    assert!(stage("builder").contains("TOKEN_PROXY_BUILD_COMMIT=\"$REVISION\""));
    assert!(stage("mock-idp").contains("ENTRYPOINT [\"mock-idp\"]"));
    // A multi-platform build runs both platforms' builds at once: one target/ cache each.
    for builder in ["builder", "mock-idp-builder"] {
        let instructions = stage(builder);
        assert!(instructions.contains("ARG TARGETPLATFORM\n"), "{instructions}");
        let mounts: Vec<&str> = instructions.lines().filter(|l| l.contains("--mount=type=cache")).collect();
        assert_eq!(mounts.len(), 2, "{instructions}");
        assert!(mounts.iter().any(|m| m.contains("target=/src/target,id=target-$TARGETPLATFORM,")), "{instructions}");
        for mount in mounts {
            assert!(mount.contains(",sharing=locked"), "{mount}");
        }
    }

    let runtime = stage("runtime");
    // Distroless cc: glibc and CA certificates (Cognito is https), no shell, no curl.
    assert!(runtime.starts_with("FROM gcr.io/distroless/cc-debian12"), "{runtime}");
    assert!(!runtime.contains("curl") && !runtime.contains("apt-get"), "{runtime}");
    assert!(!runtime.contains("mock-idp"), "the proxy's image holds no mock:\n{runtime}");
    let user = runtime.lines().rev().find_map(|l| l.strip_prefix("USER ")).expect("a USER instruction");
    assert!(!["root", "0", "0:0"].contains(&user.trim()), "the image must not run as root");
    let health = runtime.lines().position(|l| l.starts_with("HEALTHCHECK")).expect("a HEALTHCHECK");
    let check: String = runtime.lines().skip(health).take(2).collect();
    assert!(check.contains("CMD [\"/usr/local/bin/token-proxy\", \"--health\"]"), "{check}");
    assert!(runtime.contains("ENTRYPOINT [\"/usr/local/bin/token-proxy\"]"));
    assert!(runtime.contains("EXPOSE 8080") && runtime.contains("EXPOSE 9090"));
    for label in ["title", "description", "source", "licenses", "version", "revision"] {
        assert!(runtime.contains(&format!("org.opencontainers.image.{label}=")), "no OCI label {label}");
    }
    // The defaults say what Cargo.toml says.
    let manifest = read("Cargo.toml");
    let field = |name: &str| {
        let line = manifest.lines().find(|l| l.starts_with(&format!("{name} = "))).unwrap();
        line.split('"').nth(1).unwrap().to_owned()
    };
    assert!(runtime.contains(&format!("ARG VERSION={}\n", field("version"))), "ARG VERSION is not Cargo's");
    assert!(runtime.contains(&format!("licenses=\"{}\"", field("license"))));
    assert!(read("LICENSE").contains("Apache License") && field("license") == "Apache-2.0");
    let ignore = read(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target/" || l.trim() == "target" || l.trim() == "/target"));
}

#[test]
fn redis_has_a_memory_limit_and_evicts_with_volatile_lru() {
    let doc = compose();
    let redis = service(&doc, "redis");
    let command = strings(&redis["command"]);
    assert_eq!(command.first().map(String::as_str), Some("redis-server"));
    let conf_in_container = command.get(1).expect("redis-server is given its config file");
    let conf = mount_source(redis, conf_in_container);
    assert_eq!(conf, runner_value("REDIS_CONF"), "loadtest/run starts redis-server from the same file");

    // The config file, then command-line overrides, as redis-server reads them.
    let mut settings = BTreeMap::new();
    for line in read(&conf).lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (k, v) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        settings.insert(k.to_ascii_lowercase(), v.trim().to_owned());
    }
    for pair in command[2..].chunks(2) {
        if let [k, v] = pair {
            settings.insert(k.trim_start_matches("--").to_ascii_lowercase(), v.clone());
        }
    }
    assert_eq!(settings.get("maxmemory-policy").map(String::as_str), Some("volatile-lru"));
    let maxmemory = settings.get("maxmemory").expect("maxmemory is set").to_ascii_lowercase();
    let digits: String = maxmemory.chars().take_while(char::is_ascii_digit).collect();
    assert!(digits.parse::<u64>().is_ok_and(|n| n > 0), "maxmemory must be a positive size, got {maxmemory:?}");

    let (host, port) = host_port(&token_proxy_env()["TOKEN_PROXY_REDIS_URL"]);
    assert_eq!((host.as_str(), port), ("redis", settings.get("port").map_or(6379, |p| p.parse().unwrap())));
}

#[test]
fn haproxy_names_the_replicas_checks_readyz_and_retries_elsewhere() {
    let doc = compose();
    let haproxy = service(&doc, "haproxy");
    let cfg_path = mount_source(haproxy, HAPROXY_CFG_IN_CONTAINER);
    assert_eq!(cfg_path, runner_value("HAPROXY_CFG"), "loadtest/run uses the same HAProxy config");
    let cfg = read(&cfg_path);
    let lines: Vec<&str> = cfg.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();

    let env = token_proxy_env();
    let listen_port = port_of(&env["TOKEN_PROXY_LISTEN"]);
    let admin_port = port_of(&env["TOKEN_PROXY_ADMIN_LISTEN"]);
    assert!(env["TOKEN_PROXY_ADMIN_LISTEN"].starts_with("0.0.0.0:"), "the admin port must be reachable by HAProxy");

    // Exactly one server-template line (the one loadtest/run replaces) naming the service.
    let templates: Vec<&&str> = lines.iter().filter(|l| l.starts_with("server-template ")).collect();
    assert_eq!(templates.len(), 1, "one server-template line");
    let words: Vec<&str> = templates[0].split_whitespace().collect();
    assert_eq!(words[3], format!("token-proxy:{listen_port}"), "the template resolves the token-proxy service");
    assert!(words.contains(&"resolvers") && words.contains(&"init-addr"), "{}", templates[0]);
    let resolvers = words[words.iter().position(|w| *w == "resolvers").unwrap() + 1];
    assert!(
        cfg.contains(&format!("resolvers {resolvers}\n    nameserver")) && cfg.contains("127.0.0.11:53"),
        "the resolvers section asks Docker's DNS"
    );
    let default_server = lines.iter().find(|l| l.starts_with("default-server ")).expect("a default-server line");
    assert!(default_server.contains(&format!("check port {admin_port}")), "health checks on the admin port");
    assert!(
        lines.iter().any(|l| l.starts_with("http-check send") && l.contains("uri /readyz"))
            || lines.iter().any(|l| l.starts_with("option httpchk") && l.contains("/readyz")),
        "health checks ask /readyz"
    );
    assert!(lines.iter().any(|l| l.starts_with("http-check expect status 200")));
    let retry_on = lines.iter().find(|l| l.starts_with("retry-on ")).expect("retry-on");
    assert!(retry_on.contains("conn-failure") && retry_on.contains("empty-response"), "{retry_on}");
    assert!(lines.iter().any(|l| l.starts_with("retries ")));
    assert!(lines.iter().any(|l| l.starts_with("option redispatch")));

    // The frontend listens where compose publishes it.
    let published: Vec<String> = strings(&haproxy["ports"]);
    let bind = lines.iter().find(|l| l.starts_with("bind ") && l.contains("LB_BIND")).expect("frontend bind");
    let port = bind.rsplit(':').next().unwrap().trim_end_matches(['}', '"']);
    assert!(
        published.iter().any(|p| p.ends_with(&format!(":{port}"))),
        "{published:?} publishes the frontend port {port}"
    );

    match Command::new("haproxy").arg("-v").output() {
        Ok(_) => {
            let out = Command::new("bash").arg(root().join("loadtest/run")).arg("check").output().expect("bash");
            assert!(
                out.status.success(),
                "loadtest/run check (haproxy -c on both variants) failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(_) => eprintln!("note: haproxy is not installed; `haproxy -c` skipped (apt-get install haproxy)"),
    }
}

/// A SIGTERMed replica keeps serving for TOKEN_PROXY_DRAIN_DELAY while its /readyz answers 503:
/// HAProxy must mark it DOWN within that time, or requests meet a closed listener.
#[test]
fn haproxy_takes_a_draining_replica_out_within_the_default_drain_delay() {
    let cfg = read(&runner_value("HAPROXY_CFG"));
    let default_server = cfg.lines().map(str::trim).find(|l| l.starts_with("default-server ")).unwrap();
    let words: Vec<&str> = default_server.split_whitespace().collect();
    let value = |name: &str| {
        let at = words.iter().position(|w| *w == name).unwrap_or_else(|| panic!("no {name} in {default_server}"));
        words[at + 1]
    };
    let duration = |name: &str| humantime::parse_duration(value(name)).unwrap();
    let fall: u32 = value("fall").parse().unwrap();
    let marked_down_after = duration("inter") + duration("fastinter") * (fall - 1);
    let name = "TOKEN_PROXY_DRAIN_DELAY";
    let default = SETTINGS.iter().find(|s| s.name == name).and_then(|s| s.default).unwrap();
    let drain_delay = humantime::parse_duration(token_proxy_env().get(name).map_or(default, String::as_str)).unwrap();
    // Half the delay: room for the checks' own round trips and a loaded machine.
    assert!(marked_down_after * 2 <= drain_delay, "{marked_down_after:?} to mark DOWN, drain delay {drain_delay:?}");
}

#[test]
fn prometheus_scrapes_every_replica_on_its_admin_port() {
    let doc = compose();
    let prometheus = service(&doc, "prometheus");
    let config_target = strings(&prometheus["command"])
        .iter()
        .find_map(|a| a.strip_prefix("--config.file=").map(str::to_owned))
        .unwrap_or("/etc/prometheus/prometheus.yml".into());
    let config = yaml(&mount_source(prometheus, &config_target));
    let admin_port = port_of(&token_proxy_env()["TOKEN_PROXY_ADMIN_LISTEN"]);

    let jobs = config["scrape_configs"].as_vec().expect("scrape_configs");
    let replicas = jobs
        .iter()
        .flat_map(|job| job["dns_sd_configs"].as_vec().map(Vec::as_slice).unwrap_or_default())
        .find(|sd| strings(&sd["names"]).iter().any(|n| n == "token-proxy"))
        .expect("a dns_sd_configs entry for the token-proxy service (every replica, as they come and go)");
    assert_eq!(text(&replicas["type"]).as_deref(), Some("A"));
    assert_eq!(replicas["port"].as_i64(), Some(i64::from(admin_port)), "scrape the admin port");
    let job = jobs.iter().find(|j| j["dns_sd_configs"].as_vec().is_some()).unwrap();
    let path = text(&job["metrics_path"]).unwrap_or("/metrics".into());
    assert_eq!(path, "/metrics");
}

#[test]
fn grafana_is_provisioned_with_a_dashboard_of_real_metrics() {
    let doc = compose();
    let grafana = service(&doc, "grafana");
    let provisioning = mount_source(grafana, "/etc/grafana/provisioning");

    let datasources = yaml(&format!("{provisioning}/datasources/prometheus.yml"));
    let ds = &datasources["datasources"][0];
    assert_eq!(text(&ds["type"]).as_deref(), Some("prometheus"));
    let ds_uid = text(&ds["uid"]).expect("the datasource has a fixed uid");
    let (host, port) = host_port(&text(&ds["url"]).expect("datasource url"));
    assert_eq!((host.as_str(), port), ("prometheus", 9090), "Grafana reaches the prometheus service");

    let providers = yaml(&format!("{provisioning}/dashboards/token-proxy.yml"));
    let dashboards_in_container = text(&providers["providers"][0]["options"]["path"]).expect("provider path");
    let dashboards = mount_source(grafana, &dashboards_in_container);
    let home = environment_of(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].clone();
    let file = home.strip_prefix(&format!("{dashboards_in_container}/")).expect("home dashboard in the mounted folder");
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&format!("{dashboards}/{file}"))).expect("the dashboard is JSON");

    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"],
            ds_uid.as_str(),
            "panel {} uses the provisioned datasource",
            panel["title"]
        );
        for target in panel["targets"].as_array().expect("targets") {
            assert_eq!(target["datasource"]["uid"], ds_uid.as_str());
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    let all = exprs.join("\n");
    for needle in [
        "token_proxy_upstream_calls_avoided_total",
        "token_proxy_upstream_requests_total",
        "* 0.00225",
        "token_proxy_request_duration_seconds_bucket",
        "histogram_quantile(0.99",
        "token_proxy_redis_breaker_open",
        "token_proxy_coalesced_waiters_total",
        "token_proxy_lock_takeovers_total",
    ] {
        assert!(all.contains(needle), "the dashboard lacks {needle}");
    }

    // Every token_proxy_* name the dashboard asks for is one the proxy exports.
    let exported = Metrics::new().render();
    let mut names = BTreeSet::new();
    for (i, _) in all.match_indices("token_proxy_") {
        let name: String = all[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        names.insert(name);
    }
    for name in names {
        let base = ["_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
        assert!(
            exported.lines().any(|l| l.starts_with(base) && !l.starts_with('#')),
            "the dashboard uses {name}, which token-proxy does not export"
        );
    }
}

/// `NAME=value` or `NAME=(a b)` assignments at the top of loadtest/run.
fn runner_assignment(name: &str) -> String {
    let script = read("loadtest/run");
    script
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("loadtest/run does not set {name}"))
        .to_owned()
}

fn runner_value(name: &str) -> String {
    runner_assignment(name)
}

fn runner_list(name: &str) -> Vec<String> {
    let value = runner_assignment(name);
    let inner = value.strip_prefix('(').and_then(|v| v.strip_suffix(')')).expect("a bash array");
    inner.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn the_runner_reads_the_env_files_compose_uses() {
    let doc = compose();
    assert_eq!(runner_list("TOKEN_PROXY_ENV_FILES"), env_files_of(service(&doc, "token-proxy")));
    assert_eq!(runner_list("MOCK_IDP_ENV_FILES"), env_files_of(service(&doc, "mock-idp")));
}

#[test]
fn every_token_proxy_variable_is_a_real_setting_and_the_replicas_accept_their_configuration() {
    let doc = compose();
    let known: BTreeSet<&str> = SETTINGS.iter().map(|s| s.name).collect();
    let mut seen = BTreeSet::new();
    for name in SERVICES {
        for key in environment_of(service(&doc, name)).into_keys() {
            if key.starts_with("TOKEN_PROXY_") {
                assert!(known.contains(key.as_str()), "{name} sets {key}, which is not a token-proxy setting");
                seen.insert(key);
            }
        }
    }
    for entry in std::fs::read_dir(root().join("deploy")).expect("deploy/") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "env") {
            let relative = format!("deploy/{}", path.file_name().unwrap().to_string_lossy());
            for (key, _) in env_file(&relative) {
                if key.starts_with("TOKEN_PROXY_") {
                    assert!(known.contains(key.as_str()), "{relative} sets {key}, which is not a token-proxy setting");
                }
            }
        }
    }
    assert!(seen.contains("TOKEN_PROXY_SECRET") || seen.contains("TOKEN_PROXY_SECRET_FILE"), "replicas share a secret");

    // The replicas' whole environment passes the proxy's own validation.
    let env = token_proxy_env();
    let config = Config::from_lookup(|name| env.get(name).cloned()).unwrap_or_else(|e| panic!("token-proxy: {e}"));
    assert_eq!(config.listeners.client, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(config.listeners.admin, "0.0.0.0:9090".parse().unwrap());
    assert!(config.redis.is_some() && config.secret_bytes().is_some());

    // The default upstream is mock-idp, on the port mock-idp listens on; one variable changes it.
    let raw = text(&service(&doc, "token-proxy")["environment"]["TOKEN_PROXY_UPSTREAM_URL"]).expect("upstream");
    assert!(
        raw.starts_with("${TOKEN_PROXY_UPSTREAM_URL:-"),
        "the upstream comes from the host's TOKEN_PROXY_UPSTREAM_URL: {raw}"
    );
    let idp_env = environment_of(service(&doc, "mock-idp"));
    let (host, port) = host_port(config.endpoints[0].upstream.url.as_str());
    assert_eq!((host.as_str(), port), ("mock-idp", port_of(&idp_env["MOCK_IDP_LISTEN"])));
    assert_eq!(config.endpoints[0].upstream.url.path(), "/oauth2/token");
}

#[test]
fn mock_idp_accepts_its_configuration_with_the_load_test_clients() {
    let doc = compose();
    let env = environment_of(service(&doc, "mock-idp"));
    let config =
        mock_idp::Config::from_lookup(|name| env.get(name).cloned()).unwrap_or_else(|e| panic!("mock-idp: {e}"));
    let ids: BTreeSet<&str> = config.clients.iter().map(|c| c.client_id.as_str()).collect();
    for id in ["demo-client", "orders-service", "load-client-0", "load-client-999"] {
        assert!(ids.contains(id), "mock-idp lacks {id}, which the load tests use");
    }
    assert!(config.listen.ip().is_unspecified(), "reachable from the replicas");
}

#[test]
fn k6_runs_the_scripts_of_loadtest_against_haproxy() {
    let doc = compose();
    let k6 = service(&doc, "k6");
    let scripts = mount_source(k6, "/scripts");
    assert_eq!(scripts, "loadtest");
    let env = environment_of(k6);
    assert_eq!(host_port(&env["BASE_URL"]).0, "haproxy", "k6 goes through the load balancer");
    let idp_port = port_of(&environment_of(service(&doc, "mock-idp"))["MOCK_IDP_LISTEN"]);
    assert_eq!(host_port(&env["IDP_ADMIN_URL"]), ("mock-idp".to_owned(), idp_port));
    for arg in strings(&k6["command"]) {
        if let Some(script) = arg.strip_prefix("/scripts/") {
            assert!(root().join("loadtest").join(script).is_file(), "k6 runs loadtest/{script}, which is missing");
        }
    }
    for script in ["smoke", "hot-hits", "thundering-herd", "many-clients", "expiry-storm", "chaos"] {
        assert!(root().join(format!("loadtest/{script}.js")).is_file(), "loadtest/{script}.js is missing");
    }
}

// ---- two pools: docker-compose.pools.yml --------------------------------------------------------

const POOLS_OVERRIDE: &str = "docker-compose.pools.yml";

/// A service of the override merged over the base file's, the way compose merges `environment`
/// (by variable) and `volumes` (added): what that service's container sees with both files.
fn pools_environment(name: &str) -> BTreeMap<String, String> {
    let (base, pools) = (compose(), yaml(POOLS_OVERRIDE));
    let mut env = if base["services"][name].as_hash().is_some() {
        environment_of(&base["services"][name])
    } else {
        BTreeMap::new()
    };
    env.extend(environment_of(&pools["services"][name]));
    env
}

#[test]
fn the_pools_override_adds_a_second_pool_and_the_replicas_route_to_both() {
    let (base, pools) = (compose(), yaml(POOLS_OVERRIDE));
    let names: BTreeSet<String> =
        pools["services"].as_hash().expect("services").keys().map(|k| text(k).unwrap()).collect();
    assert_eq!(names, ["k6", "mock-idp-partners", "token-proxy"].map(str::to_owned).into(), "{POOLS_OVERRIDE}");

    // The second pool is the first one's image and env file, with its own issuer and port.
    let (first, second) = (service(&base, "mock-idp"), &pools["services"]["mock-idp-partners"]);
    for key in ["build", "image", "entrypoint", "env_file", "healthcheck"] {
        assert_eq!(first[key], second[key], "mock-idp-partners: {key} as mock-idp's");
    }
    let first_env = environment_of(first);
    let second_env = environment_of(second);
    let second_idp = mock_idp::Config::from_lookup(|n| second_env.get(n).cloned()).expect("mock-idp-partners: config");
    let first_idp = mock_idp::Config::from_lookup(|n| first_env.get(n).cloned()).expect("mock-idp: config");
    assert_ne!(first_idp.issuer, second_idp.issuer, "each pool has its own issuer");
    assert_eq!(second_idp.issuer, runner_value("PARTNERS_ISSUER"), "the runner's second pool is compose's");
    // k6 from the host finds the second pool where compose publishes it.
    let common = read("loadtest/lib/common.js");
    let default = common
        .lines()
        .find_map(|l| l.split_once("__ENV.IDP2_ADMIN_URL || '").map(|(_, rest)| rest.split('\'').next().unwrap()))
        .expect("loadtest/lib/common.js: the IDP2_ADMIN_URL default");
    let published = strings(&second["ports"]);
    assert_eq!(published, [format!("127.0.0.1:{}:9000", host_port(default).1)], "the port {default} names");

    // Every replica reads its upstreams from the mounted deploy/pools.toml, not from the variable.
    let proxy = &pools["services"]["token-proxy"];
    let mut env = pools_environment("token-proxy");
    assert_eq!(env["TOKEN_PROXY_UPSTREAM_URL"], "", "the one-upstream variable is unset");
    let file = mount_source(proxy, &env["TOKEN_PROXY_CONFIG"]);
    assert_eq!(file, runner_value("POOLS_FILE"), "the runner reads the same upstreams file");
    env.insert("TOKEN_PROXY_CONFIG".into(), root().join(&file).to_string_lossy().into_owned());
    let config = Config::from_lookup(|name| env.get(name).cloned()).unwrap_or_else(|e| panic!("token-proxy: {e}"));
    assert_eq!(config.default_upstream.as_deref(), Some("orders"));
    let routes: BTreeMap<String, (String, u16)> =
        config.endpoints.iter().map(|e| (e.name.clone().expect("named"), host_port(e.upstream.url.as_str()))).collect();
    let port = |env: &BTreeMap<String, String>| port_of(&env["MOCK_IDP_LISTEN"]);
    assert_eq!(
        routes,
        [
            ("orders".to_owned(), ("mock-idp".to_owned(), port(&first_env))),
            ("partners".to_owned(), ("mock-idp-partners".to_owned(), port(&second_env)))
        ]
        .into(),
        "{file}: each upstream is its compose service"
    );
    let waits_for: Vec<String> =
        proxy["depends_on"].as_hash().expect("depends_on").keys().map(|k| text(k).unwrap()).collect();
    assert_eq!(waits_for, ["mock-idp-partners"]);

    // k6 finds both pools' counters; the scenario that checks them exists.
    let k6 = pools_environment("k6");
    assert_eq!(host_port(&k6["IDP2_ADMIN_URL"]), ("mock-idp-partners".to_owned(), port(&second_env)));
    assert!(root().join("loadtest/two-pools.js").is_file());
}
