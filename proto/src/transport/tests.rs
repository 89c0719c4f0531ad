//! Tests of the Session layer over real TLS on loopback.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::splice::ChunkIo;

use super::tls::{connect, Mux, TlsListener, AGENT_ALPNS};
use super::*;
use crate::tls::{client_config, server_config, CertificateAuthority};

/// A connected agent-side and proxy-side session pair over TLS on loopback.
async fn pair(carrier: Carrier, cfg: SessionConfig) -> (Session, Session) {
    pair_with(carrier, cfg.clone(), cfg).await
}

/// What carries the session in a test.
#[derive(Debug, Clone, Copy)]
enum Carrier {
    Tls(Mux),
    Quic,
}

impl Carrier {
    fn transport_name(self) -> &'static str {
        match self {
            Carrier::Tls(mux) => mux.transport_name(),
            Carrier::Quic => "quic",
        }
    }
}

/// As [`pair`], with different limits on each side.
async fn pair_with(
    carrier: Carrier,
    agent_cfg: SessionConfig,
    proxy_cfg: SessionConfig,
) -> (Session, Session) {
    match carrier {
        Carrier::Tls(mux) => tls_pair(mux, agent_cfg, proxy_cfg).await,
        Carrier::Quic => super::quic::tests::pair_with(agent_cfg, proxy_cfg).await,
    }
}

/// A session pair over TLS with multiplexer `mux`.
async fn tls_pair(
    mux: Mux,
    agent_cfg: SessionConfig,
    proxy_cfg: SessionConfig,
) -> (Session, Session) {
    let ca = CertificateAuthority::generate("test").unwrap();
    let leaf = ca
        .issue_server(&["localhost".into()], Duration::from_secs(3600))
        .unwrap();
    // The proxy offers every multiplexer; the agent asks for one.
    let sc = server_config(&leaf.cert_pem, &leaf.key_pem, AGENT_ALPNS, None).unwrap();
    let cc = client_config(ca.cert_pem(), &[mux.alpn()], None).unwrap();
    let listener = TlsListener::bind("127.0.0.1:0", Arc::new(sc))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accept = tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        listener
            .handshaker()
            .handshake(tcp, peer, &proxy_cfg)
            .await
            .unwrap()
    });
    let agent = connect(&addr, "localhost", Arc::new(cc), &agent_cfg)
        .await
        .unwrap();
    let proxy = accept.await.unwrap();
    (agent, proxy)
}

/// Echoes every stream the session accepts (the QUIC-only tests use it too).
pub(in crate::transport) fn echo_server(mut incoming: Incoming) {
    tokio::spawn(async move {
        while let Some(s) = incoming.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

async fn streams_both_ways_with_half_close(carrier: Carrier) {
    let (agent, proxy) = pair(carrier, SessionConfig::default()).await;
    echo_server(agent.incoming);
    // The proxy opens, writes, half-closes, and reads the echo to the end.
    let mut s = proxy.handle.open_stream().await.unwrap();
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"ping");
    // And the agent can open towards the proxy (the control stream direction).
    echo_server(proxy.incoming);
    let mut s = agent.handle.open_stream().await.unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    assert_eq!(agent.handle.info().transport, carrier.transport_name());
}

async fn stream_limit_refuses_one_stream_not_the_session(carrier: Carrier) {
    let (agent, proxy) = pair(carrier, SessionConfig { max_streams: 4 }).await;
    echo_server(agent.incoming);
    let mut open = Vec::new();
    // Over HTTP/2 the proxy has already opened the control stream (it counts).
    for _ in proxy.handle.open_streams()..4 {
        open.push(proxy.handle.open_stream().await.unwrap());
    }
    let err = proxy.handle.open_stream().await.unwrap_err();
    assert!(
        matches!(err, SessionError::StreamLimit { limit: 4 }),
        "{err}"
    );
    assert_eq!(proxy.handle.open_streams(), 4);
    // Existing streams still work, and closing one frees a place.
    let mut s = open.pop().unwrap();
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    drop(s);
    let mut s = proxy.handle.open_stream().await.unwrap();
    s.write_all(b"y").await.unwrap();
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"y");
    assert!(!proxy.handle.is_closed());
}

async fn peer_beyond_our_limit_gets_its_stream_closed_only(carrier: Carrier) {
    let (agent, proxy) = pair_with(
        carrier,
        SessionConfig { max_streams: 2 },
        SessionConfig { max_streams: 10 },
    )
    .await;
    let mut incoming = agent.incoming;
    let mut held = Vec::new();
    let mut opened = Vec::new();
    for i in 0..2u8 {
        let mut s = proxy.handle.open_stream().await.unwrap();
        s.write_all(&[i]).await.unwrap();
        opened.push(s);
        held.push(incoming.accept().await.unwrap());
    }
    // The third is over the agent's limit: the agent closes it, and only it.
    let mut third = proxy.handle.open_stream().await.unwrap();
    third.write_all(b"3").await.unwrap();
    let mut buf = [0u8; 1];
    let end = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("the refused stream ends promptly");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    // The session and the first streams are unaffected.
    held[0].write_all(b"ok").await.unwrap();
    let mut two = [0u8; 2];
    opened[0].read_exact(&mut two).await.unwrap();
    assert_eq!(&two, b"ok");
    assert!(!agent.handle.is_closed() && !proxy.handle.is_closed());
}

async fn close_ends_streams_and_incoming(carrier: Carrier) {
    let (mut agent, proxy) = pair(carrier, SessionConfig::default()).await;
    let mut s = proxy.handle.open_stream().await.unwrap();
    s.write_all(b"x").await.unwrap();
    let _accepted = agent.incoming.accept().await.unwrap();
    proxy.handle.close();
    tokio::time::timeout(Duration::from_secs(5), agent.handle.closed())
        .await
        .expect("agent sees the session end");
    assert!(agent.incoming.accept().await.is_none());
    assert!(matches!(
        proxy.handle.open_stream().await,
        Err(SessionError::Closed)
    ));
}

/// A stream whose reader stops must not delay another stream on the same session.
async fn slow_reader_does_not_stall_other_streams(carrier: Carrier) {
    let (mut agent, proxy) = pair(carrier, SessionConfig::default()).await;
    // Stream 1: the agent never reads it; the proxy writes until it blocks.
    let mut stuck = proxy.handle.open_stream().await.unwrap();
    stuck.write_all(b"s").await.unwrap();
    let _stuck_peer = agent.incoming.accept().await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![0u8; 64 * 1024];
        let mut sent = 0usize;
        // Bounded: stops by itself after 64 MiB or when blocked (the timeout below).
        while sent < 64 << 20 {
            match tokio::time::timeout(Duration::from_secs(1), stuck.write_all(&chunk)).await {
                Ok(Ok(())) => sent += chunk.len(),
                _ => break,
            }
        }
        sent
    });
    // Stream 2: 32 MiB must flow while stream 1 is stuck.
    let mut bulk = proxy.handle.open_stream().await.unwrap();
    bulk.write_all(b"b").await.unwrap();
    let mut bulk_peer = agent.incoming.accept().await.unwrap();
    let total = 32usize << 20;
    let send = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..total / chunk.len() {
            bulk.write_all(&chunk).await.unwrap();
        }
        bulk.shutdown().await.unwrap();
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let recv = async {
        loop {
            let n = bulk_peer.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), recv)
        .await
        .expect("bulk stream completes while the other stream is stuck");
    assert_eq!(got, total + 1);
    send.await.unwrap();
    let sent_stuck = writer.await.unwrap();
    assert!(
        sent_stuck < 64 << 20,
        "the stuck stream should have been held back by its window, sent {sent_stuck}"
    );
}

/// Both peers push bulk data at once on several streams (the yamux #227 pattern).
async fn simultaneous_bidirectional_bulk_on_several_streams(carrier: Carrier) {
    let (mut agent, proxy) = pair(carrier, SessionConfig::default()).await;
    const STREAMS: usize = 4;
    const BYTES: usize = 16 << 20;
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let mut ours = proxy.handle.open_stream().await.unwrap();
        ours.write_all(&[i as u8]).await.unwrap();
        let mut theirs = agent.incoming.accept().await.unwrap();
        let mut first = [0u8; 1];
        theirs.read_exact(&mut first).await.unwrap();
        for s in [ours, theirs] {
            tasks.push(tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                let write = async {
                    let chunk = vec![0x5au8; 32 * 1024];
                    for _ in 0..BYTES / chunk.len() {
                        w.write_all(&chunk).await?;
                    }
                    w.shutdown().await
                };
                let read = async {
                    let mut n = 0usize;
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let k = r.read(&mut buf).await?;
                        if k == 0 {
                            return Ok::<_, std::io::Error>(n);
                        }
                        n += k;
                    }
                };
                let (w, r) = tokio::join!(write, read);
                w.unwrap();
                r.unwrap()
            }));
        }
    }
    let all = async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    };
    let received = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("no stall with bulk in both directions");
    assert!(received.iter().all(|&n| n == BYTES), "{received:?}");
}

async fn dropping_every_handle_ends_the_session(carrier: Carrier) {
    let (agent, proxy) = pair(carrier, SessionConfig::default()).await;
    let watch = agent.handle.clone();
    drop(proxy);
    tokio::time::timeout(Duration::from_secs(5), watch.closed())
        .await
        .expect("the peer sees the session end when the other side drops everything");
}

/// A peer that writes a last message, half-closes and drops the stream at once: the message
/// still arrives, followed by end of stream (the agent's StreamReject does exactly this).
async fn last_words_arrive_after_close_and_drop(carrier: Carrier) {
    let (mut agent, proxy) = pair(carrier, SessionConfig::default()).await;
    let mut ours = proxy.handle.open_stream().await.unwrap();
    ours.write_all(b"open").await.unwrap();
    let mut theirs = agent.incoming.accept().await.unwrap();
    let mut buf = [0u8; 4];
    theirs.read_exact(&mut buf).await.unwrap();
    theirs.write_all(b"rejected: reason").await.unwrap();
    theirs.shutdown().await.unwrap();
    drop(theirs);
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), ours.read_to_end(&mut got))
        .await
        .expect("end of stream arrives")
        .expect("no reset");
    assert_eq!(got, b"rejected: reason");
}

/// Echoes one line of a stream back, to prove it reached a handler.
async fn echo_once(s: MuxStream) {
    let (mut r, mut w) = tokio::io::split(s);
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// Writes `msg` on a new stream, half-closes, and reads what comes back (`None` if the stream
/// is closed or reset instead).
async fn round_trip(handle: &SessionHandle, msg: &[u8]) -> Option<Vec<u8>> {
    let mut s = handle.open_stream().await.ok()?;
    s.write_all(msg).await.ok()?;
    s.shutdown().await.ok()?;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("the stream is answered or closed")
        .ok()?;
    Some(got)
}

/// `Incoming::serve` gets the streams queued before it started as well as later ones, and once
/// it is dropped new streams are closed rather than left waiting.
async fn serve_hands_every_stream_to_the_handler(carrier: Carrier) {
    let (agent, proxy) = pair(carrier, SessionConfig::default()).await;
    // Opened (and delivered) before anyone serves: it waits in the queue.
    let mut early = proxy.handle.open_stream().await.unwrap();
    early.write_all(b"early").await.unwrap();
    early.shutdown().await.unwrap();
    let (count_tx, mut count_rx) = tokio::sync::mpsc::unbounded_channel();
    let serving = tokio::spawn(agent.incoming.serve(move |s| {
        let _ = count_tx.send(());
        tokio::spawn(echo_once(s));
    }));
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), early.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"early");
    for i in 0..20u8 {
        assert_eq!(round_trip(&proxy.handle, &[i; 3]).await, Some(vec![i; 3]));
    }
    let mut served = 0;
    while count_rx.try_recv().is_ok() {
        served += 1;
    }
    assert_eq!(served, 21, "every stream went through the handler once");
    // Stop serving: a new stream is closed, not echoed and not left hanging.
    serving.abort();
    let _ = serving.await;
    assert_eq!(
        round_trip(&proxy.handle, b"late").await.unwrap_or_default(),
        b""
    );
    assert!(count_rx.try_recv().is_err(), "the handler is gone");
}

/// A TCP connection spliced to a stream with `splice_chunks` (without a copy over tether's
/// multiplexer, through a buffer over the others) carries bulk both ways at once, whole and
/// in order, and small writes, and half-closes.
async fn splice_chunks_carries_bulk_and_small_writes_both_ways(carrier: Carrier) {
    let (agent, proxy) = pair(carrier, SessionConfig::default()).await;
    echo_server(agent.incoming);
    let stream = proxy.handle.open_stream().await.unwrap();
    assert_eq!(
        crate::splice::ChunkIo::moves_chunks(&stream),
        matches!(carrier, Carrier::Tls(Mux::Tether))
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (socket, _) = listener.accept().await.unwrap();
    let splicer = tokio::spawn(crate::splice::splice_chunks(socket, stream));
    // Small writes first: each comes back before the next goes.
    for i in 0..50u8 {
        client.write_all(&[i; 3]).await.unwrap();
        let mut back = [0u8; 3];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [i; 3]);
    }
    // Then 8 MiB each way at once.
    let data: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect();
    let (mut rd, mut wr) = client.into_split();
    let send = data.clone();
    let writer = tokio::spawn(async move {
        for piece in send.chunks(100_003) {
            wr.write_all(piece).await.unwrap();
        }
        wr.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut got))
        .await
        .expect("the echo ends")
        .unwrap();
    writer.await.unwrap();
    assert!(got == data, "{} bytes back, {} sent", got.len(), data.len());
    let spliced = tokio::time::timeout(Duration::from_secs(5), splicer)
        .await
        .expect("the splice ends after both halves close")
        .unwrap()
        .unwrap();
    assert_eq!(spliced.a_to_b, data.len() as u64 + 150);
    assert_eq!(spliced.b_to_a, data.len() as u64 + 150);
}

async fn read_chunk(s: &mut impl ChunkIo) -> io::Result<Option<bytes::Bytes>> {
    let read = std::future::poll_fn(|cx| s.poll_read_chunk(cx));
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("a chunk or the end arrives")
}

/// `AwaitReply` over a tether stream's chunk methods: bytes behind the agent's accept come
/// first, then the stream's own chunks, then the end; a reject is the read error, with the
/// agent's reason.
#[tokio::test]
async fn await_reply_moves_chunks_over_tether() {
    use crate::messages::{StreamRejectCode, StreamReply};
    use crate::reply::AwaitReply;
    use prost::Message;

    let (mut agent, proxy) = pair(Carrier::Tls(Mux::Tether), SessionConfig::default()).await;
    let stream = proxy.handle.open_stream().await.unwrap();
    let mut s = AwaitReply::new(stream, Duration::from_secs(5), None);
    assert!(s.moves_chunks());
    let mut early = bytes::Bytes::from_static(b"early");
    std::future::poll_fn(|cx| s.poll_write_chunk(cx, &mut early))
        .await
        .unwrap();
    assert!(early.is_empty());
    let mut far = agent.incoming.accept().await.unwrap();
    let mut got = [0u8; 5];
    far.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"early");
    let mut wire = StreamReply::accept().encode_length_delimited_to_vec();
    wire.extend_from_slice(b"behind");
    far.write_all(&wire).await.unwrap();
    assert_eq!(read_chunk(&mut s).await.unwrap().unwrap(), &b"behind"[..]);
    far.write_all(b"more").await.unwrap();
    assert_eq!(read_chunk(&mut s).await.unwrap().unwrap(), &b"more"[..]);
    far.shutdown().await.unwrap();
    assert_eq!(read_chunk(&mut s).await.unwrap(), None);

    let stream = proxy.handle.open_stream().await.unwrap();
    let mut s = AwaitReply::new(stream, Duration::from_secs(5), None);
    let mut late = bytes::Bytes::from_static(b"late");
    std::future::poll_fn(|cx| s.poll_write_chunk(cx, &mut late))
        .await
        .unwrap();
    let mut far = agent.incoming.accept().await.unwrap();
    let reply = StreamReply::reject(StreamRejectCode::NotAllowed, "not on the allowlist");
    far.write_all(&reply.encode_length_delimited_to_vec())
        .await
        .unwrap();
    drop(far);
    let err = read_chunk(&mut s).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    assert!(err.to_string().contains("not on the allowlist"), "{err}");
}

/// Runs each test once per carrier.
macro_rules! per_carrier {
    ($($name:ident),* $(,)?) => {
        mod tether_mux {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Carrier::Tls(super::Mux::Tether)).await
            })*
        }
        mod yamux_mux {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Carrier::Tls(super::Mux::Yamux)).await
            })*
        }
        mod h2_mux {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Carrier::Tls(super::Mux::H2)).await
            })*
        }
        mod quic {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Carrier::Quic).await
            })*
        }
    };
}

per_carrier!(
    last_words_arrive_after_close_and_drop,
    dropping_every_handle_ends_the_session,
    streams_both_ways_with_half_close,
    stream_limit_refuses_one_stream_not_the_session,
    peer_beyond_our_limit_gets_its_stream_closed_only,
    close_ends_streams_and_incoming,
    slow_reader_does_not_stall_other_streams,
    simultaneous_bidirectional_bulk_on_several_streams,
    serve_hands_every_stream_to_the_handler,
    splice_chunks_carries_bulk_and_small_writes_both_ways
);
