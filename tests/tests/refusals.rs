//! Refusals, each with the documented reason, and the proxy keeps serving others: bad agent
//! tokens, hostile bytes instead of a Hello, oversized frames, targets off the allowlist, and
//! callers without the right credentials.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tether_proto::frame::{read_message, write_message};
use tether_proto::messages::{
    hello_reply, stream_reply, Hello, HelloReply, RejectCode, StreamOpen, StreamRejectCode,
    StreamReply, Target, Welcome,
};
use tether_proto::transport::{tls, SessionConfig};
use tether_tests::harness::*;
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(15);

/// Mints an agent token from a different proxy's signing key.
fn foreign_token(dir: &std::path::Path, cluster: &str) -> String {
    let state = dir.join("foreign");
    let ok = Command::new(bin("tether-proxy"))
        .args(["init", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(ok.status.success());
    let out = Command::new(bin("tether-proxy"))
        .args(["token", "agent", "--cluster", cluster, "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_agent_tokens_are_refused_with_reasons() {
    let up = TcpEchoUpstream::start().await;
    let upstream = up.addr.to_string();
    let proxy = Proxy::start(ProxyOptions::default()).await;

    let forged = Agent::start_with_token(
        &proxy,
        "a",
        &upstream,
        &foreign_token(proxy.dir.path(), "a"),
        &[],
    );
    let expired_token = proxy.token(&["agent", "--cluster", "b", "--ttl", "1s"]);
    let wrong = Agent::start_with_token(&proxy, "c", &upstream, &proxy.agent_token("a"), &[]);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = Agent::start_with_token(&proxy, "b", &upstream, &expired_token, &[]);

    assert!(
        forged
            .process
            .wait_for_log("signature does not verify", WAIT)
            .await,
        "{}",
        forged.log()
    );
    assert!(
        expired.process.wait_for_log("expired", WAIT).await,
        "{}",
        expired.log()
    );
    assert!(
        wrong
            .process
            .wait_for_log(
                r#"agent token is for cluster "a", but the agent says it is cluster "c""#,
                WAIT
            )
            .await,
        "{}",
        wrong.log()
    );
    let metrics = proxy.metrics();
    for reason in ["bad_signature", "expired", "wrong_cluster"] {
        assert!(
            metrics.contains(&format!(
                "tether_agent_auth_failures_total{{reason=\"{reason}\"}}"
            )),
            "{reason}: {metrics}"
        );
    }
    assert!(proxy.clusters().iter().all(|c| c["agents"] == 0));
    // The token itself never appears in the proxy's log.
    assert!(!proxy.log().contains(&expired_token));

    // And the proxy goes on serving a good agent.
    let _good = Agent::start(&proxy, "good", &upstream, &[]);
    assert!(proxy.wait_agents("good", 1, WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_and_protocol_errors_are_refused() {
    let up = TcpEchoUpstream::start().await;
    let proxy = Proxy::start(ProxyOptions::default()).await;
    let agent_addr = format!("127.0.0.1:{}", proxy.agent_port);
    let ca = proxy.ca_pem();

    // Plain garbage instead of TLS.
    let mut tcp = tokio::net::TcpStream::connect(&agent_addr).await.unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3])
        .await
        .unwrap();
    let _ = drain(&mut tcp, Duration::from_secs(5)).await;

    // Valid TLS, then garbage instead of a multiplexed session.
    let config = tether_proto::tls::client_config(&ca, &[tether_proto::ALPN], None).unwrap();
    let tcp = tokio::net::TcpStream::connect(&agent_addr).await.unwrap();
    let mut tls_stream = tokio_rustls::TlsConnector::from(Arc::new(config.clone()))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls_stream.write_all(&[0xde; 4096]).await.unwrap();
    let (_, ended) = drain(&mut tls_stream, Duration::from_secs(10)).await;
    assert!(ended, "the proxy closes a connection that sends garbage");

    // A session whose first frame claims 1 MiB: refused before allocation, with the reason.
    let cfg = SessionConfig::default();
    let session = tls::connect(&agent_addr, "localhost", Arc::new(config.clone()), &cfg)
        .await
        .unwrap();
    let mut control = session.handle.open_stream().await.unwrap();
    let mut huge = Vec::new();
    prost::encoding::encode_varint(1 << 20, &mut huge);
    huge.extend_from_slice(&[0u8; 100]);
    control.write_all(&huge).await.unwrap();
    let reply: HelloReply = read_message(&mut control, 1 << 16).await.unwrap();
    match reply.reply {
        Some(hello_reply::Reply::Reject(r)) => {
            assert_eq!(r.code, RejectCode::ProtocolError as i32);
            assert!(r.reason.contains("exceeds the limit"), "{}", r.reason);
        }
        other => panic!("expected a Reject, got {other:?}"),
    }

    // An unsupported protocol version: the Reject says which versions the proxy speaks.
    let session = tls::connect(&agent_addr, "localhost", Arc::new(config.clone()), &cfg)
        .await
        .unwrap();
    let mut control = session.handle.open_stream().await.unwrap();
    let hello = Hello {
        protocol_version: 9,
        cluster: "a".into(),
        token: proxy.agent_token("a"),
        ..Default::default()
    };
    write_message(&mut control, &hello).await.unwrap();
    let reply: HelloReply = read_message(&mut control, 1 << 16).await.unwrap();
    match reply.reply {
        Some(hello_reply::Reply::Reject(r)) => {
            assert_eq!(r.code, RejectCode::UnsupportedVersion as i32);
            assert_eq!(r.supported_versions, vec![1]);
            assert!(r.reason.contains("speaks v1"), "{}", r.reason);
        }
        other => panic!("expected a Reject, got {other:?}"),
    }

    // A cluster name that breaks the Kubernetes rule: refused with the rule in the reason.
    let session = tls::connect(&agent_addr, "localhost", Arc::new(config), &cfg)
        .await
        .unwrap();
    let mut control = session.handle.open_stream().await.unwrap();
    let hello = Hello {
        protocol_version: 1,
        cluster: "Bad_Name".into(),
        token: proxy.agent_token("a"),
        ..Default::default()
    };
    write_message(&mut control, &hello).await.unwrap();
    let reply: HelloReply = read_message(&mut control, 1 << 16).await.unwrap();
    match reply.reply {
        Some(hello_reply::Reply::Reject(r)) => {
            assert_eq!(r.code, RejectCode::InvalidClusterName as i32);
            assert!(
                r.reason.contains("lowercase letters, digits"),
                "{}",
                r.reason
            );
        }
        other => panic!("expected a Reject, got {other:?}"),
    }

    let metrics = proxy.metrics();
    for reason in [
        "tls_handshake",
        "protocol_error",
        "unsupported_version",
        "invalid_cluster_name",
    ] {
        assert!(
            metrics.contains(&format!(
                "tether_agent_auth_failures_total{{reason=\"{reason}\"}}"
            )),
            "{reason}: {metrics}"
        );
    }
    // Still serving.
    let _good = Agent::start(&proxy, "good", &up.addr.to_string(), &[]);
    assert!(proxy.wait_agents("good", 1, WAIT).await, "{}", proxy.log());
}

/// The agent, driven by a proxy written in this test: targets off its allowlist are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_dials_only_its_upstream_and_allowlist() {
    let upstream = TcpEchoUpstream::start().await;
    let allowed = TcpEchoUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = tether_proto::tls::CertificateAuthority::generate("test proxy").unwrap();
    let leaf = ca
        .issue_server(
            &["localhost".into(), "127.0.0.1".into()],
            Duration::from_secs(3600),
        )
        .unwrap();
    let sc = tether_proto::tls::server_config(
        &leaf.cert_pem,
        &leaf.key_pem,
        &[tether_proto::ALPN],
        None,
    )
    .unwrap();
    let listener = tls::TlsListener::bind("127.0.0.1:0", Arc::new(sc))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("token"), "not checked by this test proxy").unwrap();

    let dead_port = free_port();
    let mut cmd = Command::new(bin("tether-agent"));
    cmd.args([
        "--proxy",
        &format!("tls://127.0.0.1:{port}"),
        "--cluster",
        "a",
    ])
    .arg("--token-file")
    .arg(dir.path().join("token"))
    .arg("--ca-file")
    .arg(dir.path().join("ca.crt"))
    .args(["--upstream", &upstream.addr.to_string()])
    .args(["--allow", &allowed.addr.to_string()])
    .args(["--allow", &format!("127.0.0.1:{dead_port}")]);
    let _agent = Process::spawn(&mut cmd, dir.path().join("agent.log"));

    let (tcp, peer) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut session = listener
        .handshaker()
        .handshake(tcp, peer, &SessionConfig::default())
        .await
        .unwrap();
    let mut control = session.incoming.accept().await.unwrap();
    let hello: Hello = read_message(&mut control, 1 << 16).await.unwrap();
    assert_eq!(hello.cluster, "a");
    write_message(
        &mut control,
        &HelloReply::welcome(Welcome {
            heartbeat_interval_ms: 5000,
            ..Default::default()
        }),
    )
    .await
    .unwrap();

    let ask = |target: Target| {
        let handle = session.handle.clone();
        async move {
            let mut s = handle.open_stream().await.unwrap();
            write_message(
                &mut s,
                &StreamOpen {
                    target: Some(target),
                    request_id: "t".into(),
                },
            )
            .await
            .unwrap();
            let reply: StreamReply = read_message(&mut s, 1 << 16).await.unwrap();
            reply.reply.unwrap()
        }
    };
    match ask(Target::address("127.0.0.1:22")).await {
        stream_reply::Reply::Reject(r) => {
            assert_eq!(r.code, StreamRejectCode::NotAllowed as i32);
            assert!(r.reason.contains("allowlist"), "{}", r.reason);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        ask(Target::address(allowed.addr.to_string())).await,
        stream_reply::Reply::Accept(_)
    ));
    assert!(matches!(
        ask(Target::api_server()).await,
        stream_reply::Reply::Accept(_)
    ));
    match ask(Target::address(format!("127.0.0.1:{dead_port}"))).await {
        stream_reply::Reply::Reject(r) => {
            assert_eq!(r.code, StreamRejectCode::Unreachable as i32);
            assert!(r.reason.contains("could not connect"), "{}", r.reason);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refusals_carry_status_and_reason() {
    let up = TcpEchoUpstream::start().await;
    let proxy = Proxy::start(ProxyOptions::default()).await;
    let mut a = Agent::start(&proxy, "a", &up.addr.to_string(), &[]);
    // Cluster "down" has an agent whose API server cannot be reached.
    let _down = Agent::start(&proxy, "down", &format!("127.0.0.1:{}", free_port()), &[]);
    assert!(proxy.wait_agents("a", 1, WAIT).await && proxy.wait_agents("down", 1, WAIT).await);
    let token = proxy.client_token("alice", "a,down");
    let auth = format!("Bearer {token}");

    let (code, body) = connect_via_front(&proxy, "a", None).await.refused();
    assert_eq!(code, 407);
    assert!(body.contains("no credentials"), "{body}");

    let foreign = foreign_token(proxy.dir.path(), "a");
    let (code, body) = connect_via_front(&proxy, "a", Some(&format!("Bearer {foreign}")))
        .await
        .refused();
    assert_eq!(code, 407);
    assert!(body.contains("signature"), "{body}");

    let agent_token = proxy.agent_token("a");
    let (code, body) = connect_via_front(&proxy, "a", Some(&format!("Bearer {agent_token}")))
        .await
        .refused();
    assert_eq!(code, 407, "an agent token is not a client token: {body}");

    let only_b = proxy.client_token("bob", "b");
    let (code, body) = connect_via_front(&proxy, "a", Some(&format!("Bearer {only_b}")))
        .await
        .refused();
    assert_eq!(code, 403);
    assert!(body.contains("may not reach cluster \"a\""), "{body}");

    let all = format!("Bearer {}", proxy.client_token("root", "*"));
    let (code, body) = connect_via_front(&proxy, "never-seen", Some(&all))
        .await
        .refused();
    assert_eq!(code, 404);
    assert!(body.contains("not known"), "{body}");

    let (code, body) = connect_via_front(&proxy, "down", Some(&auth))
        .await
        .refused();
    assert_eq!(code, 502);
    assert!(body.contains("could not connect"), "{body}");

    a.process.kill();
    assert!(proxy.wait_agents("a", 0, WAIT).await);
    let (code, body) = connect_via_front(&proxy, "a", Some(&auth)).await.refused();
    assert_eq!(code, 503);
    assert!(
        body.contains("no agent of cluster \"a\" is connected (disconnected since"),
        "{body}"
    );

    let metrics = proxy.metrics();
    assert!(
        metrics.contains("tether_caller_auth_failures_total{reason=\"missing\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tether_caller_auth_failures_total{reason=\"cluster_not_allowed\"} 1"),
        "{metrics}"
    );
}
