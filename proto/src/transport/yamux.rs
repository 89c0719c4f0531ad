//! yamux as the stream multiplexer on a byte stream (TLS over TCP).
//!
//! The `yamux` crate has hazards this module exists to handle:
//!
//! - its `Connection` makes progress only while somebody polls it, so one driver task owns
//!   it and never stops polling inbound streams, while also serving open requests from
//!   [`SessionHandle`](super::SessionHandle)s;
//! - it writes each frame's 12-byte header and its body as two writes and flushes after every
//!   frame, which over TLS means one record and one syscall per frame (or two); so its writes
//!   go into a buffer whose flush it cannot see ([`BatchedIo`]), and the driver flushes once
//!   per wakeup, after yamux has written every frame that was ready: frames that are ready
//!   together leave together, and none waits for a timer;
//! - exceeding its `max_num_streams` terminates the *whole* connection, so its limit is set
//!   well above the session's own limit, which refuses just the one stream;
//! - its setters assert `window >= 256 KiB × max_num_streams` and panic otherwise, so the
//!   connection window is derived from the stream count here, never set independently.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tracing::debug;

use super::{session_parts, DriverParts, Role, Session, SessionConfig, SessionError, SessionInfo};

/// Write buffer under yamux: the frames of one driver wakeup leave in one write of up to this
/// much (a full 64 KiB frame bypasses it).
const WRITE_BUFFER: usize = 64 * 1024;
/// yamux's default per-stream window.
const YAMUX_DEFAULT_WINDOW: usize = 256 * 1024;
/// Largest DATA frame: each frame is one hop from the stream to the connection task, so
/// bigger frames cost less CPU per byte (yamux's default is 16 KiB).
const SPLIT_SEND_SIZE: usize = 64 * 1024;
/// Connection window beyond the streams' default windows, for auto-tuned stream windows.
const WINDOW_HEADROOM: usize = 256 * 1024 * 1024;
/// Most bytes asked of a yamux stream per read (see [`YamuxStream`]).
const READ_CHUNK: usize = 64 * 1024;
/// Headroom between our stream limit and yamux's, which would kill the connection.
const YAMUX_STREAM_HEADROOM: usize = 256;

/// The yamux configuration for a session with `cfg`'s limits.
fn yamux_config(cfg: &SessionConfig) -> ::yamux::Config {
    let max_num_streams = cfg.max_streams + YAMUX_STREAM_HEADROOM;
    let mut c = ::yamux::Config::default();
    // Each setter asserts the window against the *current* stream count: lift the window
    // first, then set the count, then bound the window by the count, so no assertion fires
    // whatever the numbers are.
    c.set_max_connection_receive_window(None);
    c.set_max_num_streams(max_num_streams);
    // Plus headroom: a window of exactly streams x 256 KiB leaves yamux's auto-tuning no room
    // to grow any stream's window past 256 KiB, which caps single-stream bulk.
    c.set_max_connection_receive_window(Some(
        max_num_streams * YAMUX_DEFAULT_WINDOW + WINDOW_HEADROOM,
    ));
    c.set_split_send_size(SPLIT_SEND_SIZE);
    c
}

/// Runs yamux over `io` and returns the session; a driver task owns the connection.
pub(crate) fn start<T>(io: T, role: Role, info: SessionInfo, cfg: &SessionConfig) -> Session
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mode = match role {
        Role::Agent => ::yamux::Mode::Client,
        Role::Proxy => ::yamux::Mode::Server,
    };
    let shared = Arc::new(Mutex::new(BufWriter::with_capacity(WRITE_BUFFER, io)));
    let conn =
        ::yamux::Connection::new(BatchedIo(shared.clone()).compat(), yamux_config(cfg), mode);
    let (session, parts) = session_parts(info, cfg);
    let flush = move |cx: &mut Context<'_>| Pin::new(&mut *lock(&shared)).poll_flush(cx);
    tokio::spawn(drive(conn, parts, flush));
    session
}

/// The connection's byte stream as yamux sees it: reads pass through, writes go into a buffer,
/// and `flush` does nothing, since yamux flushes after every frame. The driver owns the real
/// flush (see [`drive`]). Only the driver task touches it, so the lock is never contended.
struct BatchedIo<T>(Arc<Mutex<BufWriter<T>>>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing can be left half-done by a panic while holding it: take it anyway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for BatchedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *lock(&self.0)).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for BatchedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *lock(&self.0)).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Flushes what is buffered first.
        Pin::new(&mut *lock(&self.0)).poll_shutdown(cx)
    }
}

/// A yamux stream as a tokio reader and writer.
///
/// yamux streams are `futures-io` readers, which need initialised memory; tokio-util's compat
/// adapter zeroes the whole unfilled part of the caller's buffer before every read (hyper's
/// read buffer, a splice buffer: up to hundreds of KiB per read, for a frame of one KiB). This
/// asks for at most [`READ_CHUNK`] bytes per read, so at most that much is zeroed, and nothing
/// when the caller's memory is initialised already.
struct YamuxStream(tokio_util::compat::Compat<::yamux::Stream>);

impl super::RawStream for YamuxStream {}

impl AsyncRead for YamuxStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let want = buf.remaining().min(READ_CHUNK);
        let mut chunk = ReadBuf::new(buf.initialize_unfilled_to(want));
        std::task::ready!(Pin::new(&mut self.0).poll_read(cx, &mut chunk))?;
        let n = chunk.filled().len();
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for YamuxStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The driver: polls the connection for inbound streams and I/O, serves open requests, and
/// closes the connection when asked. Marks the session closed when it ends.
///
/// Once yamux has nothing more to do in a wakeup, the driver calls `flush`: everything yamux
/// wrote in that wakeup goes out in one write (one TLS record per 16 KiB, one syscall).
async fn drive<T, F>(mut conn: ::yamux::Connection<T>, mut parts: DriverParts, mut flush: F)
where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin,
    F: FnMut(&mut Context<'_>) -> Poll<io::Result<()>>,
{
    let mut pending: std::collections::VecDeque<super::OpenRequest> = Default::default();
    // Kept across polls so that a close() from a handle wakes the driver.
    let cancelled = parts.closed.clone().cancelled_owned();
    tokio::pin!(cancelled);
    let result: Result<(), String> = poll_fn(|cx| {
        if cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        // New open requests from handles.
        loop {
            match parts.open_rx.poll_recv(cx) {
                Poll::Ready(Some(req)) => pending.push_back(req),
                // Every handle is gone: nobody can open streams or close the session, so
                // end it once nobody accepts streams either.
                Poll::Ready(None) if parts.incoming_tx.is_closed() => return Poll::Ready(Ok(())),
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        // Serve open requests in order.
        while !pending.is_empty() {
            match conn.poll_new_outbound(cx) {
                Poll::Ready(Ok(stream)) => {
                    let req = pending.pop_front().expect("not empty");
                    // A requester that gave up drops the stream, which closes it.
                    let _ = req.send(Ok(Box::new(YamuxStream(stream.compat()))));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.to_string())),
                Poll::Pending => break,
            }
        }
        // Inbound streams; this also drives all reading and writing of the connection.
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    parts.deliver(Box::new(YamuxStream(stream.compat())))
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.to_string())),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => break,
            }
        }
        // Pending: yamux is waiting for the socket or for its streams. Send what it wrote; a
        // full socket registers this task's waker, and yamux stops at a full buffer meanwhile.
        match flush(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e.to_string())),
            Poll::Ready(Ok(())) | Poll::Pending => Poll::Pending,
        }
    })
    .await;
    if let Err(e) = &result {
        debug!(error = %e, "yamux connection ended with an error");
    }
    for req in pending.drain(..) {
        let _ = req.send(Err(SessionError::Closed));
    }
    parts.closed.cancel();
    // Say goodbye politely, but never wait long for a peer that is gone.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        poll_fn(|cx| conn.poll_close(cx)),
    )
    .await;
    parts.open_rx.close();
}
