//! Facts read from the member cluster when the agent runs in a pod: the API server address
//! (`KUBERNETES_SERVICE_HOST`/`PORT`) and the cluster UID (the `kube-system` namespace UID,
//! read with the pod's ServiceAccount, which never leaves the member).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// `host:port` of the in-cluster API server, if running in a pod.
pub fn api_server_addr() -> Option<String> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST")
        .ok()
        .filter(|h| !h.is_empty())?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(443);
    Some(crate::settings::join_host_port(&host, port))
}

/// Reads the `kube-system` namespace UID from the API server at `addr` with the pod's
/// ServiceAccount token and CA.
pub async fn cluster_uid(addr: &str) -> Result<String> {
    let dir = Path::new(SERVICE_ACCOUNT_DIR);
    let token =
        std::fs::read_to_string(dir.join("token")).context("reading the ServiceAccount token")?;
    let ca =
        std::fs::read_to_string(dir.join("ca.crt")).context("reading the ServiceAccount CA")?;
    let body = get(
        addr,
        "kubernetes.default.svc",
        &ca,
        token.trim(),
        "/api/v1/namespaces/kube-system",
    )
    .await?;
    let v: serde_json::Value =
        serde_json::from_slice(&body).context("parsing the kube-system namespace")?;
    v["metadata"]["uid"]
        .as_str()
        .map(str::to_string)
        .context("kube-system namespace has no metadata.uid")
}

/// One bounded HTTPS GET with a bearer token; anything but 2xx is an error.
async fn get(
    addr: &str,
    server_name: &str,
    ca_pem: &str,
    token: &str,
    path: &str,
) -> Result<Vec<u8>> {
    let (status, body) = tether_proto::http::api_get(
        addr,
        server_name,
        ca_pem,
        token,
        path,
        Duration::from_secs(10),
    )
    .await?;
    if !status.is_success() {
        bail!(
            "GET {path}: {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    Ok(body.to_vec())
}
