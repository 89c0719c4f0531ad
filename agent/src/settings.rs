//! Agent settings: flags with `TETHER_…` environment twins, resolved into what the agent uses.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

/// Flags of `tether-agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Proxy to dial: tls://HOST:PORT (TLS over TCP), quic://HOST:PORT (QUIC over UDP), or
    /// auto://HOST:PORT (QUIC, falling back to TLS where UDP does not get through).
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
    /// CA (PEM) that signed the API server's certificate, for the kube gateway
    /// [default in a pod: the ServiceAccount's ca.crt].
    #[arg(long, env = "TETHER_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,
    /// Bearer token file for the API server, re-read as it rotates
    /// [default in a pod: the ServiceAccount token].
    #[arg(long, env = "TETHER_UPSTREAM_TOKEN_FILE")]
    pub upstream_token_file: Option<PathBuf>,
    /// Client certificate (PEM) for the API server, with --upstream-client-key.
    #[arg(
        long,
        env = "TETHER_UPSTREAM_CLIENT_CERT",
        requires = "upstream_client_key"
    )]
    pub upstream_client_cert: Option<PathBuf>,
    /// Client key (PEM) for the API server.
    #[arg(
        long,
        env = "TETHER_UPSTREAM_CLIENT_KEY",
        requires = "upstream_client_cert"
    )]
    pub upstream_client_key: Option<PathBuf>,
    /// How gateway callers reach the API server: impersonate the verified caller, or act as
    /// the agent itself.
    #[arg(
        long,
        env = "TETHER_IDENTITY",
        value_enum,
        default_value = "impersonate"
    )]
    pub identity: crate::kube::IdentityMode,
    /// Congestion controller of what the agent sends over QUIC: cubic, or bbr for links that
    /// lose packets at random (quinn calls its BBR experimental). Set the proxy's flag of the
    /// same name for what the proxy sends.
    #[arg(long, env = "TETHER_QUIC_CONGESTION_CONTROL", default_value = "cubic")]
    pub quic_congestion_control: tether_proto::transport::quic::CongestionControl,
    /// Stream multiplexer over tls://: tether (tether's own), yamux, or h2 (HTTP/2, which also
    /// looks like ordinary HTTPS to egress middleboxes).
    #[arg(long, env = "TETHER_MUX", value_parser = parse_mux, default_value = "tether")]
    pub mux: tether_proto::transport::tls::Mux,
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
    /// How to reach it: the scheme of `--proxy`.
    pub transport: ProxyTransport,
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
    /// Credentials for the kube gateway; `None` when none are configured (gateway streams are
    /// then refused with the reason).
    pub kube: Option<crate::kube::KubeCredentials>,
    /// Multiplexer over TLS.
    pub mux: tether_proto::transport::tls::Mux,
    pub identity: crate::kube::IdentityMode,
    /// Congestion controller of what the agent sends over QUIC.
    pub quic_congestion_control: tether_proto::transport::quic::CongestionControl,
}

impl AgentArgs {
    pub fn resolve(self) -> Result<Settings> {
        tether_proto::name::validate_cluster_name(&self.cluster).map_err(anyhow::Error::msg)?;
        let (transport, host, port) = parse_proxy(&self.proxy)?;
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
            let (h, p) = split_host_port(a, None)
                .with_context(|| format!("--allow {a:?}: expected HOST:PORT"))?;
            allow.push(join_host_port(&h.to_ascii_lowercase(), p));
        }
        let kube = self.kube_credentials()?;
        Ok(Settings {
            kube,
            mux: self.mux,
            identity: self.identity,
            quic_congestion_control: self.quic_congestion_control,
            proxy_addr: join_host_port(&host, port),
            transport,
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

impl AgentArgs {
    /// The kube gateway's credentials: flags first, then the pod's ServiceAccount.
    fn kube_credentials(&self) -> Result<Option<crate::kube::KubeCredentials>> {
        let sa = std::path::Path::new(crate::incluster::SERVICE_ACCOUNT_DIR);
        let in_pod = crate::incluster::api_server_addr().is_some() && self.upstream.is_none();
        let ca_file = self
            .upstream_ca_file
            .clone()
            .or_else(|| in_pod.then(|| sa.join("ca.crt")));
        let Some(ca_file) = ca_file else {
            return Ok(None);
        };
        let ca_pem = std::fs::read_to_string(&ca_file)
            .with_context(|| format!("reading the API server CA {}", ca_file.display()))?;
        tether_proto::tls::parse_certs(&ca_pem, "--upstream-ca-file")?;
        let token_file = self
            .upstream_token_file
            .clone()
            .or_else(|| in_pod.then(|| sa.join("token")));
        let client_identity = match (&self.upstream_client_cert, &self.upstream_client_key) {
            (Some(c), Some(k)) => Some((
                std::fs::read_to_string(c).with_context(|| format!("reading {}", c.display()))?,
                std::fs::read_to_string(k).with_context(|| format!("reading {}", k.display()))?,
            )),
            _ => None,
        };
        Ok(Some(crate::kube::KubeCredentials {
            ca_pem,
            token_file,
            client_identity,
        }))
    }
}

/// The transport an agent dials the proxy with, from the scheme of `--proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyTransport {
    /// `tls://`: TLS 1.3 over TCP, yamux on top.
    Tls,
    /// `quic://`: QUIC over UDP only.
    Quic,
    /// `auto://`: QUIC first, TLS when QUIC does not come up; remembers what worked.
    Auto,
}

impl std::fmt::Display for ProxyTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProxyTransport::Tls => "tls",
            ProxyTransport::Quic => "quic",
            ProxyTransport::Auto => "auto",
        })
    }
}

/// `tls://HOST:PORT`, `quic://HOST:PORT` or `auto://HOST:PORT` → transport, host, port.
pub fn parse_proxy(proxy: &str) -> Result<(ProxyTransport, String, u16)> {
    let expected = "expected tls://HOST:PORT, quic://HOST:PORT or auto://HOST:PORT";
    let (scheme, rest) = proxy
        .split_once("://")
        .with_context(|| format!("--proxy {proxy:?}: {expected}"))?;
    let transport = match scheme.to_ascii_lowercase().as_str() {
        "tls" => ProxyTransport::Tls,
        "quic" => ProxyTransport::Quic,
        "auto" => ProxyTransport::Auto,
        _ => bail!("--proxy {proxy:?}: unknown scheme {scheme:?}; {expected}"),
    };
    let (host, port) = split_host_port(rest.trim_end_matches('/'), None)
        .with_context(|| format!("--proxy {proxy:?}: {expected}"))?;
    Ok((transport, host, port))
}

fn parse_mux(s: &str) -> Result<tether_proto::transport::tls::Mux, String> {
    use tether_proto::transport::tls::Mux;
    match s {
        "tether" => Ok(Mux::Tether),
        "yamux" => Ok(Mux::Yamux),
        "h2" | "http2" => Ok(Mux::H2),
        other => Err(format!("--mux {other:?}: expected tether, yamux or h2")),
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
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("agent-{}", &tether_proto::token::random_id()[..8]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_schemes() {
        let (t, h, p) = parse_proxy("quic://proxy.example.com:8443").unwrap();
        assert_eq!(
            (t, h.as_str(), p),
            (ProxyTransport::Quic, "proxy.example.com", 8443)
        );
        assert_eq!(
            parse_proxy("tls://10.0.0.1:443").unwrap().0,
            ProxyTransport::Tls
        );
        let (t, h, _) = parse_proxy("auto://[::1]:8443/").unwrap();
        assert_eq!((t, h.as_str()), (ProxyTransport::Auto, "::1"));
        assert!(parse_proxy("http://x:1").is_err());
        assert!(parse_proxy("x:1").is_err());
        assert!(parse_proxy("quic://x").is_err());
    }

    #[test]
    fn upstreams() {
        assert_eq!(
            parse_upstream("https://10.0.0.1:6443").unwrap(),
            "10.0.0.1:6443"
        );
        assert_eq!(
            parse_upstream("https://kube.example").unwrap(),
            "kube.example:443"
        );
        assert_eq!(parse_upstream("https://[::1]:6443/").unwrap(), "[::1]:6443");
        assert_eq!(parse_upstream("127.0.0.1:6443").unwrap(), "127.0.0.1:6443");
        assert!(parse_upstream("http://x:1").is_err());
        assert!(parse_upstream("nohost").is_err());
    }
}
