//! `tether-proxy serve`: loads the state dir, binds every listener, and runs until SIGTERM.
//!
//! Shutdown: on SIGTERM or Ctrl-C the proxy stops accepting, tells every agent `GoAway` (so
//! they reconnect to another replica), waits for open streams to finish up to the drain
//! timeout, closes the sessions, and exits 0.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use tether_proto::tls::server_config;
use tether_proto::transport::quic::{QuicConfig, QuicListener, ResetSecret};
use tether_proto::transport::tls::TlsListener;
use tether_proto::transport::SessionConfig;

use crate::admin::{self, Admin};
use crate::agents::{self, AgentGate};
use crate::expose;
use crate::front::{self, Front};
use crate::metrics::Metrics;
use crate::publish::{self, Publish, Reissue, ServingCert};
use crate::registry::SessionRegistry;
use crate::settings::{split_host_port, Settings};
use crate::shards::Shards;
use crate::state::{ClusterUids, StateDir, CLUSTER_UIDS};

/// File in the state dir listing revoked token ids, one per line.
pub const REVOKED: &str = "revoked.txt";

/// Names the serving certificate must cover.
fn certificate_names(settings: &Settings) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    names.push(settings.publish_address.host.clone());
    for addr in [&settings.agent_addr, &settings.front_addr] {
        if let Ok((host, _)) = split_host_port(addr) {
            if host != "0.0.0.0" && host != "::" {
                names.push(host);
            }
        }
    }
    let mut seen = HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// Reads the revocation list (missing file = nothing revoked).
pub fn load_revoked(dir: &Path) -> Result<HashSet<String>> {
    let path = dir.join(REVOKED);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

async fn bind(addr: &str, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} address {addr}"))
}

/// Runs the proxy on `loops` event loops until a shutdown signal. The caller's runtime must
/// be single-threaded: it becomes shard 0 ([`Shards::start`]).
pub async fn run(settings: Settings, loops: usize) -> Result<()> {
    let shards = Shards::start(loops).context("starting the event loop threads")?;
    let state = StateDir::open(&settings.state_dir, &certificate_names(&settings))?;
    let mut verifier = state.signing_key.verifier();
    verifier.set_revoked(load_revoked(&settings.state_dir)?);
    let verifier = Arc::new(RwLock::new(verifier));
    let metrics = Arc::new(Metrics::new());
    let uids = ClusterUids::load(Some(settings.state_dir.join(CLUSTER_UIDS)))?;
    let registry = Arc::new(SessionRegistry::new(uids, metrics));
    let shutdown = CancellationToken::new();
    let stop_admin = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let publish = match &settings.publish_auto {
        Some(auto) => Publish::auto(auto),
        None => Publish::fixed(&settings.publish_address),
    };
    // The agent port's certificate can change while serving (`--publish-address auto`).
    let serving_cert = ServingCert::new(&state.server_cert_pem, &state.server_key_pem)?;
    registry
        .metrics()
        .certificate_expiry("ca", state.ca.cert_pem());
    registry
        .metrics()
        .certificate_expiry("server", &state.server_cert_pem);

    // Admin first, so /readyz can say "not ready" while the rest binds.
    let admin_listener = bind(&settings.admin_addr, "admin").await?;
    let admin_addr = admin_listener.local_addr()?;
    tokio::spawn(admin::serve(
        admin_listener,
        Admin {
            registry: registry.clone(),
            ready: ready.clone(),
            shutdown: shutdown.clone(),
            publish: publish.clone(),
        },
        stop_admin.clone(),
    ));

    let mut agent_tls = server_config(
        &state.server_cert_pem,
        &state.server_key_pem,
        tether_proto::transport::tls::AGENT_ALPNS,
        None,
    )?;
    agent_tls.cert_resolver = serving_cert.clone();
    let agent_tls = Arc::new(agent_tls);
    let gate = AgentGate {
        registry: registry.clone(),
        verifier: verifier.clone(),
        proxy_id: settings.proxy_id.clone(),
        heartbeat: settings.heartbeat_interval,
        session: SessionConfig {
            max_streams: settings.max_streams_per_session,
        },
        replica_count: 1,
        shutdown: shutdown.clone(),
        shards: shards.clone(),
    };
    // TLS on the TCP port, QUIC on the same port number over UDP (the port TCP got, when
    // the address asked for any port).
    let mut agent_addr = settings.agent_addr.clone();
    let mut agent_listeners = Vec::new();
    if settings.transports.tls {
        let listener = TlsListener::bind(&settings.agent_addr, agent_tls.clone())
            .await
            .with_context(|| format!("binding the agent address {}", settings.agent_addr))?;
        let addr = listener.local_addr()?;
        agent_addr = addr.to_string();
        agent_listeners.push(format!("tls://{addr}"));
        tokio::spawn(agents::serve_tls(listener, gate.clone()));
    }
    if settings.transports.quic {
        let quic = QuicConfig::for_heartbeat(settings.heartbeat_interval)
            .with_reset_secret(ResetSecret::derive(state.server_key_pem.as_bytes()))
            .with_congestion(settings.quic_congestion_control);
        let listener = QuicListener::bind(&agent_addr, agent_tls.clone(), &gate.session, &quic)
            .await
            .with_context(|| {
                format!(
                    "binding the QUIC agent address udp/{agent_addr} (turn QUIC off with \
                     --transports tls)"
                )
            })?;
        agent_listeners.push(format!("quic://{}", listener.local_addr()?));
        tokio::spawn(agents::serve_quic(listener, gate.clone()));
    }

    let front_tls = server_config(
        &state.server_cert_pem,
        &state.server_key_pem,
        &[b"h2", b"http/1.1"],
        Some(state.ca.cert_pem()),
    )?;
    let front_listener = bind(&settings.front_addr, "front").await?;
    let front_addr = front_listener.local_addr()?;
    tokio::spawn(front::serve(
        front_listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(front_tls)),
        Front {
            registry: registry.clone(),
            verifier: verifier.clone(),
            gateway: crate::gateway::Gateway::new(registry.clone()),
        },
        shards.clone(),
        shutdown.clone(),
    ));

    let mut exposed: Vec<(String, SocketAddr)> = Vec::new();
    for e in &settings.expose {
        let l = bind(&e.addr, &format!("exposed listener for {}", e.cluster)).await?;
        let addr = l.local_addr()?;
        registry.add_listener(&e.cluster, addr.to_string());
        exposed.push((e.cluster.clone(), addr));
        expose::serve(
            l,
            expose::Exposed {
                cluster: e.cluster.clone(),
                registry: registry.clone(),
                shards: shards.clone(),
                shutdown: shutdown.clone(),
            },
        );
    }

    if let Some(auto) = settings.publish_auto.clone() {
        let port = split_host_port(&agent_addr).map(|(_, p)| p).unwrap_or(0);
        let scheme = if settings.transports.tls {
            "tls"
        } else {
            "quic"
        };
        let reissue = Reissue {
            ca: tether_proto::tls::CertificateAuthority::load(
                state.ca.cert_pem(),
                &state.ca.key_pem(),
            )?,
            base_names: certificate_names(&settings),
            state_dir: settings.state_dir.clone(),
            cert: serving_cert.clone(),
            metrics: registry.metrics().clone(),
        };
        tokio::spawn(publish::watch(
            auto,
            scheme.into(),
            port,
            publish.clone(),
            reissue,
            shutdown.clone(),
        ));
    }

    ready.store(true, Ordering::Relaxed);
    if settings.publish_address.defaulted && settings.publish_auto.is_none() {
        warn!(
            publish_address = %settings.publish_address,
            "no --publish-address given; agents outside this machine need the address they can reach, e.g. --publish-address tls://proxy.example.com:8443"
        );
    }
    info!(
        agent_addr = %agent_listeners.join(","), %front_addr, %admin_addr,
        publish_address = %match &settings.publish_auto {
            Some(a) => format!("auto (LoadBalancer of Service {}/{})", a.namespace, a.service),
            None => settings.publish_address.to_string(),
        },
        exposed = ?exposed,
        state_dir = %settings.state_dir.display(),
        proxy_id = %settings.proxy_id,
        event_loops = shards.len(),
        "tether-proxy ready"
    );

    // Revocation list reload on SIGHUP.
    #[cfg(unix)]
    {
        let (verifier, dir) = (verifier.clone(), settings.state_dir.clone());
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hup.recv().await.is_some() {
                match load_revoked(&dir) {
                    Ok(set) => {
                        info!(revoked = set.len(), "reloaded the revocation list");
                        verifier.write().expect("verifier lock").set_revoked(set);
                    }
                    Err(e) => warn!(error = %e, "could not reload the revocation list"),
                }
            }
        });
    }

    tether_proto::process::shutdown_signal().await;
    info!(drain_timeout = ?settings.drain_timeout, "shutting down: no new connections, telling agents to go away");
    shutdown.cancel();
    drain(&registry, settings.drain_timeout).await;
    for s in registry.sessions() {
        s.handle.close();
    }
    stop_admin.cancel();
    // Let session drivers say goodbye.
    tokio::time::sleep(Duration::from_millis(100)).await;
    info!("tether-proxy stopped");
    Ok(())
}

/// Waits until no data stream is open (each session's control stream does not count), or
/// the timeout passes.
async fn drain(registry: &SessionRegistry, timeout: Duration) {
    let start = Instant::now();
    loop {
        let open: usize = registry.sessions().iter().map(|s| s.data_streams()).sum();
        if open == 0 {
            info!("all streams finished");
            return;
        }
        if start.elapsed() >= timeout {
            warn!(
                open,
                "drain timeout passed with streams still open; closing them"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
