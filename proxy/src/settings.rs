//! Settings of `tether-proxy serve`: flags, their `TETHER_…` environment twins, and the
//! optional YAML config file, merged in that order of precedence (flag, env, file, default).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;

use tether_proto::transport::quic::CongestionControl;

use crate::expose::Expose;

pub const DEFAULT_STATE_DIR: &str = "tether-state";
pub const DEFAULT_AGENT_ADDR: &str = "0.0.0.0:8443";
pub const DEFAULT_FRONT_ADDR: &str = "0.0.0.0:9443";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9090";

/// Flags of `tether-proxy serve`. Every one is optional: a missing flag falls back to its
/// environment variable, then to the config file, then to the default.
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// YAML config file whose keys mirror these flags (camelCase: stateDir, agentAddr, ...).
    #[arg(long, env = "TETHER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory holding the CA, serving certificate and signing key [default: tether-state].
    #[arg(long, env = "TETHER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where agents connect: TLS on this TCP port, QUIC on the same UDP port number
    /// [default: 0.0.0.0:8443].
    #[arg(long, env = "TETHER_AGENT_ADDR")]
    pub agent_addr: Option<String>,
    /// Agent transports to listen for: tls (TCP), quic (UDP), or both [default: tls,quic].
    #[arg(long, env = "TETHER_TRANSPORTS", value_delimiter = ',')]
    pub transports: Vec<String>,
    /// Where host-side callers connect (HTTPS: CONNECT, gateway) [default: 0.0.0.0:9443].
    #[arg(long, env = "TETHER_FRONT_ADDR")]
    pub front_addr: Option<String>,
    /// Health, readiness, status and metrics (plain HTTP) [default: 127.0.0.1:9090].
    #[arg(long, env = "TETHER_ADMIN_ADDR")]
    pub admin_addr: Option<String>,
    /// The address agents dial, e.g. tls://proxy.example.com:8443 (proxyPublishAddress), or
    /// `auto`: the external address of the proxy's LoadBalancer Service, read from the host
    /// cluster's API server [default: tls://127.0.0.1:AGENT_PORT].
    #[arg(long, env = "TETHER_PUBLISH_ADDRESS")]
    pub publish_address: Option<String>,
    /// A plain TCP listener spliced to a cluster's API server: NAME=HOST:PORT (repeatable;
    /// comma-separated in the environment variable).
    #[arg(long, env = "TETHER_EXPOSE", value_delimiter = ',')]
    pub expose: Vec<Expose>,
    /// Interval of control-stream heartbeats; three missed ones close a session [default: 5s].
    #[arg(long, env = "TETHER_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Congestion controller of what the proxy sends over QUIC: cubic, or bbr for links that
    /// lose packets at random (quinn calls its BBR experimental) [default: cubic]. Set the
    /// agent's flag of the same name for what agents send.
    #[arg(long, env = "TETHER_QUIC_CONGESTION_CONTROL")]
    pub quic_congestion_control: Option<CongestionControl>,
    /// Most streams open at once on one agent session [default: 16384].
    #[arg(long, env = "TETHER_MAX_STREAMS_PER_SESSION")]
    pub max_streams_per_session: Option<usize>,
    /// On SIGTERM, how long open streams may take to finish [default: 20s].
    #[arg(long, env = "TETHER_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// This replica's id, shown to agents [default: the host name].
    #[arg(long, env = "TETHER_PROXY_ID")]
    pub proxy_id: Option<String>,
    /// With `--publish-address auto`: the proxy's agent Service (type LoadBalancer) whose
    /// external address is published [default: tether-proxy-agent].
    #[arg(long, env = "TETHER_PUBLISH_SERVICE")]
    pub publish_service: Option<String>,
    /// Namespace of that Service [default: POD_NAMESPACE, the pod's namespace, tether-system].
    #[arg(long, env = "TETHER_PUBLISH_SERVICE_NAMESPACE")]
    pub publish_service_namespace: Option<String>,
    /// How often `--publish-address auto` reads the Service [default: 5s].
    #[arg(long, env = "TETHER_PUBLISH_POLL_INTERVAL", value_parser = humantime::parse_duration)]
    pub publish_poll_interval: Option<Duration>,
    /// The host cluster's API server for `--publish-address auto`, https://HOST:PORT
    /// [default in a pod: KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT].
    #[arg(long, env = "TETHER_HOST_API_SERVER")]
    pub host_api_server: Option<String>,
    /// CA (PEM) of the host API server [default in a pod: the ServiceAccount's ca.crt].
    #[arg(long, env = "TETHER_HOST_API_CA_FILE")]
    pub host_api_ca_file: Option<PathBuf>,
    /// Bearer token file for the host API server [default in a pod: the ServiceAccount token].
    #[arg(long, env = "TETHER_HOST_API_TOKEN_FILE")]
    pub host_api_token_file: Option<PathBuf>,
}

/// The config file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConfigFile {
    state_dir: Option<PathBuf>,
    agent_addr: Option<String>,
    transports: Option<OneOrMany>,
    front_addr: Option<String>,
    admin_addr: Option<String>,
    publish_address: Option<String>,
    #[serde(default)]
    expose: Vec<String>,
    #[serde(default, with = "humantime_serde_opt")]
    heartbeat_interval: Option<Duration>,
    #[serde(default, with = "congestion_opt")]
    quic_congestion_control: Option<CongestionControl>,
    max_streams_per_session: Option<usize>,
    #[serde(default, with = "humantime_serde_opt")]
    drain_timeout: Option<Duration>,
    proxy_id: Option<String>,
    publish_service: Option<String>,
    publish_service_namespace: Option<String>,
    #[serde(default, with = "humantime_serde_opt")]
    publish_poll_interval: Option<Duration>,
    host_api_server: Option<String>,
    host_api_ca_file: Option<PathBuf>,
    host_api_token_file: Option<PathBuf>,
}

/// A list in the config file, or one comma-separated string as on the command line.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => s.split(',').map(str::to_string).collect(),
            OneOrMany::Many(v) => v,
        }
    }
}

/// Durations in the config file are written like flags: `5s`, `1m30s`.
mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// `quicCongestionControl: cubic | bbr` in the config file.
mod congestion_opt {
    use serde::{Deserialize, Deserializer};
    use tether_proto::transport::quic::CongestionControl;

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<CongestionControl>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| s.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Resolved settings of a running proxy.
#[derive(Debug, Clone)]
pub struct Settings {
    pub state_dir: PathBuf,
    pub agent_addr: String,
    pub transports: Transports,
    pub front_addr: String,
    pub admin_addr: String,
    pub publish_address: PublishAddress,
    pub expose: Vec<Expose>,
    pub heartbeat_interval: Duration,
    /// Congestion controller of what the proxy sends over QUIC.
    pub quic_congestion_control: CongestionControl,
    pub max_streams_per_session: usize,
    pub drain_timeout: Duration,
    pub proxy_id: String,
    /// `--publish-address auto`: where to read the LoadBalancer address from. The
    /// `publish_address` is then only the local default until the address resolves.
    pub publish_auto: Option<crate::publish::AutoPublish>,
}

/// Which agent transports the proxy listens for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transports {
    /// TLS 1.3 over TCP, yamux on top.
    pub tls: bool,
    /// QUIC over UDP, on the same port number.
    pub quic: bool,
}

impl Default for Transports {
    fn default() -> Self {
        Transports {
            tls: true,
            quic: true,
        }
    }
}

impl Transports {
    /// Parses names like `tls`, `quic` (any case, blanks ignored); at least one is required.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self> {
        let mut t = Transports {
            tls: false,
            quic: false,
        };
        for name in names {
            match name.as_ref().trim().to_ascii_lowercase().as_str() {
                "tls" => t.tls = true,
                "quic" => t.quic = true,
                "" => {}
                other => {
                    bail!("transport {other:?}: expected tls or quic (e.g. --transports tls,quic)")
                }
            }
        }
        if !t.tls && !t.quic {
            bail!("no agent transport left: --transports needs tls, quic or both");
        }
        Ok(t)
    }
}

impl std::fmt::Display for Transports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = [(self.tls, "tls"), (self.quic, "quic")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
        f.write_str(&names.join(","))
    }
}

/// Where agents reach the proxy: scheme (`tls`, `quic`, `auto`), host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishAddress {
    pub scheme: String,
    pub host: String,
    pub port: u16,
    /// True when derived from the listen address rather than set by the operator.
    pub defaulted: bool,
}

impl std::fmt::Display for PublishAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}://[{}]:{}", self.scheme, self.host, self.port)
        } else {
            write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
        }
    }
}

impl PublishAddress {
    /// Parses `tls://host:port` (also `quic://`, `auto://`, or a bare `host:port`, taken as tls).
    pub fn parse(s: &str) -> Result<Self> {
        let (scheme, rest) = s.split_once("://").unwrap_or(("tls", s));
        if !matches!(scheme, "tls" | "quic" | "auto") {
            bail!("publish address {s:?}: scheme must be tls://, quic:// or auto://");
        }
        let (host, port) = split_host_port(rest)
            .with_context(|| format!("publish address {s:?}: expected SCHEME://HOST:PORT"))?;
        Ok(PublishAddress {
            scheme: scheme.into(),
            host,
            port,
            defaulted: false,
        })
    }
}

/// Splits `host:port` or `[v6]:port`.
pub fn split_host_port(s: &str) -> Result<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").context("expected [IPv6]:PORT")?;
        (h, p)
    } else {
        s.rsplit_once(':').context("expected HOST:PORT")?
    };
    if host.is_empty() {
        bail!("empty host in {s:?}");
    }
    let port = port
        .parse::<u16>()
        .with_context(|| format!("bad port in {s:?}"))?;
    Ok((host.to_string(), port))
}

impl ServeArgs {
    /// Merges flags/env with the config file and defaults.
    pub fn resolve(self) -> Result<Settings> {
        let file = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config {}", p.display()))?;
                serde_yaml_ng::from_str::<ConfigFile>(&text)
                    .with_context(|| format!("parsing config {}", p.display()))?
            }
            None => ConfigFile::default(),
        };
        let agent_addr = self
            .agent_addr
            .or(file.agent_addr)
            .unwrap_or_else(|| DEFAULT_AGENT_ADDR.into());
        let publish_flag = self.publish_address.or(file.publish_address);
        let auto = publish_flag
            .as_deref()
            .is_some_and(|p| p.trim().eq_ignore_ascii_case("auto"));
        let publish_auto = if auto {
            Some(crate::publish::AutoPublish::resolve(
                self.publish_service_namespace
                    .or(file.publish_service_namespace),
                self.publish_service.or(file.publish_service),
                self.host_api_server.or(file.host_api_server),
                self.host_api_ca_file.or(file.host_api_ca_file),
                self.host_api_token_file.or(file.host_api_token_file),
                self.publish_poll_interval.or(file.publish_poll_interval),
            )?)
        } else {
            None
        };
        let publish_address = match publish_flag.filter(|_| !auto) {
            Some(p) => PublishAddress::parse(&p)?,
            None => {
                let (host, port) = split_host_port(&agent_addr)?;
                let host = if host == "0.0.0.0" || host == "::" {
                    "127.0.0.1".into()
                } else {
                    host
                };
                PublishAddress {
                    scheme: "tls".into(),
                    host,
                    port,
                    defaulted: true,
                }
            }
        };
        let transports = if !self.transports.is_empty() {
            Transports::parse(&self.transports)?
        } else if let Some(t) = file.transports {
            Transports::parse(&t.into_vec())?
        } else {
            Transports::default()
        };
        let mut expose = self.expose;
        for e in file.expose {
            expose.push(e.parse().map_err(anyhow::Error::msg)?);
        }
        Ok(Settings {
            state_dir: self
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            agent_addr,
            transports,
            front_addr: self
                .front_addr
                .or(file.front_addr)
                .unwrap_or_else(|| DEFAULT_FRONT_ADDR.into()),
            admin_addr: self
                .admin_addr
                .or(file.admin_addr)
                .unwrap_or_else(|| DEFAULT_ADMIN_ADDR.into()),
            publish_address,
            expose,
            heartbeat_interval: self
                .heartbeat_interval
                .or(file.heartbeat_interval)
                .unwrap_or(Duration::from_secs(5)),
            quic_congestion_control: self
                .quic_congestion_control
                .or(file.quic_congestion_control)
                .unwrap_or_default(),
            max_streams_per_session: self
                .max_streams_per_session
                .or(file.max_streams_per_session)
                .unwrap_or(16_384),
            drain_timeout: self
                .drain_timeout
                .or(file.drain_timeout)
                .unwrap_or(Duration::from_secs(20)),
            proxy_id: self
                .proxy_id
                .or(file.proxy_id)
                .unwrap_or_else(default_proxy_id),
            publish_auto,
        })
    }
}

fn default_proxy_id() -> String {
    std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "tether-proxy".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_address_forms() {
        let p = PublishAddress::parse("tls://proxy.example.com:8443").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.example.com", 8443));
        assert_eq!(PublishAddress::parse("10.0.0.1:443").unwrap().scheme, "tls");
        assert_eq!(
            PublishAddress::parse("quic://[::1]:8443").unwrap().host,
            "::1"
        );
        assert_eq!(
            PublishAddress::parse("quic://[::1]:8443")
                .unwrap()
                .to_string(),
            "quic://[::1]:8443"
        );
        assert!(PublishAddress::parse("http://x:1").is_err());
        assert!(PublishAddress::parse("tls://x").is_err());
    }

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(
            &f,
            "agentAddr: 127.0.0.1:1111\nfrontAddr: 127.0.0.1:2222\nexpose: [\"a=127.0.0.1:3333\"]\nheartbeatInterval: 2s\n",
        )
        .unwrap();
        let s = ServeArgs {
            config: Some(f.clone()),
            front_addr: Some("127.0.0.1:4444".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(s.agent_addr, "127.0.0.1:1111");
        assert_eq!(s.front_addr, "127.0.0.1:4444");
        assert_eq!(s.expose.len(), 1);
        assert_eq!(s.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(s.publish_address.to_string(), "tls://127.0.0.1:1111");
        assert_eq!(s.transports, Transports::default());
        assert_eq!(s.quic_congestion_control, CongestionControl::Cubic);
        // The congestion controller: from the file, a flag over the file, a bad name refused.
        std::fs::write(&f, "quicCongestionControl: bbr\n").unwrap();
        let from_file = |flag: Option<CongestionControl>| {
            ServeArgs {
                config: Some(f.clone()),
                quic_congestion_control: flag,
                ..Default::default()
            }
            .resolve()
        };
        let cc = |s: Settings| s.quic_congestion_control;
        assert_eq!(from_file(None).map(cc).unwrap(), CongestionControl::Bbr);
        assert_eq!(
            from_file(Some(CongestionControl::Cubic)).map(cc).unwrap(),
            CongestionControl::Cubic
        );
        std::fs::write(&f, "quicCongestionControl: vegas\n").unwrap();
        let err = from_file(None).unwrap_err();
        assert!(format!("{err:#}").contains("vegas"), "{err:#}");
        std::fs::write(&f, "agentAdr: typo\n").unwrap();
        let err = ServeArgs {
            config: Some(f),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(format!("{err:#}").contains("agentAdr"), "{err:#}");
    }

    #[test]
    fn transports_from_flags_and_file() {
        let t = Transports::parse(&["tls"]).unwrap();
        assert!(t.tls && !t.quic);
        assert_eq!(
            Transports::parse(&["QUIC", " tls "]).unwrap().to_string(),
            "tls,quic"
        );
        assert!(Transports::parse(&["udp"]).is_err());
        assert!(Transports::parse::<&str>(&[]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        for text in ["transports: [quic]\n", "transports: quic\n"] {
            std::fs::write(&f, text).unwrap();
            let s = ServeArgs {
                config: Some(f.clone()),
                ..Default::default()
            }
            .resolve()
            .unwrap();
            assert_eq!(s.transports.to_string(), "quic", "{text}");
        }
        // The flag wins over the file.
        let s = ServeArgs {
            config: Some(f),
            transports: vec!["tls".into()],
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(s.transports.to_string(), "tls");
    }
}
