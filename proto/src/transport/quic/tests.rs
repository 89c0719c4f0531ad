//! Tests of the Session layer over real QUIC on loopback: the cases of `transport/tests.rs`
//! (which run over TLS + yamux), plus what only QUIC has: ALPN, idle timeout and keep-alive,
//! and stateless reset after a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::tls::{client_config, server_config, CertificateAuthority};
use crate::transport::Incoming;

/// TLS configurations for a server `localhost` and a client trusting its CA, with `alpn`.
fn configs(alpn: &[&[u8]]) -> (rustls::ServerConfig, rustls::ClientConfig) {
    let ca = CertificateAuthority::generate("test").unwrap();
    let leaf = ca
        .issue_server(&["localhost".into()], Duration::from_secs(3600))
        .unwrap();
    let sc = server_config(&leaf.cert_pem, &leaf.key_pem, &[crate::ALPN], None).unwrap();
    let cc = client_config(ca.cert_pem(), alpn, None).unwrap();
    (sc, cc)
}

/// A connected agent-side and proxy-side session pair over QUIC on loopback.
async fn pair(cfg: SessionConfig) -> (Session, Session) {
    pair_with(cfg.clone(), cfg).await
}

/// As [`pair`], with different limits on each side.
async fn pair_with(agent_cfg: SessionConfig, proxy_cfg: SessionConfig) -> (Session, Session) {
    let (sc, cc) = configs(&[crate::ALPN]);
    let quic = QuicConfig::for_heartbeat(Duration::from_secs(5));
    let listener = QuicListener::bind("127.0.0.1:0", Arc::new(sc), &proxy_cfg, &quic)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accept =
        tokio::spawn(async move { listener.accept().await.unwrap().handshake().await.unwrap() });
    let agent = connect(&addr, "localhost", Arc::new(cc), &agent_cfg)
        .await
        .unwrap();
    let proxy = accept.await.unwrap();
    (agent, proxy)
}

/// Echoes every stream the session accepts.
fn echo_server(mut incoming: Incoming) {
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

#[tokio::test]
async fn streams_both_ways_with_half_close() {
    let (agent, proxy) = pair(SessionConfig::default()).await;
    echo_server(agent.incoming);
    // The proxy opens, writes, half-closes, and reads the echo to the end.
    let mut s = proxy.handle.open_stream().await.unwrap();
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    // A second shutdown is harmless.
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
    assert_eq!(agent.handle.info().transport, "quic");
    assert_eq!(proxy.handle.info().transport, "quic");
    assert!(proxy.handle.info().peer.ip().is_loopback());
}

#[tokio::test]
async fn stream_limit_refuses_one_stream_not_the_session() {
    let (agent, proxy) = pair(SessionConfig { max_streams: 4 }).await;
    echo_server(agent.incoming);
    let mut open = Vec::new();
    for _ in 0..4 {
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

#[tokio::test]
async fn peer_beyond_our_limit_gets_its_stream_closed_only() {
    let (agent, proxy) = pair_with(
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

#[tokio::test]
async fn close_ends_streams_and_incoming() {
    let (mut agent, proxy) = pair(SessionConfig::default()).await;
    let mut s = proxy.handle.open_stream().await.unwrap();
    s.write_all(b"x").await.unwrap();
    let mut accepted = agent.incoming.accept().await.unwrap();
    proxy.handle.close();
    tokio::time::timeout(Duration::from_secs(5), agent.handle.closed())
        .await
        .expect("agent sees the session end");
    assert!(agent.incoming.accept().await.is_none());
    assert!(matches!(
        proxy.handle.open_stream().await,
        Err(SessionError::Closed)
    ));
    // The agent's end of the stream fails or ends, it does not hang.
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(5), accepted.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(_)) | Ok(Err(_))), "{r:?}");
}

#[tokio::test]
async fn dropping_every_handle_ends_the_session() {
    let (agent, proxy) = pair(SessionConfig::default()).await;
    let watch = agent.handle.clone();
    drop(proxy);
    tokio::time::timeout(Duration::from_secs(5), watch.closed())
        .await
        .expect("the peer sees the session end when the other side drops everything");
}

/// A stream whose reader stops must not delay another stream on the same session.
#[tokio::test]
async fn slow_reader_does_not_stall_other_streams() {
    let (mut agent, proxy) = pair(SessionConfig::default()).await;
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
        bulk
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
    tokio::time::timeout(Duration::from_secs(60), recv)
        .await
        .expect("bulk stream completes while the other stream is stuck");
    assert_eq!(got, total + 1);
    let _bulk = send.await.unwrap();
    let sent_stuck = writer.await.unwrap();
    // Held back by its stream window (plus what the sender buffers), far from 64 MiB.
    assert!(
        sent_stuck <= STREAM_WINDOW as usize + SEND_WINDOW as usize,
        "the stuck stream should have been held back by its window, sent {sent_stuck}"
    );
}

/// Both peers push bulk data at once on several streams.
#[tokio::test]
async fn simultaneous_bidirectional_bulk_on_several_streams() {
    let (mut agent, proxy) = pair(SessionConfig::default()).await;
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
    let received = tokio::time::timeout(Duration::from_secs(90), all)
        .await
        .expect("no stall with bulk in both directions");
    assert!(received.iter().all(|&n| n == BYTES), "{received:?}");
}

#[tokio::test]
async fn a_client_without_alpn_tether_is_refused() {
    let (sc, cc) = configs(&[b"h2"]);
    let quic = QuicConfig::for_heartbeat(Duration::from_secs(5));
    let listener = QuicListener::bind(
        "127.0.0.1:0",
        Arc::new(sc),
        &SessionConfig::default(),
        &quic,
    )
    .await
    .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move { listener.accept().await.unwrap().handshake().await });
    let Err(err) = connect(&addr, "localhost", Arc::new(cc), &SessionConfig::default()).await
    else {
        panic!("a client offering only h2 was let in");
    };
    assert!(matches!(err, SessionError::Handshake { .. }), "{err}");
    assert!(server.await.unwrap().is_err());
}

/// A proxy-side QUIC server running in a runtime of its own thread, echoing every stream, so
/// that a test can make it vanish without a goodbye, as a crashed process would.
struct Vanishing {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Vanishing {
    fn start(sc: rustls::ServerConfig, quic: QuicConfig) -> Vanishing {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = QuicListener::bind(
                    "127.0.0.1:0",
                    Arc::new(sc),
                    &SessionConfig::default(),
                    &quic,
                )
                .await
                .unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let serve = async {
                    let mut sessions = Vec::new();
                    while let Some(incoming) = listener.accept().await {
                        if let Ok(s) = incoming.handshake().await {
                            sessions.push(s.handle);
                            echo_server(s.incoming);
                        }
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime drops every task unpolled: no CONNECTION_CLOSE goes out.
            drop(rt);
        });
        Vanishing {
            addr: addr_rx.recv().unwrap(),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn vanish(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Vanishing {
    fn drop(&mut self) {
        self.vanish();
    }
}

/// Echo one message on a new stream of `session`.
async fn echo_once(session: &Session) {
    let mut s = session.handle.open_stream().await.unwrap();
    s.write_all(b"echo").await.unwrap();
    let mut b = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&b, b"echo");
}

/// Keep-alives hold a quiet session open past the idle timeout; a peer that vanishes is
/// noticed after the proxy's (short) idle timeout, not the agent's (long) one.
#[tokio::test]
async fn keep_alive_holds_a_quiet_session_and_idle_timeout_ends_a_dead_one() {
    let (sc, cc) = configs(&[crate::ALPN]);
    // Proxy: heartbeat 200 ms → idle timeout 1 s. Agent: the default (60 s).
    let mut server = Vanishing::start(sc, QuicConfig::for_heartbeat(Duration::from_millis(200)));
    let agent = connect(
        &server.addr.to_string(),
        "localhost",
        Arc::new(cc),
        &SessionConfig::default(),
    )
    .await
    .unwrap();
    echo_once(&agent).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !agent.handle.is_closed(),
        "keep-alives should hold the session open"
    );
    echo_once(&agent).await;

    server.vanish();
    let gone = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), agent.handle.closed())
        .await
        .expect("the negotiated (smaller) idle timeout ends the session");
    assert!(
        gone.elapsed() < Duration::from_secs(4),
        "took {:?}",
        gone.elapsed()
    );
}

/// A proxy that restarts on the same port with the same reset secret makes its agents'
/// sessions end at their next packet (a stateless reset), long before any idle timeout.
#[tokio::test]
async fn a_restarted_listener_resets_old_sessions_at_once() {
    let (sc, cc) = configs(&[crate::ALPN]);
    let secret = ResetSecret::derive(b"the proxy's key");
    // Idle timeout 25 s: if the session ends within a few seconds, the reset did it.
    let quic = QuicConfig::for_heartbeat(Duration::from_secs(5)).with_reset_secret(secret);
    let mut first = Vanishing::start(sc.clone(), quic.clone());
    let addr = first.addr;
    let cc = Arc::new(cc);
    let agent = connect(
        &addr.to_string(),
        "localhost",
        cc.clone(),
        &SessionConfig::default(),
    )
    .await
    .unwrap();
    echo_once(&agent).await;

    first.vanish();
    let restarted = Instant::now();
    let second = QuicListener::bind(
        &addr.to_string(),
        Arc::new(sc),
        &SessionConfig::default(),
        &quic,
    )
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), agent.handle.closed())
        .await
        .expect("the old session is reset by the restarted listener");
    assert!(
        restarted.elapsed() < Duration::from_secs(4),
        "took {:?}",
        restarted.elapsed()
    );

    // And a new session comes up on the restarted listener.
    let accept = tokio::spawn(async move {
        let s = second.accept().await.unwrap().handshake().await.unwrap();
        echo_server(s.incoming);
        (second, s.handle)
    });
    let again = connect(
        &addr.to_string(),
        "localhost",
        cc,
        &SessionConfig::default(),
    )
    .await
    .unwrap();
    let _server = accept.await.unwrap();
    echo_once(&again).await;
}

#[test]
fn config_checks_and_derivations() {
    let q = QuicConfig::for_heartbeat(Duration::from_secs(5));
    assert_eq!(q.idle_timeout, Duration::from_secs(25));
    assert_eq!(q.keep_alive, Duration::from_secs(1));
    let q = QuicConfig::for_heartbeat(Duration::from_millis(300));
    assert!(q.keep_alive < q.idle_timeout);
    let t = transport_config(&SessionConfig::default(), &q);
    assert!(t.is_ok());
    let bad = QuicConfig {
        idle_timeout: Duration::from_secs(1),
        keep_alive: Duration::from_secs(2),
        reset_secret: None,
    };
    assert!(transport_config(&SessionConfig::default(), &bad).is_err());
    // The reset secret is stable for the same material and differs for another.
    assert_eq!(ResetSecret::derive(b"k").0, ResetSecret::derive(b"k").0);
    assert_ne!(ResetSecret::derive(b"k").0, ResetSecret::derive(b"l").0);
    assert_eq!(
        format!("{:?}", ResetSecret::derive(b"k")),
        "ResetSecret(..)"
    );
}
