#!/usr/bin/env bash
# Installs the peer tunnels tether-bench compares tether with (optional: the bench skips any
# peer it cannot find). rathole 0.5 (TLS and plain), ferrotunnel 1.5 (with its per-session
# limits lifted: benches/ferrotunnel-peer), OpenSSH's sshd. Binaries go to ~/.cargo/bin and
# /usr/sbin. Takes several minutes (three crates are compiled).
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null; then
  need=()
  command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  command -v ssh >/dev/null || need+=(openssh-client)
  command -v openssl >/dev/null || need+=(openssl)
  if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}"
  fi
fi
# rathole's own lockfile pins a `time` that no longer builds with current rustc: not --locked.
command -v rathole >/dev/null || [ -x ~/.cargo/bin/rathole ] || cargo install --quiet rathole --version 0.5.0
command -v ferrotunnel >/dev/null || [ -x ~/.cargo/bin/ferrotunnel ] ||
  cargo install --quiet --locked ferrotunnel-cli --version 1.5.2
command -v ferrotunnel-bench-server >/dev/null || [ -x ~/.cargo/bin/ferrotunnel-bench-server ] ||
  cargo install --quiet --locked --path benches/ferrotunnel-peer
echo "peers installed"
