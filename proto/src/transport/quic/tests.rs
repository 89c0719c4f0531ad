//! Tests of what only QUIC has: ALPN refusal, idle timeout and keep-alive, and stateless
//! reset after a restart. The Session-layer cases shared by every transport live in
//! `transport/tests.rs` and run over QUIC too, through [`pair_with`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::tls::{client_config, server_config, CertificateAuthority};

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

/// A connected agent-side and proxy-side session pair over QUIC on loopback, with each side's
/// limits.
pub(in crate::transport) async fn pair_with(
    agent_cfg: SessionConfig,
    proxy_cfg: SessionConfig,
) -> (Session, Session) {
    let quic = QuicConfig::for_heartbeat(Duration::from_secs(5));
    pair_with_quic(agent_cfg, proxy_cfg, &QuicConfig::default(), &quic).await
}

/// As [`pair_with`], with each side's QUIC settings.
async fn pair_with_quic(
    agent_cfg: SessionConfig,
    proxy_cfg: SessionConfig,
    agent_quic: &QuicConfig,
    proxy_quic: &QuicConfig,
) -> (Session, Session) {
    let (sc, cc) = configs(&[crate::ALPN]);
    let listener = QuicListener::bind("127.0.0.1:0", Arc::new(sc), &proxy_cfg, proxy_quic)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accept =
        tokio::spawn(async move { listener.accept().await.unwrap().handshake().await.unwrap() });
    let agent = connect_with(&addr, "localhost", Arc::new(cc), &agent_cfg, agent_quic)
        .await
        .unwrap();
    let proxy = accept.await.unwrap();
    (agent, proxy)
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
                            super::super::tests::echo_server(s.incoming);
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
        super::super::tests::echo_server(s.incoming);
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
    let t = transport_config(&SessionConfig::default(), &q, Role::Proxy);
    assert!(t.is_ok());
    let bad = QuicConfig {
        idle_timeout: Duration::from_secs(1),
        keep_alive: Duration::from_secs(2),
        reset_secret: None,
        congestion: CongestionControl::Cubic,
    };
    assert!(transport_config(&SessionConfig::default(), &bad, Role::Proxy).is_err());
    // The reset secret is stable for the same material and differs for another.
    assert_eq!(ResetSecret::derive(b"k").0, ResetSecret::derive(b"k").0);
    assert_ne!(ResetSecret::derive(b"k").0, ResetSecret::derive(b"l").0);
    assert_eq!(
        format!("{:?}", ResetSecret::derive(b"k")),
        "ResetSecret(..)"
    );
}

#[test]
fn congestion_controllers_by_name() {
    assert_eq!("bbr".parse(), Ok(CongestionControl::Bbr));
    assert_eq!("CUBIC".parse(), Ok(CongestionControl::Cubic));
    assert_eq!(CongestionControl::default(), CongestionControl::Cubic);
    assert!("reno".parse::<CongestionControl>().is_err());
    for cc in [CongestionControl::Cubic, CongestionControl::Bbr] {
        assert_eq!(cc.to_string().parse(), Ok(cc));
    }
}

/// Both ends on BBR: 16 MiB each way on one stream while another stream exchanges small
/// messages, every byte arriving in order.
#[tokio::test]
async fn a_session_paced_by_bbr_carries_bulk_and_small_exchanges() {
    let bbr =
        QuicConfig::for_heartbeat(Duration::from_secs(5)).with_congestion(CongestionControl::Bbr);
    let (agent, proxy) = pair_with_quic(
        SessionConfig::default(),
        SessionConfig::default(),
        &QuicConfig::default().with_congestion(CongestionControl::Bbr),
        &bbr,
    )
    .await;
    crate::transport::tests::echo_server(agent.incoming);
    const BULK: usize = 16 << 20;
    let bulk = async {
        let s = proxy.handle.open_stream().await.unwrap();
        let (mut r, mut w) = tokio::io::split(s);
        let write = async move {
            let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
            for _ in 0..BULK / chunk.len() {
                w.write_all(&chunk).await.unwrap();
            }
            w.shutdown().await.unwrap();
        };
        let read = async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0usize;
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                for (i, b) in buf[..n].iter().enumerate() {
                    assert_eq!(
                        *b,
                        ((got + i) % (64 * 1024) % 251) as u8,
                        "byte {}",
                        got + i
                    );
                }
                got += n;
            }
            got
        };
        tokio::join!(write, read).1
    };
    let small = async {
        let mut s = proxy.handle.open_stream().await.unwrap();
        for i in 0..50u8 {
            let msg = [i; 64];
            s.write_all(&msg).await.unwrap();
            let mut back = [0u8; 64];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg);
        }
    };
    let (got, ()) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(bulk, small) })
            .await
            .expect("bulk and small exchanges over BBR within a minute");
    assert_eq!(got, BULK);
}
