//! End to end through the real binaries: CONNECT and `--expose` routing, several clusters,
//! status and metrics, recovery after the proxy or an agent dies, heartbeat loss, and
//! isolation of a stalled stream.
//!
//! Every test runs once per agent transport (`NAME::tls`, `NAME::quic`; see
//! [`per_transport!`]): the layers above the transport must not notice which one carries them.

use std::time::{Duration, Instant};

use tether_tests::harness::*;
use tether_tests::per_transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(15);

per_transport!(connect_routes_each_cluster_to_its_own_agent_with_tls_end_to_end);
async fn connect_routes_each_cluster_to_its_own_agent_with_tls_end_to_end(t: Transport) {
    let up_a = TlsEchoUpstream::start("cluster-a").await;
    let up_b = TlsEchoUpstream::start("cluster-b").await;
    let proxy = Proxy::start(ProxyOptions::over(t)).await;
    let _a = Agent::start(&proxy, "a", &up_a.addr.to_string(), &[]);
    let _b = Agent::start(&proxy, "b", &up_b.addr.to_string(), &[]);
    assert!(proxy.wait_agents("a", 1, WAIT).await, "{}", proxy.log());
    assert!(proxy.wait_agents("b", 1, WAIT).await, "{}", proxy.log());

    let token = proxy.client_token("alice", "a,b");
    for (cluster, up) in [("a", &up_a), ("b", &up_b), ("a", &up_a)] {
        let tunnel = connect_via_front(&proxy, cluster, Some(&format!("Bearer {token}")))
            .await
            .tunnel();
        // TLS runs end to end between this client and the member's server, inside the tunnel.
        let banner = up.echo(tunnel, b"hello through the tunnel").await;
        assert_eq!(banner, format!("cluster-{cluster}"));
    }

    // Basic auth with the token as the password works too (kubeconfig proxy-url form).
    let basic = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("alice:{token}"),
    );
    let tunnel = connect_via_front(&proxy, "b", Some(&format!("Basic {basic}")))
        .await
        .tunnel();
    assert_eq!(up_b.client(tunnel).await.0, "cluster-b");

    // Status and metrics reflect it.
    let a = proxy.cluster("a").unwrap();
    assert_eq!(a["connected"], true);
    assert!(
        a["bytesIn"].as_u64().unwrap() > 0 && a["bytesOut"].as_u64().unwrap() > 0,
        "{a}"
    );
    assert_eq!(a["transports"][0], t.session_name());
    assert_eq!(a["agentDetails"][0]["transport"], t.session_name());
    // Loopback is no slow link, whatever the transport.
    assert_eq!(a["slowLink"], false, "{a}");
    assert_eq!(a["agentDetails"][0]["slowLink"], false, "{a}");
    let metrics = proxy.metrics();
    let connected = format!(
        "tether_agents_connected{{cluster=\"a\",transport=\"{}\"}} 1",
        t.session_name()
    );
    assert!(metrics.contains(&connected), "{metrics}");
    assert!(
        metrics.contains("tether_stream_opens_total{result=\"ok\"} 4"),
        "{metrics}"
    );
}

per_transport!(expose_listener_splices_plain_tcp_to_the_cluster);
async fn expose_listener_splices_plain_tcp_to_the_cluster(t: Transport) {
    let up = TlsEchoUpstream::start("exposed").await;
    let proxy = Proxy::start(ProxyOptions {
        expose: vec!["a".into()],
        ..ProxyOptions::over(t)
    })
    .await;
    let _a = Agent::start(&proxy, "a", &up.addr.to_string(), &[]);
    assert!(proxy.wait_agents("a", 1, WAIT).await);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.exposed_port("a")))
        .await
        .unwrap();
    let (banner, mut tls) = up.client(tcp).await;
    assert_eq!(banner, "exposed");
    tls.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    tls.read_exact(&mut b).await.unwrap();
    let listeners = &proxy.cluster("a").unwrap()["listeners"];
    assert_eq!(
        listeners[0],
        format!("127.0.0.1:{}", proxy.exposed_port("a"))
    );
}

per_transport!(sessions_spread_over_event_loops_and_traffic_reaches_them_from_any);
/// The proxy pins each agent session to one of its event loops (`--worker-threads`): TLS
/// sessions go to the emptiest, QUIC sessions stay on the first. An exposed listener follows
/// its cluster's session to that loop; front connections are dealt to every loop, so most
/// of them reach their session from another thread. Traffic must flow either way.
async fn sessions_spread_over_event_loops_and_traffic_reaches_them_from_any(t: Transport) {
    let up_a = TlsEchoUpstream::start("cluster-a").await;
    let up_b = TlsEchoUpstream::start("cluster-b").await;
    let proxy = Proxy::start(ProxyOptions {
        expose: vec!["a".into()],
        args: vec!["--worker-threads".into(), "3".into()],
        ..ProxyOptions::over(t)
    })
    .await;
    let _b = Agent::start(&proxy, "b", &up_b.addr.to_string(), &[]);
    assert!(proxy.wait_agents("b", 1, WAIT).await, "{}", proxy.log());
    let _a = Agent::start(&proxy, "a", &up_a.addr.to_string(), &[]);
    assert!(proxy.wait_agents("a", 1, WAIT).await, "{}", proxy.log());
    let event_loop = |cluster: &str| {
        proxy.cluster(cluster).unwrap()["agentDetails"][0]["eventLoop"]
            .as_u64()
            .unwrap()
    };
    let spread = !matches!(t, Transport::Quic);
    let expected = if spread { (0, 1) } else { (0, 0) };
    assert_eq!((event_loop("b"), event_loop("a")), expected);

    // The first exposed connection is accepted on loop 0 and spliced on a's loop; the
    // listener then moves there and accepts the rest itself.
    for i in 0..4u8 {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.exposed_port("a")))
            .await
            .unwrap();
        assert_eq!(up_a.echo(tcp, &[i; 100]).await, "cluster-a");
    }
    assert_eq!(
        proxy
            .log()
            .contains("exposed listener follows its cluster's session"),
        spread,
        "{}",
        proxy.log()
    );

    let token = format!("Bearer {}", proxy.client_token("alice", "a,b"));
    for cluster in ["a", "b", "a", "b", "a", "b"] {
        let up = if cluster == "a" { &up_a } else { &up_b };
        let tunnel = connect_via_front(&proxy, cluster, Some(&token))
            .await
            .tunnel();
        let banner = up.echo(tunnel, b"across loops").await;
        assert_eq!(banner, format!("cluster-{cluster}"));
    }
}

per_transport!(expose_sends_early_bytes_and_a_refusal_closes_with_the_reason_logged);
async fn expose_sends_early_bytes_and_a_refusal_closes_with_the_reason_logged(t: Transport) {
    // The stream opens optimistically: the client's bytes follow StreamOpen at once.
    let up = TcpEchoUpstream::start().await;
    let proxy = Proxy::start(ProxyOptions {
        expose: vec!["a".into(), "b".into()],
        ..ProxyOptions::over(t)
    })
    .await;
    let _a = Agent::start(&proxy, "a", &up.addr.to_string(), &[]);
    // b's agent points at a port nobody listens on: it refuses every stream (Unreachable).
    let dead = format!("127.0.0.1:{}", free_port());
    let _b = Agent::start(&proxy, "b", &dead, &[]);
    assert!(proxy.wait_agents("a", 1, WAIT).await);
    assert!(proxy.wait_agents("b", 1, WAIT).await);

    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.exposed_port("a")))
        .await
        .unwrap();
    tcp.write_all(b"early bytes").await.unwrap();
    let mut got = [0u8; 11];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"early bytes");

    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.exposed_port("b")))
        .await
        .unwrap();
    tcp.write_all(b"lost").await.unwrap();
    let mut buf = [0u8; 16];
    // Closed (EOF or reset), never an answer.
    let read = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let deadline = Instant::now() + WAIT;
    while !proxy.log().contains("agent could not connect") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = proxy.log();
    assert!(
        log.contains("exposed connection closed") && log.contains("agent could not connect"),
        "{log}"
    );
    let metrics = proxy.metrics();
    assert!(
        metrics.contains("tether_stream_opens_total{result=\"rejected\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tether_stream_opens_total{result=\"ok\"} 1"),
        "{metrics}"
    );
}

per_transport!(agent_returns_after_proxy_restart_and_traffic_flows);
async fn agent_returns_after_proxy_restart_and_traffic_flows(t: Transport) {
    let up = TcpEchoUpstream::start().await;
    let mut proxy = Proxy::start(ProxyOptions::over(t)).await;
    let _a = Agent::start(&proxy, "a", &up.addr.to_string(), &[]);
    assert!(proxy.wait_agents("a", 1, WAIT).await);
    let token = proxy.client_token("alice", "a");

    proxy.process().kill();
    // The agent notices and retries (its backoff is capped at 2 s while the proxy is down).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restarted = Instant::now();
    proxy.launch().await;
    assert!(
        proxy.wait_agents("a", 1, Duration::from_secs(10)).await,
        "{}",
        proxy.log()
    );
    let back_after = restarted.elapsed();
    assert!(
        back_after < Duration::from_secs(5),
        "agent took {back_after:?} to return"
    );

    let mut t = connect_via_front(&proxy, "a", Some(&format!("Bearer {token}")))
        .await
        .tunnel();
    t.write_all(b"after restart").await.unwrap();
    let mut buf = [0u8; 13];
    t.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after restart");
}

per_transport!(killing_an_agent_mid_transfer_ends_its_streams_only);
async fn killing_an_agent_mid_transfer_ends_its_streams_only(t: Transport) {
    let source = TcpSourceUpstream::start(usize::MAX).await;
    let echo = TcpEchoUpstream::start().await;
    // A killed agent's TCP connection is reset by its kernel; over QUIC nothing tells the
    // proxy, which notices the silence after three heartbeats: keep them short here.
    let proxy = Proxy::start(ProxyOptions {
        args: vec!["--heartbeat-interval".into(), "1s".into()],
        ..ProxyOptions::over(t)
    })
    .await;
    let mut a = Agent::start(&proxy, "a", &source.addr.to_string(), &[]);
    let _b = Agent::start(&proxy, "b", &echo.addr.to_string(), &[]);
    assert!(proxy.wait_agents("a", 1, WAIT).await && proxy.wait_agents("b", 1, WAIT).await);
    let token = proxy.client_token("alice", "*");
    let auth = format!("Bearer {token}");

    let mut on_a = connect_via_front(&proxy, "a", Some(&auth)).await.tunnel();
    let mut on_b = connect_via_front(&proxy, "b", Some(&auth)).await.tunnel();
    let mut buf = vec![0u8; 1 << 20];
    on_a.read_exact(&mut buf).await.unwrap();

    a.process.kill();
    let (_, ended) = drain(&mut on_a, Duration::from_secs(10)).await;
    assert!(ended, "the client sees its stream end when the agent dies");

    on_b.write_all(b"still here").await.unwrap();
    let mut got = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), on_b.read_exact(&mut got))
        .await
        .expect("cluster b unaffected")
        .unwrap();
    assert_eq!(&got, b"still here");
    assert!(proxy.wait_agents("a", 0, WAIT).await);
    let a = proxy.cluster("a").unwrap();
    assert_eq!(a["connected"], false);
    assert!(a["disconnectedSince"].is_string(), "{a}");
}

per_transport!(missed_heartbeats_mark_the_cluster_disconnected);
async fn missed_heartbeats_mark_the_cluster_disconnected(t: Transport) {
    let up = TcpEchoUpstream::start().await;
    let proxy = Proxy::start(ProxyOptions {
        args: vec!["--heartbeat-interval".into(), "300ms".into()],
        ..ProxyOptions::over(t)
    })
    .await;
    let a = Agent::start(&proxy, "a", &up.addr.to_string(), &[]);
    assert!(proxy.wait_agents("a", 1, WAIT).await);
    // A frozen agent: its TCP connection stays open but nothing answers.
    a.process.signal("STOP");
    let stopped = Instant::now();
    let gone = proxy.wait_agents("a", 0, Duration::from_secs(10)).await;
    let took = stopped.elapsed();
    a.process.signal("CONT");
    assert!(
        gone,
        "session not closed after missed heartbeats:\n{}",
        proxy.log()
    );
    // Three intervals plus one tick of slack.
    assert!(took < Duration::from_millis(300 * 5 + 500), "took {took:?}");
    assert!(proxy.log().contains("no heartbeat"), "{}", proxy.log());
    // Thawed, the agent notices its dead session and comes back.
    assert!(proxy.wait_agents("a", 1, WAIT).await, "{}", a.log());
}

per_transport!(a_stalled_stream_does_not_slow_another_on_the_same_agent);
async fn a_stalled_stream_does_not_slow_another_on_the_same_agent(t: Transport) {
    let source = TcpSourceUpstream::start(usize::MAX).await;
    let proxy = Proxy::start(ProxyOptions::over(t)).await;
    let _a = Agent::start(&proxy, "a", &source.addr.to_string(), &[]);
    assert!(proxy.wait_agents("a", 1, WAIT).await);
    let auth = format!("Bearer {}", proxy.client_token("alice", "a"));

    // The first stream's reader reads a little, then stops.
    let mut stalled = connect_via_front(&proxy, "a", Some(&auth)).await.tunnel();
    let mut buf = vec![0u8; 64 * 1024];
    stalled.read_exact(&mut buf).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The second stream on the same agent still moves bulk data.
    let mut flowing = connect_via_front(&proxy, "a", Some(&auth)).await.tunnel();
    let want = 64usize << 20;
    let mut got = 0;
    let read = async {
        while got < want {
            let n = flowing.read(&mut buf).await.unwrap();
            assert!(n > 0, "stream ended early");
            got += n;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("bulk on the second stream completes while the first is stalled");
    drop(stalled);
}

per_transport!(agent_drains_on_sigterm_and_exits_zero);
async fn agent_drains_on_sigterm_and_exits_zero(t: Transport) {
    let source = TcpSourceUpstream::start(8 << 20).await;
    let proxy = Proxy::start(ProxyOptions::over(t)).await;
    let mut a = Agent::start(
        &proxy,
        "a",
        &source.addr.to_string(),
        &["--drain-timeout", "10s"],
    );
    assert!(proxy.wait_agents("a", 1, WAIT).await);
    let auth = format!("Bearer {}", proxy.client_token("alice", "a"));
    let mut s = connect_via_front(&proxy, "a", Some(&auth)).await.tunnel();
    let mut first = vec![0u8; 1024];
    s.read_exact(&mut first).await.unwrap();

    a.process.signal("TERM");
    // The open stream still completes: all 8 MiB arrive.
    let (n, ended) = drain(&mut s, Duration::from_secs(10)).await;
    assert!(ended);
    assert_eq!(n + 1024, 8 << 20);
    let status = a
        .process
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("agent exits");
    assert!(status.success(), "{status:?}\n{}", a.log());
}
