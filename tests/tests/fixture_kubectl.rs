//! Tests of the fixture apiserver itself: stock `kubectl` (the one on PATH) against it directly
//! for get/create/delete, watch, exec and a 403; then the raw HTTP behaviour other tests rely on
//! (chunked watch streams, `Status` errors, the blob endpoint, plain HTTP, the request log).

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tether_tests::fixture::{
    blob_pattern, Fixture, FixtureOptions, FIXTURE_TOKEN, KUBE_SYSTEM_UID,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::time::{timeout, Instant};

/// Bound on one kubectl run.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on waiting for something to show up in a stream.
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// `kubectl` from PATH, or a failure that says what is missing.
fn kubectl_path() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("kubectl"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "kubectl is not on PATH: these tests run the real kubectl against the fixture \
                 apiserver (on the project's machines it is /usr/bin/kubectl); install kubectl or \
                 put it on PATH"
            )
        })
}

/// A started fixture with a kubeconfig for it in a temporary directory.
struct Kube {
    fixture: Fixture,
    dir: tempfile::TempDir,
}

impl Kube {
    async fn start() -> Kube {
        let fixture = Fixture::start(FixtureOptions::default())
            .await
            .expect("fixture starts");
        let dir = tempfile::tempdir().expect("temp dir");
        fixture
            .kubeconfig(&dir.path().join("kubeconfig"))
            .expect("kubeconfig written");
        Kube { fixture, dir }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(kubectl_path());
        cmd.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs kubectl to completion (bounded), feeding `stdin` if given.
    async fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = self.command(args);
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().expect("kubectl starts");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin piped");
            pipe.write_all(input).await.expect("write kubectl stdin");
            drop(pipe);
        }
        // On timeout the child is dropped, and kill_on_drop kills it (only it).
        timeout(KUBECTL_TIMEOUT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| {
                panic!("kubectl {args:?} did not finish within {KUBECTL_TIMEOUT:?}")
            })
            .expect("kubectl runs")
    }

    /// Runs kubectl and requires success; answers stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args, None).await;
        assert!(
            out.status.success(),
            "kubectl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

#[tokio::test]
async fn kubectl_gets_creates_and_deletes() {
    let kube = Kube::start().await;

    let ns = kube.ok(&["get", "ns"]).await;
    assert!(
        ns.lines().any(|l| l.starts_with("default ")),
        "no default namespace in:\n{ns}"
    );
    assert!(ns.contains("kube-system"), "{ns}");

    let created = kube
        .ok(&[
            "create",
            "configmap",
            "x",
            "--from-literal=a=b",
            "-n",
            "default",
        ])
        .await;
    assert!(created.contains("configmap/x created"), "{created}");

    let yaml = kube.ok(&["get", "configmap", "x", "-o", "yaml"]).await;
    assert!(yaml.contains("a: b"), "{yaml}");
    assert!(
        yaml.contains("uid:") && yaml.contains("resourceVersion:"),
        "{yaml}"
    );

    let again = kube
        .run(&["create", "configmap", "x", "--from-literal=a=b"], None)
        .await;
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{again:?}"
    );

    let deleted = kube.ok(&["delete", "configmap", "x"]).await;
    assert!(deleted.contains("\"x\" deleted"), "{deleted}");

    let gone = kube.run(&["get", "configmap", "x"], None).await;
    assert!(!gone.status.success());
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("NotFound"),
        "{gone:?}"
    );

    let uid = kube
        .ok(&["get", "ns", "kube-system", "-o", "jsonpath={.metadata.uid}"])
        .await;
    assert_eq!(uid.trim(), KUBE_SYSTEM_UID);

    // The request log saw kubectl's requests with its token.
    let reqs = kube.fixture.requests();
    assert!(reqs
        .iter()
        .any(|r| r.path == "/version" || r.path.starts_with("/version?")));
    let create = reqs
        .iter()
        .find(|r| r.method == "POST" && r.path_only() == "/api/v1/namespaces/default/configmaps")
        .expect("the create was recorded");
    assert_eq!(
        create.header("authorization"),
        Some(format!("Bearer {FIXTURE_TOKEN}").as_str())
    );
    assert!(create
        .header("user-agent")
        .is_some_and(|ua| ua.contains("kubectl")));
    // kubectl negotiates HTTP/2 over TLS (ALPN h2) for ordinary requests.
    assert!(
        reqs.iter().any(|r| r.version == "HTTP/2.0"),
        "no HTTP/2 request: {reqs:?}"
    );
}

#[tokio::test]
async fn kubectl_watch_sees_a_namespace_created_later() {
    let kube = Kube::start().await;
    let mut child = kube
        .command(&["get", "ns", "--watch"])
        .spawn()
        .expect("kubectl starts");
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout piped")).lines();
    let mut seen = Vec::new();

    // The initial list.
    timeout(STREAM_TIMEOUT, async {
        while let Some(line) = lines.next_line().await.expect("read kubectl stdout") {
            let done = line.starts_with("default ");
            seen.push(line);
            if done {
                return;
            }
        }
        panic!("kubectl exited before listing: {seen:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("kubectl get ns --watch listed nothing in time: {seen:?}"));

    // Wait until its watch request has arrived, so the namespace is created after it started.
    let deadline = Instant::now() + STREAM_TIMEOUT;
    while !kube
        .fixture
        .requests()
        .iter()
        .any(|r| r.path_only() == "/api/v1/namespaces" && r.path.contains("watch="))
    {
        assert!(Instant::now() < deadline, "kubectl never started its watch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (code, body) = kube
        .fixture
        .request(
            "POST",
            "/api/v1/namespaces",
            Some(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "watched-later"}})),
        )
        .await
        .expect("create namespace");
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));

    timeout(STREAM_TIMEOUT, async {
        while let Some(line) = lines.next_line().await.expect("read kubectl stdout") {
            let done = line.starts_with("watched-later ");
            seen.push(line);
            if done {
                return;
            }
        }
        panic!("kubectl exited before showing the new namespace: {seen:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("the new namespace never showed in the watch: {seen:?}"));

    // Stop that kubectl, the child we started (by its PID), and reap it.
    assert!(pid.is_some());
    child.kill().await.expect("kill kubectl --watch");
}

#[tokio::test]
async fn kubectl_exec_echoes_stdin() {
    let kube = Kube::start().await;
    let out = kube
        .run(&["exec", "-i", "p", "--", "cat"], Some(b"hello\n"))
        .await;
    assert!(
        out.status.success(),
        "exec failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");

    let exit = kube
        .run(&["exec", "p", "--", "sh", "-c", "exit 3"], None)
        .await;
    assert_eq!(exit.status.code(), Some(3), "{exit:?}");

    let upgrade = kube
        .fixture
        .requests()
        .into_iter()
        .find(|r| r.path_only() == "/api/v1/namespaces/default/pods/p/exec")
        .expect("the exec was recorded");
    assert!(upgrade
        .header("sec-websocket-protocol")
        .is_some_and(|p| p.contains("v5.channel.k8s.io")));
}

#[tokio::test]
async fn kubectl_sees_forbidden_namespace_list() {
    let kube = Kube::start().await;
    kube.fixture.set_forbid_namespace_list(true);
    let out = kube.run(&["get", "ns"], None).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Forbidden") && err.contains("cannot list resource \"namespaces\""),
        "{err}"
    );
    kube.fixture.set_forbid_namespace_list(false);
    kube.ok(&["get", "ns"]).await;
}

/// Reads from `r` into `buf` until `want` appears (bounded by [`STREAM_TIMEOUT`]).
async fn read_until<R: AsyncReadExt + Unpin>(r: &mut R, buf: &mut Vec<u8>, want: &str) {
    let found = |b: &[u8]| String::from_utf8_lossy(b).contains(want);
    timeout(STREAM_TIMEOUT, async {
        let mut chunk = [0u8; 8192];
        while !found(buf) {
            let n = r.read(&mut chunk).await.expect("read watch stream");
            assert!(
                n > 0,
                "stream ended before {want:?}: {}",
                String::from_utf8_lossy(buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{want:?} did not arrive: {}", String::from_utf8_lossy(buf)));
}

#[tokio::test]
async fn watch_is_a_chunked_stream_of_events() {
    let fixture = Fixture::start(FixtureOptions::default()).await.unwrap();
    let config = tether_proto::tls::client_config(fixture.ca_pem(), &[b"http/1.1"], None).unwrap();
    let tcp = tokio::net::TcpStream::connect(fixture.addr())
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(
        b"GET /api/v1/namespaces?watch=1&timeoutSeconds=20 HTTP/1.1\r\nHost: x\r\nImpersonate-User: alice\r\n\
          Impersonate-Group: devs\r\nImpersonate-Group: ops\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    read_until(&mut tls, &mut buf, "\"name\":\"kube-system\"").await;
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("transfer-encoding: chunked"), "{text}");
    assert!(text.contains("{\"type\":\"added\""), "{text}");

    let (code, _) = fixture
        .request(
            "POST",
            "/api/v1/namespaces",
            Some(json!({"metadata": {"name": "live"}})),
        )
        .await
        .unwrap();
    assert_eq!(code, 201);
    read_until(&mut tls, &mut buf, "\"name\":\"live\"").await;
    let (code, _) = fixture
        .request("DELETE", "/api/v1/namespaces/live", None)
        .await
        .unwrap();
    assert_eq!(code, 200);
    read_until(&mut tls, &mut buf, "\"type\":\"DELETED\"").await;

    let watch = fixture
        .requests()
        .into_iter()
        .find(|r| r.path.starts_with("/api/v1/namespaces?watch=1"))
        .unwrap();
    assert_eq!(watch.header("impersonate-user"), Some("alice"));
    assert_eq!(watch.header_all("Impersonate-Group"), vec!["devs", "ops"]);
    assert_eq!(watch.header("authorization"), None);
}

async fn status_of(
    fixture: &Fixture,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let (code, bytes) = fixture.request(method, path, body).await.unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{method} {path}: not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (code, v)
}

#[tokio::test]
async fn errors_are_status_objects_and_blobs_stream() {
    let fixture = Fixture::start(FixtureOptions::default()).await.unwrap();
    let (code, v) = status_of(
        &fixture,
        "GET",
        "/api/v1/namespaces/default/configmaps/nope",
        None,
    )
    .await;
    assert_eq!(code, 404);
    assert_eq!(v["kind"], "Status");
    assert_eq!(v["apiVersion"], "v1");
    assert_eq!(v["status"], "Failure");
    assert_eq!(v["reason"], "NotFound");
    assert_eq!(v["code"], 404);

    let cm = json!({"metadata": {"name": "c"}, "data": {"k": "v"}});
    let (code, created) = status_of(
        &fixture,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        Some(cm.clone()),
    )
    .await;
    assert_eq!(code, 201);
    let (code, v) = status_of(
        &fixture,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        Some(cm),
    )
    .await;
    assert_eq!((code, v["reason"].as_str()), (409, Some("AlreadyExists")));
    let (code, list) = status_of(
        &fixture,
        "GET",
        "/api/v1/namespaces/default/configmaps",
        None,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "ConfigMapList");
    assert_eq!(list["items"][0]["data"]["k"], "v");
    let list_rv: u64 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let obj_rv: u64 = created["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(list_rv >= obj_rv);

    fixture.set_forbid_namespace_list(true);
    let (code, v) = status_of(&fixture, "GET", "/api/v1/namespaces", None).await;
    assert_eq!((code, v["reason"].as_str()), (403, Some("Forbidden")));
    fixture.set_forbid_namespace_list(false);

    let (code, v) = status_of(&fixture, "GET", "/version", None).await;
    assert_eq!(code, 200);
    assert_eq!(
        (v["major"].as_str(), v["minor"].as_str()),
        (Some("1"), Some("31"))
    );

    let size = 50u64 << 20;
    let (code, blob) = fixture
        .request("GET", &format!("/fixture/blob?size={size}"), None)
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert_eq!(blob.len() as u64, size);
    assert!(blob
        .iter()
        .enumerate()
        .step_by(4099)
        .all(|(i, b)| *b == blob_pattern(i as u64)));
}

#[tokio::test]
async fn plain_http_mode_serves_the_same_api() {
    let fixture = Fixture::start(FixtureOptions {
        tls: false,
        ..FixtureOptions::default()
    })
    .await
    .unwrap();
    assert!(fixture.url().starts_with("http://127.0.0.1:"));
    assert!(fixture.ca_pem().is_empty());
    let (code, v) = status_of(&fixture, "GET", "/api/v1", None).await;
    assert_eq!(code, 200);
    assert!(v["resources"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "configmaps" && r["shortNames"][0] == "cm"));
    let dir = tempfile::tempdir().unwrap();
    let path: &Path = &dir.path().join("kc");
    fixture.kubeconfig(path).unwrap();
    let kc = std::fs::read_to_string(path).unwrap();
    assert!(kc.contains(&fixture.url()) && !kc.contains("certificate-authority-data"));
}
