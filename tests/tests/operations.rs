//! Operating tether, end to end with the real binaries: the generated agent manifest (valid
//! offline, and an agent started from its values connects), `tether-proxy check` passing and
//! naming the failing step, `--publish-address auto` against a Service whose LoadBalancer
//! address arrives late, the proxy's SIGTERM drain, and the metrics a dashboard reads.
//!
//! Schema validation uses `kubernetes-validate` (PyPI; it bundles the schemas and needs no
//! network). Where it is missing the validation is skipped with a message, except under CI
//! (`CI=true`), where its absence fails the test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};
use tether_tests::fixture::{Fixture, FixtureOptions};
use tether_tests::harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(15);

/// Writes the fixture's CA and a ServiceAccount-like token for an agent's API server access;
/// returns the agent flags that use them.
fn upstream_credentials(dir: &Path, fixture: &Fixture) -> Vec<String> {
    let ca = dir.join("member-ca.crt");
    let token = dir.join("member-sa.token");
    std::fs::write(&ca, fixture.ca_pem()).unwrap();
    std::fs::write(&token, "agent-service-account-token").unwrap();
    vec![
        "--upstream-ca-file".into(),
        ca.display().to_string(),
        "--upstream-token-file".into(),
        token.display().to_string(),
    ]
}

/// Proxy + fixture + an agent for `local` with API server credentials.
struct Env {
    fixture: Fixture,
    proxy: Proxy,
    agent: Option<Agent>,
}

impl Env {
    async fn start() -> Env {
        let fixture = Fixture::start(FixtureOptions::default()).await.unwrap();
        let proxy = Proxy::start(ProxyOptions::default()).await;
        let creds = upstream_credentials(proxy.dir.path(), &fixture);
        let args: Vec<&str> = creds.iter().map(String::as_str).collect();
        let agent = Agent::start(&proxy, "local", &fixture.url(), &args);
        assert!(proxy.wait_agents("local", 1, WAIT).await, "{}", agent.log());
        Env {
            fixture,
            proxy,
            agent: Some(agent),
        }
    }
}

/// Runs `tether-proxy ARGS`.
fn tether_proxy(args: &[&str]) -> Output {
    Command::new(bin("tether-proxy"))
        .args(args)
        .output()
        .expect("running tether-proxy")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `tether-proxy check --admin-addr ... ARGS`: (exit code, stdout, stderr).
fn check(proxy: &Proxy, args: &[&str]) -> (i32, String, String) {
    let admin = format!("127.0.0.1:{}", proxy.admin_port);
    let mut all = vec!["check", "--admin-addr", &admin];
    all.extend_from_slice(args);
    let out = tether_proxy(&all);
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

/// The YAML documents of a multi-document stream (empty ones left out).
fn yaml_documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The `kubernetes-validate` command: the script, or the module under `python3`.
fn validator() -> Option<Command> {
    let works = |mut c: Command| {
        c.arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if works(Command::new("kubernetes-validate")) {
        return Some(Command::new("kubernetes-validate"));
    }
    let module = || {
        let mut c = Command::new("python3");
        c.args(["-m", "kubernetes_validate"]);
        c
    };
    works(module()).then(module)
}

/// Validates `file` against the Kubernetes schemas offline with `kubernetes-validate`.
/// Returns false (after saying so) when the tool is missing outside CI.
fn validate_offline(file: &Path) -> bool {
    let Some(mut cmd) = validator() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "kubernetes-validate is required in CI: pip install kubernetes-validate"
        );
        eprintln!(
            "SKIPPED schema validation of {}: kubernetes-validate is not installed \
             (pip install kubernetes-validate)",
            file.display()
        );
        return false;
    };
    let out = cmd
        .arg("--strict")
        .arg("--no-warn")
        .arg(file)
        .output()
        .expect("running kubernetes-validate");
    assert!(
        out.status.success(),
        "{} does not validate:\n{}{}",
        file.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
    true
}

/// The workspace root (tests/ is one level down).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_manifest_validates_offline_and_an_agent_started_from_it_connects() {
    let fixture = Fixture::start(FixtureOptions::default()).await.unwrap();
    let proxy = Proxy::start(ProxyOptions::default()).await;
    let state = proxy.state_dir.display().to_string();
    let admin = format!("127.0.0.1:{}", proxy.admin_port);
    let out = tether_proxy(&[
        "manifest",
        "--state-dir",
        &state,
        "--admin-addr",
        &admin,
        "--cluster",
        "member-a",
        "--replicas",
        "2",
        "--labels",
        "env=test,team=ops",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let manifest = text(&out.stdout);
    let file = proxy.dir.path().join("member-a.yaml");
    std::fs::write(&file, &manifest).unwrap();
    validate_offline(&file);

    let docs = yaml_documents(&manifest);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for k in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Secret",
        "Deployment",
    ] {
        assert!(kinds.contains(&k), "{k} missing: {kinds:?}");
    }
    // Least privilege: impersonate, and the kube-system namespace by name; nothing else.
    let role = find_kind(&docs, "ClusterRole")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "tether-agent")
        .expect("agent ClusterRole");
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": [""], "resources": ["users", "groups"], "verbs": ["impersonate"]},
            {"apiGroups": [""], "resources": ["namespaces"], "resourceNames": ["kube-system"], "verbs": ["get"]},
        ])
    );
    assert!(
        manifest.contains("--identity agent"),
        "the agent-identity option is documented"
    );

    // The Secret holds the proxy's CA and a token; the Deployment dials the publish address.
    let secret = find_kind(&docs, "Secret")[0];
    let b64 = |k: &str| {
        let raw = secret["data"][k]
            .as_str()
            .unwrap_or_else(|| panic!("secret has {k}"));
        text(
            &base64::engine::general_purpose::STANDARD
                .decode(raw)
                .unwrap(),
        )
    };
    assert_eq!(b64("ca.crt"), proxy.ca_pem());
    let token = b64("token");
    let dep = find_kind(&docs, "Deployment")[0];
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(dep["spec"]["replicas"], 2);
    assert!(
        !pod["affinity"]["podAntiAffinity"].is_null(),
        "anti-affinity with 2 replicas"
    );
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert!(!c["resources"]["limits"]["memory"].is_null());
    let args: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    // Generated manifests dial auto:// (QUIC, falling back to TLS) at the publish address.
    let publish = format!("--proxy=auto://127.0.0.1:{}", proxy.agent_port);
    assert!(args.contains(&publish), "{args:?}");
    assert!(args.contains(&"--label=team=ops".to_string()), "{args:?}");

    // Start a real agent from those values (files where the pod would mount them).
    let token_file = proxy.dir.path().join("from-manifest.token");
    let ca_file = proxy.dir.path().join("from-manifest-ca.crt");
    std::fs::write(&token_file, &token).unwrap();
    std::fs::write(&ca_file, b64("ca.crt")).unwrap();
    let mut cmd = Command::new(bin("tether-agent"));
    for a in &args {
        let a = a
            .replace("/etc/tether/token", token_file.to_str().unwrap())
            .replace("/etc/tether/ca.crt", ca_file.to_str().unwrap());
        cmd.arg(a);
    }
    cmd.arg("--upstream").arg(fixture.url());
    cmd.args(upstream_credentials(proxy.dir.path(), &fixture));
    let agent = Process::spawn(&mut cmd, proxy.dir.path().join("manifest-agent.log"));
    assert!(
        proxy.wait_agents("member-a", 1, WAIT).await,
        "{}",
        agent.log()
    );
    let (code, stdout, stderr) = check(&proxy, &["--cluster", "member-a"]);
    assert_eq!(code, 0, "{stdout}{stderr}");

    // Without a publish address to ask for, the command says what to do.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let out = tether_proxy(&[
        "manifest",
        "--state-dir",
        &state,
        "--admin-addr",
        &nowhere,
        "--cluster",
        "b",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--publish-address"),
        "{}",
        text(&out.stderr)
    );
    // An explicit address needs no proxy.
    let out = tether_proxy(&[
        "manifest",
        "--state-dir",
        &state,
        "--admin-addr",
        &nowhere,
        "--cluster",
        "b",
        "--publish-address",
        "tls://proxy.example.com:443",
        "--transport",
        "auto",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("--proxy=auto://proxy.example.com:443"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_then_names_each_failing_step() {
    let mut env = Env::start().await;
    let p = &env.proxy;

    let (code, out, err) = check(p, &["--cluster", "local"]);
    assert_eq!(code, 0, "{out}{err}");
    for step in [
        "agent connected",
        "API server reachable",
        "API server /version",
        "list namespaces",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("[ok]") && l.contains(step)),
            "{step}:\n{out}"
        );
    }
    assert!(out.contains("v1.31.0"), "{out}");
    assert!(
        out.contains(&format!(
            "transport {}",
            Transport::default().session_name()
        )),
        "{out}"
    );
    // The check acted as tether:check, impersonated by the agent.
    let reqs = env.fixture.requests();
    let version = reqs
        .iter()
        .rev()
        .find(|r| r.path_only() == "/version")
        .expect("/version reached the fixture");
    assert_eq!(version.header("impersonate-user"), Some("tether:check"));

    // The JSON report.
    let (code, out, _) = check(p, &["--cluster", "local", "--json"]);
    assert_eq!(code, 0);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["passed"], true);
    assert_eq!(report["steps"].as_array().unwrap().len(), 4);

    // Listing namespaces forbidden: the last step fails, with the Status message and a hint.
    env.fixture.set_forbid_namespace_list(true);
    let (code, out, _) = check(p, &["--cluster", "local"]);
    assert_eq!(code, 1, "{out}");
    let fail = out
        .lines()
        .find(|l| l.starts_with("[FAIL]"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        fail.contains("list namespaces") && fail.contains("403"),
        "{out}"
    );
    assert!(out.contains("--skip-namespace-check"), "{out}");
    let (code, out, _) = check(p, &["--cluster", "local", "--skip-namespace-check"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().any(|l| l.starts_with("[skip]")), "{out}");
    // A namespace's pods can still be listed.
    let (code, out, _) = check(p, &["--cluster", "local", "--namespace", "default"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("list pods in namespace default"), "{out}");
    env.fixture.set_forbid_namespace_list(false);

    // A cluster that never connected.
    let (code, out, _) = check(p, &["--cluster", "nosuch"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("[FAIL] agent connected") && out.contains("not known"),
        "{out}"
    );
    assert!(out.contains("[--]"), "later steps are not run: {out}");

    // The upstream goes away: the agent is connected, its API server is not reachable.
    let Env {
        fixture,
        proxy,
        agent,
    } = &mut env;
    let fixture_addr = fixture.addr();
    drop(std::mem::replace(
        fixture,
        Fixture::start(FixtureOptions::default()).await.unwrap(),
    ));
    // The replacement listens elsewhere; wait until the old port refuses connections.
    let start = Instant::now();
    while std::net::TcpStream::connect(fixture_addr).is_ok() && start.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, out, _) = check(proxy, &["--cluster", "local"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[ok]   agent connected"), "{out}");
    let fail = out
        .lines()
        .find(|l| l.starts_with("[FAIL]"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        fail.contains("API server reachable") && fail.contains("could not connect"),
        "{out}"
    );

    // The agent goes away.
    agent.take().unwrap().process.kill();
    assert!(proxy.wait_agents("local", 0, WAIT).await);
    let (code, out, _) = check(proxy, &["--cluster", "local"]);
    assert_eq!(code, 1, "{out}");
    let fail = out
        .lines()
        .find(|l| l.starts_with("[FAIL]"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        fail.contains("agent connected") && fail.contains("disconnected since"),
        "{out}"
    );
    assert!(out.contains("logs deploy/tether-agent"), "{out}");
}

/// A Service of type LoadBalancer whose agent port is `port`, with the given ingress.
fn lb_service(port: u16, ingress: Value) -> Value {
    json!({
        "spec": {
            "type": "LoadBalancer",
            "ports": [
                {"name": "agent", "port": port, "targetPort": port, "nodePort": 31443, "protocol": "TCP"},
            ],
        },
        "status": {"loadBalancer": ingress},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_address_auto_waits_for_the_load_balancer_then_publishes_it() {
    let fixture = Fixture::start(FixtureOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (agent_port, front_port, admin_port) = (free_port(), free_port(), free_port());
    fixture.set_service(
        "tether-system",
        "tether-proxy-agent",
        Some(lb_service(agent_port, json!({}))),
    );
    let ca = dir.path().join("host-ca.crt");
    let token = dir.path().join("host.token");
    std::fs::write(&ca, fixture.ca_pem()).unwrap();
    std::fs::write(&token, "proxy-service-account-token").unwrap();
    let state = dir.path().join("state");
    let mut cmd = Command::new(bin("tether-proxy"));
    cmd.arg("serve")
        .arg("--state-dir")
        .arg(&state)
        .arg("--agent-addr")
        .arg(format!("127.0.0.1:{agent_port}"))
        .arg("--front-addr")
        .arg(format!("127.0.0.1:{front_port}"))
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{admin_port}"))
        .arg("--transports")
        .arg("tls")
        .arg("--publish-address")
        .arg("auto")
        .arg("--host-api-server")
        .arg(fixture.url())
        .arg("--host-api-ca-file")
        .arg(&ca)
        .arg("--host-api-token-file")
        .arg(&token)
        .arg("--publish-poll-interval")
        .arg("200ms")
        .env("POD_NAMESPACE", "tether-system");
    let mut proxy = Process::spawn(&mut cmd, dir.path().join("proxy.log"));

    // Not ready, saying why and naming the NodePort alternative.
    let start = Instant::now();
    let readyz = loop {
        if let Ok((503, body)) = http_get(admin_port, "/readyz") {
            if body.contains("waiting for a LoadBalancer") {
                break body;
            }
        }
        assert!(!proxy.has_exited(), "proxy exited:\n{}", proxy.log());
        assert!(
            start.elapsed() < WAIT,
            "no waiting /readyz:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(readyz.contains("NodePort 31443"), "{readyz}");
    assert!(
        readyz.contains("tether-system/tether-proxy-agent"),
        "{readyz}"
    );
    assert!(
        proxy.wait_for_log("no publish address yet", WAIT).await,
        "{}",
        proxy.log()
    );
    assert!(proxy.log().contains("31443"), "{}", proxy.log());
    let (_, publish) = http_get(admin_port, "/api/v1/publish-address").unwrap();
    let publish: Value = serde_json::from_str(&publish).unwrap();
    assert!(publish["publishAddress"].is_null(), "{publish}");
    // The proxy read its Service with its token.
    let read = fixture
        .requests()
        .into_iter()
        .find(|r| r.path_only() == "/api/v1/namespaces/tether-system/services/tether-proxy-agent")
        .expect("the proxy read its Service");
    assert_eq!(
        read.header("authorization"),
        Some("Bearer proxy-service-account-token")
    );

    // A manifest now is an error that says what to do.
    let admin = format!("127.0.0.1:{admin_port}");
    let state_s = state.display().to_string();
    let out = tether_proxy(&[
        "manifest",
        "--state-dir",
        &state_s,
        "--admin-addr",
        &admin,
        "--cluster",
        "edge",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("does not know its publish address yet") && err.contains("--publish-address"),
        "{err}"
    );

    // The LoadBalancer gets an address: published, ready, and the certificate covers it.
    fixture.set_service(
        "tether-system",
        "tether-proxy-agent",
        Some(lb_service(
            agent_port,
            json!({"ingress": [{"hostname": "lb.tether.test"}]}),
        )),
    );
    let start = Instant::now();
    while http_get(admin_port, "/readyz").map(|r| r.0).unwrap_or(0) != 200 {
        assert!(
            start.elapsed() < WAIT,
            "not ready after the ingress came:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, publish) = http_get(admin_port, "/api/v1/publish-address").unwrap();
    let publish: Value = serde_json::from_str(&publish).unwrap();
    let expected = format!("tls://lb.tether.test:{agent_port}");
    assert_eq!(publish["publishAddress"], expected.as_str());
    assert!(
        proxy.log().contains("publish address resolved"),
        "{}",
        proxy.log()
    );
    let out = tether_proxy(&[
        "manifest",
        "--state-dir",
        &state_s,
        "--admin-addr",
        &admin,
        "--cluster",
        "edge",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("--proxy=auto://lb.tether.test:{agent_port}")));

    // An agent that verifies the proxy as lb.tether.test (dialing loopback) connects.
    let token_file = dir.path().join("edge.token");
    let key = tether_proxy(&[
        "token",
        "agent",
        "--state-dir",
        &state_s,
        "--cluster",
        "edge",
    ]);
    std::fs::write(&token_file, text(&key.stdout).trim()).unwrap();
    let mut cmd = Command::new(bin("tether-agent"));
    cmd.arg("--proxy")
        .arg(format!("tls://127.0.0.1:{agent_port}"))
        .arg("--server-name")
        .arg("lb.tether.test")
        .arg("--cluster")
        .arg("edge")
        .arg("--token-file")
        .arg(&token_file)
        .arg("--ca-file")
        .arg(state.join("ca.crt"))
        .arg("--upstream")
        .arg(fixture.url());
    let agent = Process::spawn(&mut cmd, dir.path().join("agent.log"));
    let start = Instant::now();
    loop {
        let (_, body) = http_get(admin_port, "/api/v1/clusters").unwrap();
        let list: Vec<Value> = serde_json::from_str(&body).unwrap();
        if list
            .iter()
            .any(|c| c["name"] == "edge" && c["connected"] == true)
        {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "agent did not connect:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.signal("TERM");
    assert!(proxy.wait_exit(WAIT).await.is_some_and(|s| s.success()));
}

/// One HTTP/1.1 GET through the front with a client token.
async fn front_get(proxy: &Proxy, token: &str, path: &str) -> (u16, Bytes) {
    let auth = format!("Bearer {token}");
    proxy.front().get(path, &[("authorization", &auth)]).await
}

/// One sample of the Prometheus text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus / OpenMetrics text exposition strictly enough to catch a malformed
/// one: every sample belongs to a family with a `# TYPE`, names and label syntax are valid,
/// values are numbers, and an OpenMetrics body ends with `# EOF`.
fn parse_prometheus(body: &str) -> Vec<Sample> {
    fn valid_name(n: &str) -> bool {
        let mut chars = n.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(
        lines.last().copied(),
        Some("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    for line in &lines {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            match kw {
                "TYPE" => {
                    let t = parts.next().expect("TYPE has a type");
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "stateset",
                            "unknown",
                            "gaugehistogram"
                        ]
                        .contains(&t),
                        "bad type: {line}"
                    );
                    assert!(valid_name(name), "bad family name: {line}");
                    types.insert(name.to_string(), t.to_string());
                }
                "HELP" | "UNIT" => assert!(valid_name(name), "{line}"),
                "EOF" => {}
                _ => panic!("unknown comment: {line}"),
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => (&line[..i], &line[i..]),
            None => panic!("sample without value: {line}"),
        };
        assert!(valid_name(name), "bad metric name: {line}");
        let mut labels = BTreeMap::new();
        let rest = if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let mut end = None;
            loop {
                // key
                let mut key = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                let key = key.trim_start_matches(',').to_string();
                if key.is_empty() {
                    break;
                }
                assert!(valid_name(&key), "bad label name {key:?}: {line}");
                assert_eq!(
                    chars.next().map(|c| c.1),
                    Some('"'),
                    "label value quoted: {line}"
                );
                let mut value = String::new();
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => value.push(chars.next().expect("escape").1),
                        '"' => break,
                        c => value.push(c),
                    }
                }
                labels.insert(key, value);
                match chars.next() {
                    Some((i, '}')) => {
                        end = Some(i);
                        break;
                    }
                    Some((_, ',')) => continue,
                    other => panic!("bad label list ({other:?}): {line}"),
                }
            }
            let end = end.unwrap_or_else(|| panic!("unclosed labels: {line}"));
            &body[end + 1..]
        } else {
            rest
        };
        let value_text = rest
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value {v:?}: {line}")),
        };
        let family = ["_total", "_bucket", "_count", "_sum", "_created", "_info"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample without # TYPE: {line}");
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    samples
}

/// The value of the sample `name` whose labels include `labels` (0 when absent).
fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .find(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_reflect_a_connect_a_stream_and_a_disconnect() {
    let fixture = Fixture::start(FixtureOptions::default()).await.unwrap();
    let proxy = Proxy::start(ProxyOptions::default()).await;
    let creds = upstream_credentials(proxy.dir.path(), &fixture);
    let args: Vec<&str> = creds.iter().map(String::as_str).collect();
    let token = proxy.token(&["agent", "--cluster", "local", "--ttl", "1h"]);
    let mut agent = Agent::start_with_token(&proxy, "local", &fixture.url(), &token, &args);
    assert!(proxy.wait_agents("local", 1, WAIT).await, "{}", agent.log());

    // Connect.
    let m = parse_prometheus(&proxy.metrics());
    assert_eq!(
        metric(
            &m,
            "tether_agents_connected",
            &[
                ("cluster", "local"),
                ("transport", Transport::default().session_name())
            ]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "tether_session_transitions_total",
            &[("cluster", "local"), ("state", "up")]
        ),
        1.0
    );
    let horizon = metric(
        &m,
        "tether_agent_token_expiry_seconds",
        &[("cluster", "local")],
    );
    assert!(
        (3000.0..=3600.0).contains(&horizon),
        "token expiry horizon {horizon}"
    );
    assert!(
        metric(
            &m,
            "tether_certificate_expiry_seconds",
            &[("certificate", "ca")]
        ) > 86_400.0 * 365.0
    );
    assert!(
        metric(
            &m,
            "tether_certificate_expiry_seconds",
            &[("certificate", "server")]
        ) > 86_400.0 * 30.0
    );

    // A stream: a gateway request, and a CONNECT held open.
    let client = proxy.client_token("alice", "*");
    let (code, _) = front_get(&proxy, &client, "/clusters/local/version").await;
    assert_eq!(code, 200);
    let (code, _) = front_get(&proxy, &client, "/clusters/never-seen/version").await;
    assert_eq!(code, 404);
    let (code, _) = front_get(&proxy, "not-a-token", "/clusters/local/version").await;
    assert_eq!(code, 401);
    let mut tunnel = connect_via_front(&proxy, "local", Some(&format!("Bearer {client}")))
        .await
        .tunnel();
    tunnel
        .write_all(b"\x16\x03\x01\x00\x05hello")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut buf)).await;
    let m = parse_prometheus(&proxy.metrics());
    assert!(metric(&m, "tether_stream_opens_total", &[("result", "ok")]) >= 2.0);
    assert!(metric(&m, "tether_streams_open", &[]) >= 1.0);
    assert!(
        metric(
            &m,
            "tether_tunnel_bytes_total",
            &[("direction", "to_agent")]
        ) > 0.0
    );
    assert!(
        metric(
            &m,
            "tether_tunnel_bytes_total",
            &[("direction", "from_agent")]
        ) > 0.0
    );
    assert_eq!(
        metric(
            &m,
            "tether_gateway_requests_total",
            &[("cluster", "local"), ("code", "200")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "tether_gateway_requests_total",
            &[("cluster", "_unknown"), ("code", "404")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "tether_gateway_requests_total",
            &[("cluster", "local"), ("code", "401")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "tether_gateway_request_duration_seconds_count",
            &[("cluster", "local")]
        ),
        2.0
    );
    assert!(m
        .iter()
        .any(|s| s.name == "tether_caller_auth_failures_total" && s.value >= 1.0));
    // Loopback is no slow link: the cluster's series is there, at 0.
    assert_eq!(
        metric(
            &m,
            "tether_agent_sessions_slow_link",
            &[("cluster", "local")]
        ),
        0.0
    );
    drop(tunnel);

    // Disconnect.
    agent.process.kill();
    assert!(proxy.wait_agents("local", 0, WAIT).await);
    let m = parse_prometheus(&proxy.metrics());
    assert_eq!(
        metric(
            &m,
            "tether_agents_connected",
            &[
                ("cluster", "local"),
                ("transport", Transport::default().session_name())
            ]
        ),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            "tether_session_transitions_total",
            &[("cluster", "local"), ("state", "down")]
        ),
        1.0
    );

    // Every metric the shipped alert rules use exists.
    let rules =
        std::fs::read_to_string(workspace().join("deploy/prometheus/tether-alerts.yaml")).unwrap();
    let rules: Value = serde_yaml_ng::from_str(&rules).unwrap();
    let exprs: Vec<String> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| r["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(
        exprs.iter().any(|e| e.contains("tether_agents_connected")),
        "{exprs:?}"
    );
    let body = proxy.metrics();
    for e in &exprs {
        for word in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("tether_") {
                let family = ["_total", "_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(word);
                assert!(
                    body.contains(&format!("# TYPE {family} ")),
                    "alert rule uses {word}, which /metrics does not have"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_drains_on_sigterm_then_agents_reconnect() {
    let echo = TcpEchoUpstream::start().await;
    let mut proxy = Proxy::start(ProxyOptions {
        args: vec!["--drain-timeout".into(), "15s".into()],
        ..Default::default()
    })
    .await;
    let agent = Agent::start(&proxy, "c", &echo.addr.to_string(), &[]);
    assert!(proxy.wait_agents("c", 1, WAIT).await, "{}", agent.log());
    let client = proxy.client_token("alice", "*");
    let mut tunnel = connect_via_front(&proxy, "c", Some(&format!("Bearer {client}")))
        .await
        .tunnel();
    let mut buf = [0u8; 6];
    tunnel.write_all(b"before").await.unwrap();
    tunnel.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"before");

    let t0 = Instant::now();
    proxy.process().signal("TERM");
    // Draining: not ready, no new connections, the agent was told to go away...
    let start = Instant::now();
    while http_get(proxy.admin_port, "/readyz")
        .map(|r| r.0)
        .unwrap_or(503)
        != 503
    {
        assert!(start.elapsed() < WAIT);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        agent
            .process
            .wait_for_log("proxy asked this agent to go away", WAIT)
            .await,
        "{}",
        agent.log()
    );
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", proxy.front_port)).is_ok() {
        assert!(
            start.elapsed() < WAIT,
            "front still accepting while draining"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ... and the stream in flight still works.
    tunnel.write_all(b"during").await.unwrap();
    tokio::time::timeout(WAIT, tunnel.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"during");
    assert!(
        !proxy.process().has_exited(),
        "the proxy waits for the open stream"
    );
    // Once it ends, the proxy exits 0, well before the drain timeout.
    tunnel.shutdown().await.unwrap();
    drop(tunnel);
    let status = proxy
        .process()
        .wait_exit(WAIT)
        .await
        .expect("proxy exits after the drain");
    assert!(status.success(), "{status:?}\n{}", proxy.log());
    assert!(
        t0.elapsed() < Duration::from_secs(14),
        "exited at {:?}",
        t0.elapsed()
    );
    assert!(
        proxy.log().contains("all streams finished"),
        "{}",
        proxy.log()
    );

    // The agent comes back to the proxy's successor.
    proxy.launch().await;
    assert!(proxy.wait_agents("c", 1, WAIT).await, "{}", agent.log());
    let mut tunnel = connect_via_front(&proxy, "c", Some(&format!("Bearer {client}")))
        .await
        .tunnel();
    tunnel.write_all(b"after!").await.unwrap();
    tunnel.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!");
}

#[test]
fn deploy_manifests_validate_offline_and_the_chart_is_consistent() {
    let deploy = workspace().join("deploy");
    for f in [
        "proxy.yaml",
        "proxy-service-nodeport.yaml",
        "agent-rbac.yaml",
    ] {
        let path = deploy.join(f);
        let body =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let docs = yaml_documents(&body);
        assert!(!docs.is_empty(), "{f} has documents");
        validate_offline(&path);
    }
    // The proxy: probes, limits, non-root, read-only root, no capabilities.
    let proxy = yaml_documents(&std::fs::read_to_string(deploy.join("proxy.yaml")).unwrap());
    let dep = find_kind(&proxy, "Deployment")[0];
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(!c["resources"]["limits"]["memory"].is_null());
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );
    let services = find_kind(&proxy, "Service");
    assert!(services
        .iter()
        .any(|s| s["spec"]["type"] == "LoadBalancer"
            && s["metadata"]["name"] == "tether-proxy-agent"));
    assert!(services.iter().any(|s| s["spec"]["type"] == "ClusterIP"));
    // The agent's RBAC in deploy/: impersonate, and kube-system by name.
    let rbac = yaml_documents(&std::fs::read_to_string(deploy.join("agent-rbac.yaml")).unwrap());
    let role = find_kind(&rbac, "ClusterRole")[0];
    assert_eq!(role["rules"].as_array().unwrap().len(), 2);
    assert_eq!(role["rules"][0]["verbs"], json!(["impersonate"]));

    // The Helm chart: every .Values path a template uses is in values.yaml.
    let chart = deploy.join("helm/tether");
    let values: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(chart.join("values.yaml")).unwrap())
            .unwrap();
    let chart_meta: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(chart.join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(chart_meta["apiVersion"], "v2");
    let mut used = 0;
    for entry in std::fs::read_dir(chart.join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let body = std::fs::read_to_string(&path).unwrap();
        for (i, _) in body.match_indices(".Values.") {
            let rest = &body[i + ".Values.".len()..];
            let path_str: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_')
                .collect();
            let mut v = &values;
            for part in path_str.trim_end_matches('.').split('.') {
                v = &v[part];
                assert!(
                    !v.is_null(),
                    "{} uses .Values.{path_str}, missing from values.yaml",
                    path.display()
                );
            }
            used += 1;
        }
    }
    assert!(used > 10, "templates use values");
}
