//! The kube gateway end to end: stock kubectl → tether-proxy `/clusters/{name}` → tether-agent
//! → the fixture API server. Impersonation, dropped caller credentials, watch, exec over
//! WebSocket, raw upgrades, Status errors, client certificates, large and many responses —
//! each over every agent transport ([`per_transport!`]).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tether_tests::fixture::{Fixture, FixtureOptions};
use tether_tests::harness::*;
use tether_tests::per_transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(15);
const AGENT_SA_TOKEN: &str = "agent-service-account-token";

/// Proxy + agent (with API server credentials) + fixture, and a kubeconfig for alice.
struct Env {
    fixture: Fixture,
    proxy: Proxy,
    agent: Agent,
    kubeconfig: std::path::PathBuf,
}

impl Env {
    async fn start(t: Transport) -> Env {
        let fixture = Fixture::start(FixtureOptions::default()).await.unwrap();
        // A short heartbeat: over QUIC a killed agent is noticed only by missed heartbeats.
        let proxy = Proxy::start(ProxyOptions {
            args: vec!["--heartbeat-interval".into(), "1s".into()],
            ..ProxyOptions::over(t)
        })
        .await;
        let agent = start_agent(&proxy, &fixture, "local", true);
        assert!(proxy.wait_agents("local", 1, WAIT).await, "{}", agent.log());
        let kubeconfig = proxy.dir.path().join("alice.kubeconfig");
        write_kubeconfig(
            &proxy,
            &kubeconfig,
            &["--cluster", "local", "--user", "alice", "--group", "dev"],
        );
        Env {
            fixture,
            proxy,
            agent,
            kubeconfig,
        }
    }

    fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        kubectl(&self.kubeconfig, args, None)
    }
}

fn start_agent(proxy: &Proxy, fixture: &Fixture, cluster: &str, credentials: bool) -> Agent {
    let ca = proxy.dir.path().join("member-ca.crt");
    let token = proxy.dir.path().join("member-sa.token");
    std::fs::write(&ca, fixture.ca_pem()).unwrap();
    std::fs::write(&token, AGENT_SA_TOKEN).unwrap();
    let (ca, token) = (
        ca.to_str().unwrap().to_string(),
        token.to_str().unwrap().to_string(),
    );
    let args: Vec<&str> = if credentials {
        vec!["--upstream-ca-file", &ca, "--upstream-token-file", &token]
    } else {
        vec![]
    };
    Agent::start(proxy, cluster, &fixture.url(), &args)
}

/// Runs `tether-proxy kubeconfig ARGS` into `path`.
fn write_kubeconfig(proxy: &Proxy, path: &std::path::Path, args: &[&str]) {
    let out = Command::new(bin("tether-proxy"))
        .arg("kubeconfig")
        .args(args)
        .arg("--state-dir")
        .arg(&proxy.state_dir)
        .arg("--server")
        .arg(format!("https://127.0.0.1:{}", proxy.front_port))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(path, out.stdout).unwrap();
}

/// Runs stock kubectl; returns (success, stdout, stderr).
fn kubectl(
    kubeconfig: &std::path::Path,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String, String) {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--request-timeout=20s")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl must be installed for the gateway tests");
    if let Some(input) = stdin {
        use std::io::Write;
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// One HTTP/1.1 GET to the front: (status, body).
async fn request(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> (u16, Bytes) {
    proxy.front().get(path, headers).await
}

fn status_of(body: &[u8]) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_slice(body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
    assert_eq!(v["kind"], "Status", "{v}");
    assert_eq!(v["status"], "Failure", "{v}");
    v
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

per_transport!(kubectl_crud_with_impersonation_and_no_caller_credentials);
async fn kubectl_crud_with_impersonation_and_no_caller_credentials(t: Transport) {
    let env = Env::start(t).await;
    let (ok, out, err) = env.kubectl(&["get", "ns"]);
    assert!(ok && out.contains("default"), "{out}{err}");
    let (ok, _, err) = env.kubectl(&[
        "create",
        "configmap",
        "x",
        "--from-literal=a=b",
        "-n",
        "default",
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = env.kubectl(&["get", "configmap", "x", "-n", "default", "-o", "yaml"]);
    assert!(ok && out.contains("a: b"), "{out}{err}");
    let (ok, _, err) = env.kubectl(&["delete", "configmap", "x", "-n", "default"]);
    assert!(ok, "{err}");
    let (ok, _, _) = env.kubectl(&["get", "configmap", "x", "-n", "default"]);
    assert!(!ok, "deleted");

    let caller_token = std::fs::read_to_string(&env.kubeconfig).unwrap();
    let caller_token = caller_token
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .unwrap()
        .to_string();
    let requests = env.fixture.requests();
    assert!(requests.len() >= 5);
    for r in &requests {
        assert_eq!(r.header("impersonate-user"), Some("alice"), "{:?}", r.path);
        assert_eq!(
            r.header_all("impersonate-group"),
            vec!["dev"],
            "{:?}",
            r.path
        );
        assert_eq!(
            r.header("authorization"),
            Some(&*format!("Bearer {AGENT_SA_TOKEN}"))
        );
        for (_, v) in &r.headers {
            assert!(
                !v.contains(&caller_token),
                "caller token leaked to the member in {:?}",
                r.path
            );
        }
    }

    // A caller asking to impersonate someone does not get it through.
    let token = env.proxy.client_token("mallory", "local");
    env.fixture.clear_requests();
    let (status, _) = request(
        &env.proxy,
        "/clusters/local/api/v1/namespaces",
        &[
            ("authorization", &format!("Bearer {token}")),
            ("impersonate-user", "admin"),
            ("impersonate-group", "system:masters"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let seen = env.fixture.requests();
    assert_eq!(seen[0].header("impersonate-user"), Some("mallory"));
    assert!(seen[0].header_all("impersonate-group").is_empty());
    drop(env.agent);
}

per_transport!(watch_streams_events_as_they_happen);
async fn watch_streams_events_as_they_happen(t: Transport) {
    let env = Env::start(t).await;
    let mut child = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .args(["get", "ns", "--watch", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let read_until = |needle: &'static str| {
        let needle = needle.to_string();
        move |seen: &String| seen.contains(&needle)
    };
    // The initial list arrives first.
    let initial = read_until("kube-system");
    tokio::time::timeout(WAIT, async {
        while !initial(&seen) {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(n > 0, "watch ended: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await
    .expect("initial watch output");
    // Then an event made after the watch started.
    let created = Instant::now();
    let (status, _) = env
        .fixture
        .request(
            "POST",
            "/api/v1/namespaces",
            Some(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "late-arrival"}})),
        )
        .await
        .unwrap();
    assert_eq!(status, 201);
    let late = read_until("late-arrival");
    tokio::time::timeout(WAIT, async {
        while !late(&seen) {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(n > 0, "watch ended: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await
    .expect("the new namespace shows in the watch");
    let latency = created.elapsed();
    println!("watch event arrived {latency:?} after creation");
    assert!(
        latency < Duration::from_secs(1),
        "watch event took {latency:?}"
    );
    let _ = child.kill().await;
}

per_transport!(exec_over_websocket_and_raw_upgrades_pass_through);
async fn exec_over_websocket_and_raw_upgrades_pass_through(t: Transport) {
    let env = Env::start(t).await;
    let (ok, out, err) = kubectl(
        &env.kubeconfig,
        &["exec", "-i", "p", "--", "cat"],
        Some("hello through exec\n"),
    );
    assert!(ok, "{err}");
    assert_eq!(out, "hello through exec\n");

    // Any upgrade protocol (SPDY/3.1 here) is spliced byte for byte, with half-close.
    let token = env.proxy.client_token("alice", "local");
    let mut tls = env.proxy.front().tls().await;
    let head = format!(
        "POST /clusters/local/fixture/upgrade-echo?command=x&stdin=true HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: Bearer {token}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    while !resp.ends_with(b"\r\n\r\n") {
        resp.push(tls.read_u8().await.unwrap());
    }
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 101"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("upgrade: spdy/3.1"),
        "{resp}"
    );
    let payload: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let (mut r, mut w) = tokio::io::split(tls);
    let send = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&send).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, r.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert!(
        back == payload,
        "upgrade echo differs ({} bytes back)",
        back.len()
    );
    let seen = env.fixture.requests();
    let up = seen
        .iter()
        .find(|r| r.path.starts_with("/fixture/upgrade-echo"))
        .unwrap();
    assert_eq!(
        up.path, "/fixture/upgrade-echo?command=x&stdin=true",
        "query string intact"
    );
}

per_transport!(failures_are_status_objects_kubectl_can_print);
async fn failures_are_status_objects_kubectl_can_print(t: Transport) {
    let mut env = Env::start(t).await;
    let dir = env.proxy.dir.path().to_path_buf();

    // 401: a bad token.
    let bad = dir.join("bad.kubeconfig");
    let text = std::fs::read_to_string(&env.kubeconfig).unwrap();
    let mangled: String = text
        .lines()
        .map(|l| {
            if l.trim().starts_with("token:") {
                "    token: not-a-token"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&bad, mangled).unwrap();
    // kubectl prints our message or, depending on its version, its own words for a 401.
    let unauthorized =
        |err: &str| err.contains("client token refused") || err.contains("provide credentials");
    let (ok, _, err) = kubectl(&bad, &["get", "ns"], None);
    assert!(!ok && unauthorized(&err), "{err}");
    let (status, body) = request(
        &env.proxy,
        "/clusters/local/api",
        &[("authorization", "Bearer not-a-token")],
    )
    .await;
    assert_eq!(status, 401);
    let v = status_of(&body);
    assert_eq!(v["reason"], "Unauthorized");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("client token refused"),
        "{v}"
    );
    let (status, body) = request(&env.proxy, "/clusters/local/api", &[]).await;
    assert_eq!(status, 401);
    assert!(status_of(&body)["message"]
        .as_str()
        .unwrap()
        .contains("no credentials"));

    // 403: a token for cluster a cannot reach local.
    let other = dir.join("other.kubeconfig");
    write_kubeconfig(
        &env.proxy,
        &other,
        &["--cluster", "local", "--clusters", "a", "--user", "alice"],
    );
    // kubectl 1.32+ drops the Status message on discovery errors ("Forbidden: unknown");
    // earlier versions print it. The Status itself is checked on the raw response.
    let (ok, _, err) = kubectl(&other, &["get", "ns"], None);
    assert!(
        !ok && (err.contains("may not reach cluster \"local\"") || err.contains("Forbidden")),
        "{err}"
    );
    let only_a = env.proxy.client_token("alice", "a");
    let (status, body) = request(
        &env.proxy,
        "/clusters/local/api",
        &[("authorization", &format!("Bearer {only_a}"))],
    )
    .await;
    assert_eq!(status, 403);
    let v = status_of(&body);
    assert_eq!(v["reason"], "Forbidden");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("may not reach cluster \"local\""),
        "{v}"
    );

    // An expired token.
    let expired = dir.join("expired.kubeconfig");
    write_kubeconfig(
        &env.proxy,
        &expired,
        &["--cluster", "local", "--user", "alice", "--ttl", "1s"],
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (ok, _, err) = kubectl(&expired, &["get", "ns"], None);
    assert!(
        !ok && (err.contains("expired") || unauthorized(&err)),
        "{err}"
    );
    let expired_token = std::fs::read_to_string(&expired).unwrap();
    let expired_token = expired_token
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .unwrap();
    let (status, body) = request(
        &env.proxy,
        "/clusters/local/api",
        &[("authorization", &format!("Bearer {expired_token}"))],
    )
    .await;
    assert_eq!(status, 401);
    assert!(status_of(&body)["message"]
        .as_str()
        .unwrap()
        .contains("expired"));

    // 404: a cluster nobody has heard of.
    let token = env.proxy.client_token("root", "*");
    let auth = format!("Bearer {token}");
    let (status, body) = request(
        &env.proxy,
        "/clusters/nope/api",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(status, 404);
    assert!(status_of(&body)["message"]
        .as_str()
        .unwrap()
        .contains("not known"));

    // 502: an agent without API server credentials cannot serve the gateway.
    let _bare = start_agent(&env.proxy, &env.fixture, "bare", false);
    assert!(env.proxy.wait_agents("bare", 1, WAIT).await);
    let (status, body) = request(
        &env.proxy,
        "/clusters/bare/api",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(status, 502);
    assert!(
        status_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("no credentials"),
        "{body:?}"
    );

    // 503: the agent is gone.
    env.agent.process.kill();
    assert!(env.proxy.wait_agents("local", 0, WAIT).await);
    let (status, body) = request(
        &env.proxy,
        "/clusters/local/api",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(status, 503);
    let message = status_of(&body)["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("no agent of cluster \"local\" is connected (disconnected since"),
        "{message}"
    );
    let (ok, _, err) = env.kubectl(&["get", "ns"]);
    assert!(
        !ok && (err.contains("no agent of cluster") || err.contains("ServiceUnavailable")),
        "{err}"
    );
    env.agent = start_agent(&env.proxy, &env.fixture, "local", true);
    assert!(env.proxy.wait_agents("local", 1, WAIT).await);
    let (ok, _, err) = env.kubectl(&["get", "ns"]);
    assert!(ok, "back after the agent returns: {err}");
}

per_transport!(client_certificate_identity);
async fn client_certificate_identity(t: Transport) {
    let env = Env::start(t).await;
    let out_dir = env.proxy.dir.path().join("certs");
    let out = Command::new(bin("tether-proxy"))
        .args([
            "cert",
            "client",
            "--user",
            "bob",
            "--group",
            "ops",
            "--clusters",
            "local",
            "--state-dir",
        ])
        .arg(&env.proxy.state_dir)
        .arg("--out-dir")
        .arg(&out_dir)
        .arg("--server")
        .arg(format!("https://127.0.0.1:{}", env.proxy.front_port))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out_dir.join("bob.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    env.fixture.clear_requests();
    let (ok, out, err) = kubectl(&out_dir.join("bob.kubeconfig"), &["get", "ns"], None);
    assert!(ok && out.contains("default"), "{err}");
    let seen = env.fixture.requests();
    assert!(seen
        .iter()
        .all(|r| r.header("impersonate-user") == Some("bob")));
    assert!(seen
        .iter()
        .all(|r| r.header_all("impersonate-group") == vec!["ops"]));
}

per_transport!(large_and_many_responses_with_bounded_proxy_memory);
async fn large_and_many_responses_with_bounded_proxy_memory(t: Transport) {
    let mut env = Env::start(t).await;
    let token = env.proxy.client_token("alice", "local");
    let auth = format!("Bearer {token}");
    let pid = env.proxy.process().pid();
    let before = rss_kib(pid);

    // 50 MiB in one response, streamed.
    let size = 50u64 << 20;
    let tls = env.proxy.front().tls().await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("/clusters/local/fixture/blob?size={size}"))
        .header("host", "localhost")
        .header("authorization", &auth)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    let mut peak = before;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            for (i, b) in data.iter().enumerate() {
                if (got + i as u64).is_multiple_of(4093) {
                    assert_eq!(*b, tether_tests::fixture::blob_pattern(got + i as u64));
                }
            }
            got += data.len() as u64;
            if got % (8 << 20) < data.len() as u64 {
                peak = peak.max(rss_kib(pid));
            }
        }
    }
    assert_eq!(got, size);

    // 200 concurrent GETs through one agent.
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (front, auth) = (env.proxy.front(), auth.clone());
        tasks.push(tokio::spawn(async move {
            front
                .get(
                    "/clusters/local/api/v1/namespaces/default",
                    &[("authorization", &auth)],
                )
                .await
        }));
    }
    for t in tasks {
        let (status, body) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, 200, "{body:?}");
        assert!(String::from_utf8_lossy(&body).contains("\"name\":\"default\""));
    }
    peak = peak.max(rss_kib(pid));
    let grew = peak.saturating_sub(before);
    println!("proxy RSS before {before} KiB, peak {peak} KiB (grew {grew} KiB)");
    assert!(
        grew < 40 * 1024,
        "proxy memory grew by {grew} KiB while streaming 50 MiB and 200 requests"
    );
}
