//! The `tether-agent` command line: flag mistakes are reported plainly before anything runs.

use std::process::Command;

fn agent(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether-agent"))
        .args(args)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn flag_mistakes_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, "not a certificate").unwrap();
    let ca = ca.to_str().unwrap();
    let base = [
        "--cluster",
        "a",
        "--token-file",
        "/nonexistent",
        "--ca-file",
    ];

    let (ok, err) = agent(
        &[
            &base[..],
            &[ca, "--proxy", "http://x:1", "--upstream", "https://k:6443"],
        ]
        .concat(),
    );
    assert!(!ok && err.contains("tls://HOST:PORT"), "{err}");

    let (ok, err) = agent(
        &[
            &base[..],
            &[ca, "--proxy", "tls://x:1", "--upstream", "https://k:6443"],
        ]
        .concat(),
    );
    assert!(!ok && err.contains("--ca-file"), "{err}");

    let (ok, err) = agent(&[
        "--cluster",
        "Bad_Name",
        "--token-file",
        "t",
        "--ca-file",
        ca,
        "--proxy",
        "tls://x:1",
    ]);
    assert!(!ok && err.contains("lowercase letters"), "{err}");
}
