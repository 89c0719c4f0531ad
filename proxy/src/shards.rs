//! The proxy's event loops: one thread per core, each running its own single-threaded tokio
//! runtime (a *shard*), with every agent session pinned to one shard.
//!
//! Why not one work-stealing runtime: a tunnel's work comes in chains (a client socket
//! wakes its splice task, which wakes the session's multiplexer, which writes to the agent),
//! and a work-stealing scheduler spreads each chain across threads: every hand-over between
//! threads is a wake-up, often a `futex` call and a context switch. Measured in tether-bench
//! on 2 cores (benches/RESULTS.md), one thread for the whole proxy served 13% more HTTP
//! requests per second than two work-stealing threads with 40% fewer context switches. Pinning
//! keeps that one-thread path for each session while the proxy still uses every core: sessions
//! are spread over the shards, and each session's traffic stays on its own.
//!
//! Where things run:
//! - shard 0 is the thread that called [`Shards::start`]; it also runs the listeners, the
//!   admin port and the proxy's housekeeping;
//! - an agent connection is handed, right after `accept`, to the shard with the fewest agent
//!   connections (ties: the lowest index), where its TLS handshake, multiplexer and
//!   heartbeats run ([`Shards::place_agent`]);
//! - a QUIC session stays on shard 0, where quinn's endpoint is driven;
//! - an exposed listener's connections are spliced on the shard of the session they go to,
//!   and the listener follows its cluster's session there (see [`crate::expose`]);
//! - front connections are dealt to the shards in turn, and the kube gateway keeps its pool
//!   of tunnel streams per shard (see [`crate::gateway`]).
//!
//! A session's throughput is thereby bounded by one proxy core, the same bound as the agent
//! at the other end, which runs one thread by default. Sessions are placed once, when they
//! connect, and never moved: a loop that drew the busiest clusters stays the busiest until
//! they reconnect.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

thread_local! {
    /// The index of the shard whose thread this is.
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The proxy's shards, shared by everything that places work on them.
pub struct Shards {
    shards: Vec<Shard>,
    next_front: AtomicUsize,
    stop: CancellationToken,
}

struct Shard {
    handle: Handle,
    /// Agent connections placed here and not yet ended.
    agents: Arc<AtomicUsize>,
}

/// Counts an agent connection against its shard until dropped.
pub struct AgentPlace {
    agents: Arc<AtomicUsize>,
}

impl Drop for AgentPlace {
    fn drop(&mut self) {
        self.agents.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shards {
    /// Makes `count` shards: the calling runtime (which must be single-threaded, see
    /// [`tether_proto::process::runtime`]) is shard 0, and `count - 1` new threads run the
    /// others until the returned `Shards` is dropped.
    pub fn start(count: usize) -> std::io::Result<Arc<Shards>> {
        let stop = CancellationToken::new();
        let mut shards = vec![Shard {
            handle: Handle::current(),
            agents: Arc::default(),
        }];
        CURRENT.with(|c| c.set(0));
        for index in 1..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                // The runtime's blocking-pool threads belong to this shard too.
                .on_thread_start(move || CURRENT.with(|c| c.set(index)))
                .build()?;
            let handle = runtime.handle().clone();
            let stopped = stop.clone();
            std::thread::Builder::new()
                .name(format!("tether-shard-{index}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(index));
                    runtime.block_on(stopped.cancelled());
                })?;
            shards.push(Shard {
                handle,
                agents: Arc::default(),
            });
        }
        Ok(Arc::new(Shards {
            shards,
            next_front: AtomicUsize::new(0),
            stop,
        }))
    }

    /// How many shards there are.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Always false: there is at least shard 0.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// The index of the shard running the caller (0 outside the shards' threads).
    pub fn current() -> usize {
        CURRENT.with(|c| c.get())
    }

    /// Runs `task` on shard `index` (taken modulo the count).
    pub fn spawn<F>(&self, index: usize, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // Detached: the task owns what it needs and ends by itself.
        drop(self.shards[index % self.shards.len()].handle.spawn(task));
    }

    /// Runs `task` with `io` on shard `index`. A socket is registered with the reactor of
    /// the runtime that made it, so one bound for another shard leaves this reactor and joins
    /// that one; one staying here is spawned as it is.
    pub fn run_with<T, F, Fut>(&self, index: usize, io: T, task: F)
    where
        T: Socket,
        F: FnOnce(T) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let index = index % self.shards.len();
        if index == Self::current() {
            tokio::spawn(task(io));
            return;
        }
        let detached = match io.detach() {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, shard = index, "could not hand a socket to another event loop");
                return;
            }
        };
        self.spawn(index, async move {
            match T::attach(detached) {
                Ok(io) => task(io).await,
                Err(e) => {
                    warn!(error = %e, shard = index, "could not take a socket into an event loop")
                }
            }
        });
    }

    /// Picks the shard for a new agent connection: the one with the fewest, lowest index
    /// first. The connection counts there until the returned place is dropped.
    pub fn place_agent(&self) -> (usize, AgentPlace) {
        let index = (0..self.shards.len())
            .min_by_key(|&i| self.shards[i].agents.load(Ordering::Relaxed))
            .expect("at least one shard");
        (index, self.count_agent(index))
    }

    /// Counts an agent connection that runs on shard `index` until the place is dropped.
    pub fn count_agent(&self, index: usize) -> AgentPlace {
        let agents = self.shards[index % self.shards.len()].agents.clone();
        agents.fetch_add(1, Ordering::Relaxed);
        AgentPlace { agents }
    }

    /// The shard for the next front connection: each in turn.
    pub fn next_front(&self) -> usize {
        self.next_front.fetch_add(1, Ordering::Relaxed) % self.shards.len()
    }
}

/// A tokio socket that can move between runtimes ([`Shards::run_with`]).
pub trait Socket: Sized + Send + 'static {
    /// The socket without a reactor.
    type Detached: Send + 'static;
    /// Leaves the current runtime's reactor.
    fn detach(self) -> std::io::Result<Self::Detached>;
    /// Joins the current runtime's reactor.
    fn attach(detached: Self::Detached) -> std::io::Result<Self>;
}

impl Socket for TcpStream {
    type Detached = std::net::TcpStream;
    fn detach(self) -> std::io::Result<Self::Detached> {
        self.into_std()
    }
    fn attach(detached: Self::Detached) -> std::io::Result<Self> {
        TcpStream::from_std(detached)
    }
}

impl Socket for TcpListener {
    type Detached = std::net::TcpListener;
    fn detach(self) -> std::io::Result<Self::Detached> {
        self.into_std()
    }
    fn attach(detached: Self::Detached) -> std::io::Result<Self> {
        TcpListener::from_std(detached)
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_on_the_shard_it_was_placed_on() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let shards = Shards::start(3).unwrap();
            assert_eq!(shards.len(), 3);
            assert_eq!(Shards::current(), 0);
            for index in 0..3 {
                let (tx, rx) = tokio::sync::oneshot::channel();
                shards.spawn(index, async move {
                    let _ = tx.send((Shards::current(), std::thread::current().id()));
                });
                let (ran_on, thread) = rx.await.unwrap();
                assert_eq!(ran_on, index);
                let (tx, rx) = tokio::sync::oneshot::channel();
                shards.spawn(index, async move {
                    let blocking = tokio::task::spawn_blocking(Shards::current);
                    let _ = tx.send(blocking.await.unwrap());
                });
                assert_eq!(rx.await.unwrap(), index, "a blocking task knows its shard");
                assert_eq!(
                    thread == std::thread::current().id(),
                    index == 0,
                    "shard 0 is the calling thread, the others are not"
                );
            }
        });
    }

    #[test]
    fn agents_go_to_the_emptiest_shard() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let shards = Shards::start(2).unwrap();
            let (a, place_a) = shards.place_agent();
            let (b, _place_b) = shards.place_agent();
            assert_eq!((a, b), (0, 1));
            drop(place_a);
            assert_eq!(shards.place_agent().0, 0, "shard 0 was freed");
            assert_eq!(
                (0..4).map(|_| shards.next_front()).collect::<Vec<_>>(),
                [0, 1, 0, 1]
            );
        });
    }
}
