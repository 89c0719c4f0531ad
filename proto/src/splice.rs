//! Copying bytes both ways between two streams until both directions are done.
//!
//! Each direction ends when its reader reaches end of stream; the writer is then shut down
//! (half-close), and the other direction keeps flowing until it ends too. Counters are updated
//! as bytes move, so status pages see long transfers while they run.
//!
//! Memory: a direction holds its copy buffer only while data is moving. When its reader has
//! nothing to give and nothing is waiting to be written, the buffer is freed, so an idle
//! connection costs no buffer at all; a busy one costs [`SPLICE_BUFFER_SMALL`] or
//! [`SPLICE_BUFFER`] per direction ([`CHUNK_READ_BUFFER`] for a socket read into chunks).
//! Both streams are polled from one task without locks (no `tokio::io::split`).
//!
//! Copies: [`splice`] copies each byte once in user space, through its own buffer. Between a
//! socket and a tunnel stream that moves [`Bytes`] chunks ([`ChunkIo`], tether's own
//! multiplexer), [`splice_chunks`] copies nothing in user space: what it reads from the
//! socket is handed to the stream as it is (TLS then encrypts it from there), and what the
//! stream received (a slice of the buffer TLS decrypted into) is written to the socket as it
//! is.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of each direction's copy buffer while it is in use.
pub const SPLICE_BUFFER: usize = 64 * 1024;

/// Bytes moved by a finished [`splice`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a`.
    pub b_to_a: u64,
}

/// Copies `a → b` and `b → a` at once, half-closing each writer when its reader ends.
///
/// `a_to_b` and `b_to_a` (if given) are incremented as bytes move. Returns when both
/// directions have ended, or with the first error.
pub async fn splice<A, B>(
    mut a: A,
    mut b: B,
    a_to_b: Option<&AtomicU64>,
    b_to_a: Option<&AtomicU64>,
) -> io::Result<Spliced>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut ab = Direction::new(a_to_b);
    let mut ba = Direction::new(b_to_a);
    both_done(|cx| {
        let ab_done = ab.poll_copy(cx, &mut a, &mut b)?.is_ready();
        let ba_done = ba.poll_copy(cx, &mut b, &mut a)?.is_ready();
        Ok(ab_done && ba_done)
    })
    .await?;
    Ok(Spliced {
        a_to_b: ab.total,
        b_to_a: ba.total,
    })
}

/// Polls both directions of a splice (`step` says whether both are finished) until they are,
/// or one fails.
async fn both_done(mut step: impl FnMut(&mut Context<'_>) -> io::Result<bool>) -> io::Result<()> {
    poll_fn(|cx| match step(cx) {
        Ok(true) => Poll::Ready(Ok(())),
        Ok(false) => Poll::Pending,
        Err(e) => Poll::Ready(Err(e)),
    })
    .await
}

/// Ends a direction: flushes the writer and shuts it down (half-close).
fn poll_finish<W: AsyncWrite + Unpin>(w: &mut W, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    ready!(Pin::new(&mut *w).poll_flush(cx))?;
    // The peer may already be gone; a failed shutdown does not undo the copy.
    let _ = ready!(Pin::new(&mut *w).poll_shutdown(cx));
    Poll::Ready(Ok(()))
}

/// A stream that hands over what it received, and takes what it sends, as [`Bytes`] chunks,
/// so that [`splice_chunks`] moves data through it without a copy of its own.
///
/// Implemented by [`crate::transport::MuxStream`] and the wrappers the proxy puts around it.
/// A stream whose transport cannot move chunks says so with [`moves_chunks`](Self::moves_chunks),
/// and is spliced through a buffer like any other stream; its chunk methods are then never
/// called.
pub trait ChunkIo: AsyncRead + AsyncWrite + Unpin {
    /// Whether the chunk methods below work (and save a copy) on this stream.
    fn moves_chunks(&self) -> bool;

    /// The next chunk received: `Some` (never empty), or `None` at end of stream.
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>>;

    /// Takes the front of `chunk` for sending (`chunk` is advanced past what was taken);
    /// `Pending` until it can take something. Flow control decides how much fits.
    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes)
        -> Poll<io::Result<()>>;
}

/// As [`splice`], between `socket` (a TCP connection, an upgraded HTTP connection, ...) and
/// `stream`, without copying in user space when `stream` [moves chunks](ChunkIo).
///
/// `Spliced::a_to_b` counts the bytes from `socket` to `stream`.
pub async fn splice_chunks<S, C>(mut socket: S, mut stream: C) -> io::Result<Spliced>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: ChunkIo,
{
    if !stream.moves_chunks() {
        return splice(socket, stream, None, None).await;
    }
    let mut up = ToChunks::default();
    let mut down = FromChunks::default();
    both_done(|cx| {
        let up_done = up.poll_copy(cx, &mut socket, &mut stream)?.is_ready();
        let down_done = down.poll_copy(cx, &mut stream, &mut socket)?.is_ready();
        Ok(up_done && down_done)
    })
    .await?;
    Ok(Spliced {
        a_to_b: up.total,
        b_to_a: down.total,
    })
}

/// Socket to chunk stream: reads into a [`BytesMut`] and hands each read over as a chunk.
///
/// The buffer is [`SPLICE_BUFFER_SMALL`] until a read fills it, then [`CHUNK_READ_BUFFER`]; when
/// the chunks handed over have been sent (the stream dropped them), the next reads reuse the
/// same allocation. An idle direction holds no buffer.
#[derive(Default)]
struct ToChunks {
    buf: BytesMut,
    /// Read, and not yet all taken by the stream.
    pending: Bytes,
    grow: bool,
    read_done: bool,
    finished: bool,
    total: u64,
}

impl ToChunks {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: ChunkIo,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            while !self.pending.is_empty() {
                ready!(w.poll_write_chunk(cx, &mut self.pending))?;
            }
            if self.read_done {
                ready!(poll_finish(w, cx))?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
            let want = if self.grow {
                CHUNK_READ_BUFFER
            } else {
                SPLICE_BUFFER_SMALL
            };
            if self.buf.capacity() < want {
                // Reuses the allocation when every chunk cut from it is gone.
                self.buf.reserve(want);
            }
            let room = self.buf.capacity();
            match tokio_util::io::poll_read_buf(Pin::new(&mut *r), cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => {
                    self.read_done = true;
                    self.buf = BytesMut::new();
                }
                Poll::Ready(Ok(n)) => {
                    self.total += n as u64;
                    self.grow = n == room;
                    self.pending = self.buf.split().freeze();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Idle: give the buffer back.
                    (self.buf, self.grow) = (BytesMut::new(), false);
                    ready!(Pin::new(&mut *w).poll_flush(cx))?;
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Chunks gathered from a stream before one (vectored) write to the socket.
const GATHER_CHUNKS: usize = 64;
/// Bytes gathered from a stream before one write to the socket.
const GATHER_BYTES: usize = 256 * 1024;

/// Chunk stream to socket: gathers the chunks the stream has ready and writes them to the
/// socket in one vectored write.
#[derive(Default)]
struct FromChunks {
    queue: VecDeque<Bytes>,
    queued: usize,
    need_flush: bool,
    read_done: bool,
    finished: bool,
    total: u64,
}

impl FromChunks {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: ChunkIo,
        W: AsyncRead + AsyncWrite + Unpin,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            while !self.read_done && self.queue.len() < GATHER_CHUNKS && self.queued < GATHER_BYTES
            {
                match r.poll_read_chunk(cx) {
                    Poll::Ready(Ok(Some(chunk))) => {
                        self.queued += chunk.len();
                        self.queue.push_back(chunk);
                    }
                    Poll::Ready(Ok(None)) => self.read_done = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if self.queue.is_empty() {
                if self.read_done {
                    ready!(poll_finish(w, cx))?;
                    self.finished = true;
                    return Poll::Ready(Ok(()));
                }
                if self.need_flush {
                    ready!(Pin::new(&mut *w).poll_flush(cx))?;
                    self.need_flush = false;
                }
                // Idle (the read registered the wakeup): keep no memory.
                if self.queue.capacity() > GATHER_CHUNKS / 8 {
                    self.queue = VecDeque::new();
                }
                return Poll::Pending;
            }
            let n = if self.queue.len() == 1 {
                ready!(Pin::new(&mut *w).poll_write(cx, &self.queue[0]))?
            } else {
                let mut slices = [io::IoSlice::new(&[]); GATHER_CHUNKS];
                for (slot, chunk) in slices.iter_mut().zip(self.queue.iter()) {
                    *slot = io::IoSlice::new(chunk);
                }
                let count = self.queue.len();
                ready!(Pin::new(&mut *w).poll_write_vectored(cx, &slices[..count]))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.total += n as u64;
            self.queued -= n;
            self.need_flush = true;
            let mut left = n;
            while left > 0 {
                let front = self
                    .queue
                    .front_mut()
                    .expect("wrote no more than was queued");
                if front.len() <= left {
                    left -= front.len();
                    self.queue.pop_front();
                } else {
                    front.advance(left);
                    left = 0;
                }
            }
        }
    }
}

/// Read size of a socket read into chunks ([`splice_chunks`]) once a read has filled
/// [`SPLICE_BUFFER_SMALL`]: a quarter as many reads as [`SPLICE_BUFFER`] for bulk, and the
/// chunk is not copied, only cut into frames. As large as a tether stream's initial window,
/// which bounds what a stream has in flight anyway. In tether-bench (`benches/RESULTS.md`,
/// session 9) it moved bulk with 8 streams +9% and one stream −7% against 64 KiB, with 5%
/// less CPU per byte at 8 streams: on a 2-core host every buffering knob moves
/// throughput between those two columns.
pub const CHUNK_READ_BUFFER: usize = 256 * 1024;

/// First buffer of a direction that wakes up: enough for a request or a response of an
/// interactive exchange. A read that fills it makes the next one [`SPLICE_BUFFER`].
pub const SPLICE_BUFFER_SMALL: usize = 4 * 1024;

/// One direction of a splice: a lazily allocated buffer and where it stands.
///
/// The buffer is zero-filled once when it is allocated, and reads go into it as initialised
/// memory. That matters for the multiplexers' streams, which are `futures-io` readers behind
/// tokio's compat adapter: given uninitialised capacity, the adapter zeroes all of it on
/// every read, which was a 64 KiB `memset` per read and 9% of the proxy's and the agent's
/// CPU in tether-bench's HTTP case. A direction starts small ([`SPLICE_BUFFER_SMALL`]) and
/// grows to [`SPLICE_BUFFER`] once a read fills it, so a request/response exchange zeroes
/// 4 KiB per wakeup and bulk 64 KiB per burst.
struct Direction<'c> {
    /// Read but not yet written bytes are `buf[start..end]`; `None` while idle.
    buf: Option<Vec<u8>>,
    start: usize,
    end: usize,
    /// The last read filled the buffer: the next buffer is the big one.
    grow: bool,
    /// Written bytes not yet flushed.
    need_flush: bool,
    read_done: bool,
    finished: bool,
    total: u64,
    counter: Option<&'c AtomicU64>,
}

impl<'c> Direction<'c> {
    fn new(counter: Option<&'c AtomicU64>) -> Self {
        Direction {
            buf: None,
            start: 0,
            end: 0,
            grow: false,
            need_flush: false,
            read_done: false,
            finished: false,
            total: 0,
            counter,
        }
    }

    /// Moves bytes from `r` to `w` until `r` ends (then shuts `w` down) or something is
    /// pending. Ready once this direction is finished.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Refill when everything read so far has been written.
            if self.start == self.end && !self.read_done {
                if self.grow && self.buf.as_ref().is_some_and(|b| b.len() < SPLICE_BUFFER) {
                    self.buf = None;
                }
                let size = if self.grow {
                    SPLICE_BUFFER
                } else {
                    SPLICE_BUFFER_SMALL
                };
                let buf = self.buf.get_or_insert_with(|| vec![0u8; size]);
                let mut rb = ReadBuf::new(&mut buf[..]);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        (self.start, self.end) = (0, n);
                        if n == 0 {
                            self.read_done = true;
                            self.buf = None;
                        } else if n == buf.len() {
                            self.grow = true;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Idle: give the buffer back, and push out what was written.
                        (self.buf, self.grow) = (None, false);
                        if self.need_flush {
                            ready!(Pin::new(&mut *w).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            // Drain the buffer into the writer.
            if let Some(buf) = self.buf.as_ref() {
                while self.start < self.end {
                    let n = ready!(Pin::new(&mut *w).poll_write(cx, &buf[self.start..self.end]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.start += n;
                    self.total += n as u64;
                    self.need_flush = true;
                    if let Some(c) = self.counter {
                        c.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
            if self.read_done {
                ready!(poll_finish(w, cx))?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_half_closes() {
        let (client, a) = tokio::io::duplex(1024);
        let (b, server) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            let c = AtomicU64::new(0);
            let r = splice(a, b, Some(&c), None).await.unwrap();
            (r, c.load(Ordering::Relaxed))
        });
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        cw.write_all(b"hello").await.unwrap();
        cw.shutdown().await.unwrap();
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        // The other direction still flows after the first one closed.
        sw.write_all(b"world!").await.unwrap();
        sw.shutdown().await.unwrap();
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world!");
        let (r, c) = task.await.unwrap();
        assert_eq!(
            r,
            Spliced {
                a_to_b: 5,
                b_to_a: 6
            }
        );
        assert_eq!(c, 5);
    }

    #[tokio::test]
    async fn moves_more_than_a_buffer_through_small_pipes() {
        let (client, a) = tokio::io::duplex(777);
        let (b, server) = tokio::io::duplex(333);
        let task = tokio::spawn(async move { splice(a, b, None, None).await.unwrap() });
        let data: Vec<u8> = (0..(5 * SPLICE_BUFFER + 123))
            .map(|i| (i % 253) as u8)
            .collect();
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        let send = data.clone();
        let writer = tokio::spawn(async move {
            cw.write_all(&send).await.unwrap();
            cw.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.unwrap();
        assert!(got == data);
        sw.shutdown().await.unwrap();
        let mut rest = Vec::new();
        cr.read_to_end(&mut rest).await.unwrap();
        writer.await.unwrap();
        assert_eq!(task.await.unwrap().a_to_b, data.len() as u64);
    }
}
