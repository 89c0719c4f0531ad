//! A pool of idle HTTP/1.1 client connections, shared by both ends of the kube gateway: the
//! proxy keeps tunnel streams per (cluster, caller identity), the agent keeps TLS
//! connections to its API server.
//!
//! A connection serves one request at a time. Once a response's body has been read to the
//! end, [`ConnPool::park_on_end`] puts the connection back in the pool from within the body
//! itself: no task per request waits for the connection to become ready again (only a
//! connection still sending its request body gets one, so that nobody queues behind that
//! upload). A connection whose response was abandoned half-read is never parked (its state
//! is unknown); it closes when its last handle drops.
//!
//! ```no_run
//! # async fn demo(req: http::Request<tether_proto::http::Body>) {
//! # async fn dial() -> std::io::Result<hyper::client::conn::http1::SendRequest<tether_proto::http::Body>> { todo!() }
//! use std::time::Duration;
//! use tether_proto::pool::ConnPool;
//!
//! let pool = ConnPool::<String>::new(Duration::from_secs(60), 64);
//! let key = "member-a".to_string();
//! // A parked connection if there is a live one, else a new one from `dial`.
//! if let Ok((sender, resp)) = pool.send(&key, false, req, dial).await {
//!     // Whoever reads this response's body to the end returns the connection to the pool.
//!     let _resp = pool.park_on_end(key, sender, resp);
//! }
//! # }
//! ```

use std::borrow::Borrow;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;

use crate::http::Body;

/// Idle connections per key, newest last, with when each was parked.
type Idle<K> = HashMap<K, Vec<(SendRequest<Body>, Instant)>>;

/// Idle HTTP/1.1 connections, keyed by what decides which requests may use them.
pub struct ConnPool<K> {
    idle: Mutex<Idle<K>>,
    idle_timeout: Duration,
    max_idle_per_key: usize,
}

impl<K> ConnPool<K>
where
    K: Hash + Eq + Send + 'static,
{
    /// A pool keeping at most `max_idle_per_key` connections per key, each for at most
    /// `idle_timeout`. A task sweeps expired and closed connections every half timeout until
    /// the pool is dropped.
    pub fn new(idle_timeout: Duration, max_idle_per_key: usize) -> Arc<Self> {
        let pool = Arc::new(ConnPool {
            idle: Mutex::new(HashMap::new()),
            idle_timeout,
            max_idle_per_key,
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(idle_timeout / 2);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.sweep();
            }
        });
        pool
    }

    /// Drops closed and expired connections.
    fn sweep(&self) {
        let mut idle = self.idle.lock().expect("pool lock");
        for conns in idle.values_mut() {
            conns.retain(|(s, at)| !s.is_closed() && at.elapsed() < self.idle_timeout);
        }
        idle.retain(|_, conns| !conns.is_empty());
    }

    /// The most recently parked live connection for `key`, if any. It may still be finishing
    /// its previous response: await [`SendRequest::ready`] before sending, and treat an error
    /// there as a dead connection.
    pub fn checkout<Q>(&self, key: &Q) -> Option<SendRequest<Body>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut idle = self.idle.lock().expect("pool lock");
        let conns = idle.get_mut(key)?;
        while let Some((s, at)) = conns.pop() {
            if !s.is_closed() && at.elapsed() < self.idle_timeout {
                return Some(s);
            }
        }
        None
    }

    /// Sends `request` on a parked connection for `key`, or on a new one from `connect` if
    /// none is parked or `fresh` is set (an upgrade wants a connection of its own). A parked
    /// connection may have died since: if hyper hands the request back unsent, it is sent
    /// once more on a new connection. Returns the connection with the response, for
    /// [`park_on_end`](Self::park_on_end).
    pub async fn send<Q, F, Fut, E>(
        &self,
        key: &Q,
        mut fresh: bool,
        mut request: Request<Body>,
        mut connect: F,
    ) -> Result<(SendRequest<Body>, Response<Incoming>), SendError<E>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<SendRequest<Body>, E>>,
    {
        loop {
            let pooled = if fresh { None } else { self.checkout(key) };
            let mut sender = match pooled {
                Some(mut s) => match s.ready().await {
                    Ok(()) => s,
                    Err(_) => {
                        fresh = true;
                        continue;
                    }
                },
                None => connect().await.map_err(SendError::Connect)?,
            };
            match sender.try_send_request(request).await {
                Ok(resp) => return Ok((sender, resp)),
                Err(mut e) => match e.take_message() {
                    Some(req) if !fresh => {
                        request = req;
                        fresh = true;
                    }
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }

    /// Parks `sender` for later requests with `key` (dropped if the key has enough).
    pub fn checkin(&self, key: K, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        let conns = idle.entry(key).or_default();
        if conns.len() < self.max_idle_per_key {
            conns.push((sender, Instant::now()));
        }
    }

    /// Idle connections held now, over all keys.
    pub fn idle_count(&self) -> usize {
        let idle = self.idle.lock().expect("pool lock");
        idle.values().map(Vec::len).sum()
    }

    /// Returns `resp` with a body that parks `sender` under `key` once it has been read to
    /// the end (at once if it is empty). Not for `101 Switching Protocols`: an upgraded
    /// connection never returns to the pool.
    pub fn park_on_end(
        self: &Arc<Self>,
        key: K,
        sender: SendRequest<Body>,
        resp: Response<Incoming>,
    ) -> Response<ParkOnEnd<K>> {
        let (parts, body) = resp.into_parts();
        let mut body = ParkOnEnd {
            body,
            park: Some((self.clone(), key, sender)),
        };
        if body.body.is_end_stream() {
            body.park();
        }
        Response::from_parts(parts, body)
    }
}

impl<K> ConnPool<K>
where
    K: Hash + Eq + Send + Sync + Unpin + 'static,
{
    /// The response to pass on to the caller: hop-by-hop headers removed, and `sender`
    /// parked under `key` once the body has been read, if `reusable` (not after an upgrade
    /// request, whose connection stays its own).
    pub fn relay(
        self: &Arc<Self>,
        key: K,
        sender: SendRequest<Body>,
        resp: Response<Incoming>,
        reusable: bool,
    ) -> Response<Body> {
        let (mut parts, body) = if reusable {
            let (parts, body) = self.park_on_end(key, sender, resp).into_parts();
            (parts, crate::http::boxed(body))
        } else {
            let (parts, body) = resp.into_parts();
            (parts, crate::http::boxed(body))
        };
        crate::http::remove_hop_by_hop(&mut parts.headers);
        Response::from_parts(parts, body)
    }
}

/// Why [`ConnPool::send`] got no response.
#[derive(Debug)]
pub enum SendError<E> {
    /// No connection could be made (the error of the `connect` function).
    Connect(E),
    /// The request failed on the connection.
    Http(hyper::Error),
}

/// A response body that returns its connection to a [`ConnPool`] when it ends.
pub struct ParkOnEnd<K: Hash + Eq + Send + 'static> {
    body: Incoming,
    park: Option<(Arc<ConnPool<K>>, K, SendRequest<Body>)>,
}

impl<K: Hash + Eq + Send + 'static> ParkOnEnd<K> {
    /// Parks the connection now if it can take a request, else once it can: its request
    /// body may still be uploading (a server may answer before it has read everything), and
    /// a request must not wait in the pool behind someone else's upload.
    fn park(&mut self) {
        if let Some((pool, key, mut sender)) = self.park.take() {
            if sender.is_ready() {
                pool.checkin(key, sender);
            } else {
                tokio::spawn(async move {
                    if sender.ready().await.is_ok() {
                        pool.checkin(key, sender);
                    }
                });
            }
        }
    }
}

impl<K: Hash + Eq + Send + Unpin + 'static> HttpBody for ParkOnEnd<K> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.park(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.park(),
            // A broken body leaves the connection in an unknown state: never reuse it.
            Poll::Ready(Some(Err(_))) => self.park = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use tokio::net::{TcpListener, TcpStream};

    /// An HTTP/1.1 server on loopback answering every request with `body_len` bytes; it
    /// closes each connection after `requests_per_conn` requests. Returns its address.
    async fn server(body_len: usize, requests_per_conn: usize) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let served = Arc::new(AtomicUsize::new(0));
                    let service = hyper::service::service_fn(move |_req| {
                        let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                        async move {
                            let mut resp = Response::new(crate::http::full(vec![b'x'; body_len]));
                            if n >= requests_per_conn {
                                resp.headers_mut().insert(
                                    http::header::CONNECTION,
                                    http::HeaderValue::from_static("close"),
                                );
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        addr
    }

    /// Dials `addr`, counting dials.
    async fn dial(
        addr: std::net::SocketAddr,
        dials: &AtomicUsize,
    ) -> std::io::Result<SendRequest<Body>> {
        dials.fetch_add(1, Ordering::SeqCst);
        let tcp = TcpStream::connect(addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// Waits (at most 5 s) until the pool holds `n` idle connections.
    async fn wait_for_idle(pool: &ConnPool<u8>, n: usize) {
        for _ in 0..500 {
            if pool.idle_count() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.idle_count(), n);
    }

    fn get() -> Request<Body> {
        Request::get("/")
            .body(crate::http::full(Vec::new()))
            .unwrap()
    }

    /// Sends one request through the pool and reads `read_all` of its body (or one frame).
    async fn round(
        pool: &Arc<ConnPool<u8>>,
        addr: std::net::SocketAddr,
        dials: &AtomicUsize,
        fresh: bool,
        read_all: bool,
    ) -> usize {
        let (sender, resp) = pool
            .send(&1, fresh, get(), || dial(addr, dials))
            .await
            .unwrap();
        let mut body = pool.relay(1, sender, resp, !fresh).into_body();
        if read_all {
            body.collect().await.unwrap().to_bytes().len()
        } else {
            let frame = body.frame().await.unwrap().unwrap();
            frame.into_data().unwrap().len()
        }
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_body_is_read() {
        let addr = server(100_000, usize::MAX).await;
        let pool = ConnPool::new(Duration::from_secs(60), 8);
        let dials = AtomicUsize::new(0);
        for _ in 0..5 {
            assert_eq!(round(&pool, addr, &dials, false, true).await, 100_000);
        }
        assert_eq!(dials.load(Ordering::SeqCst), 1);
        wait_for_idle(&pool, 1).await;
    }

    #[tokio::test]
    async fn an_empty_body_parks_at_once() {
        let addr = server(0, usize::MAX).await;
        let pool = ConnPool::new(Duration::from_secs(60), 8);
        let dials = AtomicUsize::new(0);
        let (sender, resp) = pool
            .send(&1, false, get(), || dial(addr, &dials))
            .await
            .unwrap();
        // The body is never polled: hyper's server does not poll an empty body either.
        let _resp = pool.relay(1, sender, resp, true);
        wait_for_idle(&pool, 1).await;
    }

    #[tokio::test]
    async fn a_half_read_body_never_returns_its_connection() {
        let addr = server(1 << 20, usize::MAX).await;
        let pool = ConnPool::new(Duration::from_secs(60), 8);
        let dials = AtomicUsize::new(0);
        round(&pool, addr, &dials, false, false).await;
        assert_eq!(pool.idle_count(), 0);
        round(&pool, addr, &dials, false, true).await;
        assert_eq!(dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_fresh_request_dials_and_keeps_its_connection() {
        let addr = server(10, usize::MAX).await;
        let pool = ConnPool::new(Duration::from_secs(60), 8);
        let dials = AtomicUsize::new(0);
        round(&pool, addr, &dials, false, true).await;
        round(&pool, addr, &dials, true, true).await;
        assert_eq!(dials.load(Ordering::SeqCst), 2);
        wait_for_idle(&pool, 1).await;
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_replaced() {
        // Every connection serves one request and then closes.
        let addr = server(10, 1).await;
        let pool = ConnPool::new(Duration::from_secs(60), 8);
        let dials = AtomicUsize::new(0);
        for _ in 0..3 {
            assert_eq!(round(&pool, addr, &dials, false, true).await, 10);
        }
        assert_eq!(dials.load(Ordering::SeqCst), 3);
    }

    /// A request body that sends one chunk and then never ends: an upload still going.
    struct EndlessUpload {
        sent: bool,
    }

    impl HttpBody for EndlessUpload {
        type Data = Bytes;
        type Error = crate::http::BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.sent {
                Poll::Pending
            } else {
                self.sent = true;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"upload")))))
            }
        }
    }

    #[tokio::test]
    async fn nobody_waits_behind_an_upload_that_is_still_going() {
        // A server that answers as soon as it has a request head, then reads on (and
        // discards) whatever comes, keeping the connection open.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n0123456789";
                    if tcp.write_all(answer).await.is_err() {
                        return;
                    }
                    while let Ok(n) = tcp.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                    }
                });
            }
        });
        let pool = ConnPool::new(Duration::from_secs(60), 8);
        let dials = AtomicUsize::new(0);
        let upload = Request::post("/")
            .body(crate::http::boxed(EndlessUpload { sent: false }))
            .unwrap();
        let (sender, resp) = pool
            .send(&1, false, upload, || dial(addr, &dials))
            .await
            .unwrap();
        let body = pool.relay(1, sender, resp, true).into_body();
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 10);
        // The first connection is still uploading: the next request gets a connection of
        // its own instead of waiting in the pool behind it.
        let next = tokio::time::timeout(
            Duration::from_secs(10),
            round(&pool, addr, &dials, false, true),
        )
        .await;
        assert_eq!(next.expect("the next request waited behind the upload"), 10);
        assert_eq!(dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_dial_is_reported() {
        let pool = ConnPool::<u8>::new(Duration::from_secs(60), 8);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let dials = AtomicUsize::new(0);
        let sent = pool.send(&1, false, get(), || dial(addr, &dials)).await;
        assert!(matches!(sent, Err(SendError::Connect(_))));
    }
}
