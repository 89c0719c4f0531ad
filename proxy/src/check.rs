//! The connectivity check: `tether-proxy check --cluster NAME` and the admin endpoint behind
//! it, `GET /api/v1/clusters/{name}/check`.
//!
//! The proxy tests one member cluster through the tunnel, step by step, and stops at the
//! first failure:
//! 1. **agent connected** — since when, over which transport, heartbeat RTT;
//! 2. **API server reachable** — the agent opens a TCP connection to its API server (the
//!    CONNECT path: a raw `ApiServer` stream);
//! 3. **API server /version** — an HTTP request through the kube gateway path (a `KubeHttp`
//!    stream), which exercises the agent's credentials and impersonation;
//! 4. **list namespaces** (or, with `namespace`, list pods in that namespace) — what the
//!    check's identity may see; skipped with `skipNamespaceCheck`.
//!
//! The check acts as the fixed user [`CHECK_USER`] (the agent impersonates it; the agent
//! manifest binds it to a ClusterRole that may get and list namespaces). The admin port takes
//! no identity from its caller, so it cannot be used to act as anyone else.
//!
//! Every failing step says what it saw and what to look at.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::info;

use tether_proto::messages::{target, KubeHttp, StreamRejectCode, Target};

use crate::registry::{OpenError, SessionRegistry};

/// The user the check acts as in the member cluster (impersonated by the agent).
pub const CHECK_USER: &str = "tether:check";
/// Most time one step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest response body read from the member.
const MAX_BODY: usize = 8 << 20;
/// Namespaces or pods named in a passing step's detail.
const NAMES_SHOWN: usize = 8;

/// What to check beyond connectivity.
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// List pods in this namespace instead of listing namespaces.
    pub namespace: Option<String>,
    /// Skip the listing step (for identities that may not list).
    pub skip_namespace_check: bool,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StepStatus {
    Passed,
    Failed,
    /// Skipped on request (counts as passed).
    Skipped,
    /// Not run because an earlier step failed.
    NotRun,
}

/// One step of the check.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub name: String,
    pub status: StepStatus,
    /// What the step saw.
    pub detail: String,
    /// What to look at, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// The outcome of a check.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    pub cluster: String,
    /// True when every step passed (or was skipped on request).
    pub passed: bool,
    /// The user the check acted as in the member cluster.
    pub identity: String,
    pub steps: Vec<Step>,
}

fn passed(name: &str, detail: String) -> Step {
    Step {
        name: name.into(),
        status: StepStatus::Passed,
        detail,
        hint: None,
    }
}

fn failed(name: &str, detail: String, hint: impl Into<String>) -> Step {
    Step {
        name: name.into(),
        status: StepStatus::Failed,
        detail,
        hint: Some(hint.into()),
    }
}

/// Runs the check of `cluster` through `registry`.
pub async fn run(registry: &SessionRegistry, cluster: &str, opts: &CheckOptions) -> CheckReport {
    let list_name = match &opts.namespace {
        Some(ns) => format!("list pods in namespace {ns}"),
        None => "list namespaces".to_string(),
    };
    let names = [
        "agent connected",
        "API server reachable",
        "API server /version",
        list_name.as_str(),
    ];
    let mut steps = Vec::new();

    steps.push(agent_step(registry, cluster, names[0]));
    if steps[0].status == StepStatus::Passed {
        steps.push(reachable_step(registry, cluster, names[1]).await);
    }
    let mut conn = None;
    if steps.last().map(|s| s.status) == Some(StepStatus::Passed) && steps.len() == 2 {
        let (step, c) = version_step(registry, cluster, names[2]).await;
        steps.push(step);
        conn = c;
    }
    if steps.len() == 3 && steps[2].status == StepStatus::Passed {
        if opts.skip_namespace_check {
            steps.push(Step {
                name: list_name.clone(),
                status: StepStatus::Skipped,
                detail: "skipped (--skip-namespace-check)".into(),
                hint: None,
            });
        } else if let Some(conn) = conn.as_mut() {
            steps.push(list_step(conn, opts.namespace.as_deref(), &list_name).await);
        }
    }
    let failed_at = steps
        .iter()
        .find(|s| s.status == StepStatus::Failed)
        .map(|s| s.name.clone());
    for name in names.iter().skip(steps.len()) {
        steps.push(Step {
            name: name.to_string(),
            status: StepStatus::NotRun,
            detail: format!(
                "not run: {:?} failed",
                failed_at.as_deref().unwrap_or("an earlier step")
            ),
            hint: None,
        });
    }
    let ok = steps
        .iter()
        .all(|s| matches!(s.status, StepStatus::Passed | StepStatus::Skipped));
    info!(%cluster, passed = ok, failed_step = ?failed_at, "connectivity check");
    CheckReport {
        cluster: cluster.to_string(),
        passed: ok,
        identity: CHECK_USER.to_string(),
        steps,
    }
}

fn agent_step(registry: &SessionRegistry, cluster: &str, name: &str) -> Step {
    let look = format!(
        "the agent's log in the member cluster (kubectl -n tether-system logs \
         deploy/tether-agent): it says why it cannot connect (publish address unreachable, \
         token refused, certificate not trusted, ...); `tether-proxy manifest --cluster {cluster}` \
         prints the manifest to apply there"
    );
    let status = registry.status().into_iter().find(|c| c.name == cluster);
    match status {
        Some(c) if c.connected => {
            let transports = if c.transports.is_empty() {
                "-".to_string()
            } else {
                c.transports.join(",")
            };
            let rtt = if c.rtt_micros == 0 {
                "not measured yet".to_string()
            } else {
                format!("{:.1} ms", c.rtt_micros as f64 / 1000.0)
            };
            // Not a failure: the tunnel works, and keeps its queues short for such a link.
            let slow = if c.slow_link {
                "; the link is slow (frames wait over 20 ms a batch to leave: under about \
                 3 MB/s, or lossy; with TCP on CUBIC consider BBR or quic://)"
            } else {
                ""
            };
            passed(
                name,
                format!(
                    "{} agent{} connected since {}, transport {transports}, heartbeat RTT \
                     {rtt}{slow}",
                    c.agents,
                    if c.agents == 1 { "" } else { "s" },
                    c.connected_since.as_deref().unwrap_or("-"),
                ),
            )
        }
        Some(c) => failed(
            name,
            format!(
                "no agent of cluster {cluster:?} is connected (disconnected since {})",
                c.disconnected_since.as_deref().unwrap_or("-")
            ),
            look,
        ),
        None if registry.is_known(cluster) => failed(
            name,
            format!(
                "no agent of cluster {cluster:?} has connected since this proxy started (it \
                 connected before)"
            ),
            look,
        ),
        None => failed(
            name,
            format!("cluster {cluster:?} is not known to this proxy: no agent has ever connected for it"),
            look,
        ),
    }
}

async fn reachable_step(registry: &SessionRegistry, cluster: &str, name: &str) -> Step {
    let request_id = tether_proto::token::random_id();
    let open = tokio::time::timeout(
        STEP_TIMEOUT,
        registry.open(cluster, Target::api_server(), &request_id),
    )
    .await;
    match open {
        Ok(Ok(stream)) => {
            drop(stream);
            passed(
                name,
                "the agent opened a TCP connection to its API server".into(),
            )
        }
        Ok(Err(OpenError::Rejected {
            code: StreamRejectCode::Unreachable,
            reason,
            ..
        })) => failed(
            name,
            reason,
            "the agent dials its API server at --upstream (in a pod: \
             KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT); check that the API server is up \
             and that no NetworkPolicy blocks egress from the agent's namespace",
        ),
        Ok(Err(e)) => failed(name, e.to_string(), open_error_hint(&e)),
        Err(_) => failed(
            name,
            format!("no answer within {}s", STEP_TIMEOUT.as_secs()),
            "the agent is connected but slow to dial its API server; look at the agent's log",
        ),
    }
}

fn open_error_hint(e: &OpenError) -> String {
    match e {
        OpenError::NoAgent { .. } | OpenError::UnknownCluster { .. } => {
            "the agent went away during the check; run it again and look at the agent's log".into()
        }
        OpenError::Rejected {
            code: StreamRejectCode::Unsupported,
            ..
        } => "the agent has no credentials for its API server: in a pod it uses its \
             ServiceAccount; outside one, give it --upstream-ca-file and --upstream-token-file"
            .into(),
        OpenError::Rejected {
            code: StreamRejectCode::Draining,
            ..
        } => {
            "the agent is shutting down; run the check again once its replacement connected".into()
        }
        _ => "the proxy's and the agent's logs (the request id is in both)".into(),
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// Opens a kube HTTP stream as [`CHECK_USER`] and asks for `/version`. Returns the HTTP
/// connection for the next step when it passed.
async fn version_step(
    registry: &SessionRegistry,
    cluster: &str,
    name: &str,
) -> (Step, Option<Sender>) {
    let target = Target {
        target: Some(target::Target::KubeHttp(KubeHttp {
            user: CHECK_USER.to_string(),
            groups: Vec::new(),
        })),
    };
    let request_id = tether_proto::token::random_id();
    let tunnel =
        match tokio::time::timeout(STEP_TIMEOUT, registry.open(cluster, target, &request_id)).await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return (failed(name, e.to_string(), open_error_hint(&e)), None),
            Err(_) => {
                return (
                    failed(
                        name,
                        format!("no answer within {}s", STEP_TIMEOUT.as_secs()),
                        "the agent's log",
                    ),
                    None,
                )
            }
        };
    let mut sender =
        match hyper::client::conn::http1::handshake(TokioIo::new(tunnel.into_io())).await {
            Ok((sender, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                sender
            }
            Err(e) => {
                return (
                    failed(
                        name,
                        format!("HTTP over the tunnel failed: {e}"),
                        "the agent's log",
                    ),
                    None,
                )
            }
        };
    let (code, body) = match get(&mut sender, cluster, "/version").await {
        Ok(r) => r,
        Err(e) => return (failed(name, e, "the agent's log"), None),
    };
    if code != 200 {
        return (
            failed(name, describe(code, &body), version_hint(code)),
            None,
        );
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(version) = v["gitVersion"].as_str() else {
        return (
            failed(
                name,
                format!("200 but not a version object: {}", snippet(&body)),
                "the agent's --upstream does not look like a Kubernetes API server",
            ),
            None,
        );
    };
    let platform = v["platform"].as_str().unwrap_or("-");
    (
        passed(name, format!("Kubernetes {version} ({platform})")),
        Some(sender),
    )
}

fn version_hint(code: u16) -> String {
    match code {
        401 => "the API server refused the agent's own credentials: its ServiceAccount token \
                (in a pod) or --upstream-token-file / client certificate"
            .into(),
        403 => format!(
            "the agent impersonates the check's user {CHECK_USER}: its ClusterRole needs \
             `impersonate` on users and groups (apply the manifest from `tether-proxy manifest` \
             again, or deploy/agent-rbac.yaml)"
        ),
        502..=504 => "the agent could not complete a request to its API server: check \
                           the API server's CA (the ServiceAccount's ca.crt in a pod, or \
                           --upstream-ca-file) and that the API server is up"
            .into(),
        _ => "the agent's log".into(),
    }
}

async fn list_step(sender: &mut Sender, namespace: Option<&str>, name: &str) -> Step {
    let path = match namespace {
        Some(ns) => format!("/api/v1/namespaces/{ns}/pods?limit=500"),
        None => "/api/v1/namespaces?limit=500".to_string(),
    };
    let (code, body) = match get(sender, "", &path).await {
        Ok(r) => r,
        Err(e) => return failed(name, e, "the agent's log"),
    };
    let what = if namespace.is_some() {
        "pods"
    } else {
        "namespaces"
    };
    if code == 200 {
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let items: Vec<&str> = v["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["metadata"]["name"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        let mut shown = items
            .iter()
            .take(NAMES_SHOWN)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        if items.len() > NAMES_SHOWN {
            shown.push_str(", ...");
        }
        let more = if v["metadata"]["continue"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            " (first page)"
        } else {
            ""
        };
        return passed(
            name,
            format!(
                "{} {what}{more}{}{shown}",
                items.len(),
                if shown.is_empty() { "" } else { ": " }
            ),
        );
    }
    let hint = match (code, namespace) {
        (403, None) => format!(
            "the check runs as user {CHECK_USER}; the agent manifest from `tether-proxy manifest` \
             binds it to ClusterRole tether-check (get, list namespaces): apply it, or grant \
             it yourself (kubectl create clusterrolebinding tether-check \
             --clusterrole=tether-check --user={CHECK_USER}), or pass --skip-namespace-check"
        ),
        (403, Some(ns)) => format!(
            "the check runs as user {CHECK_USER}; let it list pods there (kubectl -n {ns} create \
             rolebinding tether-check --clusterrole=view --user={CHECK_USER}), or pass \
             --skip-namespace-check"
        ),
        (404, Some(ns)) => format!("is there a namespace {ns:?} in the member cluster?"),
        _ => version_hint(code),
    };
    failed(name, describe(code, &body), hint)
}

/// One GET on the tunnel's HTTP connection: (status, body).
async fn get(
    sender: &mut Sender,
    host: &str,
    path: &str,
) -> std::result::Result<(u16, Bytes), String> {
    let exchange = async {
        sender
            .ready()
            .await
            .map_err(|e| format!("the tunnel's HTTP connection closed: {e}"))?;
        let req = http::Request::get(path)
            .header(
                http::header::HOST,
                if host.is_empty() { "kubernetes" } else { host },
            )
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "tether-proxy-check")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("GET {path} through the tunnel failed: {e}"))?;
        let code = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the answer to GET {path}: {e}"))?
            .to_bytes();
        Ok((code, body))
    };
    tokio::time::timeout(STEP_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("GET {path}: no answer within {}s", STEP_TIMEOUT.as_secs()))?
}

/// `CODE Reason: message` from a Kubernetes `Status` (or the start of any other body).
fn describe(code: u16, body: &[u8]) -> String {
    let reason = http::StatusCode::from_u16(code)
        .ok()
        .and_then(|c| c.canonical_reason())
        .unwrap_or("");
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| snippet(body));
    format!("{code} {reason}: {message}")
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    text.trim().replace('\n', " ")
}

/// Parses the endpoint's query: `namespace=NS&skipNamespaceCheck=true`.
pub fn parse_query(query: Option<&str>) -> std::result::Result<CheckOptions, String> {
    let mut opts = CheckOptions::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "namespace" if !v.is_empty() => {
                validate_namespace(v)?;
                opts.namespace = Some(v.to_string());
            }
            "namespace" => {}
            "skipNamespaceCheck" => {
                opts.skip_namespace_check = v.is_empty() || v == "true" || v == "1"
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?}: use namespace, skipNamespaceCheck"
                ))
            }
        }
    }
    Ok(opts)
}

/// A namespace name: a DNS label (lowercase letters, digits, `-`; at most 63).
pub fn validate_namespace(ns: &str) -> std::result::Result<(), String> {
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "namespace {ns:?} is not a valid name (lowercase letters, digits and '-', at most 63)"
        ))
    }
}

/// A plain HTTP/1.0 GET to the proxy's admin port: (status, body).
pub fn admin_get(admin_addr: &str, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut conn = std::net::TcpStream::connect(admin_addr).with_context(|| {
        format!(
            "connecting to the proxy's admin address {admin_addr} (is the proxy running? set \
             --admin-addr; in a cluster: kubectl -n tether-system port-forward \
             deploy/tether-proxy 9090)"
        )
    })?;
    conn.set_read_timeout(Some(timeout))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {admin_addr}\r\n\r\n")?;
    let mut resp = Vec::new();
    conn.take(16 << 20)
        .read_to_end(&mut resp)
        .with_context(|| format!("reading the answer to GET {path} from {admin_addr}"))?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed admin response")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed admin response")?;
    Ok((code, body.to_string()))
}

/// `tether-proxy check`: asks the running proxy to check `cluster` and prints the steps.
/// Returns whether every step passed.
pub fn cli(admin_addr: &str, cluster: &str, opts: &CheckOptions, json: bool) -> Result<bool> {
    tether_proto::name::validate_cluster_name(cluster).map_err(anyhow::Error::msg)?;
    if let Some(ns) = &opts.namespace {
        validate_namespace(ns).map_err(anyhow::Error::msg)?;
    }
    let mut path = format!("/api/v1/clusters/{cluster}/check");
    let mut query = Vec::new();
    if let Some(ns) = &opts.namespace {
        query.push(format!("namespace={ns}"));
    }
    if opts.skip_namespace_check {
        query.push("skipNamespaceCheck=true".into());
    }
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    let (code, body) = admin_get(admin_addr, &path, STEP_TIMEOUT * 4)?;
    let report: CheckReport = serde_json::from_str(&body)
        .with_context(|| format!("the proxy at {admin_addr} answered {code}: {}", body.trim()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, admin_addr));
    }
    Ok(report.passed)
}

/// The report as the CLI prints it.
pub fn render(report: &CheckReport, admin_addr: &str) -> String {
    let mut out = format!(
        "checking cluster {} through the proxy at {admin_addr} (as user {})\n",
        report.cluster, report.identity
    );
    let width = report.steps.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for s in &report.steps {
        let mark = match s.status {
            StepStatus::Passed => "[ok]  ",
            StepStatus::Failed => "[FAIL]",
            StepStatus::Skipped => "[skip]",
            StepStatus::NotRun => "[--]  ",
        };
        out.push_str(&format!("{mark} {:<width$}  {}\n", s.name, s.detail));
        if let Some(h) = &s.hint {
            let indent = " ".repeat(6 + 1 + width + 2);
            for line in wrap(
                &format!("look at: {h}"),
                96usize.saturating_sub(indent.len()).max(40),
            ) {
                out.push_str(&format!("{indent}{line}\n"));
            }
        }
    }
    let ok = report
        .steps
        .iter()
        .filter(|s| matches!(s.status, StepStatus::Passed | StepStatus::Skipped))
        .count();
    out.push_str(&format!(
        "cluster {}: {} ({ok} of {} steps passed)\n",
        report.cluster,
        if report.passed { "OK" } else { "FAILED" },
        report.steps.len()
    ));
    out
}

/// Splits `text` into lines of at most `width` characters at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query() {
        let o = parse_query(Some("namespace=kube-system&skipNamespaceCheck=true")).unwrap();
        assert_eq!(o.namespace.as_deref(), Some("kube-system"));
        assert!(o.skip_namespace_check);
        assert!(parse_query(Some("namespace=Bad_NS")).is_err());
        assert!(parse_query(Some("as=admin")).is_err());
        assert!(!parse_query(None).unwrap().skip_namespace_check);
    }

    #[test]
    fn describes_status_objects() {
        let body = br#"{"kind":"Status","message":"namespaces is forbidden"}"#;
        assert_eq!(
            describe(403, body),
            "403 Forbidden: namespaces is forbidden"
        );
        assert_eq!(describe(502, b"oops\n"), "502 Bad Gateway: oops");
    }
}
