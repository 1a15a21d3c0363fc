//! Checks of the Kubernetes deployment files under `deploy/` (see docs/kubernetes.md, section 9).
//!
//! No cluster is needed. The tools come from the Python virtual environment that
//! `.ci/install-deps` creates at `.ci/venv`:
//! - `kubernetes-validate` validates objects against the Kubernetes OpenAPI schemas;
//! - `helm-python-sdk` (module `helm_python`) renders and lints the chart with Helm's own Go
//!   engine, offline.
//!
//! A missing tool is a test failure, never a skip.

mod support;

use serde_json::{json, Value as Json};
use serde_yaml::Value as Yaml;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use support::repo_root as root;
use support::{
    analyser_bin, require_binary, require_venv_tool, run_to_end, text, Analyser, Listen, TempDir,
};

/// Kubernetes versions whose schemas the objects must satisfy: the oldest release the chart is
/// meant for that `kubernetes-validate` still ships, and a recent one.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.36.0"];
const NAMESPACE: &str = "kube-system";
const RELEASE: &str = "dnstap-analyser";
const SERVICE: &str = "dnstap-analyser";
const PORT: i64 = 6000;
const RUN_AS_USER: i64 = 65532;
/// Labels the chart sets and the plain manifests do not.
const HELM_ONLY_LABELS: &[&str] = &["helm.sh/chart", "app.kubernetes.io/managed-by"];
const INSTALL_HINT: &str = "run `bash .ci/install-deps` (it creates .ci/venv with \
     kubernetes-validate and helm-python-sdk)";

// ---------------------------------------------------------------------------------------------
// Paths and tools

fn chart_dir() -> PathBuf {
    root().join("deploy/helm/dnstap-analyser")
}

fn plain_manifest_path() -> PathBuf {
    root().join("deploy/kubernetes/dnstap-analyser.yaml")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A scratch directory of this test run alone (tests of two runs of one checkout may run at
/// once), removed at the end unless the test failed.
fn scratch_dir(test: &str) -> support::TempDir {
    support::TempDir::new(&format!("deploy-{test}"))
}

// ---------------------------------------------------------------------------------------------
// YAML helpers

/// All non-empty documents of a multi-document YAML text. Documents are split at `---` lines
/// (serde_yaml rejects a string that still holds several documents, so a missed split fails).
fn yaml_docs(src: &str, what: &str) -> Vec<Yaml> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut flush = |current: &mut String| {
        let doc: Yaml = serde_yaml::from_str(current)
            .unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}\n{current}"));
        if !doc.is_null() {
            docs.push(doc);
        }
        current.clear();
    };
    for line in src.lines() {
        if line.trim_end() == "---" {
            flush(&mut current);
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    flush(&mut current);
    docs
}

fn to_json(y: &Yaml) -> Json {
    serde_json::to_value(y).expect("YAML value converts to JSON")
}

/// `v["a"]["b"]...` for a path "a.b.c"; numeric segments index arrays.
fn at<'a>(v: &'a Json, path: &str) -> &'a Json {
    let mut cur = v;
    for seg in path.split('.') {
        cur = match seg.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[seg],
        };
    }
    cur
}

fn kind_name(obj: &Json) -> (String, String) {
    (
        obj["kind"].as_str().unwrap_or("?").to_string(),
        obj["metadata"]["name"].as_str().unwrap_or("?").to_string(),
    )
}

fn find<'a>(objs: &'a [Json], kind: &str) -> &'a Json {
    let found: Vec<&Json> = objs.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind}, found {}",
        found.len()
    );
    found[0]
}

fn plain_objects() -> Vec<Json> {
    let path = plain_manifest_path();
    yaml_docs(&read(&path), &path.display().to_string())
        .iter()
        .map(to_json)
        .collect()
}

fn container(objs: &[Json]) -> Json {
    let dep = find(objs, "Deployment");
    let containers = at(dep, "spec.template.spec.containers")
        .as_array()
        .expect("Deployment has containers");
    assert_eq!(containers.len(), 1, "one container expected");
    containers[0].clone()
}

fn args_of(objs: &[Json]) -> Vec<String> {
    container(objs)["args"]
        .as_array()
        .expect("container has args")
        .iter()
        .map(|a| a.as_str().expect("args are strings").to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The binary's flags

/// Long flags of `dnstap-analyser --help`, with whether each takes a value.
fn help_flags() -> BTreeMap<String, bool> {
    let out = run_to_end(
        Command::new(analyser_bin()).arg("--help"),
        None,
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "--help failed: {}", text(&out.stderr));
    let help = text(&out.stdout);
    let mut flags = BTreeMap::new();
    for line in help.lines() {
        let mut rest = line;
        while let Some(pos) = rest.find("--") {
            let tail = &rest[pos + 2..];
            let name: String = tail
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
                .collect();
            let after = &tail[name.len()..];
            if name.len() > 1 && !name.ends_with('-') {
                let takes_value =
                    after.starts_with(" <") || after.starts_with("=<") || after.starts_with(" [<");
                let e = flags.entry(name.clone()).or_insert(false);
                *e |= takes_value;
            }
            rest = after;
        }
    }
    for builtin in ["help", "version"] {
        flags.remove(builtin);
    }
    assert!(
        flags.len() >= 10,
        "--help lists too few flags ({flags:?}); output was:\n{help}"
    );
    flags
}

/// Flags of the options table in docs/cli-contract.md.
fn contract_flags() -> BTreeSet<String> {
    let doc = read(&root().join("docs/cli-contract.md"));
    let flags: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `--"))
        .map(|l| {
            l.chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '-')
                .collect::<String>()
        })
        .collect();
    assert!(
        flags.len() >= 10,
        "could not read the options table of docs/cli-contract.md"
    );
    flags
}

/// `queue-capacity` -> `queueCapacity`: the key under `analyser:` in values.yaml.
fn values_key(flag: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in flag.chars() {
        if c == '-' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// For every flag: a value to set under `analyser.` and the argument it must render to.
/// The test `every_flag_has_a_value_that_reaches_the_args` fails for a flag missing here.
/// `arg` is `--flag` or `--flag=...` (not a longer flag `flag` begins).
fn is_flag(arg: &str, flag: &str) -> bool {
    let rest = arg.strip_prefix("--").and_then(|a| a.strip_prefix(flag));
    matches!(rest, Some(r) if r.is_empty() || r.starts_with('='))
}

fn flag_cases() -> Vec<(&'static str, Json, Vec<&'static str>)> {
    vec![
        (
            "listen",
            json!(["tcp://0.0.0.0:6001", "tcp://[::]:6001"]),
            vec!["--listen=tcp://0.0.0.0:6001", "--listen=tcp://[::]:6001"],
        ),
        (
            "tls-cert",
            json!("/certs/server.crt"),
            vec!["--tls-cert=/certs/server.crt"],
        ),
        (
            "tls-key",
            json!("/certs/server.key"),
            vec!["--tls-key=/certs/server.key"],
        ),
        (
            "tls-client-ca",
            json!("/certs/clients.crt"),
            vec!["--tls-client-ca=/certs/clients.crt"],
        ),
        ("tls-pin-identity", json!(true), vec!["--tls-pin-identity"]),
        ("readers", json!(3), vec!["--readers=3"]),
        ("shards", json!(5), vec!["--shards=5"]),
        (
            "queue-capacity",
            json!(131072),
            vec!["--queue-capacity=131072"],
        ),
        ("pin", json!(true), vec!["--pin"]),
        ("session-timeout", json!(30), vec!["--session-timeout=30"]),
        ("orphan-grace", json!(4), vec!["--orphan-grace=4"]),
        (
            "max-sessions",
            json!(12000000),
            vec!["--max-sessions=12000000"],
        ),
        ("max-connections", json!(64), vec!["--max-connections=64"]),
        (
            "max-frame-size",
            json!(4194304),
            vec!["--max-frame-size=4194304"],
        ),
        (
            "handshake-timeout",
            json!(10),
            vec!["--handshake-timeout=10"],
        ),
        ("idle-timeout", json!(600), vec!["--idle-timeout=600"]),
        (
            "frame-buffer-budget",
            json!(268435456),
            vec!["--frame-buffer-budget=268435456"],
        ),
        (
            "max-identities",
            json!(20000),
            vec!["--max-identities=20000"],
        ),
        (
            "identities-per-connection",
            json!(50),
            vec!["--identities-per-connection=50"],
        ),
        (
            "identity-idle-timeout",
            json!(1800),
            vec!["--identity-idle-timeout=1800"],
        ),
        ("max-time-ahead", json!(3600), vec!["--max-time-ahead=3600"]),
        ("cache-window", json!(30), vec!["--cache-window=30"]),
        (
            "upstream-failing-window",
            json!(20),
            vec!["--upstream-failing-window=20"],
        ),
        ("max-handshaking", json!(64), vec!["--max-handshaking=64"]),
        (
            "handshakes-per-address",
            json!(2),
            vec!["--handshakes-per-address=2"],
        ),
        (
            "connections-per-address",
            json!(4),
            vec!["--connections-per-address=4"],
        ),
        ("shutdown-timeout", json!(30), vec!["--shutdown-timeout=30"]),
        (
            "log",
            json!(["failed", "sampleloss"]),
            vec!["--log=failed,sampleloss"],
        ),
        ("format", json!("text"), vec!["--format=text"]),
        (
            "sample-succeeded",
            json!(0.01),
            vec!["--sample-succeeded=0.01"],
        ),
        ("messages", json!("failed"), vec!["--messages=failed"]),
        ("stats-interval", json!("60s"), vec!["--stats-interval=60s"]),
        (
            "metrics-listen",
            json!("0.0.0.0:9436"),
            vec!["--metrics-listen=0.0.0.0:9436"],
        ),
        (
            "metrics-web-config",
            json!("/etc/web/web.yml"),
            vec!["--metrics-web-config=/etc/web/web.yml"],
        ),
        ("no-top", json!(true), vec!["--no-top"]),
        (
            "max-identity-labels",
            json!(512),
            vec!["--max-identity-labels=512"],
        ),
        (
            "max-upstream-labels",
            json!(64),
            vec!["--max-upstream-labels=64"],
        ),
        (
            "max-series-per-family",
            json!(5000),
            vec!["--max-series-per-family=5000"],
        ),
        ("max-series", json!(20000), vec!["--max-series=20000"]),
        ("stall-timeout", json!("45s"), vec!["--stall-timeout=45s"]),
        ("log-lookups", json!("all"), vec!["--log-lookups=all"]),
        (
            "cluster-domain",
            json!("cluster.example"),
            vec!["--cluster-domain=cluster.example"],
        ),
        (
            "search-suffix",
            json!(["ec2.internal", "node.test"]),
            vec!["--search-suffix=ec2.internal,node.test"],
        ),
        ("max-lookups", json!(1000), vec!["--max-lookups=1000"]),
    ]
}

/// A Frame Streams file with a START (content type dnstap) and a STOP frame and no data.
fn empty_frame_stream(path: &Path) {
    let content_type = b"protobuf:dnstap.Dnstap";
    let mut buf = Vec::new();
    let control = |buf: &mut Vec<u8>, payload: &[u8]| {
        buf.extend_from_slice(&0u32.to_be_bytes());
        buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(payload);
    };
    let mut start = Vec::new();
    start.extend_from_slice(&2u32.to_be_bytes()); // START
    start.extend_from_slice(&1u32.to_be_bytes()); // CONTENT_TYPE field
    start.extend_from_slice(&(content_type.len() as u32).to_be_bytes());
    start.extend_from_slice(content_type);
    control(&mut buf, &start);
    control(&mut buf, &3u32.to_be_bytes()); // STOP
    fs::write(path, buf).unwrap();
}

/// Runs the real binary with `args` over an empty Frame Streams file (`read` mode: it parses
/// the flags exactly as the container would, runs the pipeline, and exits).
fn run_binary_with(args: &[String], dir: &Path) -> Output {
    let input = dir.join("empty.fstrm");
    empty_frame_stream(&input);
    run_to_end(
        Command::new(analyser_bin())
            .args(args)
            .arg("read")
            .arg(&input),
        None,
        Duration::from_secs(60),
    )
}

// ---------------------------------------------------------------------------------------------
// Helm rendering (helm-python-sdk: Helm's Go SDK behind a C ABI)

const RENDER_PY: &str = r#"
import json, sys
try:
    import helm_python as helm
except ImportError as e:
    print("HELM_PYTHON_MISSING: %s" % e, file=sys.stderr)
    sys.exit(4)
chart_dir, namespace, release = sys.argv[1:4]
cases = json.load(sys.stdin)
out = {"helm_sdk": helm.helm_sdk_version(), "results": []}
for case in cases:
    r = {"name": case["name"], "error": None, "manifests": {}, "lint": None}
    try:
        with helm.Chart.load(chart_dir) as chart:
            chart.validate_schema(case["values"])
            r["manifests"] = chart.render(case["values"], name=release, namespace=namespace,
                                          is_install=True)
        r["lint"] = helm.lint(chart_dir, case["values"], strict=True, namespace=namespace)
    except helm.HelmError as e:
        r["error"] = "%s: %s" % (type(e).__name__, e)
    out["results"].append(r)
json.dump(out, sys.stdout)
"#;

struct Rendered {
    name: String,
    /// Set when the values were rejected or a template failed.
    error: Option<String>,
    /// Template path -> rendered text, NOTES.txt included.
    manifests: BTreeMap<String, String>,
    lint: Json,
}

impl Rendered {
    fn notes(&self) -> &str {
        self.manifests
            .iter()
            .find(|(k, _)| k.ends_with("templates/NOTES.txt"))
            .map(|(_, v)| v.as_str())
            .expect("chart renders NOTES.txt")
    }

    /// Kubernetes objects (everything but NOTES.txt), in template order.
    fn objects(&self) -> Vec<Json> {
        self.manifests
            .iter()
            .filter(|(k, _)| !k.ends_with("NOTES.txt"))
            .flat_map(|(k, v)| yaml_docs(v, k))
            .map(|y| to_json(&y))
            .collect()
    }

    /// Writes every non-empty manifest to `dir`, returns the files.
    fn write_to(&self, dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for (k, v) in &self.manifests {
            if k.ends_with("NOTES.txt") || yaml_docs(v, k).is_empty() {
                continue;
            }
            let file = dir.join(format!("{}-{}", self.name, k.replace('/', "_")));
            fs::write(&file, v).unwrap();
            files.push(file);
        }
        files
    }

    fn expect_ok(&self) -> &Self {
        assert!(
            self.error.is_none(),
            "case {:?}: chart did not render: {}",
            self.name,
            self.error.as_deref().unwrap_or("")
        );
        // Helm lint, strict: no errors, no warnings (severity 2 = warning, 3 = error).
        let errors = self.lint["errors"].as_array().map(|a| a.len()).unwrap_or(0);
        let bad: Vec<&Json> = self.lint["messages"]
            .as_array()
            .expect("lint report has messages")
            .iter()
            .filter(|m| m["severity"].as_i64().unwrap_or(3) >= 2)
            .collect();
        assert!(
            errors == 0 && bad.is_empty(),
            "case {:?}: helm lint --strict found problems: {}",
            self.name,
            self.lint
        );
        self
    }
}

fn render_cases(cases: &[(&str, Json)]) -> Vec<Rendered> {
    let python = require_venv_tool("python", "helm-python-sdk");
    let input = Json::Array(
        cases
            .iter()
            .map(|(n, v)| json!({"name": n, "values": v}))
            .collect(),
    )
    .to_string();
    let out = run_to_end(
        Command::new(&python)
            .arg("-c")
            .arg(RENDER_PY)
            .arg(chart_dir())
            .arg(NAMESPACE)
            .arg(RELEASE),
        Some(&input),
        Duration::from_secs(120),
    );
    let stderr = text(&out.stderr);
    assert!(
        out.status.code() != Some(4),
        "the Helm renderer (Python module helm_python from the PyPI package helm-python-sdk) \
         is not installed in .ci/venv: {INSTALL_HINT}\n{stderr}"
    );
    assert!(out.status.success(), "chart rendering crashed:\n{stderr}");
    let report: Json = serde_json::from_slice(&out.stdout).expect("renderer prints JSON");
    assert!(
        report["helm_sdk"].as_str().unwrap_or("").starts_with('v'),
        "renderer did not report the Helm SDK version: {report}"
    );
    report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Rendered {
            name: r["name"].as_str().unwrap().to_string(),
            error: r["error"].as_str().map(str::to_string),
            manifests: serde_json::from_value(r["manifests"].clone()).unwrap(),
            lint: r["lint"].clone(),
        })
        .collect()
}

fn render_one(name: &str, values: Json) -> Rendered {
    render_cases(&[(name, values)]).pop().unwrap()
}

/// Values that switch every optional part of the chart on.
fn all_options_values() -> Json {
    json!({
        "image": {"repository": "registry.example.com/platform/dnstap-analyser",
                  "digest": format!("sha256:{}", "a".repeat(64))},
        "imagePullSecrets": [{"name": "registry-credentials"}],
        "analyser": {
            "listen": ["tcp://0.0.0.0:6000"],
            "readers": 2, "shards": 2, "queueCapacity": 131072, "pin": true,
            "sessionTimeout": 30, "orphanGrace": 3, "maxSessions": 4000000,
            "maxConnections": 256, "maxFrameSize": 2097152,
            "handshakeTimeout": 10, "idleTimeout": 600, "frameBufferBudget": 134217728,
            "log": ["failed", "sampleloss"], "format": "text",
            "sampleSucceeded": 0.01, "messages": "failed", "statsInterval": 60,
            "maxIdentityLabels": 512, "maxUpstreamLabels": 64, "stallTimeout": 45
        },
        "service": {"name": SERVICE, "port": PORT, "clusterIP": "10.96.12.34",
                    "annotations": {"example.com/owner": "dns-team"}},
        "serviceAccount": {"create": true, "name": "dnstap", "annotations": {"a": "b"}},
        "networkPolicy": {"enabled": true, "extraFrom": [
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "node-local-dns"}}}]},
        "podDisruptionBudget": {"enabled": true, "minAvailable": 1},
        "podAnnotations": {"example.com/scrape": "false"},
        "podLabels": {"team": "dns"},
        "commonLabels": {"cost-center": "platform"},
        "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}}]}},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "dnstap-analyser"}}}]
    })
}

// ---------------------------------------------------------------------------------------------
// Kubernetes schema validation

/// Validates files with kubernetes-validate --strict for every version in KUBERNETES_VERSIONS and
/// checks that it validated `expected_objects` objects per version.
fn kubernetes_validate(files: &[PathBuf], expected_objects: usize) {
    assert!(!files.is_empty());
    let tool = require_venv_tool("kubernetes-validate", "kubernetes-validate");
    for version in KUBERNETES_VERSIONS {
        let out = run_to_end(
            Command::new(&tool)
                .args(["--strict", "--kubernetes-version", version])
                .args(files),
            None,
            Duration::from_secs(120),
        );
        let stdout = text(&out.stdout);
        let stderr = text(&out.stderr);
        assert!(
            out.status.success(),
            "objects do not validate against Kubernetes {version} (strict):\n{stdout}{stderr}\n\
             (if the version itself is unsupported, pick one that `ls \
             .ci/venv/lib/python3*/site-packages/kubernetes_validate/kubernetes-json-schema` lists)"
        );
        let passed = stdout.matches(" passed for resource ").count();
        assert_eq!(
            passed, expected_objects,
            "kubernetes-validate {version} checked {passed} objects, expected \
             {expected_objects}:\n{stdout}{stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Shared expectations for the plain manifests and the rendered chart

fn check_objects(objs: &[Json], what: &str) {
    for o in objs {
        assert_eq!(
            o["metadata"]["namespace"],
            NAMESPACE,
            "{what}: {:?} is not in {NAMESPACE}",
            kind_name(o)
        );
        let labels = &o["metadata"]["labels"];
        for l in [
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
        ] {
            assert!(
                labels[l].is_string(),
                "{what}: {:?} lacks label {l}",
                kind_name(o)
            );
        }
    }

    // Service: stable name, ClusterIP, TCP 6000 to the container's dnstap port.
    let svc = find(objs, "Service");
    assert_eq!(svc["metadata"]["name"], SERVICE, "{what}: Service name");
    assert_eq!(svc["spec"]["type"], "ClusterIP", "{what}: Service type");
    let ports = svc["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 2, "{what}: Service ports dnstap and metrics");
    assert_eq!(ports[0]["port"], PORT, "{what}: Service port");
    assert_eq!(ports[0]["protocol"], "TCP", "{what}: Service protocol");
    assert_eq!(
        ports[0]["targetPort"], "dnstap",
        "{what}: Service targetPort"
    );

    // Deployment: one replica; the Service selects its pods.
    let dep = find(objs, "Deployment");
    assert_eq!(dep["spec"]["replicas"], 1, "{what}: one replica by default");
    let pod_labels = at(dep, "spec.template.metadata.labels");
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            &pod_labels[k], v,
            "{what}: Service selector {k} does not match the pods"
        );
    }
    for (k, v) in at(dep, "spec.selector.matchLabels").as_object().unwrap() {
        assert_eq!(
            &pod_labels[k], v,
            "{what}: Deployment selector {k} does not match the pods"
        );
    }

    let pod = at(dep, "spec.template.spec");
    assert_eq!(
        pod["automountServiceAccountToken"], false,
        "{what}: no API token"
    );
    let sa = find(objs, "ServiceAccount");
    assert_eq!(
        pod["serviceAccountName"], sa["metadata"]["name"],
        "{what}: ServiceAccount"
    );
    assert_eq!(
        at(pod, "securityContext.runAsNonRoot"),
        true,
        "{what}: pod runAsNonRoot"
    );
    assert_eq!(
        at(pod, "securityContext.runAsUser"),
        RUN_AS_USER,
        "{what}: pod runAsUser"
    );

    let c = container(objs);
    let port = &c["ports"][0];
    assert_eq!(port["name"], "dnstap", "{what}: container port name");
    assert_eq!(port["containerPort"], PORT, "{what}: container port");
    assert_eq!(port["protocol"], "TCP", "{what}: container port protocol");
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true, "{what}: runAsNonRoot");
    assert_eq!(
        sc["readOnlyRootFilesystem"], true,
        "{what}: readOnlyRootFilesystem"
    );
    assert_eq!(
        sc["allowPrivilegeEscalation"], false,
        "{what}: allowPrivilegeEscalation"
    );
    assert_eq!(
        sc["capabilities"]["drop"],
        json!(["ALL"]),
        "{what}: drop ALL capabilities"
    );
    check_metrics_port_and_probes(svc, &c, what);
    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][res].is_string(),
                "{what}: resources.{kind}.{res} missing"
            );
        }
    }
    let args = args_of(objs);
    assert!(
        args.iter()
            .any(|a| a == &format!("--listen=tcp://0.0.0.0:{PORT}")
                || a == &format!("--listen=tls://0.0.0.0:{PORT}")),
        "{what}: the analyser must listen on {PORT}: {args:?}"
    );

    // NetworkPolicy: ingress to 6000 from CoreDNS only.
    if let Some(np) = objs.iter().find(|o| o["kind"] == "NetworkPolicy") {
        assert_eq!(
            np["spec"]["podSelector"]["matchLabels"],
            dep["spec"]["selector"]["matchLabels"]
        );
        assert_eq!(np["spec"]["policyTypes"], json!(["Ingress"]));
        let rule = &np["spec"]["ingress"][0];
        assert_eq!(
            rule["ports"],
            json!([{"protocol": "TCP", "port": PORT}]),
            "{what}: NP port"
        );
        let peer = &rule["from"][0];
        assert_eq!(
            at(peer, "podSelector.matchLabels"),
            &json!({"k8s-app": "kube-dns"})
        );
        assert_eq!(
            at(peer, "namespaceSelector.matchLabels"),
            &json!({"kubernetes.io/metadata.name": NAMESPACE})
        );
    }
}

fn strip_helm_labels(mut obj: Json) -> Json {
    fn strip(labels: &mut Json) {
        if let Some(m) = labels.as_object_mut() {
            for l in HELM_ONLY_LABELS {
                m.remove(*l);
            }
        }
    }
    strip(&mut obj["metadata"]["labels"]);
    if obj["kind"] == "Deployment" {
        strip(&mut obj["spec"]["template"]["metadata"]["labels"]);
    }
    obj
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn plain_manifests_have_the_expected_objects() {
    let objs = plain_objects();
    let kinds: BTreeSet<(String, String)> = objs.iter().map(kind_name).collect();
    let expected: BTreeSet<(String, String)> =
        ["ServiceAccount", "Service", "Deployment", "NetworkPolicy"]
            .iter()
            .map(|k| (k.to_string(), "dnstap-analyser".to_string()))
            .collect();
    assert_eq!(
        kinds, expected,
        "objects of deploy/kubernetes/dnstap-analyser.yaml"
    );
    check_objects(&objs, "plain manifests");
    // docs/kubernetes.md patches argument 9 (`--log=all`) of the plain manifest by index.
    assert_eq!(
        args_of(&objs).get(9).map(String::as_str),
        Some("--log=all"),
        "docs/kubernetes.md section 4 patches args/9 expecting --log=all; update it with the args"
    );
    // The install command of docs/kubernetes.md replaces exactly this image line.
    let manifest = read(&plain_manifest_path());
    let image = format!("image: dnstap-analyser:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(
        manifest.lines().filter(|l| l.trim() == image).count(),
        1,
        "the plain manifest must contain `{image}` once (docs/kubernetes.md rewrites it with sed)"
    );
}

#[test]
fn plain_manifests_validate_against_kubernetes_schemas() {
    let n = plain_objects().len();
    kubernetes_validate(&[plain_manifest_path()], n);

    // The validator must be able to fail: an unknown field under strict validation.
    let dir = scratch_dir("validate-negative");
    let bad = dir.join("bad.yaml");
    let broken = read(&plain_manifest_path()).replacen(
        "readOnlyRootFilesystem: true",
        "readOnlyRootFileSystem: true",
        1,
    );
    fs::write(&bad, broken).unwrap();
    let out = run_to_end(
        Command::new(require_venv_tool(
            "kubernetes-validate",
            "kubernetes-validate",
        ))
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSIONS[0]])
        .arg(&bad),
        None,
        Duration::from_secs(120),
    );
    assert!(
        !out.status.success(),
        "kubernetes-validate accepted a misspelt field: {}",
        text(&out.stdout)
    );
}

#[test]
fn chart_metadata_and_values_are_well_formed() {
    let chart: Json =
        to_json(&serde_yaml::from_str(&read(&chart_dir().join("Chart.yaml"))).unwrap());
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "dnstap-analyser");
    assert_eq!(chart["type"], "application");
    let version = chart["version"].as_str().expect("Chart version");
    assert_eq!(
        version.split('.').count(),
        3,
        "Chart version is SemVer: {version}"
    );
    assert_eq!(
        chart["appVersion"],
        env!("CARGO_PKG_VERSION"),
        "Chart appVersion must be the crate version (it is the default image tag)"
    );

    let values_src = read(&chart_dir().join("values.yaml"));
    let values: Json = to_json(&serde_yaml::from_str(&values_src).unwrap());
    assert_eq!(values["replicaCount"], 1);
    assert_eq!(values["service"]["name"], SERVICE);
    assert_eq!(values["service"]["port"], PORT);
    assert_eq!(values["containerPort"], PORT);
    assert_eq!(
        values["podDisruptionBudget"]["enabled"], false,
        "PDB is off by default"
    );
    assert_eq!(
        values["networkPolicy"]["corednsPodLabels"],
        json!({"k8s-app": "kube-dns"})
    );
    assert_eq!(
        values["resources"]["requests"],
        json!({"cpu": "500m", "memory": "256Mi"})
    );
    assert_eq!(
        values["resources"]["limits"],
        json!({"cpu": "2", "memory": "1Gi"})
    );
    assert!(
        values_src.contains("docs/benchmarks.md") && values_src.contains("messages/s"),
        "values.yaml must carry the sizing table that cites docs/benchmarks.md"
    );

    let schema: Json =
        serde_json::from_str(&read(&chart_dir().join("values.schema.json"))).expect("schema JSON");
    assert_eq!(schema["type"], "object");

    for t in [
        "_helpers.tpl",
        "NOTES.txt",
        "deployment.yaml",
        "service.yaml",
        "serviceaccount.yaml",
        "networkpolicy.yaml",
        "poddisruptionbudget.yaml",
    ] {
        assert!(
            chart_dir().join("templates").join(t).is_file(),
            "templates/{t} missing"
        );
    }
}

#[test]
fn chart_values_cover_every_tuning_flag() {
    let help = help_flags();
    let contract = contract_flags();
    let values: Json =
        to_json(&serde_yaml::from_str(&read(&chart_dir().join("values.yaml"))).unwrap());
    let schema: Json =
        serde_json::from_str(&read(&chart_dir().join("values.schema.json"))).unwrap();
    let helpers = read(&chart_dir().join("templates/_helpers.tpl"));
    let analyser = values["analyser"]
        .as_object()
        .expect("values.yaml has analyser:");

    let all: BTreeSet<&String> = help.keys().chain(contract.iter()).collect();
    for flag in all {
        let key = values_key(flag);
        assert!(
            analyser.contains_key(&key),
            "flag --{flag} has no value analyser.{key} in values.yaml"
        );
        assert!(
            schema["properties"]["analyser"]["properties"][&key].is_object(),
            "values.schema.json does not describe analyser.{key}"
        );
        assert!(
            helpers.contains(&format!("--{flag}")) && helpers.contains(&format!("$a.{key}")),
            "templates/_helpers.tpl does not turn analyser.{key} into --{flag}"
        );
    }
    // The ones the issue names explicitly.
    for key in [
        "shards",
        "readers",
        "queueCapacity",
        "pin",
        "sessionTimeout",
        "maxSessions",
        "log",
        "format",
        "extraArgs",
    ] {
        assert!(
            analyser.contains_key(key),
            "values.yaml lacks analyser.{key}"
        );
    }
}

#[test]
fn chart_renders_lints_and_validates() {
    let cases: Vec<(&str, Json)> = vec![
        ("defaults", json!({})),
        ("all-options", all_options_values()),
        (
            "minimal",
            json!({"serviceAccount": {"create": false}, "networkPolicy": {"enabled": false},
                   "analyser": {"shards": null, "readers": null, "log": null, "format": null}}),
        ),
    ];
    let rendered = render_cases(&cases);
    let dir = scratch_dir("render");

    let defaults = rendered[0].expect_ok();
    let objs = defaults.objects();
    check_objects(&objs, "chart defaults");
    let files = defaults.write_to(&dir);
    kubernetes_validate(&files, objs.len());
    let notes = defaults.notes();
    for needle in [
        "kubectl -n kube-system get service dnstap-analyser -o jsonpath='{.spec.clusterIP}",
        "dnstap tcp://CLUSTER_IP:6000 full",
        "kubectl -n kube-system logs -f deployment/dnstap-analyser",
        "Reloading complete",
        "helm uninstall dnstap-analyser --namespace kube-system",
    ] {
        assert!(
            notes.contains(needle),
            "NOTES.txt lacks {needle:?}:\n{notes}"
        );
    }

    let all = rendered[1].expect_ok();
    let objs = all.objects();
    let kinds: BTreeSet<String> = objs.iter().map(|o| kind_name(o).0).collect();
    assert!(
        kinds.contains("PodDisruptionBudget"),
        "PDB renders when enabled: {kinds:?}"
    );
    check_objects(&objs, "chart with all options");
    let files = all.write_to(&dir);
    kubernetes_validate(&files, objs.len());
    assert!(
        all.notes().contains("dnstap tcp://10.96.12.34:6000 full"),
        "{}",
        all.notes()
    );
    let c = container(&objs);
    assert_eq!(
        c["image"],
        format!(
            "registry.example.com/platform/dnstap-analyser@sha256:{}",
            "a".repeat(64)
        )
    );
    assert_eq!(find(&objs, "Service")["spec"]["clusterIP"], "10.96.12.34");
    let pod = at(find(&objs, "Deployment"), "spec.template.spec");
    assert_eq!(pod["serviceAccountName"], "dnstap");
    assert_eq!(pod["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    assert_eq!(pod["tolerations"][0]["key"], "CriticalAddonsOnly");
    assert!(pod["affinity"]["podAntiAffinity"].is_object());

    let min = rendered[2].expect_ok();
    let objs = min.objects();
    let kinds: BTreeSet<String> = objs.iter().map(|o| kind_name(o).0).collect();
    assert_eq!(
        kinds,
        ["Deployment", "Service"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        "ServiceAccount and NetworkPolicy are optional"
    );
    assert_eq!(
        at(
            find(&objs, "Deployment"),
            "spec.template.spec.serviceAccountName"
        ),
        "default"
    );
    let args = args_of(&objs);
    for absent in ["--shards", "--readers", "--log", "--format"] {
        assert!(
            !args.iter().any(|a| a.starts_with(absent)),
            "a null value must leave {absent} out: {args:?}"
        );
    }
    kubernetes_validate(&min.write_to(&dir), objs.len());
}

#[test]
fn chart_defaults_equal_the_plain_manifests() {
    let rendered = render_one("defaults", json!({}));
    let chart: BTreeMap<(String, String), Json> = rendered
        .expect_ok()
        .objects()
        .into_iter()
        .map(|o| (kind_name(&o), strip_helm_labels(o)))
        .collect();
    let plain: BTreeMap<(String, String), Json> = plain_objects()
        .into_iter()
        .map(|o| (kind_name(&o), strip_helm_labels(o)))
        .collect();
    assert_eq!(
        chart.keys().collect::<Vec<_>>(),
        plain.keys().collect::<Vec<_>>(),
        "the chart's default objects and deploy/kubernetes/dnstap-analyser.yaml differ"
    );
    for (key, c) in &chart {
        assert_eq!(
            c,
            &plain[key],
            "{key:?} differs between the chart's defaults and the plain manifests\nchart: {}\nplain: {}",
            serde_json::to_string_pretty(c).unwrap(),
            serde_json::to_string_pretty(&plain[key]).unwrap()
        );
    }
}

#[test]
fn chart_rejects_bad_values() {
    let cases: Vec<(&str, Json)> = vec![
        ("typo", json!({"analyser": {"shard": 4}})),
        ("not-a-number", json!({"analyser": {"shards": "many"}})),
        ("zero-readers", json!({"analyser": {"readers": 0}})),
        ("unknown-log", json!({"analyser": {"log": ["everything"]}})),
        (
            "rate-above-one",
            json!({"analyser": {"sampleSucceeded": 1.5}}),
        ),
        (
            "unknown-messages",
            json!({"analyser": {"messages": "some"}}),
        ),
        (
            "interval-in-days",
            json!({"analyser": {"statsInterval": "1d"}}),
        ),
        (
            "bad-listen",
            json!({"analyser": {"listen": ["0.0.0.0:6000"]}}),
        ),
        (
            "bad-service-type",
            json!({"service": {"name": SERVICE, "port": PORT, "type": "NodePort"}}),
        ),
    ];
    for r in render_cases(&cases) {
        assert!(
            r.error.is_some(),
            "values case {:?} should be rejected by values.schema.json, but rendered",
            r.name
        );
    }
}

#[test]
fn every_flag_has_a_value_that_reaches_the_args() {
    let help = help_flags();
    let cases = flag_cases();
    let covered: BTreeSet<String> = cases.iter().map(|(f, _, _)| f.to_string()).collect();
    let listed: BTreeSet<String> = help.keys().cloned().collect();
    assert_eq!(
        covered, listed,
        "flags of `dnstap-analyser --help` and the cases of this test differ: add the new flag \
         to values.yaml, values.schema.json, templates/_helpers.tpl, the plain manifest and \
         flag_cases()"
    );

    let mut render_in: Vec<(String, Json)> = Vec::new();
    for (flag, value, _) in &cases {
        let key = values_key(flag);
        render_in.push((
            format!("set-{flag}"),
            json!({"analyser": {key.clone(): value}}),
        ));
        if *flag != "listen" {
            render_in.push((format!("null-{flag}"), json!({"analyser": {key: null}})));
        }
    }
    render_in.push((
        "extra-args".into(),
        json!({"analyser": {"extraArgs": ["--some-future-flag=1"]}}),
    ));
    let refs: Vec<(&str, Json)> = render_in
        .iter()
        .map(|(n, v)| (n.as_str(), v.clone()))
        .collect();
    let rendered = render_cases(&refs);
    let by_name: BTreeMap<&str, &Rendered> =
        rendered.iter().map(|r| (r.name.as_str(), r)).collect();

    for (flag, _, expected) in &cases {
        let args = args_of(
            &by_name[format!("set-{flag}").as_str()]
                .expect_ok()
                .objects(),
        );
        for e in expected {
            assert!(
                args.iter().any(|a| a == e),
                "--{flag}: expected {e} in {args:?}"
            );
        }
        let n = args.iter().filter(|a| is_flag(a, flag)).count();
        assert_eq!(n, expected.len(), "--{flag} appears {n} times in {args:?}");
        if *flag != "listen" {
            let args = args_of(
                &by_name[format!("null-{flag}").as_str()]
                    .expect_ok()
                    .objects(),
            );
            assert!(
                !args.iter().any(|a| is_flag(a, flag)),
                "analyser.{} = null must leave --{flag} out: {args:?}",
                values_key(flag)
            );
        }
    }
    let args = args_of(&by_name["extra-args"].expect_ok().objects());
    assert_eq!(
        args.last().map(String::as_str),
        Some("--some-future-flag=1"),
        "{args:?}"
    );
}

#[test]
fn container_args_are_accepted_by_the_binary() {
    let dir = scratch_dir("args");
    let help = help_flags();

    let plain = args_of(&plain_objects());
    let mut mtls = tls_secret_values();
    mtls["tls"]["clientCA"] = json!(true);
    let rendered = render_cases(&[
        ("defaults", json!({})),
        ("all-options", all_options_values()),
        ("mtls", mtls),
    ]);
    let sets = [
        ("plain manifests", plain),
        (
            "chart defaults",
            args_of(&rendered[0].expect_ok().objects()),
        ),
        (
            "chart with all options",
            args_of(&rendered[1].expect_ok().objects()),
        ),
        // Parsed only: `read` mode does not open the certificate files. The TLS listener with
        // real files is `chart_tls_args_serve_the_documented_certificate`.
        (
            "chart with mTLS",
            args_of(&rendered[2].expect_ok().objects()),
        ),
    ];
    for (what, args) in &sets {
        for a in args {
            let name = a.trim_start_matches("--").split('=').next().unwrap();
            assert!(
                help.contains_key(name),
                "{what}: {a} is not a flag of --help"
            );
            assert_eq!(
                help[name],
                a.contains('='),
                "{what}: {a}: value/no-value does not match --help"
            );
        }
        let out = run_binary_with(args, &dir);
        assert!(
            out.status.success(),
            "{what}: the binary rejects the container args {args:?}\nstderr:\n{}",
            text(&out.stderr)
        );
    }

    // The same check must fail for a flag the binary does not know.
    let mut bad = sets[0].1.clone();
    bad.push("--no-such-flag=1".into());
    let out = run_binary_with(&bad, &dir);
    assert!(!out.status.success(), "the binary accepted --no-such-flag");
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_the_binary_as_entrypoint() {
    let df = read(&root().join("deploy/Dockerfile"));
    let lines: Vec<&str> = df
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "build stage and runtime stage: {froms:?}");
    assert!(
        df.contains("ARG RUST_IMAGE=rust:1-bookworm"),
        "Rust build stage on bookworm"
    );
    assert!(
        df.contains("gcr.io/distroless/cc-debian12"),
        "distroless runtime matching the bookworm build"
    );
    assert!(
        df.contains("cargo build --profile production --locked"),
        "the shipped (LTO) build from Cargo.lock"
    );
    assert!(
        lines.contains(&"USER 65532:65532"),
        "numeric non-root user 65532"
    );
    assert!(lines.contains(&"EXPOSE 6000/tcp"), "port 6000 exposed");
    assert!(
        lines.contains(&r#"ENTRYPOINT ["/usr/local/bin/dnstap-analyser"]"#),
        "the binary is the entrypoint (exec form)"
    );
    assert!(
        df.contains("docker build -f deploy/Dockerfile -t dnstap-analyser:0.1.0 ."),
        "the Dockerfile documents its build command"
    );
    assert!(
        root().join("Cargo.lock").is_file(),
        "--locked needs Cargo.lock in the repository"
    );
    let ignore = read(&root().join("deploy/Dockerfile.dockerignore"));
    assert!(
        ignore.lines().any(|l| l.trim() == "target"),
        "the build context excludes target/"
    );
}

#[test]
fn docs_describe_the_whole_lifecycle_with_existing_files() {
    let doc = read(&root().join("docs/kubernetes.md"));
    for needle in [
        "docker build -f deploy/Dockerfile -t dnstap-analyser:0.1.0 .",
        "helm install dnstap-analyser deploy/helm/dnstap-analyser --namespace kube-system",
        "| kubectl apply -f -",
        "kubectl -n kube-system get service dnstap-analyser -o jsonpath='{.spec.clusterIP}'",
        "kubectl -n kube-system patch configmap coredns",
        "[INFO] Reloading complete",
        "kubectl -n kube-system logs -f deployment/dnstap-analyser",
        r#"select(.status == "Failed")"#,
        r#"select(.status == "SampleLoss")"#,
        "Dropped dnstap messages",
        "helm uninstall dnstap-analyser --namespace kube-system",
        "kubectl delete -f deploy/kubernetes/dnstap-analyser.yaml",
    ] {
        assert!(doc.contains(needle), "docs/kubernetes.md lacks {needle:?}");
    }
    // Uninstall order: the dnstap line goes before the release.
    let uninstall = &doc[doc.find("## 8. Uninstall").expect("uninstall section")..];
    let remove_line = uninstall
        .find("Remove the dnstap line")
        .expect("remove-line step");
    let helm_uninstall = uninstall
        .find("helm uninstall")
        .expect("helm uninstall step");
    assert!(
        remove_line < helm_uninstall,
        "uninstall must remove the dnstap line first"
    );

    // Every repository path the docs mention exists.
    for file in ["docs/kubernetes.md", "deploy/coredns/README.md"] {
        let src = read(&root().join(file));
        for (i, _) in src.match_indices("deploy/") {
            let path: String = src[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || "-_./".contains(*c))
                .collect();
            let path = path.trim_end_matches('.');
            assert!(
                root().join(path).exists(),
                "{file} mentions {path}, which does not exist"
            );
        }
    }

    // The CoreDNS snippets use the syntax of CoreDNS's dnstap plugin.
    let coredns = read(&root().join("deploy/coredns/README.md"));
    assert!(coredns.contains("    dnstap tcp://CLUSTER_IP:6000 full\n"));
    assert!(coredns.contains("    dnstap tcp://CLUSTER_IP:6000 full 4 4\n"));
    let example = read(&root().join("deploy/coredns/Corefile.dnstap.example"));
    assert_eq!(
        example
            .lines()
            .filter(|l| l.trim_start().starts_with("dnstap "))
            .count(),
        1,
        "the example Corefile has one dnstap line"
    );
}

// ---------------------------------------------------------------------------------------------
// The metrics endpoint, the probes and the monitoring objects (docs/operations.md)

/// The analyser's default metrics port (`--metrics-listen`, default 0.0.0.0:9435).
const METRICS_PORT: i64 = 9435;
/// The plain manifests of the monitoring objects: the chart's rendering, checked by
/// `plain_monitoring_manifests_equal_the_chart`.
const MONITORING_DIR: &str = "deploy/kubernetes/monitoring";
/// Set to 1 to rewrite MONITORING_DIR from the chart instead of comparing with it.
const BLESS_ENV: &str = "DNSTAP_BLESS_MONITORING_MANIFESTS";
/// Template -> file in MONITORING_DIR.
const MONITORING_TEMPLATES: &[(&str, &str)] = &[
    ("templates/servicemonitor.yaml", "servicemonitor.yaml"),
    ("templates/prometheusrule.yaml", "prometheusrule.yaml"),
    ("templates/grafana-dashboard.yaml", "grafana-dashboard.yaml"),
];
const OPERATOR_API: &str = "monitoring.coreos.com/v1";

/// Every monitoring object switched on, with the defaults of their other values.
fn monitoring_on() -> Json {
    json!({"monitoring": {
        "serviceMonitor": {"enabled": true},
        "prometheusRule": {"enabled": true},
        "grafanaDashboard": {"enabled": true}
    }})
}

fn named<'a>(list: &'a Json, name: &str) -> Option<&'a Json> {
    list.as_array()?.iter().find(|p| p["name"] == name)
}

/// With metrics on (the default): a port named metrics on the Service and the container, and
/// HTTP probes on it (readiness /readyz, liveness /healthz), patient enough for a busy analyser.
fn check_metrics_port_and_probes(svc: &Json, c: &Json, what: &str) {
    let sp = named(&svc["spec"]["ports"], "metrics")
        .unwrap_or_else(|| panic!("{what}: the Service has no port named metrics"));
    assert_eq!(sp["port"], METRICS_PORT, "{what}: Service metrics port");
    assert_eq!(
        sp["targetPort"], "metrics",
        "{what}: Service metrics targetPort"
    );
    assert_eq!(sp["protocol"], "TCP", "{what}: Service metrics protocol");
    let cp = named(&c["ports"], "metrics")
        .unwrap_or_else(|| panic!("{what}: the container has no port named metrics"));
    assert_eq!(
        cp["containerPort"], METRICS_PORT,
        "{what}: container metrics port"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let p = &c[probe];
        assert_eq!(
            p["httpGet"],
            json!({"path": path, "port": "metrics"}),
            "{what}: {probe} must GET {path} on the metrics port"
        );
        assert!(
            p["tcpSocket"].is_null(),
            "{what}: {probe} has a TCP probe too"
        );
    }
    let live = &c["livenessProbe"];
    let patience =
        live["periodSeconds"].as_i64().unwrap() * live["failureThreshold"].as_i64().unwrap();
    assert!(
        patience >= 60,
        "{what}: liveness restarts after {patience} s of failures; a busy analyser needs at least a minute"
    );
}

fn metrics_args(objs: &[Json]) -> Vec<String> {
    args_of(objs)
        .into_iter()
        .filter(|a| a.starts_with("--metrics-listen"))
        .collect()
}

/// Writes the objects that Kubernetes' own schemas describe (not the operator's or
/// cert-manager's CRDs) to `dir`.
fn write_core_objects(objs: &[Json], dir: &Path, case: &str) -> Vec<PathBuf> {
    objs.iter()
        .filter(|o| o["apiVersion"] != OPERATOR_API && o["apiVersion"] != CERT_MANAGER_API)
        .enumerate()
        .map(|(i, o)| {
            let file = dir.join(format!("{case}-{i}.yaml"));
            fs::write(&file, serde_yaml::to_string(o).unwrap()).unwrap();
            file
        })
        .collect()
}

fn chart_file_yaml(name: &str) -> Json {
    to_json(&serde_yaml::from_str(&read(&chart_dir().join("files").join(name))).unwrap())
}

#[test]
fn chart_metrics_values_reach_the_pod_the_service_and_the_args() {
    let cases: Vec<(&str, Json)> = vec![
        ("defaults", json!({})),
        ("port", json!({"metrics": {"enabled": true, "port": 9500}})),
        (
            "off",
            json!({"metrics": {"enabled": false, "port": METRICS_PORT}}),
        ),
        ("ipv6", json!({"analyser": {"metricsListen": "[::]:9435"}})),
        (
            "no-annotations",
            json!({"metrics": {"enabled": true, "port": METRICS_PORT, "scrapeAnnotations": false},
                   "podAnnotations": {"example.com/team": "dns"}}),
        ),
        (
            "metrics-from",
            json!({"networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels":
                   {"kubernetes.io/metadata.name": "monitoring"}}}]}}),
        ),
    ];
    let rendered = render_cases(&cases);
    let dir = scratch_dir("metrics");
    let by_name: BTreeMap<&str, Vec<Json>> = rendered
        .iter()
        .map(|r| (r.name.as_str(), r.expect_ok().objects()))
        .collect();
    for r in &rendered {
        let objs = &by_name[r.name.as_str()];
        kubernetes_validate(&r.write_to(&dir), objs.len());
    }
    let annotations = |objs: &[Json]| {
        at(
            find(objs, "Deployment"),
            "spec.template.metadata.annotations",
        )
        .clone()
    };
    let np_rules = |objs: &[Json]| find(objs, "NetworkPolicy")["spec"]["ingress"].clone();

    // Defaults: the binary's default port, so no flag; scrape annotations; metrics open to all.
    let objs = &by_name["defaults"];
    assert!(metrics_args(objs).is_empty(), "{:?}", metrics_args(objs));
    assert_eq!(
        annotations(objs),
        json!({"prometheus.io/scrape": "true", "prometheus.io/port": "9435",
               "prometheus.io/path": "/metrics"})
    );
    assert_eq!(
        np_rules(objs)[1],
        json!({"ports": [{"protocol": "TCP", "port": METRICS_PORT}]})
    );

    // Another port: passed to the binary, and every reference to the port follows.
    let objs = &by_name["port"];
    assert_eq!(metrics_args(objs), ["--metrics-listen=0.0.0.0:9500"]);
    let c = container(objs);
    assert_eq!(
        named(&c["ports"], "metrics").unwrap()["containerPort"],
        9500
    );
    let svc = find(objs, "Service");
    assert_eq!(
        named(&svc["spec"]["ports"], "metrics").unwrap()["port"],
        9500
    );
    assert_eq!(annotations(objs)["prometheus.io/port"], "9500");
    assert_eq!(np_rules(objs)[1]["ports"][0]["port"], 9500);
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "metrics");

    // Off: --metrics-listen=none, no metrics port anywhere, TCP probes with the same timings.
    let objs = &by_name["off"];
    assert_eq!(metrics_args(objs), ["--metrics-listen=none"]);
    let c = container(objs);
    assert!(named(&c["ports"], "metrics").is_none(), "{}", c["ports"]);
    assert!(named(&find(objs, "Service")["spec"]["ports"], "metrics").is_none());
    assert!(annotations(objs).is_null(), "{}", annotations(objs));
    assert_eq!(
        np_rules(objs).as_array().unwrap().len(),
        1,
        "{}",
        np_rules(objs)
    );
    let values: Json =
        to_json(&serde_yaml::from_str(&read(&chart_dir().join("values.yaml"))).unwrap());
    for probe in ["readinessProbe", "livenessProbe"] {
        let mut expected = values[probe].clone();
        let m = expected.as_object_mut().unwrap();
        m.remove("httpGet");
        m.insert("tcpSocket".into(), json!({"port": "dnstap"}));
        assert_eq!(c[probe], expected, "metrics off: {probe}");
    }

    let objs = &by_name["ipv6"];
    assert_eq!(metrics_args(objs), ["--metrics-listen=[::]:9435"]);

    let objs = &by_name["no-annotations"];
    assert_eq!(annotations(objs), json!({"example.com/team": "dns"}));

    let objs = &by_name["metrics-from"];
    assert_eq!(
        np_rules(objs)[1]["from"],
        json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}])
    );
}

#[test]
fn chart_rejects_bad_monitoring_values() {
    let cases: Vec<(&str, Json)> = vec![
        (
            "service-monitor-without-metrics",
            json!({"metrics": {"enabled": false, "port": METRICS_PORT},
                   "monitoring": {"serviceMonitor": {"enabled": true}}}),
        ),
        (
            "port-zero",
            json!({"metrics": {"enabled": true, "port": 0}}),
        ),
        (
            "listen-without-host",
            json!({"analyser": {"metricsListen": "9435"}}),
        ),
        (
            "typo",
            json!({"monitoring": {"serviceMonitor": {"enable": true}}}),
        ),
        (
            "bad-interval",
            json!({"monitoring": {"serviceMonitor": {"interval": "30"}}}),
        ),
        (
            "alert-ratio-above-1",
            json!({"monitoring": {"prometheusRule": {"rules":
                   {"DnstapDNSFailing": {"ratio": 20}}}}}),
        ),
        (
            "alert-unknown-rule",
            json!({"monitoring": {"prometheusRule": {"rules": {"DnstapSomething": {"enabled": true}}}}}),
        ),
        (
            "alert-threshold-the-rule-lacks",
            json!({"monitoring": {"prometheusRule": {"rules":
                   {"DnstapCoreDNSPodSilent": {"ratio": 0.1}}}}}),
        ),
        (
            "alert-bad-for",
            json!({"monitoring": {"prometheusRule": {"rules":
                   {"DnstapAnalyserDown": {"for": "5 minutes"}}}}}),
        ),
        (
            "alert-runbook-base-with-anchor",
            json!({"monitoring": {"prometheusRule": {"runbookBaseUrl": "https://example.com/ops#alerts"}}}),
        ),
    ];
    for r in render_cases(&cases) {
        assert!(
            r.error.is_some(),
            "values case {:?} should be rejected, but rendered",
            r.name
        );
    }
}

#[test]
fn chart_monitoring_objects_render_and_validate() {
    // Off by default.
    let defaults = render_one("defaults", json!({}));
    let kinds: BTreeSet<String> = defaults
        .expect_ok()
        .objects()
        .iter()
        .map(|o| kind_name(o).0)
        .collect();
    for kind in ["ServiceMonitor", "PrometheusRule", "ConfigMap"] {
        assert!(!kinds.contains(kind), "{kind} must be off by default");
    }

    let values = json!({"monitoring": {
        "serviceMonitor": {"enabled": true, "labels": {"release": "kube-prometheus-stack"},
                           "interval": "15s", "scrapeTimeout": "5s"},
        "prometheusRule": {"enabled": true, "labels": {"release": "kube-prometheus-stack"}},
        "grafanaDashboard": {"enabled": true, "namespace": "monitoring",
                             "labels": {"grafana_dashboard": "1"},
                             "annotations": {"grafana_folder": "DNS"}}
    }});
    let rendered = render_one("monitoring", values);
    let objs = rendered.expect_ok().objects();
    let core: Vec<Json> = objs
        .iter()
        .filter(|o| o["apiVersion"] != OPERATOR_API)
        .cloned()
        .collect();
    let dir = scratch_dir("monitoring");
    kubernetes_validate(&write_core_objects(&objs, &dir, "monitoring"), core.len());

    // The operator's CRDs have no schema here: check them field by field.
    let svc = find(&objs, "Service");
    let sm = find(&objs, "ServiceMonitor");
    assert_eq!(sm["apiVersion"], OPERATOR_API);
    assert_eq!(sm["metadata"]["namespace"], NAMESPACE);
    assert_eq!(sm["metadata"]["labels"]["release"], "kube-prometheus-stack");
    let spec = sm["spec"].as_object().unwrap();
    assert_eq!(
        spec.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from(["selector", "namespaceSelector", "endpoints"])
    );
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &svc["metadata"]["labels"][k], v,
            "ServiceMonitor selects the Service by {k}"
        );
    }
    assert_eq!(
        sm["spec"]["namespaceSelector"],
        json!({"matchNames": [NAMESPACE]})
    );
    let endpoints = sm["spec"]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(
        endpoints[0],
        json!({"port": "metrics", "path": "/metrics", "scheme": "http",
               "interval": "15s", "scrapeTimeout": "5s"})
    );
    assert!(named(&svc["spec"]["ports"], "metrics").is_some());

    // The PrometheusRule carries exactly the rule file that promtool checks (tests/monitoring.rs).
    let rule = find(&objs, "PrometheusRule");
    assert_eq!(rule["apiVersion"], OPERATOR_API);
    assert_eq!(rule["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    assert_eq!(rule["spec"], chart_file_yaml("alerts.yaml"));
    assert_eq!(rule["spec"]["groups"][0]["name"], "dnstap-analyser");

    // The dashboard ConfigMap carries exactly files/dashboard.json.
    let cm = find(&objs, "ConfigMap");
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(
        cm["metadata"]["annotations"],
        json!({"grafana_folder": "DNS"})
    );
    let data = cm["data"].as_object().unwrap();
    assert_eq!(data.len(), 1);
    let shipped = read(&chart_dir().join("files/dashboard.json"));
    assert_eq!(
        data["dnstap-analyser.json"].as_str().unwrap().trim_end(),
        shipped.trim_end(),
        "the ConfigMap must carry files/dashboard.json verbatim"
    );
}

/// The alerting rules of a rendered PrometheusRule, by name.
fn alert_rules_of(objs: &[Json]) -> BTreeMap<String, Json> {
    let groups = &find(objs, "PrometheusRule")["spec"]["groups"];
    assert_eq!(groups.as_array().map(Vec::len), Some(1), "one rule group");
    groups[0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["alert"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

/// `promtool check rules` on the `spec` of a rendered PrometheusRule.
fn promtool_check_rule_spec(objs: &[Json], dir: &Path, case: &str) {
    let file = dir.join(format!("{case}-rules.yaml"));
    let spec = &find(objs, "PrometheusRule")["spec"];
    fs::write(&file, serde_yaml::to_string(spec).unwrap()).unwrap();
    let out = support::promtool(&["check", "rules", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "case {case}: promtool rejects the rendered rules:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn chart_alert_values_reach_the_rules() {
    let custom = json!({"monitoring": {"prometheusRule": {
        "enabled": true,
        "runbookBaseUrl": "https://wiki.example.com/dns/operations",
        "groupBy": ["cluster", "region"],
        "alertLabels": {"team": "dns"},
        "rules": {
            "DnstapCoreDNSPodSilent": {"enabled": false},
            "DnstapUpstreamTimingOut": {"ratio": 0.1, "minRate": 2, "for": "15m",
                                        "severity": "critical", "labels": {"team": "network"}},
            "DnstapAnalyserDown": {"lookback": "6h"}
        }
    }}});
    let flat = json!({"monitoring": {"prometheusRule": {"enabled": true, "groupBy": []}}});
    let rendered = render_cases(&[("custom", custom), ("flat", flat)]);
    let dir = scratch_dir("alert-values");
    let custom = rendered[0].expect_ok().objects();
    let flat = rendered[1].expect_ok().objects();
    promtool_check_rule_spec(&custom, &dir, "custom");
    promtool_check_rule_spec(&flat, &dir, "flat");

    let rules = alert_rules_of(&custom);
    assert!(
        !rules.contains_key("DnstapCoreDNSPodSilent"),
        "a disabled rule is left out"
    );
    assert_eq!(rules.len(), alert_rules_of(&flat).len() - 1);
    let timing = &rules["DnstapUpstreamTimingOut"];
    let expr = timing["expr"].as_str().unwrap();
    for part in ["by (cluster, region, upstream)", ") > 0.1\n", ">= 2\n"] {
        assert!(expr.contains(part), "{part:?} not in {expr}");
    }
    assert_eq!(timing["for"], "15m");
    assert_eq!(
        timing["labels"],
        json!({"severity": "critical", "team": "network"}),
        "the rule's labels win over alertLabels"
    );
    assert!(
        timing["annotations"]["description"]
            .as_str()
            .unwrap()
            .contains("(threshold 10%)"),
        "{}",
        timing["annotations"]["description"]
    );
    assert!(rules["DnstapAnalyserDown"]["expr"]
        .as_str()
        .unwrap()
        .contains("[6h]"));
    for (name, rule) in &rules {
        assert_eq!(
            rule["annotations"]["runbook_url"],
            format!(
                "https://wiki.example.com/dns/operations#{}",
                name.to_lowercase()
            )
        );
        if name != "DnstapUpstreamTimingOut" {
            assert_eq!(rule["labels"]["team"], "dns", "{name}: alertLabels");
        }
    }
    // groupBy [] sums over everything.
    let flat_rules = alert_rules_of(&flat);
    let errors = flat_rules["DnstapErrorRcodesRising"]["expr"]
        .as_str()
        .unwrap();
    assert!(
        errors.contains("sum by () (") && !errors.contains("cluster"),
        "{errors}"
    );
}

/// The rendered text of a template without the Helm-only labels, as kept in MONITORING_DIR.
fn plain_text_of(rendered: &str, template: &str) -> String {
    let mut out = format!(
        "# Generated from the Helm chart deploy/helm/dnstap-analyser ({template}, release\n\
         # dnstap-analyser in kube-system) for clusters without Helm; tests/deploy.rs checks that\n\
         # both stay equal. Do not edit: change the chart, then run\n\
         #   {BLESS_ENV}=1 cargo test --release --test deploy plain_monitoring\n\
         # Install and labels: docs/operations.md.\n"
    );
    for line in rendered.trim_start().lines() {
        let t = line.trim_start();
        if HELM_ONLY_LABELS
            .iter()
            .any(|l| t.starts_with(&format!("{l}:")))
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The plain Prometheus rule file, in the chart: the PrometheusRule's spec rendered with the
/// default values (`plain_monitoring_manifests_equal_the_chart` checks and blesses it).
const ALERTS_FILE: &str = "files/alerts.yaml";

/// The `spec` of a rendered PrometheusRule as a plain rule file: the lines after `spec:`, one
/// indentation level less, behind a header saying where they come from.
fn plain_rules_of(rendered: &str) -> String {
    let mut out = format!(
        "# Generated from the Helm chart deploy/helm/dnstap-analyser (templates/_alerts.tpl with the\n\
         # default values of monitoring.prometheusRule): a plain Prometheus rule file for rule_files,\n\
         # and the file deploy/monitoring/alerts.test.yaml tests. Do not edit: change the chart, then run\n\
         #   {BLESS_ENV}=1 cargo test --release --test deploy plain_monitoring\n"
    );
    let spec = rendered
        .split_once("\nspec:\n")
        .expect("the PrometheusRule has a spec")
        .1;
    for line in spec.lines() {
        out.push_str(line.strip_prefix("  ").unwrap_or(line));
        out.push('\n');
    }
    out
}

#[test]
fn plain_monitoring_manifests_equal_the_chart() {
    let rendered = render_one("monitoring", monitoring_on());
    rendered.expect_ok();
    let dir = root().join(MONITORING_DIR);
    let bless = std::env::var(BLESS_ENV).is_ok_and(|v| v == "1");
    let mut plain_files = Vec::new();
    for (template, file) in MONITORING_TEMPLATES {
        let (_, text) = rendered
            .manifests
            .iter()
            .find(|(k, _)| k.ends_with(template))
            .unwrap_or_else(|| panic!("the chart has no {template}"));
        let path = dir.join(file);
        if bless {
            fs::create_dir_all(&dir).unwrap();
            fs::write(&path, plain_text_of(text, template)).unwrap();
        }
        let chart: Vec<Json> = yaml_docs(text, template)
            .iter()
            .map(|y| strip_helm_labels(to_json(y)))
            .collect();
        let plain: Vec<Json> = yaml_docs(&read(&path), file).iter().map(to_json).collect();
        assert_eq!(chart.len(), 1, "{template} renders one object");
        assert_eq!(
            plain, chart,
            "{MONITORING_DIR}/{file} differs from the chart's {template}; regenerate it with \
             {BLESS_ENV}=1 cargo test --release --test deploy plain_monitoring"
        );
        plain_files.push(path);
    }
    // The plain rule file is the PrometheusRule's spec with the default values, text for text
    // (its comments included).
    let (_, rule_text) = rendered
        .manifests
        .iter()
        .find(|(k, _)| k.ends_with("templates/prometheusrule.yaml"))
        .expect("the chart has templates/prometheusrule.yaml");
    let rules_path = chart_dir().join(ALERTS_FILE);
    let expected = plain_rules_of(rule_text);
    if bless {
        fs::write(&rules_path, &expected).unwrap();
    }
    assert!(
        read(&rules_path) == expected,
        "{ALERTS_FILE} differs from the chart's PrometheusRule spec with the default values; \
         regenerate it with {BLESS_ENV}=1 cargo test --release --test deploy plain_monitoring"
    );
    let mut listed: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listed.sort();
    let mut expected: Vec<String> = MONITORING_TEMPLATES
        .iter()
        .map(|(_, f)| f.to_string())
        .collect();
    expected.sort();
    assert_eq!(listed, expected, "files of {MONITORING_DIR}");
    // The ConfigMap is a core object: validate the plain file too.
    kubernetes_validate(&[dir.join("grafana-dashboard.yaml")], 1);
}

// ---------------------------------------------------------------------------------------------
// TLS, replicas and draining (issue #11; docs/kubernetes.md sections 6.3 and 6.4)

const CERT_MANAGER_API: &str = "cert-manager.io/v1";
/// The TLS variant of the plain manifests, and the cert-manager objects without Helm.
const TLS_DIR: &str = "deploy/kubernetes/tls";
/// Set to 1 to rewrite the generated files of TLS_DIR from the chart instead of comparing.
const BLESS_TLS_ENV: &str = "DNSTAP_BLESS_TLS_MANIFESTS";
const TLS_SECRET: &str = "dnstap-analyser-tls";
const TLS_MOUNT: &str = "/etc/dnstap-analyser/tls";
const CA_ISSUER: &str = "dnstap-analyser-ca";

/// TLS from an existing Secret: the values `deploy/kubernetes/tls/dnstap-analyser.yaml` renders.
fn tls_secret_values() -> Json {
    json!({"tls": {"enabled": true, "existingSecret": TLS_SECRET}})
}

/// TLS from cert-manager, signed by the Issuer of `deploy/kubernetes/tls/ca-issuer.yaml`.
fn tls_cert_manager_values() -> Json {
    json!({"tls": {"enabled": true,
                   "certManager": {"enabled": true, "issuerRef": {"name": CA_ISSUER}}}})
}

fn pod_spec(objs: &[Json]) -> Json {
    at(find(objs, "Deployment"), "spec.template.spec").clone()
}

/// The pod of a TLS rendering: listens on tls:// only, gets the Secret's files as flags, and
/// mounts the whole Secret read-only (never with subPath, which would freeze renewals).
fn check_tls_pod(objs: &[Json], secret: &str, mount: &str, client_ca: bool, what: &str) {
    let args = args_of(objs);
    let listen: Vec<&String> = args.iter().filter(|a| a.starts_with("--listen")).collect();
    assert_eq!(
        listen,
        [&format!("--listen=tls://0.0.0.0:{PORT}")],
        "{what}: one TLS listener on the dnstap port"
    );
    let tls: Vec<&str> = args
        .iter()
        .filter(|a| a.starts_with("--tls-"))
        .map(String::as_str)
        .collect();
    let mut expected = vec![
        format!("--tls-cert={mount}/tls.crt"),
        format!("--tls-key={mount}/tls.key"),
    ];
    if client_ca {
        expected.push(format!("--tls-client-ca={mount}/ca.crt"));
    }
    assert_eq!(tls, expected, "{what}: TLS flags");

    let c = container(objs);
    assert_eq!(
        c["volumeMounts"],
        json!([{"name": "tls", "mountPath": mount, "readOnly": true}]),
        "{what}: the Secret is mounted read-only as a directory, without subPath"
    );
    let pod = pod_spec(objs);
    assert_eq!(
        pod["volumes"],
        json!([{"name": "tls", "secret": {"secretName": secret, "defaultMode": 0o440}}]),
        "{what}: Secret volume"
    );
    assert_eq!(
        pod["securityContext"]["fsGroup"], RUN_AS_USER,
        "{what}: the Secret's files belong to the analyser's group"
    );
    assert_eq!(pod["securityContext"]["runAsGroup"], RUN_AS_USER);
    // Same Service port and NetworkPolicy as plaintext: only the scheme changes.
    check_objects(objs, what);
}

/// `2160h`, `1h30m`, `90s` -> seconds; None if it is not a Go duration.
fn go_duration_secs(s: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&n| n > 0)?;
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let (unit, scale) = [("ms", 0.001), ("h", 3600.0), ("m", 60.0), ("s", 1.0)]
            .into_iter()
            .find(|(u, _)| rest.starts_with(u))?;
        rest = &rest[unit.len()..];
        total += value * scale;
    }
    (total > 0.0).then_some(total)
}

fn keys_within(obj: &Json, allowed: &[&str], what: &str) {
    let map = obj
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not an object: {obj}"));
    for k in map.keys() {
        assert!(
            allowed.contains(&k.as_str()),
            "{what}: unknown field {k:?} (allowed: {allowed:?})"
        );
    }
}

fn check_cert_manager_meta(obj: &Json, kind: &str, what: &str) {
    assert_eq!(obj["apiVersion"], CERT_MANAGER_API, "{what}: apiVersion");
    assert_eq!(obj["kind"], kind, "{what}: kind");
    keys_within(obj, &["apiVersion", "kind", "metadata", "spec"], what);
    let name = obj["metadata"]["name"].as_str().expect("metadata.name");
    assert!(
        !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
        "{what}: name {name:?}"
    );
    assert_eq!(obj["metadata"]["namespace"], NAMESPACE, "{what}: namespace");
}

/// A cert-manager Certificate checked field by field against cert-manager.io/v1 (the CRD's
/// schema is not available offline): known fields only, required ones present, enums, names and
/// addresses well formed, renewal before the end.
fn check_certificate(cert: &Json, what: &str) {
    check_cert_manager_meta(cert, "Certificate", what);
    let spec = &cert["spec"];
    keys_within(
        spec,
        &[
            "additionalOutputFormats",
            "commonName",
            "dnsNames",
            "duration",
            "emailAddresses",
            "encodeUsagesInRequest",
            "ipAddresses",
            "isCA",
            "issuerRef",
            "keystores",
            "literalSubject",
            "nameConstraints",
            "otherNames",
            "privateKey",
            "renewBefore",
            "renewBeforePercentage",
            "renewal",
            "revisionHistoryLimit",
            "secretName",
            "secretTemplate",
            "signatureAlgorithm",
            "subject",
            "uris",
            "usages",
        ],
        &format!("{what}: spec"),
    );
    assert!(
        spec["secretName"].as_str().is_some_and(|s| !s.is_empty()),
        "{what}: spec.secretName is required"
    );
    let issuer = &spec["issuerRef"];
    keys_within(
        issuer,
        &["name", "kind", "group"],
        &format!("{what}: issuerRef"),
    );
    assert!(
        issuer["name"].as_str().is_some_and(|s| !s.is_empty()),
        "{what}: issuerRef.name is required"
    );
    if issuer["group"] == "cert-manager.io" {
        assert!(
            ["Issuer", "ClusterIssuer"].contains(&issuer["kind"].as_str().unwrap_or("")),
            "{what}: issuerRef.kind {}",
            issuer["kind"]
        );
    }
    if let Some(key) = spec.get("privateKey") {
        keys_within(
            key,
            &["algorithm", "encoding", "rotationPolicy", "size"],
            what,
        );
        for (field, allowed) in [
            ("algorithm", &["RSA", "ECDSA", "Ed25519"][..]),
            ("encoding", &["PKCS1", "PKCS8"][..]),
            ("rotationPolicy", &["Never", "Always"][..]),
        ] {
            if let Some(v) = key.get(field) {
                assert!(
                    allowed.contains(&v.as_str().unwrap_or("")),
                    "{what}: privateKey.{field} {v}"
                );
            }
        }
        if key["algorithm"] == "ECDSA" {
            assert!([256, 384, 521].contains(&key["size"].as_i64().unwrap_or(0)));
        }
    }
    const USAGES: &[&str] = &[
        "signing",
        "digital signature",
        "content commitment",
        "key encipherment",
        "key agreement",
        "data encipherment",
        "cert sign",
        "crl sign",
        "encipher only",
        "decipher only",
        "any",
        "server auth",
        "client auth",
        "code signing",
        "email protection",
        "s/mime",
        "ipsec end system",
        "ipsec tunnel",
        "ipsec user",
        "timestamping",
        "ocsp signing",
        "microsoft sgc",
        "netscape sgc",
    ];
    for u in spec["usages"].as_array().into_iter().flatten() {
        assert!(
            USAGES.contains(&u.as_str().unwrap_or("")),
            "{what}: usage {u}"
        );
    }
    for n in spec["dnsNames"].as_array().into_iter().flatten() {
        let n = n.as_str().expect("dnsNames are strings");
        assert!(
            n.split('.').all(|l| !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')),
            "{what}: dnsName {n:?}"
        );
    }
    for ip in spec["ipAddresses"].as_array().into_iter().flatten() {
        let ip = ip.as_str().expect("ipAddresses are strings");
        assert!(
            ip.parse::<std::net::IpAddr>().is_ok(),
            "{what}: ipAddress {ip:?}"
        );
    }
    if let Some(t) = spec.get("secretTemplate") {
        keys_within(t, &["labels", "annotations"], what);
    }
    let duration = spec["duration"]
        .as_str()
        .map(|d| go_duration_secs(d).unwrap_or_else(|| panic!("{what}: duration {d:?}")));
    let renew = spec["renewBefore"]
        .as_str()
        .map(|d| go_duration_secs(d).unwrap_or_else(|| panic!("{what}: renewBefore {d:?}")));
    if let Some(d) = duration {
        assert!(d >= 3600.0, "{what}: cert-manager's minimum duration is 1h");
    }
    if let (Some(d), Some(r)) = (duration, renew) {
        assert!(r < d, "{what}: renewBefore must be shorter than duration");
    }
}

/// A cert-manager Issuer: exactly one kind of issuer, known fields.
fn check_issuer(issuer: &Json, what: &str) {
    check_cert_manager_meta(issuer, "Issuer", what);
    let spec = issuer["spec"].as_object().expect("Issuer spec");
    assert_eq!(spec.len(), 1, "{what}: one issuer type");
    keys_within(
        &issuer["spec"],
        &["acme", "ca", "selfSigned", "vault", "venafi"],
        what,
    );
    if let Some(ca) = spec.get("ca") {
        keys_within(
            ca,
            &[
                "crlDistributionPoints",
                "issuingCertificateURLs",
                "ocspServers",
                "secretName",
            ],
            what,
        );
        assert!(ca["secretName"].is_string(), "{what}: ca.secretName");
    }
}

#[test]
fn chart_tls_values_mount_the_secret_and_reach_the_args() {
    let mut mtls = tls_secret_values();
    mtls["tls"]["clientCA"] = json!(true);
    let mut full = tls_cert_manager_values();
    full["tls"]["certManager"]["issuerRef"] = json!({"name": "corp-ca", "kind": "ClusterIssuer",
                                                      "group": "cert-manager.io"});
    full["tls"]["certManager"]["ipAddresses"] = json!(["fd00:10:96::12", "10.96.12.34"]);
    full["tls"]["certManager"]["dnsNames"] = json!(["dnstap.example.com"]);
    full["tls"]["certManager"]["secretName"] = json!("dnstap-cert");
    full["tls"]["mountPath"] = json!("/run/tls");
    full["service"] = json!({"name": SERVICE, "port": PORT, "clusterIP": "10.96.12.34"});
    let cases: Vec<(&str, Json)> = vec![
        ("secret", tls_secret_values()),
        ("mtls", mtls),
        ("cert-manager", tls_cert_manager_values()),
        ("cert-manager-full", full),
        // Own files: the flags only, no volume.
        (
            "own-files",
            json!({"analyser": {"listen": ["tls://0.0.0.0:6000"], "tlsCert": "/own/c.pem",
                                "tlsKey": "/own/k.pem"}}),
        ),
    ];
    let rendered = render_cases(&cases);
    let dir = scratch_dir("tls");
    let by_name: BTreeMap<&str, Vec<Json>> = rendered
        .iter()
        .map(|r| (r.name.as_str(), r.expect_ok().objects()))
        .collect();
    for (name, objs) in &by_name {
        let core = write_core_objects(objs, &dir, name);
        let n = core.len();
        kubernetes_validate(&core, n);
    }

    check_tls_pod(&by_name["secret"], TLS_SECRET, TLS_MOUNT, false, "secret");
    assert!(
        !by_name["secret"].iter().any(|o| o["kind"] == "Certificate"),
        "no Certificate without certManager.enabled"
    );
    check_tls_pod(&by_name["mtls"], TLS_SECRET, TLS_MOUNT, true, "mtls");

    let objs = &by_name["cert-manager"];
    check_tls_pod(objs, TLS_SECRET, TLS_MOUNT, false, "cert-manager");
    let cert = find(objs, "Certificate");
    check_certificate(cert, "chart Certificate");
    assert_eq!(cert["spec"]["secretName"], TLS_SECRET);
    assert_eq!(
        cert["spec"]["issuerRef"],
        json!({"name": CA_ISSUER, "kind": "Issuer", "group": "cert-manager.io"})
    );
    assert_eq!(
        cert["spec"]["dnsNames"],
        json!([
            SERVICE,
            format!("{SERVICE}.{NAMESPACE}"),
            format!("{SERVICE}.{NAMESPACE}.svc"),
            format!("{SERVICE}.{NAMESPACE}.svc.cluster.local")
        ])
    );
    assert!(cert["spec"]["ipAddresses"].is_null(), "no address known");
    assert!(cert["spec"]["usages"]
        .as_array()
        .unwrap()
        .contains(&json!("server auth")));
    assert_eq!(cert["spec"]["privateKey"]["rotationPolicy"], "Always");

    let objs = &by_name["cert-manager-full"];
    check_tls_pod(objs, "dnstap-cert", "/run/tls", false, "cert-manager-full");
    let cert = find(objs, "Certificate");
    check_certificate(cert, "chart Certificate (all values)");
    assert_eq!(cert["spec"]["issuerRef"]["kind"], "ClusterIssuer");
    assert_eq!(
        cert["spec"]["ipAddresses"],
        json!(["10.96.12.34", "fd00:10:96::12"]),
        "the fixed ClusterIP, once, and the listed addresses"
    );
    assert!(cert["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .contains(&json!("dnstap.example.com")));
    let notes = rendered
        .iter()
        .find(|r| r.name == "cert-manager-full")
        .unwrap()
        .notes();
    assert!(
        notes.contains("dnstap tls://10.96.12.34:6000 full"),
        "NOTES give the TLS line:\n{notes}"
    );

    let objs = &by_name["own-files"];
    let args = args_of(objs);
    assert!(
        args.contains(&"--tls-cert=/own/c.pem".to_string()),
        "{args:?}"
    );
    assert!(
        args.contains(&"--tls-key=/own/k.pem".to_string()),
        "{args:?}"
    );
    assert!(pod_spec(objs)["volumes"].is_null());
}

#[test]
fn chart_defaults_have_tls_off() {
    let values: Json =
        to_json(&serde_yaml::from_str(&read(&chart_dir().join("values.yaml"))).unwrap());
    assert_eq!(values["tls"]["enabled"], false, "TLS is off by default");
    assert_eq!(values["tls"]["certManager"]["enabled"], false);
    for objs in [
        render_one("defaults", json!({})).expect_ok().objects(),
        plain_objects(),
    ] {
        let args = args_of(&objs);
        assert!(
            args.contains(&format!("--listen=tcp://0.0.0.0:{PORT}")),
            "{args:?}"
        );
        assert!(!args.iter().any(|a| a.starts_with("--tls")), "{args:?}");
        assert!(pod_spec(&objs)["volumes"].is_null());
        assert!(!objs.iter().any(|o| o["kind"] == "Certificate"));
    }
}

#[test]
fn chart_rejects_bad_tls_and_drain_values() {
    let cases: Vec<(&str, Json)> = vec![
        ("tls-without-certificate", json!({"tls": {"enabled": true}})),
        (
            "secret-and-cert-manager",
            json!({"tls": {"enabled": true, "existingSecret": TLS_SECRET,
                           "certManager": {"enabled": true, "issuerRef": {"name": CA_ISSUER}}}}),
        ),
        (
            "cert-manager-without-issuer",
            json!({"tls": {"enabled": true, "certManager": {"enabled": true}}}),
        ),
        (
            "tls-with-plaintext-listen",
            json!({"tls": {"enabled": true, "existingSecret": TLS_SECRET},
                   "analyser": {"listen": ["tcp://0.0.0.0:6000"]}}),
        ),
        (
            "bad-key-algorithm",
            json!({"tls": {"certManager": {"privateKey": {"algorithm": "DSA"}}}}),
        ),
        ("typo", json!({"tls": {"enable": true}})),
        ("relative-mount", json!({"tls": {"mountPath": "certs"}})),
        (
            "bad-duration",
            json!({"tls": {"certManager": {"duration": "90 days"}}}),
        ),
        (
            "bad-affinity",
            json!({"service": {"name": SERVICE, "port": PORT, "sessionAffinity": "Cookie"}}),
        ),
        (
            "grace-too-short",
            json!({"terminationGracePeriodSeconds": 19}),
        ),
        (
            "grace-too-short-for-timeout",
            json!({"terminationGracePeriodSeconds": 30, "analyser": {"sessionTimeout": 30}}),
        ),
        (
            "pdb-max-unavailable-zero",
            json!({"podDisruptionBudget": {"enabled": true, "maxUnavailable": 0}}),
        ),
    ];
    for r in render_cases(&cases) {
        assert!(
            r.error.is_some(),
            "values case {:?} should be rejected, but rendered",
            r.name
        );
    }
    // The limits themselves render: preStop 5 + session timeout 10 + 5, with a shutdown
    // deadline that fits (5 + 10 + 5); and 5 + the default shutdown timeout 20 + 5.
    render_one(
        "grace-at-limit",
        json!({"terminationGracePeriodSeconds": 20, "analyser": {"shutdownTimeout": 10}}),
    )
    .expect_ok();
    render_one(
        "grace-at-shutdown-limit",
        json!({"terminationGracePeriodSeconds": 30}),
    )
    .expect_ok();
    assert!(
        render_one(
            "grace-before-the-shutdown-deadline",
            json!({"terminationGracePeriodSeconds": 29}),
        )
        .error
        .is_some(),
        "a grace period ending before the analyser's shutdown deadline is rejected"
    );
}

/// The text of the chart's templates for `values`, without Helm-only labels, one document per
/// object, in the order of `templates`.
fn plain_text_for(rendered: &Rendered, templates: &[&str], header: &str) -> String {
    let mut out = String::from(header);
    for t in templates {
        let (_, text) = rendered
            .manifests
            .iter()
            .find(|(k, _)| k.ends_with(&format!("templates/{t}")))
            .unwrap_or_else(|| panic!("the chart has no {t}"));
        out.push_str("---\n");
        for line in text.trim_start().lines() {
            let trimmed = line.trim_start();
            if HELM_ONLY_LABELS
                .iter()
                .any(|l| trimmed.starts_with(&format!("{l}:")))
            {
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn tls_header(values: &str, what: &str) -> String {
    format!(
        "# Generated from the Helm chart deploy/helm/dnstap-analyser (release dnstap-analyser in\n\
         # kube-system, values {values}): {what}\n\
         # tests/deploy.rs checks that both stay equal. Do not edit: change the chart, then run\n\
         #   {BLESS_TLS_ENV}=1 cargo test --release --test deploy plain_tls\n\
         # Guide: docs/kubernetes.md, section 6.4.\n"
    )
}

#[test]
fn plain_tls_manifests_equal_the_chart() {
    let rendered = render_cases(&[
        ("secret", tls_secret_values()),
        ("cert-manager", tls_cert_manager_values()),
    ]);
    let dir = root().join(TLS_DIR);
    let bless = std::env::var(BLESS_TLS_ENV).is_ok_and(|v| v == "1");
    let files = [
        (
            &rendered[0],
            "dnstap-analyser.yaml",
            vec!["serviceaccount.yaml", "service.yaml", "deployment.yaml", "networkpolicy.yaml"],
            tls_header(
                "tls.enabled=true, tls.existingSecret=dnstap-analyser-tls",
                "the plain manifests\n# with TLS on, for clusters without Helm. The Secret dnstap-analyser-tls \
                 (tls.crt, tls.key, ca.crt)\n# must exist: create it, or let cert-manager write it \
                 (certificate.yaml).",
            ),
        ),
        (
            &rendered[1],
            "certificate.yaml",
            vec!["certificate.yaml"],
            tls_header(
                "tls.certManager.enabled=true, issuerRef.name=dnstap-analyser-ca",
                "the cert-manager\n# Certificate that writes the Secret dnstap-analyser-tls. Add the \
                 Service's ClusterIP after applying\n# (docs/kubernetes.md 6.4, step 2): \
                 kubectl -n kube-system patch certificate dnstap-analyser ...",
            ),
        ),
    ];
    for (r, file, templates, header) in &files {
        r.expect_ok();
        let path = dir.join(file);
        if bless {
            fs::create_dir_all(&dir).unwrap();
            fs::write(&path, plain_text_for(r, templates, header)).unwrap();
        }
        let chart: BTreeMap<(String, String), Json> = r
            .objects()
            .into_iter()
            .filter(|o| {
                templates.iter().any(|t| {
                    let kind = kind_name(o).0.to_lowercase();
                    t.trim_end_matches(".yaml") == kind
                })
            })
            .map(|o| (kind_name(&o), strip_helm_labels(o)))
            .collect();
        let plain: BTreeMap<(String, String), Json> = yaml_docs(&read(&path), file)
            .iter()
            .map(|y| {
                let o = to_json(y);
                (kind_name(&o), o)
            })
            .collect();
        assert_eq!(chart.len(), templates.len(), "{file}: objects of the chart");
        assert_eq!(
            plain, chart,
            "{TLS_DIR}/{file} differs from the chart; regenerate it with \
             {BLESS_TLS_ENV}=1 cargo test --release --test deploy plain_tls"
        );
    }
    let plain = yaml_docs(&read(&dir.join("dnstap-analyser.yaml")), "tls manifest")
        .iter()
        .map(to_json)
        .collect::<Vec<_>>();
    check_tls_pod(&plain, TLS_SECRET, TLS_MOUNT, false, "plain TLS manifests");
    kubernetes_validate(&[dir.join("dnstap-analyser.yaml")], plain.len());
    // One plain Deployment fits both: cert-manager writes the Secret the manifest mounts.
    let strip = |objs: Vec<Json>| strip_helm_labels(find(&objs, "Deployment").clone());
    assert_eq!(
        strip(rendered[0].objects()),
        strip(rendered[1].objects()),
        "the Deployment must not depend on where the Secret comes from"
    );
    let cert = yaml_docs(&read(&dir.join("certificate.yaml")), "certificate.yaml");
    check_certificate(&to_json(&cert[0]), "plain certificate.yaml");
    // The plain TLS manifests differ from the plaintext ones only in TLS.
    let base: BTreeSet<(String, String)> = plain_objects().iter().map(kind_name).collect();
    let tls: BTreeSet<(String, String)> = plain.iter().map(kind_name).collect();
    assert_eq!(
        base, tls,
        "same objects as deploy/kubernetes/dnstap-analyser.yaml"
    );
}

#[test]
fn ca_issuer_is_a_valid_cert_manager_chain() {
    let path = root().join(TLS_DIR).join("ca-issuer.yaml");
    let objs: Vec<Json> = yaml_docs(&read(&path), "ca-issuer.yaml")
        .iter()
        .map(to_json)
        .collect();
    let kinds: Vec<(String, String)> = objs.iter().map(kind_name).collect();
    assert_eq!(
        kinds,
        [
            ("Issuer", "dnstap-analyser-selfsigned"),
            ("Certificate", "dnstap-analyser-ca"),
            ("Issuer", CA_ISSUER),
        ]
        .map(|(k, n)| (k.to_string(), n.to_string()))
    );
    check_issuer(&objs[0], "self-signed Issuer");
    assert_eq!(objs[0]["spec"], json!({"selfSigned": {}}));
    check_certificate(&objs[1], "CA Certificate");
    assert_eq!(objs[1]["spec"]["isCA"], true);
    assert_eq!(
        objs[1]["spec"]["issuerRef"]["name"], objs[0]["metadata"]["name"],
        "the CA is signed by the self-signed Issuer"
    );
    assert_eq!(objs[1]["spec"]["privateKey"]["rotationPolicy"], "Never");
    check_issuer(&objs[2], "CA Issuer");
    assert_eq!(
        objs[2]["spec"]["ca"]["secretName"], objs[1]["spec"]["secretName"],
        "the CA Issuer signs with the CA Certificate's Secret"
    );
    // The analyser's Certificate (plain and chart) uses this Issuer.
    let cert = yaml_docs(
        &read(&root().join(TLS_DIR).join("certificate.yaml")),
        "cert",
    );
    assert_eq!(to_json(&cert[0])["spec"]["issuerRef"]["name"], CA_ISSUER);

    // The structural check can fail: a misspelt field and a bad usage are caught.
    for (field, value) in [
        ("dnsName", json!(["a"])),
        ("usages", json!(["server-auth"])),
    ] {
        let mut bad = objs[1].clone();
        bad["spec"][field] = value;
        let caught = std::panic::catch_unwind(|| check_certificate(&bad, "bad"));
        assert!(caught.is_err(), "check_certificate accepted spec.{field}");
    }
}

#[test]
fn service_keeps_each_coredns_pod_on_one_replica() {
    let cases: Vec<(&str, Json)> = vec![
        ("defaults", json!({})),
        (
            "replicas",
            json!({"replicaCount": 3, "podDisruptionBudget": {"enabled": true}}),
        ),
        (
            "min-available",
            json!({"replicaCount": 3, "podDisruptionBudget": {"enabled": true, "minAvailable": 2}}),
        ),
        (
            "no-affinity",
            json!({"service": {"name": SERVICE, "port": PORT, "sessionAffinity": "None"}}),
        ),
    ];
    let rendered = render_cases(&cases);
    let dir = scratch_dir("replicas");
    let by_name: BTreeMap<&str, &Rendered> = rendered
        .iter()
        .map(|r| (r.name.as_str(), r.expect_ok()))
        .collect();
    for r in &rendered {
        kubernetes_validate(&r.write_to(&dir), r.objects().len());
    }
    let affinity = json!({"clientIP": {"timeoutSeconds": 10800}});
    for (what, objs) in [
        ("chart defaults", by_name["defaults"].objects()),
        ("plain manifests", plain_objects()),
    ] {
        let svc = find(&objs, "Service");
        assert_eq!(svc["spec"]["sessionAffinity"], "ClientIP", "{what}");
        assert_eq!(svc["spec"]["sessionAffinityConfig"], affinity, "{what}");
    }

    let objs = by_name["replicas"].objects();
    assert_eq!(find(&objs, "Deployment")["spec"]["replicas"], 3);
    let pdb = find(&objs, "PodDisruptionBudget");
    assert_eq!(
        pdb["spec"]["maxUnavailable"], 1,
        "one replica at a time, whatever replicaCount is"
    );
    assert!(pdb["spec"]["minAvailable"].is_null(), "{pdb}");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        find(&objs, "Deployment")["spec"]["selector"]["matchLabels"]
    );
    let notes = by_name["replicas"].notes();
    assert!(
        notes.contains("logs -l app.kubernetes.io/name=dnstap-analyser --prefix"),
        "{notes}"
    );
    assert!(!notes.contains("WARNING"), "{notes}");

    let objs = by_name["min-available"].objects();
    let pdb = find(&objs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 2);
    assert!(
        pdb["spec"]["maxUnavailable"].is_null(),
        "only one of the two: {pdb}"
    );

    let objs = by_name["no-affinity"].objects();
    let svc = find(&objs, "Service");
    assert!(svc["spec"]["sessionAffinity"].is_null(), "{svc}");
    assert!(svc["spec"]["sessionAffinityConfig"].is_null(), "{svc}");
}

/// `--session-timeout=N` of the args, in seconds.
fn session_timeout_arg(objs: &[Json]) -> i64 {
    args_of(objs)
        .iter()
        .find_map(|a| a.strip_prefix("--session-timeout="))
        .map(|v| v.trim_end_matches('s').parse().expect("seconds"))
        .unwrap_or(10)
}

#[test]
fn stopping_pod_drains_within_its_grace_period() {
    let cases: Vec<(&str, Json)> = vec![
        ("defaults", json!({})),
        ("long-timeout", json!({"analyser": {"sessionTimeout": 30}})),
        ("no-sleep", json!({"preStopSleepSeconds": 0})),
        (
            "explicit",
            json!({"terminationGracePeriodSeconds": 90, "preStopSleepSeconds": 15}),
        ),
    ];
    let rendered = render_cases(&cases);
    let by_name: BTreeMap<&str, Vec<Json>> = rendered
        .iter()
        .map(|r| (r.name.as_str(), r.expect_ok().objects()))
        .collect();
    let drain = |objs: &[Json], what: &str| -> (i64, i64) {
        let dep = find(objs, "Deployment");
        assert_eq!(
            dep["spec"]["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
            "{what}: the new pod is ready before the old one stops"
        );
        let c = container(objs);
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{what}");
        let sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_i64()
            .unwrap_or(0);
        if sleep == 0 {
            assert!(c["lifecycle"].is_null(), "{what}: no empty hook");
        } else {
            assert_eq!(
                c["lifecycle"],
                json!({"preStop": {"sleep": {"seconds": sleep}}}),
                "{what}: a kubelet sleep, no exec (the image has no shell)"
            );
        }
        let grace = at(dep, "spec.template.spec.terminationGracePeriodSeconds")
            .as_i64()
            .expect("terminationGracePeriodSeconds");
        let timeout = session_timeout_arg(objs);
        assert!(
            grace >= sleep + timeout + 5,
            "{what}: grace {grace} s < preStop {sleep} + session timeout {timeout} + 5"
        );
        (sleep, grace)
    };
    assert_eq!(drain(&by_name["defaults"], "chart defaults"), (5, 30));
    assert_eq!(drain(&plain_objects(), "plain manifests"), (5, 30));
    assert_eq!(
        drain(&by_name["long-timeout"], "sessionTimeout 30"),
        (5, 50)
    );
    assert_eq!(
        drain(&by_name["no-sleep"], "preStopSleepSeconds 0"),
        (0, 25)
    );
    assert_eq!(drain(&by_name["explicit"], "explicit"), (15, 90));
    let dir = scratch_dir("drain");
    for r in &rendered {
        kubernetes_validate(&r.write_to(&dir), r.objects().len());
    }
}

/// The shell lines of the openssl recipe in docs/kubernetes.md 6.4 (the code block that makes
/// the CA), without the kubectl line.
fn documented_openssl_recipe() -> Vec<String> {
    let doc = read(&root().join("docs/kubernetes.md"));
    let block = doc
        .split("```")
        .find(|b| b.contains("openssl req -x509"))
        .expect("docs/kubernetes.md has the openssl recipe");
    let lines: Vec<String> = block
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("openssl ") || l.starts_with("printf "))
        .map(str::to_string)
        .collect();
    assert!(lines.len() >= 4, "recipe too short: {lines:?}");
    lines
}

fn run_recipe(dir: &Path, ip: &str) {
    let openssl = require_binary("openssl", "openssl");
    let script = documented_openssl_recipe().join("\n");
    let out = run_to_end(
        Command::new("sh")
            .args(["-e", "-c", &script])
            .current_dir(dir)
            .env("DNSTAP_IP", ip)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    openssl.parent().unwrap().display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            ),
        None,
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "the openssl recipe of docs/kubernetes.md failed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `openssl s_client` verifying the analyser's certificate the way CoreDNS does: against the
/// CA, for the IP address of its dnstap line.
fn tls_client_verifies(port: u16, ca: &Path, ip: &str) -> (bool, String) {
    let out = run_to_end(
        Command::new(require_binary("openssl", "openssl"))
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-CAfile",
            ])
            .arg(ca)
            .args(["-verify_ip", ip, "-verify_return_error", "-brief"]),
        Some(""),
        Duration::from_secs(30),
    );
    (
        out.status.success(),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

#[test]
fn chart_tls_args_serve_the_documented_certificate() {
    let dir = TempDir::new("deploy-tls-serve");
    run_recipe(dir.path(), "127.0.0.1");
    let verify = |ip: &str| {
        run_to_end(
            Command::new(require_binary("openssl", "openssl"))
                .current_dir(dir.path())
                .args(["verify", "-CAfile", "ca.crt", "-verify_ip", ip, "tls.crt"]),
            None,
            Duration::from_secs(30),
        )
        .status
        .success()
    };
    assert!(
        verify("127.0.0.1"),
        "the recipe's certificate must name its IP"
    );
    assert!(!verify("10.96.99.99"), "the check must fail for another IP");

    // The chart's TLS args, pointed at the recipe's files through tls.mountPath, run by the
    // real binary in serve mode on a free port.
    let (analyser, port) = Analyser::serve_on_free_port(|port| {
        let mut values = tls_secret_values();
        values["tls"]["mountPath"] = json!(dir.path().display().to_string());
        values["containerPort"] = json!(port);
        values["analyser"] = json!({"format": null});
        let objs = render_one("serve", values).expect_ok().objects();
        let args: Vec<String> = args_of(&objs)
            .into_iter()
            .map(|a| a.replace("tls://0.0.0.0:", "tls://127.0.0.1:"))
            .collect();
        assert!(
            args.contains(&format!("--listen=tls://127.0.0.1:{port}")),
            "{args:?}"
        );
        (Listen::Tcp(0), args)
    });
    // It logged every listener bound and listening, the chart's TLS port among them.
    assert_eq!(analyser.bound_port("tls"), Some(port));
    let (ok, log) = tls_client_verifies(port, &dir.join("ca.crt"), "127.0.0.1");
    assert!(
        ok,
        "a client checking like CoreDNS refused the certificate:\n{log}"
    );
    assert!(
        log.contains("Verification: OK") && log.contains("TLSv1.3"),
        "{log}"
    );
    let (ok, log) = tls_client_verifies(port, &dir.join("ca.crt"), "10.96.99.99");
    assert!(
        !ok,
        "the client must refuse a certificate without its IP:\n{log}"
    );
    let out = analyser.stop();
    assert!(
        out.summary["tls"]["handshakes"].as_u64().unwrap_or(0) >= 1,
        "the analyser counted no TLS handshake: {}",
        out.summary
    );
}

#[test]
fn coredns_tls_snippets_match_the_analyser() {
    let coredns = root().join("deploy/coredns");
    let code = |file: &str| -> Vec<String> {
        read(&coredns.join(file))
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(str::to_string)
            .collect()
    };
    let plain = code("Corefile.dnstap.example");
    let tls = code("Corefile.dnstap-tls.example");
    let expected: Vec<String> = plain
        .iter()
        .map(|l| l.replace("dnstap tcp://", "dnstap tls://"))
        .collect();
    assert_eq!(
        tls, expected,
        "the TLS example differs from the plaintext one only in the scheme"
    );
    assert!(
        tls.iter()
            .any(|l| l.trim() == format!("dnstap tls://10.96.12.34:{PORT} full")),
        "{tls:?}"
    );

    // The CoreDNS patch: merged into a kubeadm-like CoreDNS Deployment the way a strategic
    // merge patch does (containers, env and volumes by name), it must validate, add the CA
    // directory to SSL_CERT_DIR while keeping /etc/ssl/certs, and mount an optional ConfigMap
    // with only ca.crt (never the analyser's Secret and its key).
    let patch = to_json(
        &serde_yaml::from_str(&read(&coredns.join("coredns-dnstap-ca.patch.yaml"))).unwrap(),
    );
    let pspec = at(&patch, "spec.template.spec");
    let pc = &pspec["containers"][0];
    assert_eq!(pc["name"], "coredns");
    let cert_dir = pc["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "SSL_CERT_DIR")
        .expect("SSL_CERT_DIR")["value"]
        .as_str()
        .unwrap()
        .to_string();
    let dirs: Vec<&str> = cert_dir.split(':').collect();
    assert!(dirs.contains(&"/etc/ssl/certs"), "{cert_dir}");
    let mount = &pc["volumeMounts"][0];
    assert!(
        dirs.contains(&mount["mountPath"].as_str().unwrap()),
        "{cert_dir}"
    );
    assert_eq!(mount["readOnly"], true);
    assert!(mount["subPath"].is_null());
    let vol = &pspec["volumes"][0];
    assert_eq!(vol["name"], mount["name"]);
    assert!(
        vol["secret"].is_null(),
        "the analyser's key must not reach CoreDNS"
    );
    assert_eq!(
        vol["configMap"]["optional"], true,
        "CoreDNS must start without it"
    );
    assert_eq!(vol["configMap"]["items"][0]["key"], "ca.crt");

    let mut coredns_dep = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "coredns", "namespace": NAMESPACE, "labels": {"k8s-app": "kube-dns"}},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"k8s-app": "kube-dns"}},
            "template": {"metadata": {"labels": {"k8s-app": "kube-dns"}}, "spec": {
                "priorityClassName": "system-cluster-critical", "serviceAccountName": "coredns",
                "dnsPolicy": "Default",
                "containers": [{"name": "coredns", "image": "registry.k8s.io/coredns/coredns:v1.11.3",
                    "args": ["-conf", "/etc/coredns/Corefile"],
                    "volumeMounts": [{"name": "config-volume", "mountPath": "/etc/coredns", "readOnly": true}],
                    "ports": [{"containerPort": 53, "name": "dns", "protocol": "UDP"}]}],
                "volumes": [{"name": "config-volume", "configMap": {"name": "coredns",
                    "items": [{"key": "Corefile", "path": "Corefile"}]}}]}}}
    });
    {
        let spec = &mut coredns_dep["spec"]["template"]["spec"];
        let c = &mut spec["containers"][0];
        c["env"] = pc["env"].clone();
        c["volumeMounts"]
            .as_array_mut()
            .unwrap()
            .extend(pc["volumeMounts"].as_array().unwrap().iter().cloned());
        spec["volumes"]
            .as_array_mut()
            .unwrap()
            .extend(pspec["volumes"].as_array().unwrap().iter().cloned());
    }
    let dir = scratch_dir("coredns-patch");
    let file = dir.join("coredns.yaml");
    fs::write(&file, serde_yaml::to_string(&coredns_dep).unwrap()).unwrap();
    kubernetes_validate(&[file], 1);
    // Only the paths a strategic merge patch needs: nothing else to overwrite in CoreDNS.
    keys_within(&patch, &["spec"], "patch");
    keys_within(&patch["spec"], &["template"], "patch");
    keys_within(pspec, &["containers", "volumes"], "patch");
    keys_within(pc, &["name", "env", "volumeMounts"], "patch");
}

/// CI runs the README's test command, word for word, and it does not stop at the first failing
/// test binary (one flake must not hide the rest).
#[test]
fn ci_runs_the_readme_test_command() {
    let readme = fs::read_to_string(root().join("README.md")).unwrap();
    let command = readme
        .lines()
        .find_map(|l| l.strip_prefix(".ci/install-deps && "))
        .expect("README: the `.ci/install-deps && cargo test ...` line");
    assert!(command.starts_with("cargo test "), "{command}");
    assert!(command.contains("--no-fail-fast"), "{command}");
    let ci = fs::read_to_string(root().join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == command),
        ".ci/run does not run the README's `{command}`:\n{ci}"
    );
}

/// In a cluster the analyser runs all day: the chart's default log is every Failed session with
/// its messages and 1 % of the Succeeded ones without (docs/kubernetes.md, "Log volume").
#[test]
fn chart_defaults_log_quietly() {
    let args = args_of(&render_one("quiet", json!({})).expect_ok().objects());
    for flag in ["--log=all", "--sample-succeeded=0.01", "--messages=failed"] {
        assert!(args.iter().any(|a| a == flag), "{flag} not in {args:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The metrics port's web config (--metrics-web-config) and --no-top

/// The web config and metrics certificate Secrets are mounted whole and read-only, the args
/// point at the file, the probes switch to HTTPS (the kubelet does not verify; the analyser
/// asks the probes for no credentials), and the ServiceMonitor scrapes https with the given
/// basicAuth and tlsConfig.
#[test]
fn chart_metrics_web_config_mounts_the_secrets_and_secures_the_scrape() {
    let basic_auth = json!({"username": {"name": "scrape", "key": "username"},
                            "password": {"name": "scrape", "key": "password"}});
    let tls_config = json!({"ca": {"secret": {"name": "metrics-tls", "key": "ca.crt"}},
                            "serverName": "dnstap-analyser"});
    let values = json!({
        "metrics": {"top": false, "webConfig": {"secretName": "metrics-web", "tls": true,
                                                "tlsSecretName": "metrics-tls"}},
        "monitoring": {"serviceMonitor": {"enabled": true, "basicAuth": basic_auth,
                                          "tlsConfig": tls_config}}
    });
    let rendered = render_one("metrics-web-config", values);
    let objs = rendered.expect_ok().objects();
    let core: Vec<Json> = objs
        .iter()
        .filter(|o| o["apiVersion"] != OPERATOR_API)
        .cloned()
        .collect();
    let dir = scratch_dir("metrics-web");
    kubernetes_validate(&write_core_objects(&objs, &dir, "metrics-web"), core.len());

    let args = args_of(&objs);
    for want in [
        "--metrics-web-config=/etc/dnstap-analyser/metrics-web/web-config.yml",
        "--no-top",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} not in {args:?}");
    }
    let c = container(&objs);
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    for (name, path) in [
        ("metrics-web-config", "/etc/dnstap-analyser/metrics-web"),
        ("metrics-tls", "/etc/dnstap-analyser/metrics-tls"),
    ] {
        let m = mounts
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no mount {name}: {mounts:?}"));
        assert_eq!(m["mountPath"], path);
        assert_eq!(m["readOnly"], true);
        assert!(
            m["subPath"].is_null(),
            "whole Secrets: rotation reaches them"
        );
    }
    let pod = pod_spec(&objs);
    let volumes = pod["volumes"].as_array().expect("volumes");
    for (name, secret) in [
        ("metrics-web-config", "metrics-web"),
        ("metrics-tls", "metrics-tls"),
    ] {
        let v = volumes.iter().find(|v| v["name"] == name).unwrap();
        assert_eq!(v["secret"]["secretName"], secret);
    }
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            c[probe]["httpGet"]["scheme"], "HTTPS",
            "{probe}: {}",
            c[probe]
        );
    }
    let annotations = &at(find(&objs, "Deployment"), "spec.template.metadata")["annotations"];
    assert_eq!(annotations["prometheus.io/scheme"], "https");
    let endpoint = &find(&objs, "ServiceMonitor")["spec"]["endpoints"][0];
    assert_eq!(endpoint["scheme"], "https");
    assert_eq!(endpoint["basicAuth"], basic_auth);
    assert_eq!(endpoint["tlsConfig"], tls_config);

    // By default: plain HTTP probes, no mounts, /top on.
    let defaults = render_one("defaults", json!({}));
    let objs = defaults.expect_ok().objects();
    let c = container(&objs);
    assert!(c["livenessProbe"]["httpGet"]["scheme"].is_null());
    let args = args_of(&objs);
    assert!(!args
        .iter()
        .any(|a| a.starts_with("--metrics-web-config") || a == "--no-top"));

    // Contradictions are refused.
    let bad = [
        (
            "tls-without-web-config",
            json!({"metrics": {"webConfig": {"tls": true}}}),
        ),
        (
            "web-config-without-metrics",
            json!({"metrics": {"enabled": false, "webConfig": {"secretName": "metrics-web"}}}),
        ),
        ("typo", json!({"metrics": {"webConfig": {"secret": "x"}}})),
    ];
    for r in render_cases(&bad) {
        assert!(r.error.is_some(), "values case {:?} rendered", r.name);
    }
}
