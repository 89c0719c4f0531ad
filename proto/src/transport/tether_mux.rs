//! tether's own stream multiplexer over a byte stream (TLS over TCP): ALPN `tether/2`.
//!
//! yamux and HTTP/2 each hand every frame from the stream's task to the connection's task
//! through a channel, in an allocation of its own, and yamux zero-fills every frame it
//! receives. On a tunnel that moves many small requests those per-frame costs, and the
//! cross-thread wakeups they cause, are most of the user-space CPU. This multiplexer is built
//! around batches instead:
//!
//! - **Writing.** A stream copies its frame straight into the session's [`Outbox`] (one copy,
//!   no allocation) and wakes the connection task only when the outbox goes from empty to not
//!   empty. The task then hands everything in the outbox to TLS in one (vectored) write:
//!   frames that many streams wrote between two wakeups leave together, in as few TLS records
//!   and syscalls as their size allows. Small writes go in an urgent lane that is sent ahead
//!   of bulk frames queued before them ([`Lane`]). A body handed over as a [`Bytes`] chunk
//!   ([`ChunkIo`](crate::splice::ChunkIo), which [`crate::splice::splice_chunks`] uses) is not copied at all: the
//!   outbox keeps the chunk, and TLS encrypts straight from it.
//! - **Reading.** The connection task reads TLS into one buffer and gives each DATA frame's
//!   body to its stream as a [`Bytes`] slice of that buffer (no copy, no allocation per frame).
//!   The stream's reader copies it into the caller's buffer, or takes the slice itself
//!   ([`ChunkIo::poll_read_chunk`](crate::splice::ChunkIo::poll_read_chunk)).
//!
//! # Wire format
//!
//! Every frame starts with a 12-byte header, integers big-endian:
//!
//! ```text
//! | type: u8 | flags: u8 | reserved: u16 = 0 | stream id: u32 | length: u32 |
//! ```
//!
//! - `DATA` (0): `length` bytes of the stream's data follow (at most [`MAX_FRAME`]).
//!   Flags: `OPEN` (1) on a stream's first frame, `FIN` (2) the sender writes no more,
//!   `RESET` (4) the sender abandons the stream in both directions. A frame may carry data and
//!   flags together, or flags alone (`length` 0).
//! - `WINDOW` (1): `length` more bytes the sender of this frame will accept on the stream.
//! - `GOAWAY` (2): stream id 0: the sender is closing the session; `length` bytes of UTF-8
//!   follow, saying why when it is not a normal close (at most [`MAX_GOAWAY_REASON`]).
//!
//! Unknown flag bits are ignored; an unknown type, a frame over [`MAX_FRAME`], data beyond
//! the stream's window, or a stream id that breaks the rules below ends the session (the peer
//! is broken or hostile, and nothing it sends after can be trusted).
//!
//! Streams: the agent opens odd ids, the proxy even ids, each side in increasing order and
//! never reusing one. Ids are 32 bits: a session that has opened 2³¹ streams refuses more and
//! closes, and the agent dials a new one.
//!
//! # Flow control and memory
//!
//! Each direction of a stream starts with [`INITIAL_WINDOW`] bytes of credit. A receiver
//! returns credit with `WINDOW` frames as its reader consumes data (once half the window is
//! consumed), so a stream whose reader stops holds at most its window in memory and never
//! delays another stream. A stream whose reader keeps up (nothing left queued when it returns
//! credit) doubles its window each time, up to [`MAX_WINDOW`], for long fat links; the growth
//! of all streams of a session together is bounded by [`WINDOW_GROWTH_BUDGET`]. The outbox is
//! bounded: a writer that finds it full waits for the connection task to drain it. The bound
//! is [`OUTBOX_LIMIT`] while the connection takes a full outbox within [`QUICK_DRAIN`], and
//! halves, down to [`MIN_OUTBOX`], each time one takes longer than [`SLOW_DRAIN`] with the
//! connection pushing back (doubling back when draining is quick again; a batch that was
//! slow only because the driver's thread was busy does not count): on a slow or lossy link a
//! small message, which goes ahead of queued bulk in the urgent lane, then waits for at most
//! the small batch being sent, not half a megabyte at the link's rate. Idle sessions give
//! their read and write buffers back.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, warn};

use super::{
    session_parts_with, DirectOpen, DriverParts, Role, Session, SessionConfig, SessionError,
    SessionInfo, SlowLinkHook, StreamInner,
};

/// Bytes of a frame header.
const HEADER: usize = 12;
/// Largest DATA body a frame may carry.
pub const MAX_FRAME: usize = 64 * 1024;
/// Longest reason a GOAWAY frame may carry.
pub const MAX_GOAWAY_REASON: usize = 1024;
/// Credit each direction of a new stream starts with.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// Largest window a stream grows to.
pub const MAX_WINDOW: u32 = 16 * 1024 * 1024;
/// Window growth beyond [`INITIAL_WINDOW`], summed over a session's streams.
pub const WINDOW_GROWTH_BUDGET: i64 = 64 * 1024 * 1024;
/// Frames waiting in the outbox beyond which writers of data wait (control frames never do),
/// on a connection that keeps up.
pub const OUTBOX_LIMIT: usize = 512 * 1024;
/// The least the outbox limit falls to on a connection that drains slowly.
pub const MIN_OUTBOX: usize = 16 * 1024;
/// A batch of frames that takes longer than this to hand to the connection, which made the
/// driver wait for it, halves the outbox limit (at 512 KiB, a link slower than 25 MB/s; at
/// 16 KiB, 0.8 MB/s).
pub const SLOW_DRAIN: Duration = Duration::from_millis(20);
/// Outbox room kept after a take for each writer that had found it full before queuing
/// anything (see [`Outbox::reserved`]).
const FIRST_TURN_RESERVE: usize = 16 * 1024;
/// The smallest piece of a write that goes in the outbox's last room; with less room than
/// this (and a larger write) the writer waits for the next take.
const MIN_PIECE: usize = 4 * 1024;
/// An outbox limit at or below this means a slow link (batches of half of it took over
/// [`SLOW_DRAIN`] to hand over: a link under about 3 MB/s): see [`start_with`].
pub const SLOW_LINK_OUTBOX: usize = 4 * MIN_OUTBOX;
/// A batch handed over within this doubles the outbox limit again.
pub const QUICK_DRAIN: Duration = Duration::from_millis(5);
/// Unsent frames beyond which the connection task stops reading (only frames sent in answer
/// to the peer's, which data writers never wait for, can take the outbox past
/// [`OUTBOX_LIMIT`]).
const UNSENT_LIMIT: usize = 4 * OUTBOX_LIMIT;
/// Free space the read buffer is topped up to before each read.
const READ_CHUNK: usize = 64 * 1024;
/// Buffers larger than this are given back when the session goes idle.
const IDLE_KEEP: usize = 16 * 1024;
/// Bodies handed over as chunks that are at most this long are copied into the outbox
/// instead: for a small body a copy costs less than keeping the chunk.
const INLINE_BODY: usize = 2 * 1024;
/// Largest write whose DATA frame may go in the outbox's urgent lane ([`Lane`]): one TLS
/// record.
const URGENT_FRAME: usize = 16 * 1024;
/// Frames the urgent lane holds at most; beyond, small writes go in the bulk lane and wait
/// for room there like the others.
const URGENT_ROOM: usize = 64 * 1024;
/// Pieces (runs of frame bytes, chunks) handed to the connection in one vectored write.
const WRITE_PIECES: usize = 64;
/// Reads the connection task makes per wakeup before letting other tasks run.
const READS_PER_WAKEUP: usize = 16;
/// Peer-opened streams that may wait for a place under the session's stream limit (the peer
/// may see a place free before this side has let go of the stream); beyond, they are reset.
const OPEN_BACKLOG: usize = 16;
/// Longest a peer-opened stream waits in the backlog before it is reset.
const OPEN_BACKLOG_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

const TYPE_DATA: u8 = 0;
const TYPE_WINDOW: u8 = 1;
const TYPE_GOAWAY: u8 = 2;
const FLAG_OPEN: u8 = 1;
const FLAG_FIN: u8 = 2;
const FLAG_RESET: u8 = 4;

/// Runs the multiplexer over `io` and returns the session; a driver task owns `io`.
#[cfg(test)]
pub(crate) fn start<T>(io: T, role: Role, info: SessionInfo, cfg: &SessionConfig) -> Session
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    start_with(io, role, info, cfg, None)
}

/// [`start`], calling `on_slow_link` when the outbox limit falls to [`SLOW_LINK_OUTBOX`]
/// (the link is slow) and when it grows past it again.
pub(crate) fn start_with<T>(
    io: T,
    role: Role,
    info: SessionInfo,
    cfg: &SessionConfig,
    on_slow_link: Option<SlowLinkHook<T>>,
) -> Session
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let peer = info.peer;
    let conn = Arc::new(Conn {
        outbox: Mutex::new(Outbox {
            next_id: match role {
                Role::Agent => 1,
                Role::Proxy => 2,
            },
            ..Default::default()
        }),
        growth_budget: AtomicI64::new(WINDOW_GROWTH_BUDGET),
        closed: OnceLock::new(),
    });
    let (session, parts) = session_parts_with(info, cfg, Some(conn.clone()));
    let _ = conn.closed.set(parts.closed.clone());
    let parts_limit = parts.limit.clone();
    let driver = Driver {
        io,
        peer,
        conn,
        parts,
        streams: HashMap::new(),
        peer_parity: match role {
            Role::Agent => 0,
            Role::Proxy => 1,
        },
        last_peer_id: 0,
        permits: tokio_util::sync::PollSemaphore::new(parts_limit),
        backlog: VecDeque::new(),
        backlog_timer: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
        refused_opens: 0,
        rbuf: BytesMut::new(),
        sending: Frames::default(),
        batch: None,
        need_flush: false,
        yielded: false,
        write_blocked: false,
        on_slow_link,
    };
    tokio::spawn(driver.run());
    session
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent: take the lock even if a holder panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State of one session that its streams share with the connection task.
struct Conn {
    outbox: Mutex<Outbox>,
    /// What is left of [`WINDOW_GROWTH_BUDGET`].
    growth_budget: AtomicI64,
    /// The session's end, to end it when stream ids run out.
    closed: OnceLock<tokio_util::sync::CancellationToken>,
}

impl DirectOpen for Conn {
    /// Opens a stream from the caller's task: the OPEN frame goes into the outbox, and the
    /// stream into [`Outbox::opened`], which the connection task adds to its table before it
    /// sends the frame, so nothing the peer answers can arrive before the stream is known.
    fn open(self: Arc<Self>) -> Result<StreamInner, SessionError> {
        let mut out = lock(&self.outbox);
        if out.closed {
            return Err(SessionError::Closed);
        }
        if out.next_id > u32::MAX - 2 {
            drop(out);
            if let Some(c) = self.closed.get() {
                c.cancel();
            }
            return Err(SessionError::Mux(
                "stream ids exhausted; the session must be re-established".into(),
            ));
        }
        let id = out.next_id;
        out.next_id += 2;
        let shared = StreamShared::new(id);
        out.opened.push(shared.clone());
        let w = out.push_data(Lane::Urgent, FLAG_OPEN, id, &[]);
        drop(out);
        wake(w);
        Ok(Box::new(TetherStream { shared, conn: self }))
    }
}

/// The outbox limit after a batch of `bytes` took `took` to hand to the connection, from
/// `limit`. Only a batch of at least half the limit that the connection `pushed_back` on
/// counts as slow (a few frames can wait for a moment without the link being slow, and a
/// driver kept off the CPU is not a slow link: see [`Batch::pushed_back`]); any quick one
/// counts as quick.
fn next_outbox_limit(limit: usize, bytes: usize, took: Duration, pushed_back: bool) -> usize {
    if took > SLOW_DRAIN && bytes >= limit / 2 && pushed_back {
        (limit / 2).max(MIN_OUTBOX)
    } else if took < QUICK_DRAIN && bytes >= limit / 2 {
        (limit * 2).min(OUTBOX_LIMIT)
    } else {
        limit
    }
}

/// Frames in the order they are to be sent: headers and copied bodies in one buffer, bodies
/// handed over as chunks kept as they are, each at its place between those bytes.
#[derive(Default)]
struct Frames {
    bytes: Vec<u8>,
    /// Chunks to send, each with the offset in `bytes` it goes before, in order.
    chunks: VecDeque<(usize, Bytes)>,
    chunk_bytes: usize,
    /// Bytes of `bytes` already written (the connection task's progress).
    written: usize,
}

impl Frames {
    /// Bytes not yet written.
    fn len(&self) -> usize {
        self.bytes.len() - self.written + self.chunk_bytes
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn header(&mut self, kind: u8, flags: u8, id: u32, length: u32) {
        self.bytes.extend_from_slice(&[kind, flags, 0, 0]);
        self.bytes.extend_from_slice(&id.to_be_bytes());
        self.bytes.extend_from_slice(&length.to_be_bytes());
    }

    fn chunk(&mut self, chunk: Bytes) {
        self.chunk_bytes += chunk.len();
        self.chunks.push_back((self.bytes.len(), chunk));
    }

    /// Fills `slices` with what is left to write, in order; returns how many it filled.
    fn io_slices<'a>(&'a self, slices: &mut [io::IoSlice<'a>]) -> usize {
        let mut pos = self.written;
        let mut n = 0;
        for (at, chunk) in &self.chunks {
            if n + 2 > slices.len() {
                return n;
            }
            if *at > pos {
                slices[n] = io::IoSlice::new(&self.bytes[pos..*at]);
                n += 1;
                pos = *at;
            }
            slices[n] = io::IoSlice::new(chunk);
            n += 1;
        }
        if pos < self.bytes.len() && n < slices.len() {
            slices[n] = io::IoSlice::new(&self.bytes[pos..]);
            n += 1;
        }
        n
    }

    /// Marks `n` more bytes written.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            match self.chunks.front_mut() {
                Some((at, chunk)) if *at == self.written => {
                    let k = n.min(chunk.len());
                    chunk.advance(k);
                    self.chunk_bytes -= k;
                    n -= k;
                    if chunk.is_empty() {
                        self.chunks.pop_front();
                    }
                }
                next => {
                    let end = next.map_or(self.bytes.len(), |(at, _)| *at);
                    let k = n.min(end - self.written);
                    assert!(k > 0, "advanced past the end of the frames");
                    self.written += k;
                    n -= k;
                }
            }
        }
    }

    /// Everything left to write, as one buffer (for the last words of a session).
    fn to_vec(&self) -> Vec<u8> {
        let mut slices = vec![io::IoSlice::new(&[]); self.chunks.len() * 2 + 1];
        let n = self.io_slices(&mut slices);
        let mut all = Vec::with_capacity(self.len());
        for slice in &slices[..n] {
            all.extend_from_slice(slice);
        }
        all
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.chunks.clear();
        self.chunk_bytes = 0;
        self.written = 0;
    }
}

/// The two queues of the [`Outbox`]. At each take the connection task sends the urgent
/// frames first: a stream that writes little (a keystroke, a request, a window update) does
/// not wait behind whatever bulk the other streams queued before it, only behind the batch
/// already being sent. What goes where ([`Outbox::lane_for`]):
/// - `WINDOW` frames, and a stream's `OPEN`: urgent;
/// - a write of at most [`URGENT_FRAME`] bytes (or a `FIN`, a `RESET`): urgent, unless the
///   stream already has a frame in the bulk lane since the last take (its frames must leave
///   in the order it wrote them) or the urgent lane holds [`URGENT_ROOM`];
/// - everything else: bulk, where writers wait for room under the outbox limit and take
///   turns.
///
/// So the outbox holds at most its limit in the bulk lane and [`URGENT_ROOM`] (plus a
/// 12-byte frame per stream for opens and window updates) in the urgent one.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lane {
    Urgent,
    Bulk,
}

/// Frames written by streams and not yet taken by the connection task.
struct Outbox {
    /// Frames that go ahead of `frames` at the next take ([`Lane::Urgent`]).
    urgent: Frames,
    /// Frames in the order they were written ([`Lane::Bulk`]).
    frames: Frames,
    /// Streams dropped since the connection task last looked: it forgets them.
    dropped: Vec<u32>,
    /// The connection task, when it is waiting for frames.
    driver: Option<Waker>,
    /// Streams that found the outbox full before queuing anything since it was last taken:
    /// they are woken first when it is.
    starved: Vec<Arc<StreamShared>>,
    /// Other streams waiting for room: over their fair share, or full after queuing some.
    waiting: Vec<Arc<StreamShared>>,
    /// Counts the times the connection task took the frames; a stream's share is counted
    /// per take.
    taken: u64,
    /// More than one writer was woken at the last take: each may queue a quarter of `limit`
    /// until the next. Without this, whichever woken writer runs first refills the whole outbox
    /// (a splice queues all it can in one go), and with a scheduler that runs woken tasks in
    /// order, the same one runs first every time and a small writer behind it starves.
    contended: bool,
    /// Frames beyond which data writers wait: [`OUTBOX_LIMIT`], lower while the connection
    /// drains slowly (set by the connection task).
    limit: usize,
    /// Room under `limit` kept, since the last take, for the writers that were starved
    /// before it ([`FIRST_TURN_RESERVE`] each): whoever else runs first after a take cannot
    /// fill the outbox in front of them (a writer woken by new credit, say).
    reserved: usize,
    /// The session has ended: nothing more is sent.
    closed: bool,
    /// Id of the next stream this side opens.
    next_id: u32,
    /// Streams opened since the connection task last looked: it adds them to its table.
    opened: Vec<Arc<StreamShared>>,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            urgent: Frames::default(),
            frames: Frames::default(),
            dropped: Vec::new(),
            driver: None,
            starved: Vec::new(),
            waiting: Vec::new(),
            taken: 0,
            contended: false,
            limit: OUTBOX_LIMIT,
            reserved: 0,
            closed: false,
            next_id: 0,
            opened: Vec::new(),
        }
    }
}

impl Outbox {
    /// Appends one frame to `lane`; returns the connection task's waker if it must be woken
    /// (after the caller releases the lock).
    fn push(
        &mut self,
        lane: Lane,
        kind: u8,
        flags: u8,
        id: u32,
        body: &[u8],
        length: u32,
    ) -> Option<Waker> {
        let was_empty = self.is_empty();
        let frames = self.lane(lane);
        frames.bytes.reserve(HEADER + body.len());
        frames.header(kind, flags, id, length);
        frames.bytes.extend_from_slice(body);
        self.woken_if(was_empty)
    }

    fn push_data(&mut self, lane: Lane, flags: u8, id: u32, body: &[u8]) -> Option<Waker> {
        self.push(lane, TYPE_DATA, flags, id, body, body.len() as u32)
    }

    /// Appends one DATA frame whose body is the first `n` bytes of `bufs`, gathered.
    fn push_gathered(
        &mut self,
        lane: Lane,
        id: u32,
        bufs: &[io::IoSlice<'_>],
        n: usize,
    ) -> Option<Waker> {
        let was_empty = self.is_empty();
        let frames = self.lane(lane);
        frames.bytes.reserve(HEADER + n);
        frames.header(TYPE_DATA, 0, id, n as u32);
        let mut left = n;
        for b in bufs {
            let take = left.min(b.len());
            frames.bytes.extend_from_slice(&b[..take]);
            left -= take;
            if left == 0 {
                break;
            }
        }
        self.woken_if(was_empty)
    }

    /// Appends a DATA frame whose body is sent from `body` itself, or copied when small (and
    /// always in the urgent lane, which holds no chunks).
    fn push_chunk(&mut self, lane: Lane, id: u32, body: Bytes) -> Option<Waker> {
        if body.len() <= INLINE_BODY || lane == Lane::Urgent {
            return self.push_data(lane, 0, id, &body);
        }
        let was_empty = self.is_empty();
        self.frames.header(TYPE_DATA, 0, id, body.len() as u32);
        self.frames.chunk(body);
        self.woken_if(was_empty)
    }

    fn lane(&mut self, lane: Lane) -> &mut Frames {
        match lane {
            Lane::Urgent => &mut self.urgent,
            Lane::Bulk => &mut self.frames,
        }
    }

    /// Bytes of frames waiting, in both lanes.
    fn len(&self) -> usize {
        self.urgent.len() + self.frames.len()
    }

    /// The lane for a write of `len` data bytes (or none) from the stream whose state is
    /// `st`: urgent when it is small, the stream has nothing in the bulk lane since the last
    /// take (so that its frames still leave in the order it wrote them) and the urgent lane
    /// has room; bulk otherwise, and then for the stream's writes until the next take.
    fn lane_for(&self, st: &mut StreamState, len: usize) -> Lane {
        if len <= URGENT_FRAME
            && st.bulk_at != Some(self.taken)
            && self.urgent.len() + HEADER + len <= URGENT_ROOM
        {
            Lane::Urgent
        } else {
            st.bulk_at = Some(self.taken);
            Lane::Bulk
        }
    }

    /// Takes both lanes, urgent frames first, into `sending` (empty), keeping buffers, and
    /// counts the take.
    fn take_frames(&mut self, sending: &mut Frames) {
        self.taken += 1;
        if self.urgent.is_empty() {
            std::mem::swap(&mut self.frames, sending);
        } else if self.frames.is_empty() {
            std::mem::swap(&mut self.urgent, sending);
        } else {
            // Both: the urgent frames (no chunks of their own) go in front as one chunk.
            std::mem::swap(&mut self.frames, sending);
            let urgent = std::mem::take(&mut self.urgent.bytes);
            sending.chunk_bytes += urgent.len();
            sending.chunks.push_front((0, Bytes::from(urgent)));
            self.urgent.written = 0;
        }
    }

    /// Nothing for the connection task to do.
    fn is_empty(&self) -> bool {
        self.urgent.is_empty() && self.frames.is_empty() && self.dropped.is_empty()
    }

    /// The connection task's waker, if the outbox was empty before (so it may be asleep).
    fn woken_if(&mut self, was_empty: bool) -> Option<Waker> {
        if was_empty {
            self.driver.take()
        } else {
            None
        }
    }
}

/// One stream's state, shared by its handle and the connection task.
struct StreamShared {
    id: u32,
    state: Mutex<StreamState>,
}

#[derive(Default)]
struct StreamState {
    /// Received and not yet read.
    recv: VecDeque<Bytes>,
    /// The peer sent FIN: after `recv`, end of stream.
    recv_fin: bool,
    /// The peer reset the stream.
    reset: bool,
    /// The session ended.
    gone: bool,
    /// Bytes the peer may still send (checked by the connection task).
    peer_credit: u32,
    /// This direction's current window.
    window: u32,
    /// Bytes read since credit was last returned.
    consumed: u32,
    reader: Option<Waker>,
    /// Bytes we may still send.
    send_credit: u64,
    /// We sent FIN.
    sent_fin: bool,
    /// The writer, waiting for credit or outbox space.
    writer: Option<Waker>,
    /// Queued in [`Outbox::waiting`] or [`Outbox::starved`].
    waiting_room: bool,
    /// The writer found the outbox full before queuing anything and was woken first at the
    /// take with this count ([`Outbox::taken`]): until the next take, room is kept for it
    /// ([`Outbox::reserved`]) until it writes.
    first_turn: Option<u64>,
    /// The take count ([`Outbox::taken`]) when this stream last put a frame in the bulk
    /// lane: until the next take, its frames go there too, behind it.
    bulk_at: Option<u64>,
    /// Data bytes queued since the outbox was last taken (valid while `queued_at` is
    /// [`Outbox::taken`]).
    queued: usize,
    queued_at: u64,
}

impl StreamShared {
    fn new(id: u32) -> Arc<Self> {
        Arc::new(StreamShared {
            id,
            state: Mutex::new(StreamState {
                peer_credit: INITIAL_WINDOW,
                window: INITIAL_WINDOW,
                send_credit: INITIAL_WINDOW as u64,
                ..Default::default()
            }),
        })
    }
}

fn wake(w: Option<Waker>) {
    if let Some(w) = w {
        w.wake();
    }
}

/// A stream as its user sees it.
struct TetherStream {
    shared: Arc<StreamShared>,
    conn: Arc<Conn>,
}

impl TetherStream {
    fn closed_error() -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionAborted, "the tunnel session ended")
    }

    fn reset_error() -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionReset, "stream reset by the peer")
    }

    /// A read found nothing queued: end of stream (`Ok`), why the stream is over (`Err`), or
    /// `Pending` with the reader registered for the next frame.
    fn poll_nothing_queued(st: &mut StreamState, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if st.recv_fin {
            return Poll::Ready(Ok(()));
        }
        if st.reset {
            return Poll::Ready(Err(Self::reset_error()));
        }
        if st.gone {
            return Poll::Ready(Err(Self::closed_error()));
        }
        st.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncRead for TetherStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut st = lock(&self.shared.state);
        if st.recv.is_empty() {
            return Self::poll_nothing_queued(&mut st, cx);
        }
        let mut read = 0usize;
        while buf.remaining() > 0 {
            let Some(front) = st.recv.front_mut() else {
                break;
            };
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                st.recv.pop_front();
            }
            read += n;
        }
        self.consumed(st, read);
        Poll::Ready(Ok(()))
    }
}

impl TetherStream {
    /// The reader took `read` bytes: return credit to the peer when it is due.
    fn consumed(&self, mut st: MutexGuard<'_, StreamState>, read: usize) {
        st.consumed += read as u32;
        // Return credit once half the window is used, so the peer never runs dry while the
        // reader keeps up.
        if st.consumed >= st.window / 2 && !st.reset && !st.gone && !st.recv_fin {
            let mut grant = st.consumed;
            if st.recv.is_empty() && st.window < MAX_WINDOW {
                // The reader keeps up: let the peer send more at once.
                let extra = st.window.min(MAX_WINDOW - st.window);
                if self
                    .conn
                    .growth_budget
                    .fetch_sub(extra as i64, Ordering::Relaxed)
                    >= extra as i64
                {
                    st.window += extra;
                    grant += extra;
                } else {
                    self.conn
                        .growth_budget
                        .fetch_add(extra as i64, Ordering::Relaxed);
                }
            }
            st.consumed = 0;
            st.peer_credit += grant;
            let id = self.shared.id;
            let w = lock(&self.conn.outbox).push(Lane::Urgent, TYPE_WINDOW, 0, id, &[], grant);
            drop(st);
            wake(w);
        }
    }

    /// Waits for credit and outbox room to send up to `len` bytes (`len` > 0), then has
    /// `push` queue the first `n` of them and returns `n`.
    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        len: usize,
        push: impl FnOnce(&mut Outbox, Lane, usize) -> Option<Waker>,
    ) -> Poll<io::Result<usize>> {
        let mut st = lock(&self.shared.state);
        if st.reset {
            return Poll::Ready(Err(Self::reset_error()));
        }
        if st.gone {
            return Poll::Ready(Err(Self::closed_error()));
        }
        if st.sent_fin {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        if st.send_credit == 0 {
            st.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = len.min(MAX_FRAME).min(st.send_credit as usize);
        let mut out = lock(&self.conn.outbox);
        if out.closed {
            return Poll::Ready(Err(Self::closed_error()));
        }
        if st.queued_at != out.taken {
            st.queued = 0;
            st.queued_at = out.taken;
        }
        // A small write goes ahead in the urgent lane, which has room of its own; the rest
        // waits for room under the outbox limit.
        let lane = out.lane_for(&mut st, len);
        // Room kept for writers that found the outbox full last time, until they have written.
        let first_turn = st.first_turn == Some(out.taken);
        let n = if lane == Lane::Urgent {
            n
        } else {
            let reserved = if first_turn { 0 } else { out.reserved };
            let limit = out.limit.saturating_sub(reserved);
            let room = limit.saturating_sub(out.frames.len());
            // Full, or too full for this write to go in a frame worth sending.
            let full = room == 0 || (room < n && room < MIN_PIECE);
            if full || (out.contended && st.queued >= out.limit / 4) {
                st.writer = Some(cx.waker().clone());
                if !st.waiting_room {
                    st.waiting_room = true;
                    if full && st.queued == 0 {
                        out.starved.push(self.shared.clone());
                    } else {
                        out.waiting.push(self.shared.clone());
                    }
                }
                return Poll::Pending;
            }
            // Never past the limit: with a small outbox one frame could otherwise fill it all.
            n.min(room)
        };
        if first_turn {
            st.first_turn = None;
            out.reserved = out.reserved.saturating_sub(FIRST_TURN_RESERVE);
        }
        let w = push(&mut out, lane, n);
        drop(out);
        st.queued += n;
        st.send_credit -= n as u64;
        drop(st);
        wake(w);
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for TetherStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let id = self.shared.id;
        self.poll_send(cx, buf.len(), |out, lane, n| {
            out.push_data(lane, 0, id, &buf[..n])
        })
    }

    /// Gathers the slices into one frame (as much as credit and [`MAX_FRAME`] allow), so a
    /// writer such as hyper can hand over a head and a body without first copying them
    /// together itself.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum::<usize>();
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        let id = self.shared.id;
        self.poll_send(cx, len, |out, lane, n| out.push_gathered(lane, id, bufs, n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Written frames are in the session's outbox, which the connection task sends as soon
    /// as it can: there is nothing more to flush.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = lock(&self.shared.state);
        if st.sent_fin || st.reset || st.gone {
            return Poll::Ready(Ok(()));
        }
        st.sent_fin = true;
        let mut out = lock(&self.conn.outbox);
        let lane = out.lane_for(&mut st, 0);
        let w = out.push_data(lane, FLAG_FIN, self.shared.id, &[]);
        drop(out);
        drop(st);
        wake(w);
        Poll::Ready(Ok(()))
    }
}

impl super::RawStream for TetherStream {
    fn moves_chunks(&self) -> bool {
        true
    }

    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        let mut st = lock(&self.shared.state);
        let Some(chunk) = st.recv.pop_front() else {
            return Self::poll_nothing_queued(&mut st, cx).map_ok(|()| None);
        };
        self.consumed(st, chunk.len());
        Poll::Ready(Ok(Some(chunk)))
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        if chunk.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let id = self.shared.id;
        let len = chunk.len();
        ready!(self.poll_send(cx, len, |out, lane, n| {
            out.push_chunk(lane, id, chunk.split_to(n))
        }))?;
        Poll::Ready(Ok(()))
    }
}

impl Drop for TetherStream {
    /// Resets the stream unless both directions ended cleanly, and tells the connection task
    /// to forget it.
    fn drop(&mut self) {
        let mut st = lock(&self.shared.state);
        let reset = !(st.reset || st.gone || (st.sent_fin && st.recv_fin));
        st.recv.clear();
        let growth = st.window.saturating_sub(INITIAL_WINDOW);
        st.window = INITIAL_WINDOW;
        self.conn
            .growth_budget
            .fetch_add(growth as i64, Ordering::Relaxed);
        let mut out = lock(&self.conn.outbox);
        let w = if out.closed {
            None
        } else {
            let mut w = None;
            if reset {
                let lane = out.lane_for(&mut st, 0);
                w = out.push_data(lane, FLAG_RESET, self.shared.id, &[]);
            }
            let was_empty = out.is_empty();
            out.dropped.push(self.shared.id);
            if was_empty {
                w = out.driver.take();
            }
            w
        };
        drop(out);
        drop(st);
        wake(w);
    }
}

/// What [`Driver::refill`] found.
enum Refill {
    /// Nothing to send; the driver is registered to be woken.
    Empty,
    /// Frames to send are in `sending`.
    Ready,
    /// Frames are waiting: yield first.
    Defer,
}

/// Why the connection task stopped.
#[derive(Debug, thiserror::Error)]
enum DriverError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("peer broke the multiplexer protocol: {0}")]
    Protocol(String),
}

fn protocol(msg: impl Into<String>) -> DriverError {
    DriverError::Protocol(msg.into())
}

/// The connection task: owns the byte stream, reads and dispatches frames, writes the outbox.
struct Driver<T> {
    io: T,
    peer: std::net::SocketAddr,
    conn: Arc<Conn>,
    parts: DriverParts,
    /// Streams that may still receive frames, by id.
    streams: HashMap<u32, Arc<StreamShared>>,
    /// `id % 2` of the streams the peer opens.
    peer_parity: u32,
    /// Highest id the peer has opened.
    last_peer_id: u32,
    /// Places under the session's stream limit, for the backlog.
    permits: tokio_util::sync::PollSemaphore,
    /// Peer-opened streams waiting for a place, with when they stop waiting.
    backlog: VecDeque<(TetherStream, tokio::time::Instant)>,
    /// Fires when the front of the backlog has waited long enough.
    backlog_timer: Pin<Box<tokio::time::Sleep>>,
    /// Peer-opened streams reset for want of a place.
    refused_opens: u64,
    /// Bytes read and not yet parsed.
    rbuf: BytesMut,
    /// Frames being written.
    sending: Frames,
    /// The frames being written: when they were taken from the outbox, how many bytes they
    /// were, and whether the connection has made the driver wait for them. How the connection
    /// takes them sets the outbox limit.
    batch: Option<Batch>,
    /// Bytes handed to TLS since the last flush.
    need_flush: bool,
    /// The driver has just yielded ([`Step::Yield`]): take the outbox now.
    yielded: bool,
    /// The connection did not take everything written to it (the peer is not reading, or
    /// not fast enough).
    write_blocked: bool,
    /// Told when the link turns slow (the outbox limit falls to [`SLOW_LINK_OUTBOX`]) or
    /// fast again; the session's handle is told through `parts.slow_link`.
    on_slow_link: Option<SlowLinkHook<T>>,
}

/// A batch of frames being handed to the connection: how it goes sets the outbox limit
/// ([`next_outbox_limit`]).
struct Batch {
    /// When it was taken from the outbox.
    since: Instant,
    bytes: usize,
    /// The connection made the driver wait (a write or flush was pending) at least once: the
    /// link, not the host, set the pace. A batch that took long with no wait only says the
    /// driver's thread was busy or descheduled (a saturated host), which a smaller outbox
    /// would not help.
    pushed_back: bool,
}

/// What the driver does next.
enum Step {
    /// Carry on (or wait to be woken).
    Continue,
    /// Frames are waiting in the outbox: yield once, then send them with whatever other
    /// streams add meanwhile.
    Yield,
    /// Close the session: nobody uses it any more.
    Close,
    /// The peer said it is closing the session.
    PeerClosed,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Driver<T> {
    async fn run(mut self) {
        let cancelled = self.parts.closed.clone().cancelled_owned();
        tokio::pin!(cancelled);
        let result = loop {
            let step = poll_fn(|cx| {
                if cancelled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(Step::Close));
                }
                match self.poll_step(cx) {
                    Ok(Step::Continue) => Poll::Pending,
                    end => Poll::Ready(end),
                }
            })
            .await;
            match step {
                Ok(Step::Yield) => {
                    // Let the other tasks that are ready run (and the runtime poll for I/O)
                    // first: the frames they write join this batch.
                    tokio::task::yield_now().await;
                    self.yielded = true;
                }
                end => break end,
            }
        };
        let goodbye = match result {
            Ok(Step::PeerClosed) => None,
            Ok(_) => Some(String::new()),
            Err(DriverError::Protocol(e)) => {
                warn!(peer = %self.peer, error = %e, "ending the session");
                Some(e)
            }
            Err(DriverError::Io(e)) => {
                debug!(peer = %self.peer, error = %e, "session connection ended");
                None
            }
        };
        self.finish(goodbye).await;
    }

    /// One round of work: serve open requests, read and dispatch, write what is queued.
    /// `Continue` means everything that could be done is done and a waker is registered.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Result<Step, DriverError> {
        if self.serve_opens(cx) {
            return Ok(Step::Close);
        }
        // A peer that sends but does not read would make the frames we send in answer
        // (WINDOW, RESET) pile up: past a limit, stop reading until it reads.
        let read_paused = self.write_blocked && self.unsent() > UNSENT_LIMIT;
        if !read_paused {
            if let Poll::Ready(end) = self.poll_read_frames(cx) {
                return end;
            }
        }
        self.serve_backlog(cx);
        let yield_now = self.poll_write_outbox(cx)?;
        if read_paused && !(self.write_blocked && self.unsent() > UNSENT_LIMIT) {
            // Writing made room, and nothing else may wake us to read.
            cx.waker().wake_by_ref();
        }
        Ok(if yield_now {
            Step::Yield
        } else {
            Step::Continue
        })
    }

    /// Bytes of frames not yet handed to the connection.
    fn unsent(&self) -> usize {
        self.sending.len() + lock(&self.conn.outbox).len()
    }

    /// Returns true when every handle is gone and nobody accepts streams: the session has no
    /// user left. (Handles open streams themselves, [`Conn::open`]; nothing arrives here.)
    fn serve_opens(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            match self.parts.open_rx.poll_recv(cx) {
                Poll::Ready(Some(req)) => {
                    let _ = req.send(Err(SessionError::Mux("opened without the driver".into())));
                }
                Poll::Ready(None) => return self.parts.incoming_tx.is_closed(),
                Poll::Pending => return false,
            }
        }
    }

    /// Resets (by dropping) a peer-opened stream there is no place for; says so once per
    /// session at warn level, then at debug level, so a flood cannot flood the log.
    fn refused(&mut self, stream: TetherStream) {
        self.refused_opens += 1;
        if self.refused_opens == 1 {
            warn!(
                peer = %self.peer,
                "peer opened a stream beyond the session's stream limit and none freed up; \
                 resetting it (further ones are logged at debug level)"
            );
        } else {
            debug!(peer = %self.peer, refused = self.refused_opens, "reset a stream beyond the limit");
        }
        drop(stream);
    }

    /// Puts a peer-opened stream over the limit in the backlog, or resets it (by dropping it)
    /// when the backlog is full.
    fn wait_for_place(&mut self, stream: TetherStream) {
        if self.backlog.len() >= OPEN_BACKLOG {
            self.refused(stream);
            return;
        }
        let deadline = tokio::time::Instant::now() + OPEN_BACKLOG_WAIT;
        if self.backlog.is_empty() {
            self.backlog_timer.as_mut().reset(deadline);
        }
        self.backlog.push_back((stream, deadline));
    }

    /// Delivers backlogged streams as places free up; resets those that waited too long.
    fn serve_backlog(&mut self, cx: &mut Context<'_>) {
        while !self.backlog.is_empty() {
            if let Poll::Ready(permit) = self.permits.poll_acquire(cx) {
                let (stream, _) = self.backlog.pop_front().expect("not empty");
                match permit {
                    Some(permit) => self.parts.deliver_with(permit, Box::new(stream)),
                    None => drop(stream),
                }
                continue;
            }
            if self.backlog_timer.as_mut().poll(cx).is_pending() {
                return;
            }
            let now = tokio::time::Instant::now();
            while self.backlog.front().is_some_and(|(_, d)| *d <= now) {
                let (stream, _) = self.backlog.pop_front().expect("not empty");
                self.refused(stream);
            }
            if let Some((_, d)) = self.backlog.front() {
                self.backlog_timer.as_mut().reset(*d);
            }
        }
    }

    /// Reads and dispatches frames until the socket has nothing more (Pending) or the budget
    /// of reads per wakeup is spent (then wakes itself and yields).
    fn poll_read_frames(&mut self, cx: &mut Context<'_>) -> Poll<Result<Step, DriverError>> {
        for _ in 0..READS_PER_WAKEUP {
            while let Some(step) = self.parse_frame()? {
                if !matches!(step, Step::Continue) {
                    return Poll::Ready(Ok(step));
                }
            }
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
                self.rbuf.reserve(READ_CHUNK);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the connection without GOAWAY",
                    )
                    .into()))
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => {
                    if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
                        // Idle: give the buffer back (frames still queued keep their part).
                        self.rbuf = BytesMut::new();
                    }
                    return Poll::Pending;
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Takes one whole frame off the read buffer and acts on it; `None` if none is complete.
    fn parse_frame(&mut self) -> Result<Option<Step>, DriverError> {
        if self.rbuf.len() < HEADER {
            return Ok(None);
        }
        let h = &self.rbuf[..HEADER];
        let (kind, flags) = (h[0], h[1]);
        let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let length = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        match kind {
            TYPE_DATA => {
                let len = length as usize;
                if len > MAX_FRAME {
                    return Err(protocol(format!(
                        "DATA frame of {len} bytes on stream {id}, over the {MAX_FRAME}-byte limit"
                    )));
                }
                if self.rbuf.len() < HEADER + len {
                    self.rbuf.reserve(HEADER + len - self.rbuf.len());
                    return Ok(None);
                }
                self.rbuf.advance(HEADER);
                let body = self.rbuf.split_to(len).freeze();
                self.on_data(flags, id, body)?;
            }
            TYPE_WINDOW => {
                self.rbuf.advance(HEADER);
                if let Some(s) = self.streams.get(&id) {
                    let mut st = lock(&s.state);
                    st.send_credit += length as u64;
                    if st.send_credit > u32::MAX as u64 {
                        return Err(protocol(format!("window of stream {id} over 4 GiB")));
                    }
                    let w = st.writer.take();
                    drop(st);
                    wake(w);
                } else {
                    self.check_known(id)?;
                }
            }
            TYPE_GOAWAY => {
                let len = length as usize;
                if len > MAX_GOAWAY_REASON {
                    return Err(protocol(format!("GOAWAY reason of {len} bytes")));
                }
                if self.rbuf.len() < HEADER + len {
                    return Ok(None);
                }
                self.rbuf.advance(HEADER);
                let reason = self.rbuf.split_to(len);
                if reason.is_empty() {
                    debug!(peer = %self.peer, "peer is closing the session");
                } else {
                    warn!(
                        peer = %self.peer,
                        reason = %String::from_utf8_lossy(&reason),
                        "peer closed the session because of an error on its side"
                    );
                }
                return Ok(Some(Step::PeerClosed));
            }
            other => return Err(protocol(format!("unknown frame type {other}"))),
        }
        Ok(Some(Step::Continue))
    }

    /// A frame for a stream we no longer track is fine if the stream existed (it was closed
    /// here while the peer was still sending); otherwise the peer made the id up.
    fn check_known(&self, id: u32) -> Result<(), DriverError> {
        let existed = if id % 2 == self.peer_parity {
            id != 0 && id <= self.last_peer_id
        } else {
            id < lock(&self.conn.outbox).next_id
        };
        if existed {
            Ok(())
        } else {
            Err(protocol(format!(
                "frame for stream {id}, which was never opened"
            )))
        }
    }

    fn on_data(&mut self, flags: u8, id: u32, body: Bytes) -> Result<(), DriverError> {
        if flags & FLAG_OPEN != 0 {
            if id % 2 != self.peer_parity || id <= self.last_peer_id {
                return Err(protocol(format!(
                    "stream {id} opened out of order (last was {})",
                    self.last_peer_id
                )));
            }
            self.last_peer_id = id;
            let shared = StreamShared::new(id);
            self.streams.insert(id, shared.clone());
            let stream = TetherStream {
                shared,
                conn: self.conn.clone(),
            };
            if !self.backlog.is_empty() {
                self.wait_for_place(stream);
            } else {
                match self.parts.limit.clone().try_acquire_owned() {
                    Ok(permit) => self.parts.deliver_with(permit, Box::new(stream)),
                    Err(_) => self.wait_for_place(stream),
                }
            }
        }
        let Some(s) = self.streams.get(&id) else {
            return self.check_known(id);
        };
        let mut st = lock(&s.state);
        if !body.is_empty() {
            if body.len() as u32 > st.peer_credit {
                return Err(protocol(format!(
                    "{} bytes on stream {id}, beyond its window of {}",
                    body.len(),
                    st.peer_credit
                )));
            }
            st.peer_credit -= body.len() as u32;
            if !st.recv_fin && !st.reset {
                st.recv.push_back(body);
            }
        }
        if flags & FLAG_FIN != 0 {
            st.recv_fin = true;
        }
        let forget = flags & FLAG_RESET != 0;
        if forget {
            st.reset = true;
        }
        let (r, w) = (
            st.reader.take(),
            if forget { st.writer.take() } else { None },
        );
        drop(st);
        if forget {
            self.streams.remove(&id);
        }
        wake(r);
        wake(w);
        Ok(())
    }

    /// Writes the outbox to the connection until it is empty (then waits for frames) or the
    /// connection is full (then waits for it). Returns true when frames are waiting and the
    /// driver should yield before it takes them ([`Step::Yield`]).
    fn poll_write_outbox(&mut self, cx: &mut Context<'_>) -> Result<bool, DriverError> {
        let mut defer = false;
        self.write_blocked = false;
        loop {
            if self.sending.is_empty() {
                match self.refill(cx) {
                    Refill::Empty => break,
                    Refill::Defer => {
                        defer = true;
                        break;
                    }
                    Refill::Ready => continue,
                }
            }
            let mut slices = [io::IoSlice::new(&[]); WRITE_PIECES];
            let count = self.sending.io_slices(&mut slices);
            let written = if count == 1 {
                Pin::new(&mut self.io).poll_write(cx, &slices[0])
            } else {
                Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count])
            };
            match written {
                Poll::Ready(Ok(0)) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Poll::Ready(Ok(n)) => {
                    self.sending.advance(n);
                    self.need_flush = true;
                }
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => {
                    self.pushed_back();
                    break;
                }
            }
        }
        if self.need_flush {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.need_flush = false,
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => self.pushed_back(),
            }
        }
        Ok(defer)
    }

    /// The connection did not take what the driver wrote (or flushed) for now.
    fn pushed_back(&mut self) {
        self.write_blocked = true;
        if let Some(batch) = &mut self.batch {
            batch.pushed_back = true;
        }
    }

    /// Swaps the outbox's frames in for sending, forgets dropped streams and wakes writers
    /// waiting for room. If the outbox is empty, registers to be woken when it is not. Unless
    /// the driver has just yielded, frames in the outbox are left for after a yield.
    fn refill(&mut self, cx: &mut Context<'_>) -> Refill {
        self.sending.clear();
        let mut out = lock(&self.conn.outbox);
        let waiting_frames = !out.is_empty();
        if waiting_frames && !std::mem::take(&mut self.yielded) {
            return Refill::Defer;
        }
        // The batch just sent is done: how long it took says how fast the connection drains.
        if let Some(b) = self.batch.take() {
            out.limit = next_outbox_limit(out.limit, b.bytes, b.since.elapsed(), b.pushed_back);
        }
        let slow_link = out.limit <= SLOW_LINK_OUTBOX;
        let pace_changed = slow_link != self.parts.slow_link.load(Ordering::Relaxed);
        out.take_frames(&mut self.sending);
        if !self.sending.is_empty() {
            self.batch = Some(Batch {
                since: Instant::now(),
                bytes: self.sending.len(),
                pushed_back: false,
            });
        }
        for s in out.opened.drain(..) {
            self.streams.insert(s.id, s);
        }
        let dropped = std::mem::take(&mut out.dropped);
        // Woken in this order and, on a scheduler that runs woken tasks in order, served so.
        let mut waiting = std::mem::take(&mut out.starved);
        let first_turns = waiting.len();
        out.reserved = (first_turns * FIRST_TURN_RESERVE).min(out.limit / 2);
        waiting.append(&mut out.waiting);
        let taken = out.taken;
        out.contended = waiting.len() > 1;
        let empty = self.sending.is_empty();
        if empty {
            out.driver = Some(cx.waker().clone());
            // Idle: keep small buffers only.
            if out.frames.bytes.capacity() > IDLE_KEEP {
                out.frames = Frames::default();
            }
            if out.urgent.bytes.capacity() > IDLE_KEEP {
                out.urgent = Frames::default();
            }
        }
        drop(out);
        if pace_changed {
            self.parts.slow_link.store(slow_link, Ordering::Relaxed);
            if let Some(hook) = &mut self.on_slow_link {
                hook(&mut self.io, slow_link);
            }
        }
        if empty && self.sending.bytes.capacity() > IDLE_KEEP {
            self.sending = Frames::default();
        }
        for id in dropped {
            self.streams.remove(&id);
        }
        for (i, s) in waiting.into_iter().enumerate() {
            let mut st = lock(&s.state);
            st.waiting_room = false;
            st.first_turn = (i < first_turns).then_some(taken);
            let w = st.writer.take();
            drop(st);
            wake(w);
        }
        if empty {
            Refill::Empty
        } else {
            Refill::Ready
        }
    }

    /// Ends the session: tells the peer (when it is still there: `goodbye` is the reason, empty
    /// for a normal close), wakes every stream, and marks the session closed.
    async fn finish(mut self, goodbye: Option<String>) {
        self.parts.closed.cancel();
        let leftovers = {
            let mut out = lock(&self.conn.outbox);
            out.closed = true;
            out.dropped.clear();
            let mut leftovers = std::mem::take(&mut out.waiting);
            leftovers.append(&mut out.starved);
            leftovers.append(&mut out.opened);
            leftovers
        };
        for s in self.streams.values().chain(leftovers.iter()) {
            let mut st = lock(&s.state);
            st.gone = true;
            let (r, w) = (st.reader.take(), st.writer.take());
            drop(st);
            wake(r);
            wake(w);
        }
        self.streams.clear();
        self.parts.open_rx.close();
        while let Ok(req) = self.parts.open_rx.try_recv() {
            let _ = req.send(Err(SessionError::Closed));
        }
        if let Some(reason) = goodbye {
            // What was queued, then GOAWAY and TLS close_notify; never wait long for a peer
            // that is gone.
            let mut tail = self.sending.to_vec();
            {
                let out = lock(&self.conn.outbox);
                tail.extend_from_slice(&out.urgent.to_vec());
                tail.extend_from_slice(&out.frames.to_vec());
            }
            let mut reason = reason.into_bytes();
            reason.truncate(MAX_GOAWAY_REASON);
            let mut out = Outbox::default();
            out.push(Lane::Bulk, TYPE_GOAWAY, 0, 0, &reason, reason.len() as u32);
            tail.extend_from_slice(&out.frames.bytes);
            let bye = async {
                use tokio::io::AsyncWriteExt;
                self.io.write_all(&tail).await?;
                self.io.shutdown().await
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), bye).await;
        }
    }
}

#[cfg(test)]
mod tests {
    //! The multiplexer against a hand-driven peer: frames written byte by byte, and hostile
    //! input, which must end the session with a reason and never panic.

    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::transport::MuxStream;

    /// A proxy-role session over an in-memory pipe, and the raw other end of the pipe.
    fn proxy_session() -> (Session, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let info = SessionInfo {
            transport: "test",
            peer: "127.0.0.1:9".parse().unwrap(),
        };
        let session = start(ours, Role::Proxy, info, &SessionConfig::default());
        (session, theirs)
    }

    fn frame(kind: u8, flags: u8, id: u32, body: &[u8], length: u32) -> Vec<u8> {
        let mut out = Outbox::default();
        out.push(Lane::Bulk, kind, flags, id, body, length);
        out.frames.bytes
    }

    fn data(flags: u8, id: u32, body: &[u8]) -> Vec<u8> {
        frame(TYPE_DATA, flags, id, body, body.len() as u32)
    }

    /// Reads frames from the raw end until GOAWAY; returns its reason.
    async fn goaway_reason(raw: &mut DuplexStream) -> String {
        let read = async {
            loop {
                let mut h = [0u8; HEADER];
                raw.read_exact(&mut h).await.unwrap();
                let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
                let body_len = if h[0] == TYPE_WINDOW { 0 } else { len };
                let mut body = vec![0u8; body_len];
                raw.read_exact(&mut body).await.unwrap();
                if h[0] == TYPE_GOAWAY {
                    return String::from_utf8(body).unwrap();
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("GOAWAY arrives")
    }

    /// Small writes go ahead of queued bulk, and a stream that has bulk queued keeps its
    /// order.
    #[test]
    fn small_frames_go_ahead_of_bulk_and_each_stream_keeps_its_order() {
        let mut out = Outbox::default();
        let (mut flood, mut small) = (StreamState::default(), StreamState::default());
        let big = vec![7u8; MAX_FRAME];
        // Stream 1 queues a large frame, then a small one, which must stay behind it.
        let lane = out.lane_for(&mut flood, big.len());
        assert_eq!(lane, Lane::Bulk);
        let _ = out.push_chunk(lane, 1, Bytes::from(big.clone()));
        let lane = out.lane_for(&mut flood, 10);
        assert_eq!(lane, Lane::Bulk, "behind its own bulk frame");
        let _ = out.push_data(lane, 0, 1, b"0123456789");
        // Stream 3 writes a little and ends; stream 1's reader returns credit.
        let lane = out.lane_for(&mut small, 5);
        assert_eq!(lane, Lane::Urgent);
        let _ = out.push_data(lane, 0, 3, b"hello");
        let lane = out.lane_for(&mut small, 0);
        let _ = out.push_data(lane, FLAG_FIN, 3, &[]);
        let _ = out.push(Lane::Urgent, TYPE_WINDOW, 0, 1, &[], 4096);

        let mut sending = Frames::default();
        out.take_frames(&mut sending);
        let mut expected = data(0, 3, b"hello");
        expected.extend(data(FLAG_FIN, 3, &[]));
        expected.extend(frame(TYPE_WINDOW, 0, 1, &[], 4096));
        expected.extend(data(0, 1, &big));
        expected.extend(data(0, 1, b"0123456789"));
        assert_eq!(sending.to_vec(), expected);
        assert!(out.is_empty());

        // Once taken, nothing of stream 1 is queued: its next small frame goes ahead too,
        // while a large one does not.
        assert_eq!(out.lane_for(&mut flood, 10), Lane::Urgent);
        assert_eq!(out.lane_for(&mut flood, URGENT_FRAME + 1), Lane::Bulk);
        // Only urgent frames, or only bulk ones: taken as they are.
        let _ = out.push_data(Lane::Urgent, 0, 3, b"a");
        let mut sending = Frames::default();
        out.take_frames(&mut sending);
        assert_eq!(sending.to_vec(), data(0, 3, b"a"));
    }

    /// Chunks and copied bodies, written out in pieces of every size, come out whole and in
    /// order.
    #[test]
    fn frames_with_chunks_written_in_odd_pieces_keep_their_order() {
        let body = |len: usize, seed: u8| -> Vec<u8> {
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect()
        };
        let mut out = Outbox::default();
        let mut expected = Vec::new();
        for (i, len) in [5000, 10, 3000, 0, 70_000, 2049, 1].into_iter().enumerate() {
            let b = body(len.min(MAX_FRAME), i as u8);
            expected.extend_from_slice(&data(0, 7, &b));
            let _ = out.push_chunk(Lane::Bulk, 7, Bytes::from(b));
            if i % 3 == 0 {
                let _ = out.push(Lane::Bulk, TYPE_WINDOW, 0, 9, &[], 1234);
                expected.extend_from_slice(&frame(TYPE_WINDOW, 0, 9, &[], 1234));
            }
        }
        assert!(
            out.frames.chunks.len() >= 3,
            "large bodies are kept as chunks"
        );
        assert_eq!(out.frames.len(), expected.len());
        assert_eq!(out.frames.to_vec(), expected);
        for step in [1usize, 7, 4096, 65_537] {
            let mut frames = Frames {
                bytes: out.frames.bytes.clone(),
                chunks: out.frames.chunks.clone(),
                chunk_bytes: out.frames.chunk_bytes,
                written: 0,
            };
            let mut got = Vec::new();
            // A connection that takes `step` bytes per write, at most three slices at a time.
            while !frames.is_empty() {
                let mut slices = [io::IoSlice::new(&[]); 3];
                let n = frames.io_slices(&mut slices);
                assert!(n > 0);
                let mut take = step;
                for slice in &slices[..n] {
                    let k = take.min(slice.len());
                    got.extend_from_slice(&slice[..k]);
                    take -= k;
                }
                let wrote = step - take;
                frames.advance(wrote);
            }
            assert!(got == expected, "written {step} bytes at a time");
        }
    }

    #[tokio::test]
    async fn frames_split_into_single_bytes_are_reassembled() {
        let (mut session, mut raw) = proxy_session();
        let mut bytes = data(FLAG_OPEN, 1, b"hello, ");
        bytes.extend(data(FLAG_FIN, 1, b"proxy"));
        for b in bytes {
            raw.write_all(&[b]).await.unwrap();
            raw.flush().await.unwrap();
        }
        let mut s = session.incoming.accept().await.unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello, proxy");
    }

    #[tokio::test]
    async fn hostile_frames_end_the_session_with_the_reason() {
        let over = vec![0u8; MAX_FRAME + 1];
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "unknown type",
                frame(9, 0, 1, &[], 0),
                "unknown frame type 9",
            ),
            (
                "oversized",
                data(FLAG_OPEN, 1, &over),
                "over the 65536-byte limit",
            ),
            (
                "never opened",
                data(0, 7, b"x"),
                "frame for stream 7, which was never opened",
            ),
            (
                "wrong parity",
                data(FLAG_OPEN, 2, b"x"),
                "stream 2 opened out of order",
            ),
            (
                "reused id",
                {
                    let mut v = data(FLAG_OPEN, 3, b"");
                    v.extend(data(FLAG_OPEN, 1, b""));
                    v
                },
                "stream 1 opened out of order (last was 3)",
            ),
            (
                "beyond the window",
                {
                    let mut v = data(FLAG_OPEN, 1, &[]);
                    let chunk = vec![0u8; MAX_FRAME];
                    for _ in 0..(INITIAL_WINDOW as usize / MAX_FRAME + 1) {
                        v.extend(data(0, 1, &chunk));
                    }
                    v
                },
                "beyond its window",
            ),
            (
                "window overflow",
                {
                    let mut v = data(FLAG_OPEN, 1, &[]);
                    v.extend(frame(TYPE_WINDOW, 0, 1, &[], u32::MAX));
                    v
                },
                "window of stream 1 over 4 GiB",
            ),
            (
                "huge GOAWAY",
                frame(TYPE_GOAWAY, 0, 0, &[], 1 << 20),
                "GOAWAY reason of 1048576 bytes",
            ),
        ];
        for (what, bytes, reason) in cases {
            let (session, mut raw) = proxy_session();
            // Write from another task: the session may stop reading half-way.
            let writer = tokio::spawn(async move {
                let _ = raw.write_all(&bytes).await;
                raw
            });
            tokio::time::timeout(Duration::from_secs(5), session.handle.closed())
                .await
                .unwrap_or_else(|_| panic!("{what}: the session ends"));
            let mut raw = writer.await.unwrap();
            let said = goaway_reason(&mut raw).await;
            assert!(said.contains(reason), "{what}: GOAWAY said {said:?}");
        }
    }

    #[tokio::test]
    async fn a_reader_that_keeps_up_grows_its_window_within_bounds() {
        let (mut session, mut raw) = proxy_session();
        raw.write_all(&data(FLAG_OPEN, 1, b"")).await.unwrap();
        let mut s = session.incoming.accept().await.unwrap();
        // The raw peer sends whatever credit it is given; the reader reads it all.
        let chunk = vec![1u8; MAX_FRAME];
        let mut credit = INITIAL_WINDOW as u64;
        let mut granted_max = 0u64;
        let mut received = 0u64;
        let total = 64u64 << 20;
        let mut sent = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        while received < total {
            while credit > 0 && sent < total {
                let n = credit.min(MAX_FRAME as u64).min(total - sent) as usize;
                raw.write_all(&data(0, 1, &chunk[..n])).await.unwrap();
                credit -= n as u64;
                sent += n as u64;
            }
            // Read what arrived, then collect the WINDOW frames it caused.
            while received < sent {
                received += s.read(&mut buf).await.unwrap() as u64;
            }
            loop {
                let mut h = [0u8; HEADER];
                match tokio::time::timeout(Duration::from_millis(50), raw.read_exact(&mut h)).await
                {
                    Ok(r) => {
                        r.unwrap();
                        assert_eq!(h[0], TYPE_WINDOW);
                        let grant = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as u64;
                        granted_max = granted_max.max(grant);
                        credit += grant;
                    }
                    Err(_) => break,
                }
            }
            assert!(
                credit > 0 || received == total,
                "the reader returned no credit"
            );
        }
        // The window grew past its start, and never past the maximum (a grant returns at
        // most the window's worth consumed plus as much again).
        assert!(granted_max > INITIAL_WINDOW as u64, "{granted_max}");
        assert!(granted_max <= MAX_WINDOW as u64, "{granted_max}");
    }

    #[tokio::test]
    async fn a_peer_that_opens_streams_and_never_reads_is_held_back() {
        let (ours, mut raw) = tokio::io::duplex(64 * 1024);
        let info = SessionInfo {
            transport: "test",
            peer: "127.0.0.1:9".parse().unwrap(),
        };
        let _session = start(ours, Role::Proxy, info, &SessionConfig { max_streams: 4 });
        // Every open beyond 4 + the backlog is answered with a RESET that the peer never
        // reads. 24 MiB of opens would make 24 MiB of answers; the session must stop reading
        // long before, so this write cannot finish.
        let mut opens = Vec::new();
        for i in 0..(24 << 20) / HEADER as u32 {
            opens.extend(data(FLAG_OPEN, 2 * i + 1, &[]));
        }
        let write = tokio::time::timeout(Duration::from_secs(3), raw.write_all(&opens)).await;
        assert!(
            write.is_err(),
            "the session kept reading a peer that does not read"
        );
    }

    #[tokio::test]
    async fn a_stream_dropped_unfinished_is_reset_and_a_finished_one_is_not() {
        let (mut session, mut raw) = proxy_session();
        raw.write_all(&data(FLAG_OPEN, 1, b"a")).await.unwrap();
        raw.write_all(&data(FLAG_OPEN | FLAG_FIN, 3, b"b"))
            .await
            .unwrap();
        let unfinished = session.incoming.accept().await.unwrap();
        let mut finished = session.incoming.accept().await.unwrap();
        let mut rest = Vec::new();
        finished.read_to_end(&mut rest).await.unwrap();
        finished.shutdown().await.unwrap();
        drop(finished);
        drop(unfinished);
        // Stream 3: FIN (both ends done, no reset). Stream 1: RESET.
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let mut h = [0u8; HEADER];
            tokio::time::timeout(Duration::from_secs(5), raw.read_exact(&mut h))
                .await
                .expect("frames arrive")
                .unwrap();
            let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            seen.push((id, h[1]));
        }
        assert_eq!(seen, vec![(3, FLAG_FIN), (1, FLAG_RESET)]);
    }

    /// A vectored write (hyper's head and body) goes out as one frame with the slices in order,
    /// and says how much of them it took.
    #[tokio::test]
    async fn a_vectored_write_is_one_frame_of_its_slices_in_order() {
        let (mut session, mut raw) = proxy_session();
        raw.write_all(&data(FLAG_OPEN, 1, b"")).await.unwrap();
        let mut s = session.incoming.accept().await.unwrap();
        assert!(s.is_write_vectored());
        let bufs = [
            io::IoSlice::new(b"HTTP/1.1 200 OK\r\n\r\n"),
            io::IoSlice::new(b""),
            io::IoSlice::new(b"body"),
        ];
        let n = s.write_vectored(&bufs).await.unwrap();
        assert_eq!(n, 23);
        // More than one frame may carry: only the first MAX_FRAME bytes are taken.
        let big = vec![7u8; MAX_FRAME];
        let n = s
            .write_vectored(&[io::IoSlice::new(b"x"), io::IoSlice::new(&big)])
            .await
            .unwrap();
        assert_eq!(n, MAX_FRAME);
        let mut bodies = Vec::new();
        while bodies.len() < 2 {
            let mut h = [0u8; HEADER];
            raw.read_exact(&mut h).await.unwrap();
            let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
            let mut body = vec![0u8; len];
            raw.read_exact(&mut body).await.unwrap();
            if h[0] == TYPE_DATA {
                bodies.push(body);
            }
        }
        assert_eq!(bodies[0], b"HTTP/1.1 200 OK\r\n\r\nbody");
        assert_eq!(bodies[1].len(), MAX_FRAME);
        assert_eq!(bodies[1][0], b'x');
        assert!(bodies[1][1..].iter().all(|&b| b == 7));
    }

    /// A proxy session on `proxy_io` and an agent session on `agent_io` (which tells
    /// `agent_on_slow_link` of its pace), and two streams the proxy opened, each as (proxy's
    /// end, agent's end), both open at both ends. The sessions are returned to be kept alive.
    async fn two_streams<P, A>(
        proxy_io: P,
        agent_io: A,
        agent_on_slow_link: Option<SlowLinkHook<A>>,
    ) -> ((Session, Session), [(MuxStream, MuxStream); 2])
    where
        P: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        A: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let info = SessionInfo {
            transport: "test",
            peer: "127.0.0.1:9".parse().unwrap(),
        };
        let proxy = start(
            proxy_io,
            Role::Proxy,
            info.clone(),
            &SessionConfig::default(),
        );
        let mut agent = start_with(
            agent_io,
            Role::Agent,
            info,
            &SessionConfig::default(),
            agent_on_slow_link,
        );
        let mut streams = Vec::with_capacity(2);
        for _ in 0..2 {
            // The agent learns of a stream with its first byte.
            let mut ours = proxy.handle.open_stream().await.unwrap();
            ours.write_all(b"o").await.unwrap();
            let mut theirs = agent.incoming.accept().await.unwrap();
            let mut first = [0u8; 1];
            theirs.read_exact(&mut first).await.unwrap();
            streams.push((ours, theirs));
        }
        let Ok(streams) = <[_; 2]>::try_from(streams) else {
            unreachable!("two streams were pushed")
        };
        ((proxy, agent), streams)
    }

    /// A writer that queues all it can (as a splice does) must not keep a small writer on the
    /// same session out of the outbox. On a single-threaded runtime, which runs woken tasks in
    /// the order they were woken, the greedy writer once refilled the whole outbox every time
    /// it was taken, and the small write waited until the greedy one stopped.
    #[tokio::test]
    async fn a_small_write_gets_through_while_another_stream_floods_the_session() {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        // A narrow pipe keeps the outbox full, as a slow link does.
        let (a, b) = tokio::io::duplex(8 * 1024);
        let (_sessions, [(mut greedy_rx, mut greedy_tx), (mut small_rx, mut small_tx)]) =
            two_streams(a, b, None).await;

        const CAP: u64 = 32 << 20;
        let sent = Arc::new(AtomicU64::new(0));
        let small_done = Arc::new(AtomicBool::new(false));
        let flood = {
            let (sent, small_done) = (sent.clone(), small_done.clone());
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![7u8; MAX_FRAME]);
                // Until the small write is through (and a little after), bounded by CAP.
                let mut after = 0;
                while sent.load(Ordering::Relaxed) < CAP && after < 8 {
                    greedy_tx.write_all(&chunk).await.unwrap();
                    sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    if small_done.load(Ordering::Relaxed) {
                        after += 1;
                    }
                }
                greedy_tx.shutdown().await.unwrap();
            })
        };
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                match greedy_rx.read(&mut buf).await.unwrap() {
                    0 => return total,
                    n => total += n as u64,
                }
            }
        });
        // Write once the flood has filled the outbox, and count what the flood queued meanwhile.
        while sent.load(Ordering::Relaxed) < 4 * OUTBOX_LIMIT as u64 {
            tokio::task::yield_now().await;
        }
        let before = sent.load(Ordering::Relaxed);
        small_tx.write_all(&[1u8; 64]).await.unwrap();
        let flooded = sent.load(Ordering::Relaxed) - before;
        small_done.store(true, Ordering::Relaxed);
        let mut got = [0u8; 64];
        small_rx.read_exact(&mut got).await.unwrap();
        flood.await.unwrap();
        let drained = drain.await.unwrap();
        assert_eq!(
            drained,
            sent.load(Ordering::Relaxed),
            "the flood arrived whole"
        );
        assert!(
            flooded <= 2 * OUTBOX_LIMIT as u64,
            "the small write waited while {flooded} bytes of the flood were queued"
        );
    }

    #[test]
    fn the_outbox_shrinks_while_batches_drain_slowly_and_grows_back() {
        let slow = SLOW_DRAIN + Duration::from_millis(1);
        let quick = Duration::ZERO;
        let mut limit = OUTBOX_LIMIT;
        let mut seen = vec![limit];
        while limit > MIN_OUTBOX {
            limit = next_outbox_limit(limit, limit, slow, true);
            seen.push(limit);
        }
        assert_eq!(seen, [512, 256, 128, 64, 32, 16].map(|k| k * 1024));
        assert_eq!(next_outbox_limit(limit, limit, slow, true), MIN_OUTBOX);
        // A few frames that waited a while say nothing about the link.
        assert_eq!(
            next_outbox_limit(OUTBOX_LIMIT, 1024, slow, true),
            OUTBOX_LIMIT
        );
        // Nor does a batch the connection took without ever making the driver wait: the
        // driver was kept off the CPU, the link was not slow.
        assert_eq!(
            next_outbox_limit(OUTBOX_LIMIT, OUTBOX_LIMIT, slow, false),
            OUTBOX_LIMIT
        );
        // Neither slow nor quick: unchanged.
        let middling = Duration::from_millis(10);
        assert_eq!(
            next_outbox_limit(128 * 1024, 128 * 1024, middling, true),
            128 * 1024
        );
        while limit < OUTBOX_LIMIT {
            limit = next_outbox_limit(limit, limit, quick, true);
        }
        assert_eq!(limit, OUTBOX_LIMIT);
        assert_eq!(next_outbox_limit(limit, limit, quick, false), OUTBOX_LIMIT);
    }

    /// Batches that take long only because the driver's thread is kept busy are not a slow
    /// link: the outbox keeps its size and the session does not lower the socket's bounds
    /// (which would cost bulk on a fast link until a quick batch raised them again).
    #[tokio::test]
    async fn a_busy_host_is_not_taken_for_a_slow_link() {
        // A pipe with room for everything, written by a driver that stalls on every write.
        const BULK: u64 = 8 << 20;
        let (a, b) = tokio::io::duplex(2 * BULK as usize);
        let b = Link::stalling(b, SLOW_DRAIN + Duration::from_millis(5));
        let told = Arc::new(Mutex::new(Vec::new()));
        let paces = told.clone();
        let (sessions, [(mut bulk_rx, mut bulk_tx), _]) = two_streams(
            a,
            b,
            Some(Box::new(move |_, slow| paces.lock().unwrap().push(slow))),
        )
        .await;
        let flood = tokio::spawn(async move {
            let chunk = Bytes::from(vec![7u8; MAX_FRAME]);
            for _ in 0..BULK / MAX_FRAME as u64 {
                bulk_tx.write_all(&chunk).await.unwrap();
            }
            bulk_tx.shutdown().await.unwrap();
        });
        let mut buf = vec![0u8; 256 * 1024];
        let mut arrived = 0u64;
        loop {
            match bulk_rx.read(&mut buf).await.unwrap() {
                0 => break,
                n => arrived += n as u64,
            }
        }
        flood.await.unwrap();
        assert_eq!(arrived, BULK, "the flood arrived whole");
        let told = told.lock().unwrap().clone();
        assert!(told.is_empty(), "the session reported paces {told:?}");
        assert!(!sessions.1.handle.link_is_slow());
    }

    /// A connection whose writes go through a test's idea of the link (reads pass through).
    struct Link<T> {
        io: T,
        pace: Pace,
    }

    /// How a [`Link`] takes writes.
    enum Pace {
        /// `per_tick` bytes every `tick`, making the writer wait for the next tick: a slow link.
        Throttled {
            per_tick: usize,
            tick: Duration,
            allowance: usize,
            next: Pin<Box<tokio::time::Sleep>>,
        },
        /// Everything at once, but each write keeps the writer's thread for this long: a
        /// writer on a busy host, whose batches take long although the link has room.
        Stalling(Duration),
    }

    impl<T> Link<T> {
        fn throttled(io: T, per_tick: usize, tick: Duration) -> Self {
            let next = Box::pin(tokio::time::sleep(tick));
            let pace = Pace::Throttled {
                per_tick,
                tick,
                allowance: per_tick,
                next,
            };
            Link { io, pace }
        }

        fn stalling(io: T, stall: Duration) -> Self {
            let pace = Pace::Stalling(stall);
            Link { io, pace }
        }
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Link<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for Link<T> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = &mut *self;
            match &mut this.pace {
                Pace::Throttled {
                    per_tick,
                    tick,
                    allowance,
                    next,
                } => {
                    if *allowance == 0 {
                        ready!(next.as_mut().poll(cx));
                        next.as_mut().reset(tokio::time::Instant::now() + *tick);
                        *allowance = *per_tick;
                    }
                    let n = buf.len().min(*allowance);
                    let written = ready!(Pin::new(&mut this.io).poll_write(cx, &buf[..n]))?;
                    *allowance -= written;
                    Poll::Ready(Ok(written))
                }
                Pace::Stalling(stall) => {
                    std::thread::sleep(*stall);
                    Pin::new(&mut this.io).poll_write(cx, buf)
                }
            }
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// On a slow link the outbox shrinks and a small message goes ahead of the queued bulk in
    /// the urgent lane, so it arrives after about one small batch of a bulk stream written
    /// before it, not after half a megabyte queued at the link's rate. (Counted in bytes of
    /// the bulk stream that arrived first.)
    #[tokio::test]
    async fn on_a_slow_link_a_small_message_waits_behind_little_of_a_flood() {
        use std::sync::atomic::AtomicU64;
        // 4 KiB per 2 ms, about 2 MB/s, from the agent's side.
        let (a, b) = tokio::io::duplex(8 * 1024);
        let b = Link::throttled(b, 4 * 1024, Duration::from_millis(2));
        // What the agent's session says of the link's pace, in order.
        let told = Arc::new(Mutex::new(Vec::new()));
        let paces = told.clone();
        let (sessions, [(mut bulk_rx, mut bulk_tx), (mut small_rx, mut small_tx)]) = two_streams(
            a,
            b,
            Some(Box::new(move |_, slow| paces.lock().unwrap().push(slow))),
        )
        .await;

        // The bulk stream writes 3 MiB; its reader counts what has arrived.
        const BULK: u64 = 3 << 20;
        let flood = tokio::spawn(async move {
            let chunk = Bytes::from(vec![7u8; MAX_FRAME]);
            for _ in 0..BULK / MAX_FRAME as u64 {
                bulk_tx.write_all(&chunk).await.unwrap();
            }
            bulk_tx.shutdown().await.unwrap();
        });
        let arrived = Arc::new(AtomicU64::new(0));
        let drain = {
            let arrived = arrived.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4 * 1024];
                loop {
                    match bulk_rx.read(&mut buf).await.unwrap() {
                        0 => return,
                        n => arrived.fetch_add(n as u64, Ordering::Relaxed),
                    };
                }
            })
        };
        // Once a megabyte has arrived the outbox has had time to shrink (each halving takes
        // one batch drained too slowly): send the small message and count what arrives first.
        while arrived.load(Ordering::Relaxed) < 1 << 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = arrived.load(Ordering::Relaxed);
        small_tx.write_all(&[1u8; 64]).await.unwrap();
        let mut got = [0u8; 64];
        small_rx.read_exact(&mut got).await.unwrap();
        let behind = arrived.load(Ordering::Relaxed) - before;
        assert_eq!(got, [1u8; 64]);
        flood.await.unwrap();
        drain.await.unwrap();
        assert_eq!(
            arrived.load(Ordering::Relaxed),
            BULK,
            "the flood arrived whole"
        );
        // The small message goes in the urgent lane, ahead of the flood queued in the
        // outbox: only the batch being sent (a shrunk outbox's worth) and what is in the pipe
        // arrive first. Measured: 64 KiB; 104 KiB without the urgent lane, 180 KiB with a
        // 64 KiB smallest outbox as well, 786 KiB with an outbox that never shrinks.
        // The session found the link slow (and the TLS transport would lower the socket's
        // unsent bound); any later reports alternate.
        let told = told.lock().unwrap().clone();
        assert_eq!(told.first(), Some(&true), "reports: {told:?}");
        assert!(told.windows(2).all(|w| w[0] != w[1]), "reports: {told:?}");
        // The agent's handle says what the session last reported; the proxy's, whose side
        // sent little, that its link is not slow.
        let (proxy, agent) = &sessions;
        assert_eq!(agent.handle.link_is_slow(), told[told.len() - 1]);
        assert!(!proxy.handle.link_is_slow());
        assert!(
            behind < 96 * 1024,
            "the small message arrived after {behind} bytes of the flood (outbox limit \
             {MIN_OUTBOX} once shrunk, {OUTBOX_LIMIT} unshrunk)"
        );
    }
}
