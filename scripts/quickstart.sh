#!/usr/bin/env bash
# tether quickstart: a proxy and an agent for a cluster named `local`, on loopback, no setup.
#
#   scripts/quickstart.sh                      # demo API server as the member (built in)
#   scripts/quickstart.sh --upstream https://10.0.0.5:6443   # a real API server you name
#   scripts/quickstart.sh --from-kubeconfig    # the API server of your current kubeconfig context
#   scripts/quickstart.sh --check              # bring it up, run the printed commands, tear down
#
# Everything lives in .tether-quickstart/ (state dir, tokens, kubeconfig, logs). Ctrl-C stops
# the processes this script started (and only those).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIR="$ROOT/.tether-quickstart"
AGENT_PORT=${TETHER_QS_AGENT_PORT:-18443}
FRONT_PORT=${TETHER_QS_FRONT_PORT:-19443}
ADMIN_PORT=${TETHER_QS_ADMIN_PORT:-19090}
EXPOSE_PORT=${TETHER_QS_EXPOSE_PORT:-16444}
DEMO_PORT=${TETHER_QS_DEMO_PORT:-16443}
UPSTREAM=""
FROM_KUBECONFIG=0
CHECK=0

while [ $# -gt 0 ]; do
  case "$1" in
    --upstream) UPSTREAM="$2"; shift 2 ;;
    --from-kubeconfig) FROM_KUBECONFIG=1; shift ;;
    --check) CHECK=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if ! command -v cargo >/dev/null; then
  echo "cargo is needed to build tether (install Rust from rustup.rs)" >&2; exit 1
fi

echo "==> building (release)"
# Two commands: `--bin` would apply to every package named with -p.
cargo build --release --quiet -p tether-proxy -p tether-agent
cargo build --release --quiet -p tether-tests --bin tether-fixture-apiserver
BIN="$ROOT/target/release"

rm -rf "$DIR"; mkdir -p "$DIR"; chmod 700 "$DIR"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() { # url, what
  for _ in $(seq 1 100); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$2 did not come up; see $DIR/*.log" >&2; exit 1
}

MEMBER_CA=""
if [ -n "$UPSTREAM" ]; then
  echo "==> member API server: $UPSTREAM"
elif [ "$FROM_KUBECONFIG" = 1 ]; then
  UPSTREAM=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
  kubectl config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' | base64 -d > "$DIR/member-ca.crt" || true
  MEMBER_CA="$DIR/member-ca.crt"
  echo "==> member API server from your kubeconfig: $UPSTREAM"
else
  echo "==> starting a demo API server (a stand-in for a member's kube-apiserver) on 127.0.0.1:$DEMO_PORT"
  "$BIN/tether-fixture-apiserver" --addr "127.0.0.1:$DEMO_PORT" --ca-out "$DIR/member-ca.crt" > "$DIR/demo-apiserver.log" 2>&1 &
  PIDS+=($!)
  UPSTREAM="https://127.0.0.1:$DEMO_PORT"
  MEMBER_CA="$DIR/member-ca.crt"
  for _ in $(seq 1 100); do [ -s "$MEMBER_CA" ] && break; sleep 0.1; done
fi

echo "==> starting tether-proxy (agents :$AGENT_PORT, front :$FRONT_PORT, admin :$ADMIN_PORT, expose local on :$EXPOSE_PORT)"
"$BIN/tether-proxy" serve --state-dir "$DIR/state" \
  --agent-addr "127.0.0.1:$AGENT_PORT" --front-addr "127.0.0.1:$FRONT_PORT" \
  --admin-addr "127.0.0.1:$ADMIN_PORT" --publish-address "tls://127.0.0.1:$AGENT_PORT" \
  --expose "local=127.0.0.1:$EXPOSE_PORT" > "$DIR/proxy.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$ADMIN_PORT/readyz" "tether-proxy"

(umask 077; "$BIN/tether-proxy" token agent --state-dir "$DIR/state" --cluster local > "$DIR/agent.token")
(umask 077; "$BIN/tether-proxy" token client --state-dir "$DIR/state" --user quickstart --clusters local > "$DIR/client.token")

# The agent's own credentials for the member API server (used by the kube gateway; they never
# leave the member side). The demo API server accepts any token.
AGENT_CREDS=()
if [ -n "$MEMBER_CA" ] && [ -s "$MEMBER_CA" ]; then
  AGENT_CREDS+=(--upstream-ca-file "$MEMBER_CA")
  if [ "$FROM_KUBECONFIG" = 1 ]; then
    TOKEN=$(kubectl config view --minify --raw -o jsonpath='{.users[0].user.token}' || true)
  else
    TOKEN=demo-agent-service-account-token
  fi
  if [ -n "$TOKEN" ]; then
    (umask 077; printf '%s' "$TOKEN" > "$DIR/agent-upstream.token")
    AGENT_CREDS+=(--upstream-token-file "$DIR/agent-upstream.token")
  fi
fi

echo "==> starting tether-agent for cluster local"
"$BIN/tether-agent" --proxy "tls://127.0.0.1:$AGENT_PORT" --cluster local \
  --token-file "$DIR/agent.token" --ca-file "$DIR/state/ca.crt" --upstream "$UPSTREAM" \
  ${AGENT_CREDS[@]+"${AGENT_CREDS[@]}"} > "$DIR/agent.log" 2>&1 &
PIDS+=($!)
connected=0
for _ in $(seq 1 150); do
  if curl -fsS "http://127.0.0.1:$ADMIN_PORT/api/v1/clusters" 2>/dev/null | grep -q '"connected": true'; then connected=1; break; fi
  sleep 0.1
done
if [ "$connected" != 1 ]; then
  echo "the agent did not connect within 15 s; its log ($DIR/agent.log) ends with:" >&2
  tail -n 20 "$DIR/agent.log" >&2
  exit 1
fi

# A kubeconfig for the kube gateway: https://FRONT/clusters/local, a client token for user
# "quickstart"; the agent impersonates that user towards the member.
(umask 077; "$BIN/tether-proxy" kubeconfig --state-dir "$DIR/state" --cluster local \
  --user quickstart --group demo --server "https://127.0.0.1:$FRONT_PORT" > "$DIR/gateway.kubeconfig")

# A kubeconfig that reaches the member through the proxy's CONNECT front. client-go checks
# the https proxy's certificate against certificate-authority-data, so the bundle holds both
# the proxy's CA and the member's.
HOSTPORT=${UPSTREAM#https://}; HOSTPORT=${HOSTPORT%%/*}; MEMBER_HOST=${HOSTPORT%:*}
case "$MEMBER_HOST" in 127.*|localhost) MEMBER_HOST=localhost ;; esac
CA_BUNDLE=$(cat "$DIR/state/ca.crt" ${MEMBER_CA:+"$MEMBER_CA"} | base64 | tr -d '\n')
(umask 077; cat > "$DIR/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://local:443
    tls-server-name: $MEMBER_HOST
    certificate-authority-data: $CA_BUNDLE
    proxy-url: https://quickstart:$(cat "$DIR/client.token")@127.0.0.1:$FRONT_PORT
users:
- name: member-user
  user:
    token: demo-token-for-the-member
contexts:
- name: local
  context: {cluster: local, user: member-user}
current-context: local
EOF
)

cat <<EOF

tether is up: proxy + agent for cluster "local" on loopback.

Try these (each goes through the proxy and the agent to the member's API server):

  kubectl --kubeconfig $DIR/gateway.kubeconfig get namespaces      # the kube gateway
  kubectl --kubeconfig $DIR/gateway.kubeconfig create configmap hello --from-literal=a=b
  kubectl --kubeconfig $DIR/kubeconfig get namespaces              # CONNECT (proxy-url)
  curl --cacert $MEMBER_CA --connect-to $MEMBER_HOST:$EXPOSE_PORT:127.0.0.1:$EXPOSE_PORT https://$MEMBER_HOST:$EXPOSE_PORT/version
  curl http://127.0.0.1:$ADMIN_PORT/api/v1/clusters
  $BIN/tether-proxy clusters --admin-addr 127.0.0.1:$ADMIN_PORT

Logs: $DIR/*.log.  Ctrl-C stops everything.
EOF

if [ "$CHECK" = 1 ]; then
  echo "==> --check: running the commands above"
  kubectl --kubeconfig "$DIR/gateway.kubeconfig" get namespaces | tee "$DIR/check.out"
  grep -q default "$DIR/check.out"
  kubectl --kubeconfig "$DIR/gateway.kubeconfig" create configmap hello --from-literal=a=b
  kubectl --kubeconfig "$DIR/kubeconfig" get namespaces | tee "$DIR/check.out"
  grep -q default "$DIR/check.out"
  curl -fsS --cacert "$MEMBER_CA" --connect-to "$MEMBER_HOST:$EXPOSE_PORT:127.0.0.1:$EXPOSE_PORT" \
    "https://$MEMBER_HOST:$EXPOSE_PORT/version" | grep -q gitVersion
  "$BIN/tether-proxy" clusters --admin-addr "127.0.0.1:$ADMIN_PORT"
  echo "==> quickstart check passed"
  exit 0
fi

wait
