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
use support::{analyser_bin, require_venv_tool, run_to_end, text};

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

fn scratch_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("deploy-{test}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
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
fn flag_cases() -> Vec<(&'static str, Json, Vec<&'static str>)> {
    vec![
        (
            "listen",
            json!(["tcp://0.0.0.0:6001", "tcp://[::]:6001"]),
            vec!["--listen=tcp://0.0.0.0:6001", "--listen=tcp://[::]:6001"],
        ),
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
        (
            "log",
            json!(["failed", "sampleloss"]),
            vec!["--log=failed,sampleloss"],
        ),
        ("format", json!("text"), vec!["--format=text"]),
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
            "log": ["failed", "sampleloss"], "format": "text"
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
            .any(|a| a == &format!("--listen=tcp://0.0.0.0:{PORT}")),
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
        let n = args
            .iter()
            .filter(|a| a.starts_with(&format!("--{flag}")))
            .count();
        assert_eq!(n, expected.len(), "--{flag} appears {n} times in {args:?}");
        if *flag != "listen" {
            let args = args_of(
                &by_name[format!("null-{flag}").as_str()]
                    .expect_ok()
                    .objects(),
            );
            assert!(
                !args.iter().any(|a| a.starts_with(&format!("--{flag}"))),
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
    let rendered = render_cases(&[
        ("defaults", json!({})),
        ("all-options", all_options_values()),
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
        df.contains("cargo build --release --locked"),
        "release build from Cargo.lock"
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

/// Writes the objects that Kubernetes' own schemas describe (not the operator's CRDs) to `dir`.
fn write_core_objects(objs: &[Json], dir: &Path, case: &str) -> Vec<PathBuf> {
    objs.iter()
        .filter(|o| o["apiVersion"] != OPERATOR_API)
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
