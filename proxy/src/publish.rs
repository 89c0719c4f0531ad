//! The publish address: where agents reach this proxy (`proxyPublishAddress`).
//!
//! It is either set by the operator (`--publish-address tls://HOST:PORT`), left to its default
//! (the agent listen address, only good on this machine), or `auto`: the proxy reads its own
//! Service from the host cluster's API server ([`watch`]) and uses the LoadBalancer's external
//! IP or hostname once one is assigned, with the Service's agent port. Until then it says so in
//! its log and on `/readyz` (503), naming the NodePort a NodePort setup would publish by hand.
//!
//! When the address resolves (or changes), the serving certificate is re-issued from the
//! proxy's CA to cover the new name and swapped in without a restart ([`ServingCert`]), so
//! agents that verify the proxy by its published name connect at once.
//!
//! [`Publish`] holds the current state for `/readyz`, `/api/v1/publish-address` and the
//! manifests `tether-proxy manifest` generates.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use tether_proto::tls::{parse_certs, parse_key, provider, CertificateAuthority};

use crate::settings::PublishAddress;

/// Where the ServiceAccount of a pod is mounted.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The Service `--publish-address auto` reads unless told otherwise (deploy/ names it so).
pub const DEFAULT_PUBLISH_SERVICE: &str = "tether-proxy-agent";
/// The namespace of that Service when neither the flag, `POD_NAMESPACE` nor the pod's
/// ServiceAccount say.
pub const DEFAULT_NAMESPACE: &str = "tether-system";
/// Serving certificates issued on a publish-address change are valid this long.
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// A request to the host API server must finish within this.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of `--publish-address auto`: which Service to read, and how to reach the host
/// cluster's API server.
#[derive(Debug, Clone)]
pub struct AutoPublish {
    /// Namespace of the proxy's agent Service.
    pub namespace: String,
    /// Name of the proxy's agent Service (type LoadBalancer).
    pub service: String,
    /// `host:port` of the host cluster's API server.
    pub api_server: String,
    /// Name to verify the API server's certificate against.
    pub server_name: String,
    /// CA bundle (PEM file) of the API server.
    pub ca_file: PathBuf,
    /// Bearer token file (re-read on every request: the kubelet rotates it).
    pub token_file: PathBuf,
    /// How often the Service is read.
    pub poll_interval: Duration,
}

impl AutoPublish {
    /// Resolves the auto settings from flags, falling back to the pod's in-cluster
    /// configuration. Fails, saying what to pass, when neither is there.
    pub fn resolve(
        namespace: Option<String>,
        service: Option<String>,
        api_server: Option<String>,
        ca_file: Option<PathBuf>,
        token_file: Option<PathBuf>,
        poll_interval: Option<Duration>,
    ) -> Result<Self> {
        let sa = Path::new(SERVICE_ACCOUNT_DIR);
        let (api_server, server_name) = match api_server {
            Some(url) => {
                let rest = match url.split_once("://") {
                    Some(("https", r)) => r,
                    Some((s, _)) => bail!(
                        "--host-api-server {url:?}: scheme {s:?} is not supported, use https://"
                    ),
                    None => url.as_str(),
                };
                let authority = rest.split('/').next().unwrap_or(rest);
                let (host, port) = match crate::settings::split_host_port(authority) {
                    Ok(hp) => hp,
                    Err(_) => (authority.trim_matches(['[', ']']).to_string(), 443),
                };
                (join_host_port(&host, port), host)
            }
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST")
                    .ok()
                    .filter(|h| !h.is_empty())
                    .context(
                        "--publish-address auto reads the proxy's Service from the host cluster's \
                         API server, but this is not a pod (KUBERNETES_SERVICE_HOST is unset): run \
                         it in the cluster, pass --host-api-server, --host-api-ca-file and \
                         --host-api-token-file, or set --publish-address tls://HOST:PORT",
                    )?;
                let port = std::env::var("KUBERNETES_SERVICE_PORT")
                    .ok()
                    .and_then(|p| p.parse::<u16>().ok())
                    .unwrap_or(443);
                (
                    join_host_port(&host, port),
                    "kubernetes.default.svc".to_string(),
                )
            }
        };
        let namespace = namespace
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .or_else(|| {
                std::fs::read_to_string(sa.join("namespace"))
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
        Ok(AutoPublish {
            namespace,
            service: service.unwrap_or_else(|| DEFAULT_PUBLISH_SERVICE.into()),
            api_server,
            server_name,
            ca_file: ca_file.unwrap_or_else(|| sa.join("ca.crt")),
            token_file: token_file.unwrap_or_else(|| sa.join("token")),
            poll_interval: poll_interval.unwrap_or(Duration::from_secs(5)),
        })
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// How the publish address came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PublishSource {
    /// `--publish-address` was given.
    Explicit,
    /// Derived from the agent listen address: only reachable from this machine.
    Default,
    /// Read from the LoadBalancer of the proxy's Service.
    Auto,
}

/// What `/api/v1/publish-address` answers.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishStatus {
    /// The address agents should dial; `None` while `auto` waits for a LoadBalancer.
    pub publish_address: Option<String>,
    pub source: PublishSource,
    /// Why there is no address yet, or a warning about the one there is.
    pub message: Option<String>,
}

/// The current publish address, shared by the admin endpoints and the auto watcher.
pub struct Publish {
    status: RwLock<PublishStatus>,
}

impl Publish {
    /// A publish address set by flag (or defaulted from the listen address).
    pub fn fixed(addr: &PublishAddress) -> Arc<Self> {
        let (source, message) = if addr.defaulted {
            (
                PublishSource::Default,
                Some(format!(
                    "no --publish-address was given, so agents are told {addr}, which only this \
                     machine can reach; start the proxy with --publish-address \
                     tls://PUBLIC_HOST:PORT (or auto, in a cluster with a LoadBalancer)"
                )),
            )
        } else {
            (PublishSource::Explicit, None)
        };
        Arc::new(Publish {
            status: RwLock::new(PublishStatus {
                publish_address: Some(addr.to_string()),
                source,
                message,
            }),
        })
    }

    /// `auto`, before the Service was read.
    pub fn auto(auto: &AutoPublish) -> Arc<Self> {
        Arc::new(Publish {
            status: RwLock::new(PublishStatus {
                publish_address: None,
                source: PublishSource::Auto,
                message: Some(format!(
                    "waiting for a LoadBalancer address on Service {}/{} (not read yet)",
                    auto.namespace, auto.service
                )),
            }),
        })
    }

    pub fn status(&self) -> PublishStatus {
        self.status.read().expect("publish lock").clone()
    }

    /// Why agents cannot be told an address yet, if so.
    pub fn waiting(&self) -> Option<String> {
        let s = self.status.read().expect("publish lock");
        match &s.publish_address {
            None => Some(
                s.message
                    .clone()
                    .unwrap_or_else(|| "no publish address yet".into()),
            ),
            Some(_) => None,
        }
    }

    fn set(&self, address: Option<String>, message: Option<String>) {
        let mut s = self.status.write().expect("publish lock");
        s.publish_address = address;
        s.message = message;
    }
}

/// The agent listener's serving certificate, swappable while the proxy runs.
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServingCert")
    }
}

impl ServingCert {
    /// Starts with the certificate and key (PEM) from the state dir.
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Arc<Self>> {
        Ok(Arc::new(ServingCert {
            current: RwLock::new(Arc::new(certified_key(cert_pem, key_pem)?)),
        }))
    }

    /// Serves this certificate and key from now on.
    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<()> {
        let key = Arc::new(certified_key(cert_pem, key_pem)?);
        *self.current.write().expect("cert lock") = key;
        Ok(())
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("cert lock").clone())
    }
}

fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey> {
    let certs = parse_certs(cert_pem, "server certificate")?;
    let key = parse_key(key_pem, "server key")?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| anyhow::anyhow!("loading the server key: {e}"))?;
    Ok(CertifiedKey::new(certs, signer))
}

/// What the watcher needs to re-issue the serving certificate for a new address.
pub struct Reissue {
    pub ca: CertificateAuthority,
    /// Names the certificate always covers (localhost, listen addresses, ...).
    pub base_names: Vec<String>,
    /// The state dir, where the new certificate is also written (so a restart reuses it).
    pub state_dir: PathBuf,
    pub cert: Arc<ServingCert>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Reissue {
    fn issue_for(&self, host: &str) -> Result<()> {
        let mut names = self.base_names.clone();
        if !names.iter().any(|n| n == host) {
            names.push(host.to_string());
        }
        let leaf = self.ca.issue_server(&names, SERVER_CERT_VALIDITY)?;
        self.cert.replace(&leaf.cert_pem, &leaf.key_pem)?;
        self.metrics.certificate_expiry("server", &leaf.cert_pem);
        // Best effort: a read-only state dir keeps serving the new certificate from memory.
        let write = |file: &str, data: &str| {
            tether_proto::tls::write_private_file(&self.state_dir.join(file), data.as_bytes())
        };
        if let Err(e) = write(crate::state::SERVER_KEY, &leaf.key_pem)
            .and_then(|_| write(crate::state::SERVER_CERT, &leaf.cert_pem))
        {
            warn!(error = %e, "could not write the re-issued serving certificate to the state dir");
        }
        info!(names = ?names, "serving certificate re-issued for the publish address");
        Ok(())
    }
}

/// Reads the proxy's Service every poll interval until `shutdown`, and keeps `publish` (and
/// the serving certificate) in step with its LoadBalancer address.
pub async fn watch(
    auto: AutoPublish,
    scheme: String,
    agent_port: u16,
    publish: Arc<Publish>,
    reissue: Reissue,
    shutdown: CancellationToken,
) {
    let mut last_logged: Option<String> = None;
    let mut current: Option<String> = None;
    loop {
        let outcome = match read_service(&auto).await {
            Ok(svc) => {
                address_from_service(&svc, &scheme, agent_port, &auto.namespace, &auto.service)
            }
            Err(e) => Err(format!(
                "waiting for a LoadBalancer address: cannot read Service {}/{} from the host API \
                 server at {}: {e:#}",
                auto.namespace, auto.service, auto.api_server
            )),
        };
        match outcome {
            Ok(addr) => {
                let text = addr.to_string();
                if current.as_deref() != Some(text.as_str()) {
                    if let Err(e) = reissue.issue_for(&addr.host) {
                        warn!(error = %format!("{e:#}"), "could not re-issue the serving certificate for the publish address");
                    }
                    info!(
                        publish_address = %text,
                        service = %format!("{}/{}", auto.namespace, auto.service),
                        "publish address resolved from the LoadBalancer"
                    );
                    publish.set(Some(text.clone()), None);
                    current = Some(text);
                    last_logged = None;
                }
            }
            Err(why) => {
                // Keep an address already resolved while the API server is unreachable; an
                // ingress that went away means waiting again.
                let keep = current.is_some() && why.contains("cannot read Service");
                if !keep {
                    if last_logged.as_deref() != Some(why.as_str()) {
                        warn!(
                            service = %format!("{}/{}", auto.namespace, auto.service),
                            reason = %why,
                            "no publish address yet"
                        );
                        last_logged = Some(why.clone());
                    }
                    publish.set(None, Some(why));
                    current = None;
                } else if last_logged.as_deref() != Some(why.as_str()) {
                    warn!(reason = %why, "keeping the publish address already resolved");
                    last_logged = Some(why);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(auto.poll_interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The publish address a Service yields, or why there is none yet (the sentence for the log
/// and `/readyz`, naming the NodePort alternative).
pub fn address_from_service(
    svc: &Value,
    scheme: &str,
    agent_port: u16,
    namespace: &str,
    name: &str,
) -> std::result::Result<PublishAddress, String> {
    let id = format!("{namespace}/{name}");
    let ports = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
    let port = pick_port(&ports, scheme, agent_port).ok_or_else(|| {
        format!(
            "Service {id} has no port for agents: name its agent port `agent` (or let its \
             targetPort be the proxy's agent port {agent_port})"
        )
    })?;
    let service_port = port["port"].as_u64().and_then(|p| u16::try_from(p).ok());
    let node_port = port["nodePort"].as_u64();
    let nodeport_hint = match node_port {
        Some(np) => format!(
            "a NodePort setup must set the address by hand: --publish-address \
             {scheme}://NODE_ADDRESS:{np} (NodePort {np} of Service {id})"
        ),
        None => format!(
            "a NodePort setup must set the address by hand: --publish-address \
             {scheme}://NODE_ADDRESS:NODE_PORT (Service {id} has no NodePort yet)"
        ),
    };
    let kind = svc["spec"]["type"].as_str().unwrap_or("ClusterIP");
    if kind != "LoadBalancer" {
        return Err(format!(
            "Service {id} is of type {kind}, not LoadBalancer, so it gets no external address; \
             {nodeport_hint}"
        ));
    }
    let ingress = svc["status"]["loadBalancer"]["ingress"]
        .as_array()
        .and_then(|list| {
            list.iter().find_map(|i| {
                i["ip"]
                    .as_str()
                    .or_else(|| i["hostname"].as_str())
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
            })
        });
    let Some(host) = ingress else {
        return Err(format!(
            "waiting for a LoadBalancer address on Service {id} (status.loadBalancer.ingress is \
             empty; `kubectl -n {namespace} get service {name}` shows EXTERNAL-IP <pending>); {nodeport_hint}"
        ));
    };
    let port = service_port.ok_or_else(|| format!("Service {id}: the agent port has no `port`"))?;
    Ok(PublishAddress {
        scheme: scheme.to_string(),
        host,
        port,
        defaulted: false,
    })
}

/// The Service port agents use: named `agent`, else targeting the agent port, else the only
/// port for the transport's protocol.
fn pick_port(ports: &[Value], scheme: &str, agent_port: u16) -> Option<Value> {
    let protocol = if scheme == "quic" { "UDP" } else { "TCP" };
    let proto_of = |p: &Value| p["protocol"].as_str().unwrap_or("TCP").to_string();
    let same_proto: Vec<&Value> = ports.iter().filter(|p| proto_of(p) == protocol).collect();
    same_proto
        .iter()
        .find(|p| p["name"].as_str() == Some("agent"))
        .or_else(|| {
            same_proto.iter().find(|p| {
                p["targetPort"].as_u64() == Some(agent_port as u64)
                    || p["targetPort"].as_str() == Some("agent")
            })
        })
        .or_else(|| (same_proto.len() == 1).then(|| &same_proto[0]))
        .map(|p| (*p).clone())
}

/// `GET /api/v1/namespaces/{ns}/services/{name}` from the host API server.
async fn read_service(auto: &AutoPublish) -> Result<Value> {
    let token = std::fs::read_to_string(&auto.token_file)
        .with_context(|| format!("reading the token {}", auto.token_file.display()))?;
    let ca = std::fs::read_to_string(&auto.ca_file)
        .with_context(|| format!("reading the CA {}", auto.ca_file.display()))?;
    let path = format!(
        "/api/v1/namespaces/{}/services/{}",
        auto.namespace, auto.service
    );
    let (status, body) = tether_proto::http::api_get(
        &auto.api_server,
        &auto.server_name,
        &ca,
        &token,
        &path,
        API_TIMEOUT,
    )
    .await?;
    let message = || {
        serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned())
    };
    match status.as_u16() {
        200 => serde_json::from_slice(&body).context("parsing the Service"),
        401 => bail!(
            "401 Unauthorized: the API server refused the proxy's token ({})",
            message()
        ),
        403 => bail!(
            "403 Forbidden: the proxy's ServiceAccount may not read the Service; grant it `get` on \
             services (the Role in deploy/proxy.yaml) ({})",
            message()
        ),
        404 => bail!(
            "404 Not Found: no Service {}/{}; create it (deploy/proxy.yaml) or name yours with \
             --publish-service",
            auto.namespace,
            auto.service
        ),
        _ => bail!("{status}: {}", message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(kind: &str, ingress: Value) -> Value {
        json!({
            "spec": {"type": kind, "ports": [
                {"name": "agent", "port": 443, "targetPort": 8443, "nodePort": 31443, "protocol": "TCP"},
                {"name": "agent-quic", "port": 443, "targetPort": 8443, "nodePort": 31443, "protocol": "UDP"},
            ]},
            "status": {"loadBalancer": ingress},
        })
    }

    #[test]
    fn load_balancer_ip_or_hostname() {
        let a = address_from_service(
            &svc("LoadBalancer", json!({"ingress": [{"ip": "203.0.113.7"}]})),
            "tls",
            8443,
            "ns",
            "s",
        )
        .unwrap();
        assert_eq!(a.to_string(), "tls://203.0.113.7:443");
        let a = address_from_service(
            &svc(
                "LoadBalancer",
                json!({"ingress": [{"hostname": "lb.example.com"}]}),
            ),
            "quic",
            8443,
            "ns",
            "s",
        )
        .unwrap();
        assert_eq!(a.to_string(), "quic://lb.example.com:443");
    }

    #[test]
    fn waiting_names_the_node_port() {
        let why = address_from_service(&svc("LoadBalancer", json!({})), "tls", 8443, "ns", "s")
            .unwrap_err();
        assert!(why.contains("waiting for a LoadBalancer"), "{why}");
        assert!(why.contains("NodePort 31443"), "{why}");
        let why =
            address_from_service(&svc("NodePort", json!({})), "tls", 8443, "ns", "s").unwrap_err();
        assert!(why.contains("type NodePort"), "{why}");
        assert!(why.contains("tls://NODE_ADDRESS:31443"), "{why}");
    }

    #[test]
    fn port_by_target_when_unnamed() {
        let s = json!({
            "spec": {"type": "LoadBalancer", "ports": [
                {"port": 9443, "targetPort": 9443},
                {"port": 7000, "targetPort": 8443},
            ]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}},
        });
        assert_eq!(
            address_from_service(&s, "tls", 8443, "n", "s")
                .unwrap()
                .port,
            7000
        );
    }
}
