//! Optimistic stream open: the opener's bytes follow `StreamOpen` at once, and the agent's
//! `StreamReply` is taken off the front of the way back.
//!
//! The plain way to open a data stream is to send `StreamOpen`, wait for `StreamReply`, and
//! only then let bytes cross. For a client that speaks first (TLS, HTTP, the bench's echo),
//! that costs one whole tunnel round trip per connection. The protocol does not need it: the
//! agent reads exactly the `StreamOpen` ([`crate::frame::read_message`] never reads past a
//! message), dials, answers, and only then reads on, so bytes sent early wait in the stream's
//! receive window (bounded by the multiplexer's flow control); if the agent refuses the
//! stream, they are dropped with it, unread.
//!
//! [`AwaitReply`] is the opener's end of that: writes pass straight through, and the first
//! reads parse the `StreamReply`. An accept is dropped and what follows it passes through; a
//! reject, a malformed reply or no reply within the deadline ends the read side with an
//! [`io::Error`] whose inner error is a [`ReplyError`] carrying the agent's reason.
//!
//! ```no_run
//! # async fn demo(stream: tokio::net::TcpStream) -> std::io::Result<()> {
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tether_proto::reply::AwaitReply;
//! // `stream` has just carried a StreamOpen.
//! let mut s = AwaitReply::new(stream, std::time::Duration::from_secs(15), None);
//! s.write_all(b"GET / HTTP/1.1\r\n\r\n").await?; // no round trip first
//! let mut buf = [0u8; 1024];
//! let n = s.read(&mut buf).await?; // an error if the agent refused the stream
//! # let _ = n; Ok(()) }
//! ```

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::messages::{stream_reply, StreamRejectCode, StreamReply};
use crate::splice::ChunkIo;

/// A reply is a few bytes plus the reject reason; anything longer is not a reply.
const MAX_REPLY: usize = 16 * 1024;

/// Why the read side of an [`AwaitReply`] ended before any data.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReplyError {
    #[error("the agent refused the stream ({}): {reason}", code.as_str_name())]
    Rejected {
        code: StreamRejectCode,
        reason: String,
    },
    #[error("the agent did not answer the stream within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("the agent's StreamReply was malformed: {0}")]
    Protocol(String),
}

/// Called once with the outcome of the reply (for metrics).
pub type OnReply = Box<dyn FnOnce(Result<(), &ReplyError>) + Send>;

/// A stream whose `StreamReply` has not been read yet. See the [module docs](self).
pub struct AwaitReply<S> {
    inner: S,
    state: State,
    timeout: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
    on_reply: Option<OnReply>,
}

enum State {
    /// Bytes of the reply read so far.
    Waiting(Vec<u8>),
    /// Accepted; bytes that came after the reply in the same read, then the stream.
    Leftover(Vec<u8>, usize),
    Open,
    Failed(ReplyError),
}

impl<S> AwaitReply<S> {
    /// Wraps `inner`, which has just carried a `StreamOpen`; the reply must come within
    /// `timeout`.
    pub fn new(inner: S, timeout: Duration, on_reply: Option<OnReply>) -> Self {
        AwaitReply {
            inner,
            state: State::Waiting(Vec::new()),
            timeout,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            on_reply,
        }
    }

    /// The stream inside.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn settle(&mut self, outcome: Result<Vec<u8>, ReplyError>) {
        self.deadline = None;
        if let Some(f) = self.on_reply.take() {
            f(outcome.as_ref().map(|_| ()));
        }
        self.state = match outcome {
            Ok(rest) if rest.is_empty() => State::Open,
            Ok(rest) => State::Leftover(rest, 0),
            Err(e) => State::Failed(e),
        };
    }
}

/// Parses a length-delimited `StreamReply` at the front of `buf`: `None` while incomplete,
/// else the outcome and the bytes after the reply.
fn parse(buf: &[u8]) -> Option<Result<Vec<u8>, ReplyError>> {
    let mut len: u64 = 0;
    let mut header = None;
    for (i, b) in buf.iter().take(10).enumerate() {
        len |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            header = Some(i + 1);
            break;
        }
    }
    let Some(header) = header else {
        return (buf.len() >= 10).then(|| Err(ReplyError::Protocol("bad length prefix".into())));
    };
    if len > MAX_REPLY as u64 {
        return Some(Err(ReplyError::Protocol(format!(
            "reply of {len} bytes is over the limit of {MAX_REPLY}"
        ))));
    }
    let end = header + len as usize;
    if buf.len() < end {
        return None;
    }
    let reply = match StreamReply::decode(&buf[header..end]) {
        Ok(r) => r,
        Err(e) => return Some(Err(ReplyError::Protocol(e.to_string()))),
    };
    Some(match reply.reply {
        Some(stream_reply::Reply::Accept(_)) => Ok(buf[end..].to_vec()),
        Some(stream_reply::Reply::Reject(r)) => Err(ReplyError::Rejected {
            code: StreamRejectCode::try_from(r.code).unwrap_or(StreamRejectCode::Unspecified),
            reason: r.reason,
        }),
        None => Err(ReplyError::Protocol("neither accept nor reject".into())),
    })
}

fn failed(e: &ReplyError) -> io::Error {
    let kind = match e {
        ReplyError::Rejected { .. } => io::ErrorKind::ConnectionRefused,
        ReplyError::Timeout(_) => io::ErrorKind::TimedOut,
        ReplyError::Protocol(_) => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, e.clone())
}

impl<S: AsyncRead + Unpin> AwaitReply<S> {
    /// Waits for the reply: `Ok` once the agent accepted (bytes after the reply stay for the
    /// next read), or why not. For openers that must know before they go on (CONNECT answers
    /// its caller only after the accept).
    pub async fn wait_reply(&mut self) -> Result<(), ReplyError> {
        std::future::poll_fn(|cx| self.poll_reply(cx)).await
    }

    /// Reads until the reply has settled.
    fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ReplyError>> {
        loop {
            let got = match &mut self.state {
                State::Waiting(got) => got,
                State::Failed(e) => return Poll::Ready(Err(e.clone())),
                State::Leftover(..) | State::Open => return Poll::Ready(Ok(())),
            };
            if let Some(outcome) = parse(got) {
                self.settle(outcome);
                continue;
            }
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
            let mut rb = ReadBuf::uninit(&mut chunk);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => self.settle(Err(
                    ReplyError::Protocol("the stream ended before the reply".into()),
                )),
                Poll::Ready(Ok(())) => got.extend_from_slice(rb.filled()),
                Poll::Ready(Err(e)) => {
                    self.settle(Err(ReplyError::Protocol(format!("reading the reply: {e}"))))
                }
                Poll::Pending => {
                    let expired = self
                        .deadline
                        .as_mut()
                        .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                    if !expired {
                        return Poll::Pending;
                    }
                    let timeout = self.timeout;
                    self.settle(Err(ReplyError::Timeout(timeout)));
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AwaitReply<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = std::task::ready!(this.poll_reply(cx)) {
            return Poll::Ready(Err(failed(&e)));
        }
        match &mut this.state {
            State::Leftover(rest, pos) => {
                let n = buf.remaining().min(rest.len() - *pos);
                buf.put_slice(&rest[*pos..*pos + n]);
                *pos += n;
                if *pos == rest.len() {
                    this.state = State::Open;
                }
                Poll::Ready(Ok(()))
            }
            _ => Pin::new(&mut this.inner).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + Unpin> AwaitReply<S> {
    /// A write failed. If the agent refused the stream, its reply came before the stream
    /// was torn down and is still waiting to be read: the refusal, with its reason, is the
    /// error to report, not the reset it caused.
    fn explain<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(Err(e)) if matches!(self.state, State::Waiting(_)) => {
                match self.poll_reply(cx) {
                    Poll::Ready(Err(reply @ ReplyError::Rejected { .. })) => {
                        Poll::Ready(Err(failed(&reply)))
                    }
                    _ => Poll::Ready(Err(e)),
                }
            }
            other => other,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for AwaitReply<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.explain(cx, polled)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.explain(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.explain(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.explain(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: ChunkIo> ChunkIo for AwaitReply<S> {
    fn moves_chunks(&self) -> bool {
        self.inner.moves_chunks()
    }

    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if let Err(e) = std::task::ready!(self.poll_reply(cx)) {
            return Poll::Ready(Err(failed(&e)));
        }
        match &mut self.state {
            State::Leftover(rest, pos) => {
                let chunk = Bytes::copy_from_slice(&rest[*pos..]);
                self.state = State::Open;
                Poll::Ready(Ok(Some(chunk)))
            }
            _ => self.inner.poll_read_chunk(cx),
        }
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        let polled = self.inner.poll_write_chunk(cx, chunk);
        self.explain(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn encoded(reply: &StreamReply) -> Vec<u8> {
        reply.encode_length_delimited_to_vec()
    }

    #[tokio::test]
    async fn accept_then_data_passes_through_and_writes_go_early() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut s = AwaitReply::new(
            near,
            Duration::from_secs(5),
            Some(Box::new(move |r| tx.send(r.is_ok()).unwrap())),
        );
        // Written before any reply exists.
        s.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        // The reply arrives split, with data behind it in the same write.
        let mut wire = encoded(&StreamReply::accept());
        wire.extend_from_slice(b"world");
        far.write_all(&wire[..1]).await.unwrap();
        far.write_all(&wire[1..]).await.unwrap();
        drop(far);
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"world");
        assert!(rx.recv().unwrap());
    }

    #[tokio::test]
    async fn reject_ends_the_read_side_with_the_reason() {
        let (near, mut far) = tokio::io::duplex(1024);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut s = AwaitReply::new(
            near,
            Duration::from_secs(5),
            Some(Box::new(move |r| tx.send(r.err().cloned()).unwrap())),
        );
        let reply = StreamReply::reject(StreamRejectCode::Unreachable, "no route");
        far.write_all(&encoded(&reply)).await.unwrap();
        let err = s.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert!(err.to_string().contains("no route"), "{err}");
        let reported = rx.recv().unwrap().unwrap();
        assert!(matches!(
            reported,
            ReplyError::Rejected {
                code: StreamRejectCode::Unreachable,
                ..
            }
        ));
        // Stays failed.
        assert!(s.read(&mut [0u8; 16]).await.is_err());
    }

    #[tokio::test]
    async fn a_write_that_fails_after_a_reject_reports_the_reject() {
        // The agent refused and tore the stream down before the opener's next write: the
        // write fails, and the error carries the agent's reason, not just the teardown.
        let (near, mut far) = tokio::io::duplex(1024);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut s = AwaitReply::new(
            near,
            Duration::from_secs(5),
            Some(Box::new(move |r| tx.send(r.is_err()).unwrap())),
        );
        let reply = StreamReply::reject(StreamRejectCode::Unreachable, "no route");
        far.write_all(&encoded(&reply)).await.unwrap();
        drop(far);
        let err = s.write_all(b"more").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        assert!(
            err.get_ref().is_some_and(|e| e.is::<ReplyError>()),
            "{err:?}"
        );
        assert!(err.to_string().contains("no route"), "{err}");
        assert!(rx.recv().unwrap());
    }

    #[tokio::test]
    async fn a_write_that_fails_without_a_reply_keeps_its_error() {
        let (near, far) = tokio::io::duplex(1024);
        let mut s = AwaitReply::new(near, Duration::from_secs(5), None);
        drop(far);
        let err = s.write_all(b"more").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
    }

    #[tokio::test]
    async fn end_before_reply_garbage_and_oversize_are_errors() {
        for wire in [
            vec![],
            vec![0xff; 12],
            vec![0x80, 0x80, 0x04],
            vec![2, 0xff, 0xff],
        ] {
            let (near, mut far) = tokio::io::duplex(1024);
            let mut s = AwaitReply::new(near, Duration::from_secs(5), None);
            far.write_all(&wire).await.unwrap();
            drop(far);
            let err = s.read(&mut [0u8; 16]).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{wire:?}: {err}");
        }
    }

    #[tokio::test]
    async fn no_reply_times_out() {
        let (near, _far) = tokio::io::duplex(1024);
        let mut s = AwaitReply::new(near, Duration::from_millis(50), None);
        let err = s.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("did not answer"), "{err}");
    }
}
