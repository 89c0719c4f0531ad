//! HTTP/2 (the `h2` crate) as the stream multiplexer on a TLS connection.
//!
//! Roles are the reverse of who dialed: the agent dials, then serves HTTP/2 on the connection;
//! the proxy is the HTTP/2 client and opens every stream as a request (`POST /`, no body end).
//! The agent answers each request at once with `200` and keeps the response body open, so
//! every stream is a pair of DATA flows, one per direction; END_STREAM is half-close, and
//! RST_STREAM is what dropping a stream sends.
//!
//! The control stream is the one exception to "the proxy opens": protocol v1 says the agent
//! opens it. Here the proxy opens the first stream right after the handshake; the agent's
//! first `open_stream()` returns it, and the proxy's `Incoming` yields it — so the layers
//! above see exactly what they see over yamux.
//!
//! Flow control: data is released to the peer's window only as the application reads it, so
//! a stream whose reader stops holds back only its own sender. The connection window is set
//! to its maximum so that stalled streams (each holding at most its stream window) cannot
//! starve the rest. Sending honours `poll_capacity`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use super::{
    session_parts, DriverParts, OpenRequest, Role, Session, SessionConfig, SessionError,
    SessionInfo,
};

/// Per-stream receive window: what one stream may have in flight, and so what a stalled
/// reader can leave buffered. 4 MiB, as Go's HTTP/2 client (so client-go and kubectl) uses:
/// over a link with 40 ms round trips and 1% loss, 1 MiB held one bulk stream to 8.7 MiB/s
/// against 33.5 MiB/s with 4 MiB, level with tether's multiplexer and yamux (the lossy-link
/// test in `tests/tests/quic.rs`).
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Connection window: the protocol maximum, so stalled streams cannot starve the others.
const CONNECTION_WINDOW: u32 = (1 << 31) - 1;
/// DATA frame size: fewer frames for bulk, still fine-grained enough to interleave streams.
const MAX_FRAME: u32 = 64 * 1024;
/// Most bytes handed to `send_data` at once.
const MAX_WRITE: usize = 256 * 1024;
/// Headroom between the session's stream limit and HTTP/2's, which would refuse streams.
const STREAM_HEADROOM: u32 = 256;

/// Runs HTTP/2 over `io` and returns the session; a driver task owns the connection.
pub(crate) fn start<T>(io: T, role: Role, info: SessionInfo, cfg: &SessionConfig) -> Session
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (session, parts) = session_parts(info, cfg);
    let max_streams =
        u32::try_from(cfg.max_streams).unwrap_or(u32::MAX - STREAM_HEADROOM) + STREAM_HEADROOM;
    match role {
        Role::Proxy => tokio::spawn(drive_client(io, parts, max_streams)),
        Role::Agent => tokio::spawn(drive_server(io, parts, max_streams)),
    };
    session
}

/// The proxy's side: an HTTP/2 client that opens streams.
async fn drive_client<T>(io: T, mut parts: DriverParts, max_streams: u32)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let handshake = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(max_streams)
        .max_header_list_size(16 * 1024)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await;
    let (mut sender, conn) = match handshake {
        Ok(pair) => pair,
        Err(e) => {
            debug!(error = %e, "HTTP/2 handshake failed");
            parts.closed.cancel();
            return;
        }
    };
    let mut conn = std::pin::pin!(conn);
    // The control stream: opened here, seen by the proxy's logic as the agent's first stream.
    let control = tokio::select! {
        s = open(&mut sender) => s,
        r = &mut conn => Err(SessionError::Mux(format!("connection ended: {r:?}"))),
    };
    match control {
        Ok(stream) => parts.deliver(Box::new(stream)),
        Err(e) => {
            debug!(error = %e, "could not open the control stream");
            parts.closed.cancel();
            return;
        }
    }
    loop {
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    debug!(error = %e, "HTTP/2 connection ended with an error");
                }
                break;
            }
            req = parts.open_rx.recv() => match req {
                Some(req) => {
                    // Opening waits only when the peer's stream limit is reached.
                    let opened = tokio::select! {
                        s = open(&mut sender) => s,
                        _ = &mut conn => Err(SessionError::Closed),
                    };
                    let _ = req.send(opened.map(|s| Box::new(s) as _));
                }
                None if parts.incoming_tx.is_closed() => break,
                None => std::future::pending::<()>().await,
            },
            _ = parts.closed.cancelled() => break,
        }
    }
    parts.closed.cancel();
}

/// Opens one stream as a request whose body stays open.
async fn open(sender: &mut h2::client::SendRequest<Bytes>) -> Result<H2Stream, SessionError> {
    let ready = sender
        .clone()
        .ready()
        .await
        .map_err(|e| SessionError::Mux(e.to_string()))?;
    *sender = ready;
    let request = http::Request::post("https://tether/")
        .body(())
        .expect("static request");
    let (response, send) = sender
        .send_request(request, false)
        .map_err(|e| SessionError::Mux(e.to_string()))?;
    Ok(H2Stream::new(send, Recv::Waiting(response)))
}

/// The agent's side: an HTTP/2 server whose streams the proxy opens.
async fn drive_server<T>(io: T, mut parts: DriverParts, max_streams: u32)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(max_streams)
        .max_header_list_size(16 * 1024)
        .handshake::<_, Bytes>(io)
        .await;
    let mut conn = match handshake {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "HTTP/2 handshake failed");
            parts.closed.cancel();
            return;
        }
    };
    // The first stream the proxy opens is the control stream, for the agent's first
    // `open_stream()`. Later open requests cannot be served: an HTTP/2 server opens nothing.
    let mut control: Option<H2Stream> = None;
    let mut waiting: Option<OpenRequest> = None;
    let mut control_given = false;
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((request, mut respond))) => {
                    let send = match respond.send_response(http::Response::new(()), false) {
                        Ok(s) => s,
                        Err(e) => {
                            debug!(error = %e, "could not answer a stream");
                            continue;
                        }
                    };
                    let stream = H2Stream::new(send, Recv::Ready(request.into_body()));
                    if control_given {
                        parts.deliver(Box::new(stream));
                    } else if let Some(req) = waiting.take() {
                        control_given = true;
                        let _ = req.send(Ok(Box::new(stream)));
                    } else if control.is_none() {
                        control = Some(stream);
                    } else {
                        parts.deliver(Box::new(stream));
                    }
                }
                Some(Err(e)) => {
                    debug!(error = %e, "HTTP/2 connection ended with an error");
                    break;
                }
                None => break,
            },
            req = parts.open_rx.recv() => match req {
                Some(req) if !control_given => match control.take() {
                    Some(stream) => {
                        control_given = true;
                        let _ = req.send(Ok(Box::new(stream)));
                    }
                    None => waiting = Some(req),
                },
                Some(req) => {
                    let _ = req.send(Err(SessionError::Mux(
                        "over HTTP/2 only the proxy opens streams (the agent's one is the control stream)".into(),
                    )));
                }
                None if parts.incoming_tx.is_closed() => break,
                None => std::future::pending::<()>().await,
            },
            _ = parts.closed.cancelled() => {
                conn.graceful_shutdown();
                break;
            }
        }
    }
    parts.closed.cancel();
    if let Some(req) = waiting {
        let _ = req.send(Err(SessionError::Closed));
    }
    // Let a GOAWAY go out, but never wait long for a peer that is gone.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        std::future::poll_fn(|cx| conn.poll_closed(cx)),
    )
    .await;
}

/// The receiving half of a stream: the proxy waits for the agent's response headers first.
enum Recv {
    Waiting(h2::client::ResponseFuture),
    Ready(RecvStream),
    Done,
}

/// One HTTP/2 stream as a byte stream.
pub(crate) struct H2Stream {
    send: SendStream<Bytes>,
    recv: Recv,
    /// Received bytes not yet read by the application.
    pending: Bytes,
    shut: bool,
}

impl H2Stream {
    fn new(send: SendStream<Bytes>, recv: Recv) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            shut: false,
        }
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::ErrorKind::BrokenPipe.into());
    }
    match e.reason() {
        Some(Reason::CANCEL) | Some(Reason::NO_ERROR) => {
            io::Error::new(io::ErrorKind::ConnectionReset, e)
        }
        _ => io::Error::other(e),
    }
}

impl super::RawStream for H2Stream {}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                // The peer may send more only as the application reads.
                if let Recv::Ready(body) = &mut this.recv {
                    let _ = body.flow_control().release_capacity(n);
                }
                return Poll::Ready(Ok(()));
            }
            match &mut this.recv {
                Recv::Waiting(response) => {
                    let resp = ready!(Pin::new(response).poll(cx)).map_err(to_io)?;
                    if resp.status() != http::StatusCode::OK {
                        return Poll::Ready(Err(io::Error::other(format!(
                            "stream refused: {}",
                            resp.status()
                        ))));
                    }
                    this.recv = Recv::Ready(resp.into_body());
                }
                Recv::Ready(body) => match ready!(body.poll_data(cx)) {
                    Some(Ok(data)) => this.pending = data,
                    Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                    None => {
                        this.recv = Recv::Done;
                        return Poll::Ready(Ok(()));
                    }
                },
                Recv::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let want = buf.len().min(MAX_WRITE);
        self.send.reserve_capacity(want);
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(cap)) => {
                    let n = cap.min(want);
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(to_io)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes frames as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            self.send.send_data(Bytes::new(), true).map_err(to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// How long a half-closed stream dropped before its peer finished may linger, so that data
/// queued behind the peer's window still goes out.
const LINGER: std::time::Duration = std::time::Duration::from_secs(30);

impl Drop for H2Stream {
    fn drop(&mut self) {
        // Dropped without a half-close: abort the stream.
        if !self.shut {
            self.send.send_reset(Reason::CANCEL);
            return;
        }
        if matches!(self.recv, Recv::Done) {
            return;
        }
        // Half-closed, peer still sending. If every handle went now, h2 would cancel the
        // stream and discard our queued DATA. Like a TCP close after shutdown, keep reading
        // (and discarding) the peer's side for a while instead, so what we sent arrives.
        let recv = std::mem::replace(&mut self.recv, Recv::Done);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let drain = async {
                let mut body = match recv {
                    Recv::Waiting(response) => match response.await {
                        Ok(resp) => resp.into_body(),
                        Err(_) => return,
                    },
                    Recv::Ready(body) => body,
                    Recv::Done => return,
                };
                while let Some(Ok(data)) = body.data().await {
                    let _ = body.flow_control().release_capacity(data.len());
                }
            };
            let _ = tokio::time::timeout(LINGER, drain).await;
        });
    }
}
