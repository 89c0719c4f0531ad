//! The Session/Transport layer: one multiplexed session between an agent and the proxy.
//!
//! Everything above this module sees only three types:
//!
//! - [`SessionHandle`]: a cheap, cloneable handle to open streams, close the session, and see
//!   whether it is still alive;
//! - [`Incoming`]: the streams the peer opened, in order;
//! - [`MuxStream`]: one bidirectional byte stream (tokio `AsyncRead + AsyncWrite`), with its
//!   own flow control: a stream whose reader stops never delays another stream.
//!
//! How bytes travel is the business of a transport module: [`tls`] (TLS 1.3 over TCP, with a
//! multiplexer on top: [`tether_mux`], yamux or HTTP/2) or [`quic`] (QUIC over UDP, native
//! streams). Each produces the same
//! [`Session`]; the proxy and agent logic above does not change with the transport.
//!
//! Roles: the agent always dials, and opens the first stream (the control stream); the proxy
//! opens one data stream per host request.
//!
//! Limits: each session admits at most [`SessionConfig::max_streams`] open streams, counted
//! together in both directions. Opening one more fails with [`SessionError::StreamLimit`]
//! (just that stream); a peer that opens one more gets it closed at once. The multiplexer's
//! own limit sits above ours, so it never has to tear the whole connection down.

mod h2;
pub mod quic;
pub mod tether_mux;
pub mod tls;
mod yamux;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::splice::ChunkIo;

/// Which end of the session this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The agent: dials out, opens the control stream.
    Agent,
    /// The proxy: accepts, opens data streams.
    Proxy,
}

/// Limits and sizes of one session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Open streams allowed at once, both directions together.
    pub max_streams: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_streams: 16_384,
        }
    }
}

/// Why a session or stream operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session is closed")]
    Closed,
    #[error("session has {limit} streams open, its limit; try again when some finish")]
    StreamLimit { limit: usize },
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("TLS handshake with {peer}: {source}")]
    Handshake { peer: String, source: io::Error },
    #[error("{0}")]
    Config(String),
    #[error("multiplexer: {0}")]
    Mux(String),
}

/// Facts about a session for status pages and logs.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// `tls+yamux`, `quic`, ...
    pub transport: &'static str,
    pub peer: SocketAddr,
}

/// A freshly established session: the handle to use it, and the streams the peer opens.
pub struct Session {
    pub handle: SessionHandle,
    pub incoming: Incoming,
}

/// State shared by every handle of one session.
struct Shared {
    info: SessionInfo,
    limit: Arc<Semaphore>,
    max_streams: usize,
    closed: CancellationToken,
    /// Set by a transport that opens streams from the caller's task, without a round trip to
    /// its driver task.
    direct: Option<Arc<dyn DirectOpen>>,
    /// The multiplexer finds the link slow (see [`SessionHandle::link_is_slow`]).
    slow_link: Arc<AtomicBool>,
}

/// A transport that opens an outbound stream at once, in the caller's task.
pub(crate) trait DirectOpen: Send + Sync {
    fn open(self: Arc<Self>) -> Result<StreamInner, SessionError>;
}

/// Called by a multiplexer, with the connection `T` under it, when it finds the link slow
/// (`true`: batches of frames take long to hand over while the connection pushes back) or
/// fast again (`false`). The TLS transport keeps less unsent in the kernel and in rustls on a
/// slow link ([`tls::SLOW_UNSENT_LOWAT`], [`tls::SLOW_TLS_BUFFER`]), so that what a
/// multiplexer sends ahead (tether's urgent frames) waits behind less of what it sent before.
pub(crate) type SlowLinkHook<T> = Box<dyn FnMut(&mut T, bool) + Send>;

/// A request from a handle to the driver to open an outbound stream.
type OpenRequest = oneshot::Sender<Result<StreamInner, SessionError>>;

/// Handle to a live session: open streams, close, watch for the end.
#[derive(Clone)]
pub struct SessionHandle {
    shared: Arc<Shared>,
    opener: mpsc::Sender<OpenRequest>,
}

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle")
            .field("info", &self.shared.info)
            .finish_non_exhaustive()
    }
}

impl SessionHandle {
    /// Opens a new stream to the peer.
    pub async fn open_stream(&self) -> Result<MuxStream, SessionError> {
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        let permit = self.shared.limit.clone().try_acquire_owned().map_err(|_| {
            SessionError::StreamLimit {
                limit: self.shared.max_streams,
            }
        })?;
        if let Some(direct) = &self.shared.direct {
            return Ok(MuxStream {
                inner: direct.clone().open()?,
                _permit: permit,
            });
        }
        let (tx, rx) = oneshot::channel();
        self.opener
            .send(tx)
            .await
            .map_err(|_| SessionError::Closed)?;
        let inner = rx.await.map_err(|_| SessionError::Closed)??;
        Ok(MuxStream {
            inner,
            _permit: permit,
        })
    }

    /// Asks the session to close; streams end, [`closed`](Self::closed) resolves.
    pub fn close(&self) {
        self.shared.closed.cancel();
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// Resolves when the session has ended, for whatever reason.
    pub async fn closed(&self) {
        self.shared.closed.cancelled().await
    }

    /// Streams open right now, both directions.
    pub fn open_streams(&self) -> usize {
        self.shared.max_streams - self.shared.limit.available_permits()
    }

    pub fn info(&self) -> &SessionInfo {
        &self.shared.info
    }

    /// Whether the session's multiplexer finds its link slow right now: batches of frames
    /// take over 20 ms to leave while the connection pushes back (a link under about 3 MB/s,
    /// or a lossy one). Sessions on such a link keep less queued ahead of small messages
    /// (see [`tls::SLOW_UNSENT_LOWAT`]). Only tether's multiplexer (`tls+tether`) tells; on
    /// other transports this is always false.
    pub fn link_is_slow(&self) -> bool {
        self.shared.slow_link.load(Ordering::Relaxed)
    }
}

/// The streams the peer opens, in the order it opened them.
///
/// Take them one by one with [`accept`](Self::accept), or hand each to a function the moment
/// it arrives with [`serve`](Self::serve).
pub struct Incoming {
    rx: mpsc::Receiver<MuxStream>,
    handler: Arc<HandlerSlot>,
}

/// What [`Incoming::serve`] runs on each peer-opened stream.
type StreamHandler = Arc<dyn Fn(MuxStream) + Send + Sync>;

/// Where the driver looks for a [`StreamHandler`] before it queues a stream for `accept`.
type HandlerSlot = std::sync::Mutex<Option<StreamHandler>>;

impl Incoming {
    /// The next stream the peer opened; `None` once the session has ended.
    pub async fn accept(&mut self) -> Option<MuxStream> {
        self.rx.recv().await
    }

    /// Runs `handler` on every stream the peer opens, until the session ends or this future
    /// is dropped.
    ///
    /// The transport's driver calls `handler` itself as it reads each new stream, so a
    /// stream reaches its handler without first waking a task that loops over `accept`
    /// (one cross-task hand-off less per stream). `handler` therefore must not block or
    /// wait: spawn a task for the stream's work.
    ///
    /// ```no_run
    /// # async fn run(incoming: tether_proto::transport::Incoming) {
    /// incoming
    ///     .serve(|stream| {
    ///         tokio::spawn(async move {
    ///             // read the stream's StreamOpen, dial, splice ...
    ///             drop(stream);
    ///         });
    ///     })
    ///     .await;
    /// # }
    /// ```
    pub async fn serve<F>(mut self, handler: F)
    where
        F: Fn(MuxStream) + Send + Sync + 'static,
    {
        /// Unregisters the handler when `serve` ends or is dropped: from then on the driver
        /// queues streams again, and closes them once nobody accepts.
        struct Unregister(Arc<HandlerSlot>);
        impl Drop for Unregister {
            fn drop(&mut self) {
                *lock_slot(&self.0) = None;
            }
        }
        let handler: StreamHandler = Arc::new(handler);
        *lock_slot(&self.handler) = Some(handler.clone());
        let _unregister = Unregister(self.handler.clone());
        // Streams queued before the handler was registered, or by a driver that looked just
        // before, still arrive here; the loop ends when the driver is gone.
        while let Some(stream) = self.rx.recv().await {
            handler(stream);
        }
    }
}

fn lock_slot(slot: &HandlerSlot) -> std::sync::MutexGuard<'_, Option<StreamHandler>> {
    // Setting or clearing the slot cannot leave it half-done: take it even if poisoned.
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// One bidirectional byte stream of a session.
///
/// Shutting down the write half sends end-of-stream to the peer (half-close); reading goes on
/// until the peer does the same. Dropping the stream closes both halves.
pub struct MuxStream {
    inner: StreamInner,
    _permit: OwnedSemaphorePermit,
}

/// The transport-specific stream inside a [`MuxStream`]: anything that reads and writes, and
/// may move [`Bytes`] chunks without a copy (see [`ChunkIo`]; by default it does not).
///
/// Each transport hands its native stream type over boxed, so adding a transport never
/// touches this module. (One allocation per stream; reads and writes go through a vtable.)
pub(crate) trait RawStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    fn moves_chunks(&self) -> bool {
        false
    }

    fn poll_read_chunk(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        Poll::Ready(Err(no_chunks()))
    }

    fn poll_write_chunk(&mut self, _cx: &mut Context<'_>, _: &mut Bytes) -> Poll<io::Result<()>> {
        Poll::Ready(Err(no_chunks()))
    }
}

fn no_chunks() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "this transport's streams do not move chunks",
    )
}

type StreamInner = Box<dyn RawStream>;

impl std::fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MuxStream")
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl ChunkIo for MuxStream {
    fn moves_chunks(&self) -> bool {
        self.inner.moves_chunks()
    }

    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        self.inner.poll_read_chunk(cx)
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        self.inner.poll_write_chunk(cx, chunk)
    }
}

/// The pieces a transport's driver task works with, made by [`session_parts`].
struct DriverParts {
    open_rx: mpsc::Receiver<OpenRequest>,
    incoming_tx: mpsc::Sender<MuxStream>,
    /// Set while [`Incoming::serve`] runs: streams go straight to it.
    handler: Arc<HandlerSlot>,
    limit: Arc<Semaphore>,
    closed: CancellationToken,
    /// What [`SessionHandle::link_is_slow`] reads; the driver sets it.
    slow_link: Arc<AtomicBool>,
}

impl DriverParts {
    /// Hands a peer-opened stream to [`Incoming`] (or its serving handler), or closes it when
    /// over the limit or when nobody accepts streams any more.
    fn deliver(&self, inner: StreamInner) {
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            tracing::warn!("peer opened a stream beyond the session's limit; closing it");
            return;
        };
        self.deliver_with(permit, inner);
    }

    /// Hands a peer-opened stream to [`Incoming`] with the permit already taken for it.
    fn deliver_with(&self, permit: OwnedSemaphorePermit, inner: StreamInner) {
        let stream = MuxStream {
            inner,
            _permit: permit,
        };
        let handler = lock_slot(&self.handler).clone();
        if let Some(handler) = handler {
            return handler(stream);
        }
        if self.incoming_tx.try_send(stream).is_err() {
            tracing::warn!("incoming stream queue is full or closed; closing the stream");
        }
    }
}

/// Builds the shared state, the user-facing [`Session`] and the driver's side of it.
fn session_parts(info: SessionInfo, cfg: &SessionConfig) -> (Session, DriverParts) {
    session_parts_with(info, cfg, None)
}

/// As [`session_parts`], for a transport whose handles open streams with `direct`. The
/// driver's `open_rx` then receives nothing, and ends once every handle is gone.
fn session_parts_with(
    info: SessionInfo,
    cfg: &SessionConfig,
    direct: Option<Arc<dyn DirectOpen>>,
) -> (Session, DriverParts) {
    let limit = Arc::new(Semaphore::new(cfg.max_streams));
    let closed = CancellationToken::new();
    let (open_tx, open_rx) = mpsc::channel(1024);
    // Every accepted stream holds a permit, so the queue never needs to exceed the limit.
    let (incoming_tx, incoming_rx) = mpsc::channel(cfg.max_streams.max(1));
    let handler = Arc::new(HandlerSlot::default());
    let slow_link = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared {
        info,
        limit: limit.clone(),
        max_streams: cfg.max_streams,
        closed: closed.clone(),
        direct,
        slow_link: slow_link.clone(),
    });
    let session = Session {
        handle: SessionHandle {
            shared,
            opener: open_tx,
        },
        incoming: Incoming {
            rx: incoming_rx,
            handler: handler.clone(),
        },
    };
    let parts = DriverParts {
        open_rx,
        incoming_tx,
        handler,
        limit,
        closed,
        slow_link,
    };
    (session, parts)
}

#[cfg(test)]
mod tests;
