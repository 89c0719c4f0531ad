//! The session registry: which agents are connected for which cluster, and opening tunnel
//! streams to a cluster through one of them.
//!
//! Several agents (replicas) may serve one cluster; a new stream goes to the connected,
//! non-draining agent with the fewest open streams. The registry also keeps, per cluster, when
//! it connected or disconnected, so status pages can say "disconnected since".
//!
//! Locking: one `RwLock` over the map, held only to read or change membership, never across
//! an await.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tether_proto::frame::write_message;
use tether_proto::messages::{StreamOpen, StreamRejectCode, Target};
use tether_proto::reply::{AwaitReply, OnReply, ReplyError};
use tether_proto::transport::{MuxStream, SessionError, SessionHandle};

use crate::metrics::Metrics;
use crate::state::ClusterUids;

/// How long the agent has to answer a `StreamOpen` (it dials its target first).
pub const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// One connected agent session.
pub struct AgentSession {
    pub cluster: String,
    pub agent_id: String,
    pub agent_version: String,
    pub session_id: String,
    pub labels: HashMap<String, String>,
    pub handle: SessionHandle,
    pub connected_at: SystemTime,
    /// Last heartbeat round trip, microseconds (0 until measured).
    pub rtt_micros: AtomicU64,
    /// The agent's side of the session finds the link slow, as its last `Pong` said (the
    /// proxy's side tells [`SessionHandle::link_is_slow`]; each measures what it sends).
    pub agent_finds_link_slow: AtomicBool,
    /// Bytes sent to the agent on data streams.
    pub bytes_to_agent: AtomicU64,
    /// Bytes received from the agent on data streams.
    pub bytes_from_agent: AtomicU64,
    /// Set when either side is draining: no new streams go here.
    pub draining: AtomicBool,
    /// The event loop the session runs on ([`crate::shards`]).
    pub shard: usize,
}

impl AgentSession {
    /// Either side of the session finds the link slow.
    pub fn link_is_slow(&self) -> bool {
        self.handle.link_is_slow() || self.agent_finds_link_slow.load(Ordering::Relaxed)
    }

    /// Data streams open now (the session's streams less its control stream).
    pub fn data_streams(&self) -> usize {
        self.handle.open_streams().saturating_sub(1)
    }
}

/// What the registry knows about one cluster.
#[derive(Default)]
struct ClusterEntry {
    agents: Vec<Arc<AgentSession>>,
    /// When the first of the current agents connected.
    connected_since: Option<SystemTime>,
    /// When the last agent went away (while none is connected).
    disconnected_since: Option<SystemTime>,
}

/// Status of one cluster, for `/api/v1/clusters`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    pub name: String,
    pub agents: usize,
    pub connected: bool,
    pub connected_since: Option<String>,
    pub disconnected_since: Option<String>,
    pub rtt_micros: u64,
    /// Some agent's session finds its link slow ([`AgentStatus::slow_link`]).
    pub slow_link: bool,
    pub open_streams: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub transports: Vec<String>,
    /// Per-cluster TCP listeners (`--expose`) on this proxy.
    pub listeners: Vec<String>,
    pub agent_details: Vec<AgentStatus>,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub agent_id: String,
    pub session_id: String,
    pub version: String,
    pub transport: String,
    pub peer: String,
    pub connected_since: String,
    pub rtt_micros: u64,
    /// Either side of the session finds the link slow, in the direction it sends, and keeps
    /// less queued ([`AgentSession::link_is_slow`]; `tls+tether` sessions only).
    pub slow_link: bool,
    pub open_streams: usize,
    pub draining: bool,
    /// The proxy event loop (shard) the session runs on.
    pub event_loop: usize,
}

/// Why a stream to a cluster could not be opened. Each maps to an HTTP status on the front.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cluster {cluster:?} is not known to this proxy: no agent has ever connected for it")]
    UnknownCluster { cluster: String },
    #[error("no agent of cluster {cluster:?} is connected{}", since_text(*.since))]
    NoAgent {
        cluster: String,
        since: Option<SystemTime>,
    },
    #[error("agent of cluster {cluster:?} refused the stream: {reason}")]
    Rejected {
        cluster: String,
        code: StreamRejectCode,
        reason: String,
    },
    #[error("tunnel to cluster {cluster:?} failed: {source}")]
    Session {
        cluster: String,
        source: SessionError,
    },
    #[error("agent of cluster {cluster:?} broke the stream protocol: {detail}")]
    Protocol { cluster: String, detail: String },
    #[error("agent of cluster {cluster:?} did not answer within {}s", STREAM_OPEN_TIMEOUT.as_secs())]
    Timeout { cluster: String },
}

fn since_text(since: Option<SystemTime>) -> String {
    match since {
        Some(t) => format!(
            " (disconnected since {})",
            humantime::format_rfc3339_seconds(t)
        ),
        None => String::new(),
    }
}

impl OpenError {
    /// Stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            OpenError::UnknownCluster { .. } => "unknown_cluster",
            OpenError::NoAgent { .. } => "no_agent",
            OpenError::Rejected { .. } => "rejected",
            OpenError::Session { .. } => "session_error",
            OpenError::Protocol { .. } => "protocol_error",
            OpenError::Timeout { .. } => "timeout",
        }
    }
}

/// A data stream to a cluster: accepted by its agent ([`SessionRegistry::open`]), or with the
/// agent's reply still to be read off its front ([`SessionRegistry::open_early`]). Counts
/// bytes into the agent's totals and the open-streams gauge while it lives.
pub struct TunnelStream {
    pub stream: AwaitReply<MuxStream>,
    pub agent: Arc<AgentSession>,
    metrics: Arc<Metrics>,
}

impl TunnelStream {
    /// The stream as plain I/O that counts its bytes into the agent's and the proxy's totals
    /// and holds the open-streams gauge while it lives.
    pub fn into_io(self) -> CountedStream {
        self.metrics.streams_open().inc();
        CountedStream {
            stream: self.stream,
            agent: self.agent,
            metrics: self.metrics,
        }
    }

    /// Splices `client` with this stream until both directions end.
    pub async fn splice_with<C>(self, client: C) -> std::io::Result<tether_proto::splice::Spliced>
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        tether_proto::splice::splice_chunks(client, self.into_io()).await
    }
}

/// A tunnel stream that counts bytes as they pass. See [`TunnelStream::into_io`].
pub struct CountedStream {
    stream: AwaitReply<MuxStream>,
    agent: Arc<AgentSession>,
    metrics: Arc<Metrics>,
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.metrics.streams_open().dec();
    }
}

impl tokio::io::AsyncRead for CountedStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.agent.bytes_from_agent.fetch_add(n, Ordering::Relaxed);
            self.metrics.bytes(0, n);
        }
        poll
    }
}

impl CountedStream {
    /// Counts bytes written to the agent.
    fn count_sent(&self, poll: &std::task::Poll<std::io::Result<usize>>) {
        if let std::task::Poll::Ready(Ok(n)) = poll {
            self.agent
                .bytes_to_agent
                .fetch_add(*n as u64, Ordering::Relaxed);
            self.metrics.bytes(*n as u64, 0);
        }
    }
}

impl tokio::io::AsyncWrite for CountedStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.stream).poll_write(cx, buf);
        self.count_sent(&poll);
        poll
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.count_sent(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl tether_proto::splice::ChunkIo for CountedStream {
    fn moves_chunks(&self) -> bool {
        self.stream.moves_chunks()
    }

    fn poll_read_chunk(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<Option<bytes::Bytes>>> {
        let poll = self.stream.poll_read_chunk(cx);
        if let std::task::Poll::Ready(Ok(Some(chunk))) = &poll {
            let n = chunk.len() as u64;
            self.agent.bytes_from_agent.fetch_add(n, Ordering::Relaxed);
            self.metrics.bytes(0, n);
        }
        poll
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut std::task::Context<'_>,
        chunk: &mut bytes::Bytes,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = chunk.len();
        let poll = self.stream.poll_write_chunk(cx, chunk);
        let n = (before - chunk.len()) as u64;
        if n > 0 {
            self.agent.bytes_to_agent.fetch_add(n, Ordering::Relaxed);
            self.metrics.bytes(n, 0);
        }
        poll
    }
}

/// The registry of connected agents.
pub struct SessionRegistry {
    clusters: RwLock<HashMap<String, ClusterEntry>>,
    uids: ClusterUids,
    listeners: RwLock<HashMap<String, Vec<String>>>,
    metrics: Arc<Metrics>,
}

impl SessionRegistry {
    pub fn new(uids: ClusterUids, metrics: Arc<Metrics>) -> Self {
        SessionRegistry {
            clusters: RwLock::new(HashMap::new()),
            uids,
            listeners: RwLock::new(HashMap::new()),
            metrics,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn uids(&self) -> &ClusterUids {
        &self.uids
    }

    /// Records a per-cluster listener (`--expose`) for status pages.
    pub fn add_listener(&self, cluster: &str, addr: String) {
        self.listeners
            .write()
            .expect("listeners lock")
            .entry(cluster.to_string())
            .or_default()
            .push(addr);
    }

    /// Adds a session that passed `Hello`.
    pub fn register(&self, session: Arc<AgentSession>) {
        let cluster = session.cluster.clone();
        let transport = session.handle.info().transport;
        {
            let mut map = self.clusters.write().expect("registry lock");
            let entry = map.entry(cluster.clone()).or_default();
            if entry.agents.is_empty() {
                entry.connected_since = Some(session.connected_at);
                entry.disconnected_since = None;
            }
            entry.agents.push(session);
        }
        self.metrics.session_up(&cluster, transport);
    }

    /// Removes a session that ended.
    pub fn unregister(&self, session: &Arc<AgentSession>) {
        let removed = {
            let mut map = self.clusters.write().expect("registry lock");
            let Some(entry) = map.get_mut(&session.cluster) else {
                return;
            };
            let before = entry.agents.len();
            entry.agents.retain(|a| !Arc::ptr_eq(a, session));
            if entry.agents.is_empty() && before > 0 {
                entry.connected_since = None;
                entry.disconnected_since = Some(SystemTime::now());
            }
            before != entry.agents.len()
        };
        if removed {
            self.metrics
                .session_down(&session.cluster, session.handle.info().transport);
        }
    }

    /// All connected sessions (for draining at shutdown).
    pub fn sessions(&self) -> Vec<Arc<AgentSession>> {
        let map = self.clusters.read().expect("registry lock");
        map.values()
            .flat_map(|e| e.agents.iter().cloned())
            .collect()
    }

    /// Whether any agent of `cluster` ever connected (this run, or recorded in the state dir).
    pub fn is_known(&self, cluster: &str) -> bool {
        self.clusters
            .read()
            .expect("registry lock")
            .contains_key(cluster)
            || self.uids.known(cluster)
    }

    /// Picks the least-loaded connected, non-draining agent of `cluster`.
    fn pick(&self, cluster: &str) -> Result<Arc<AgentSession>, OpenError> {
        let map = self.clusters.read().expect("registry lock");
        let Some(entry) = map.get(cluster) else {
            return Err(if self.uids.known(cluster) {
                OpenError::NoAgent {
                    cluster: cluster.into(),
                    since: None,
                }
            } else {
                OpenError::UnknownCluster {
                    cluster: cluster.into(),
                }
            });
        };
        entry
            .agents
            .iter()
            .filter(|a| !a.draining.load(Ordering::Relaxed) && !a.handle.is_closed())
            .min_by_key(|a| a.handle.open_streams())
            .cloned()
            .ok_or(OpenError::NoAgent {
                cluster: cluster.into(),
                since: entry.disconnected_since,
            })
    }

    /// Where a stream to `cluster` would be opened now: the shard of the agent `pick`
    /// chooses, and whether every live agent of the cluster is on that shard too.
    pub fn placement(&self, cluster: &str) -> Option<(usize, bool)> {
        let shard = self.pick(cluster).ok()?.shard;
        let map = self.clusters.read().expect("registry lock");
        let all = map.get(cluster)?.agents.iter().all(|a| a.shard == shard);
        Some((shard, all))
    }

    /// Opens a data stream to `target` in `cluster` and waits for the agent to accept it.
    pub async fn open(
        &self,
        cluster: &str,
        target: Target,
        request_id: &str,
    ) -> Result<TunnelStream, OpenError> {
        let result: Result<TunnelStream, OpenError> = async {
            let (stream, agent) = self.send_open(cluster, target, request_id).await?;
            let mut stream = AwaitReply::new(stream, STREAM_OPEN_TIMEOUT, None);
            stream.wait_reply().await.map_err(|e| match e {
                ReplyError::Rejected { code, reason } => OpenError::Rejected {
                    cluster: cluster.into(),
                    code,
                    reason,
                },
                ReplyError::Timeout(_) => OpenError::Timeout {
                    cluster: cluster.into(),
                },
                ReplyError::Protocol(detail) => OpenError::Protocol {
                    cluster: cluster.into(),
                    detail,
                },
            })?;
            Ok(TunnelStream {
                stream,
                agent,
                metrics: self.metrics.clone(),
            })
        }
        .await;
        match &result {
            Ok(_) => self.metrics.stream_open("ok"),
            Err(e) => self.metrics.stream_open(e.label()),
        }
        result
    }

    /// Opens a data stream to `target` in `cluster` without waiting for the agent's reply
    /// (optimistic open, see [`tether_proto::reply`]): the caller may write at once, which
    /// saves a tunnel round trip for clients that speak first. A refusal shows up as an error
    /// on the stream's first read, carrying the agent's reason; it is counted then.
    ///
    /// Only for raw byte routes whose client needs no answer before it sends (`--expose`):
    /// CONNECT must answer its caller after the accept, and the gateway turns refusals into
    /// `Status` responses.
    pub async fn open_early(
        &self,
        cluster: &str,
        target: Target,
        request_id: &str,
    ) -> Result<TunnelStream, OpenError> {
        let (stream, agent) = match self.send_open(cluster, target, request_id).await {
            Ok(opened) => opened,
            Err(e) => {
                self.metrics.stream_open(e.label());
                return Err(e);
            }
        };
        let metrics = self.metrics.clone();
        let on_reply: OnReply = Box::new(move |outcome| {
            metrics.stream_open(match outcome {
                Ok(()) => "ok",
                Err(ReplyError::Rejected { .. }) => "rejected",
                Err(ReplyError::Timeout(_)) => "timeout",
                Err(ReplyError::Protocol(_)) => "protocol_error",
            })
        });
        Ok(TunnelStream {
            stream: AwaitReply::new(stream, STREAM_OPEN_TIMEOUT, Some(on_reply)),
            agent,
            metrics: self.metrics.clone(),
        })
    }

    /// Picks an agent, opens a stream on its session and sends `StreamOpen`.
    async fn send_open(
        &self,
        cluster: &str,
        target: Target,
        request_id: &str,
    ) -> Result<(MuxStream, Arc<AgentSession>), OpenError> {
        // A session that died between pick and open is skipped; try each agent at most once.
        let mut last_err = None;
        for _ in 0..4 {
            let agent = self.pick(cluster)?;
            let mut stream = match agent.handle.open_stream().await {
                Ok(s) => s,
                Err(SessionError::Closed) => {
                    last_err = Some(SessionError::Closed);
                    continue;
                }
                Err(source) => {
                    return Err(OpenError::Session {
                        cluster: cluster.into(),
                        source,
                    })
                }
            };
            let open = StreamOpen {
                target: Some(target.clone()),
                request_id: request_id.to_string(),
            };
            tokio::time::timeout(STREAM_OPEN_TIMEOUT, write_message(&mut stream, &open))
                .await
                .map_err(|_| OpenError::Timeout {
                    cluster: cluster.into(),
                })?
                .map_err(|e| OpenError::Protocol {
                    cluster: cluster.into(),
                    detail: e.to_string(),
                })?;
            return Ok((stream, agent));
        }
        Err(OpenError::Session {
            cluster: cluster.into(),
            source: last_err.unwrap_or(SessionError::Closed),
        })
    }

    /// Status of every cluster, sorted by name.
    pub fn status(&self) -> Vec<ClusterStatus> {
        let map = self.clusters.read().expect("registry lock");
        let listeners = self.listeners.read().expect("listeners lock");
        let mut names: Vec<&String> = map.keys().chain(listeners.keys()).collect();
        names.sort();
        names.dedup();
        let fmt = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        names
            .into_iter()
            .map(|name| {
                let empty = ClusterEntry::default();
                let entry = map.get(name).unwrap_or(&empty);
                let agents = &entry.agents;
                let mut transports: Vec<String> = agents
                    .iter()
                    .map(|a| a.handle.info().transport.to_string())
                    .collect();
                transports.sort();
                transports.dedup();
                ClusterStatus {
                    name: name.clone(),
                    agents: agents.len(),
                    connected: !agents.is_empty(),
                    connected_since: entry.connected_since.map(fmt),
                    disconnected_since: entry.disconnected_since.map(fmt),
                    rtt_micros: agents
                        .iter()
                        .map(|a| a.rtt_micros.load(Ordering::Relaxed))
                        .min()
                        .unwrap_or(0),
                    slow_link: agents.iter().any(|a| a.link_is_slow()),
                    open_streams: agents.iter().map(|a| a.data_streams()).sum(),
                    bytes_in: agents
                        .iter()
                        .map(|a| a.bytes_from_agent.load(Ordering::Relaxed))
                        .sum(),
                    bytes_out: agents
                        .iter()
                        .map(|a| a.bytes_to_agent.load(Ordering::Relaxed))
                        .sum(),
                    transports,
                    listeners: listeners.get(name).cloned().unwrap_or_default(),
                    agent_details: agents
                        .iter()
                        .map(|a| AgentStatus {
                            agent_id: a.agent_id.clone(),
                            session_id: a.session_id.clone(),
                            version: a.agent_version.clone(),
                            transport: a.handle.info().transport.to_string(),
                            peer: a.handle.info().peer.to_string(),
                            connected_since: fmt(a.connected_at),
                            rtt_micros: a.rtt_micros.load(Ordering::Relaxed),
                            slow_link: a.link_is_slow(),
                            open_streams: a.data_streams(),
                            draining: a.draining.load(Ordering::Relaxed),
                            event_loop: a.shard,
                        })
                        .collect(),
                }
            })
            .collect()
    }
}
