//! Agent settings: flags with `TETHER_…` environment twins, resolved into what the agent uses.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

/// Flags of `tether-agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Proxy to dial: tls://HOST:PORT.
    #[arg(long, env = "TETHER_PROXY")]
    pub proxy: String,
    /// This member cluster's name (as the agent token says).
    #[arg(long, env = "TETHER_CLUSTER")]
    pub cluster: String,
    /// File holding the agent token (re-read at every connection, so it can be rotated).
    #[arg(long, env = "TETHER_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// CA certificate (PEM) that signed the proxy's serving certificate.
    #[arg(long, env = "TETHER_CA_FILE")]
    pub ca_file: PathBuf,
    /// Name to verify the proxy certificate against [default: the host of --proxy].
    #[arg(long, env = "TETHER_SERVER_NAME")]
    pub server_name: Option<String>,
    /// The member's API server: https://HOST:PORT [default: the in-cluster API server].
    #[arg(long, env = "TETHER_UPSTREAM")]
    pub upstream: Option<String>,
    /// Further targets the proxy may ask for, HOST:PORT (repeatable; comma-separated in env).
    #[arg(long = "allow", env = "TETHER_ALLOW", value_delimiter = ',')]
    pub allow: Vec<String>,
    /// This cluster's UID [default in a pod: the kube-system namespace UID].
    #[arg(long, env = "TETHER_CLUSTER_UID")]
    pub cluster_uid: Option<String>,
    /// This agent replica's id [default: POD_NAME or the host name].
    #[arg(long, env = "TETHER_AGENT_ID")]
    pub agent_id: Option<String>,
    /// Labels sent to the proxy, k=v (repeatable; comma-separated in env).
    #[arg(long = "label", env = "TETHER_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// On SIGTERM, how long open streams may take to finish.
    #[arg(long, env = "TETHER_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Most streams open at once on the session.
    #[arg(long, env = "TETHER_MAX_STREAMS", default_value_t = 16_384)]
    pub max_streams: usize,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `host:port` of the proxy.
    pub proxy_addr: String,
    pub server_name: String,
    pub cluster: String,
    pub token_file: PathBuf,
    pub ca_pem: String,
    /// `host:port` of the API server.
    pub upstream: String,
    /// Allowed `host:port` targets besides the API server (lowercase).
    pub allow: Vec<String>,
    pub cluster_uid: Option<String>,
    pub agent_id: String,
    pub labels: Vec<(String, String)>,
    pub drain_timeout: Duration,
    pub max_streams: usize,
}

impl AgentArgs {
    pub fn resolve(self) -> Result<Settings> {
        tether_proto::name::validate_cluster_name(&self.cluster).map_err(anyhow::Error::msg)?;
        let (scheme, rest) = self
            .proxy
            .split_once("://")
            .with_context(|| format!("--proxy {:?}: expected tls://HOST:PORT", self.proxy))?;
        if scheme != "tls" {
            bail!("--proxy {:?}: this agent speaks tls:// (QUIC is not built yet)", self.proxy);
        }
        let (host, port) = split_host_port(rest, None)
            .with_context(|| format!("--proxy {:?}: expected tls://HOST:PORT", self.proxy))?;
        let ca_pem = std::fs::read_to_string(&self.ca_file)
            .with_context(|| format!("reading --ca-file {}", self.ca_file.display()))?;
        tether_proto::tls::parse_certs(&ca_pem, "--ca-file")?;
        let upstream = match &self.upstream {
            Some(u) => parse_upstream(u)?,
            None => crate::incluster::api_server_addr().context(
                "no --upstream given and not running in a pod (KUBERNETES_SERVICE_HOST is unset); \
                 pass --upstream https://HOST:PORT",
            )?,
        };
        let mut labels = Vec::new();
        for l in &self.labels {
            let (k, v) = l
                .split_once('=')
                .with_context(|| format!("--label {l:?}: expected KEY=VALUE"))?;
            labels.push((k.to_string(), v.to_string()));
        }
        let mut allow = Vec::new();
        for a in &self.allow {
            let (h, p) = split_host_port(a, None).with_context(|| format!("--allow {a:?}: expected HOST:PORT"))?;
            allow.push(join_host_port(&h.to_ascii_lowercase(), p));
        }
        Ok(Settings {
            proxy_addr: join_host_port(&host, port),
            server_name: self.server_name.unwrap_or(host),
            cluster: self.cluster,
            token_file: self.token_file,
            ca_pem,
            upstream,
            allow,
            cluster_uid: self.cluster_uid,
            agent_id: self.agent_id.unwrap_or_else(default_agent_id),
            labels,
            drain_timeout: self.drain_timeout,
            max_streams: self.max_streams,
        })
    }
}

/// `https://host[:port][/...]` or `host:port` → `host:port` (443 when an https URL has none).
pub fn parse_upstream(u: &str) -> Result<String> {
    let rest = match u.split_once("://") {
        Some(("https", r)) => r,
        Some((s, _)) => bail!("--upstream {u:?}: scheme {s:?} is not supported, use https://"),
        None => u,
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let default_port = u.contains("://").then_some(443);
    let (h, p) = split_host_port(authority, default_port)
        .with_context(|| format!("--upstream {u:?}: expected https://HOST:PORT"))?;
    Ok(join_host_port(&h, p))
}

/// Splits `host:port` / `[v6]:port`; `default_port` applies when there is no port.
pub fn split_host_port(s: &str, default_port: Option<u16>) -> Result<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once(']').context("unclosed [")?;
        let port = match p.strip_prefix(':') {
            Some(p) => p.parse()?,
            None => default_port.context("missing port")?,
        };
        return Ok((h.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.contains(':') => Ok((h.to_string(), p.parse()?)),
        None if !s.is_empty() => Ok((s.to_string(), default_port.context("missing port")?)),
        _ => bail!("expected HOST:PORT"),
    }
}

pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn default_agent_id() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_string()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("agent-{}", &tether_proto::token::random_id()[..8]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams() {
        assert_eq!(parse_upstream("https://10.0.0.1:6443").unwrap(), "10.0.0.1:6443");
        assert_eq!(parse_upstream("https://kube.example").unwrap(), "kube.example:443");
        assert_eq!(parse_upstream("https://[::1]:6443/").unwrap(), "[::1]:6443");
        assert_eq!(parse_upstream("127.0.0.1:6443").unwrap(), "127.0.0.1:6443");
        assert!(parse_upstream("http://x:1").is_err());
        assert!(parse_upstream("nohost").is_err());
    }
}
