//! The `tether-proxy` command line: state dir creation and token minting, run as a user would.

use std::process::Command;

fn proxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tether-proxy"))
}

#[test]
fn init_then_mint_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = proxy()
        .args(["init", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "signing.key",
    ] {
        assert!(state.join(f).exists(), "{f}");
    }
    let out = proxy()
        .args([
            "token",
            "agent",
            "--cluster",
            "prod-1",
            "--ttl",
            "24h",
            "--state-dir",
        ])
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(token.trim().split('.').count(), 3, "a JWT: {token}");
    // The token is not logged to stderr.
    assert!(!String::from_utf8_lossy(&out.stderr).contains(token.trim()));
}

#[test]
fn bad_cluster_name_is_refused_with_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    proxy()
        .args(["init", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let out = proxy()
        .args(["token", "agent", "--cluster", "Prod_1", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lowercase letters, digits"), "{err}");
}

#[test]
fn token_without_state_dir_says_how_to_create_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = proxy()
        .args([
            "token",
            "client",
            "--user",
            "u",
            "--clusters",
            "*",
            "--state-dir",
        ])
        .arg(dir.path().join("missing"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tether-proxy init"), "{err}");
}
