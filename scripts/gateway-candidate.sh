#!/usr/bin/env bash
# Runs apim as the candidate gateway of the shared gateway benchmark (gateway-bench.sh):
# a fresh node whose gateway listens on $GW_LISTEN and routes every path of host 127.0.0.1
# to $GW_UPSTREAM, with no policy ("plain proxying") or, with APIM_BENCH_POLICIES=1, with an
# API key, a rate limit that never trips and the access log on (written to a file in the
# node's work directory, or $APIM_BENCH_LOG_FILE); the key is then written to $APIM_BENCH_KEY_FILE, for a load
# generator that sends it (scripts/gateway-policies-bench.sh). With GW_TLS=1 it
# listens for HTTPS on $GW_LISTEN with the benchmark's certificate ($GW_TLS_CERT, $GW_TLS_KEY)
# uploaded as a certificate resource. Stays in the foreground; the benchmark stops it by
# process group. Usage (from the repository root, after `cargo build --release`):
#   ../shared/bench/gateway-bench.sh --tls --candidate-name apim \
#     --candidate scripts/gateway-candidate.sh --candidate-tls scripts/gateway-candidate.sh
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${APIM_BIN:-$here/target/release/apim}"
work="$(mktemp -d)"
trap 'kill 0 2>/dev/null; rm -rf "$work"' EXIT
admin_port=$(( ${GW_PORT:-18090} + 1000 ))
if [ "${GW_TLS:-0}" = 1 ]; then
  http_listen="127.0.0.1:$(( ${GW_PORT:-18446} + 2000 ))"
  https_listen="${GW_LISTEN:-127.0.0.1:18446}"
else
  http_listen="${GW_LISTEN:-127.0.0.1:18090}"
  https_listen="127.0.0.1:$(( ${GW_PORT:-18090} + 2000 ))"
fi
cat > "$work/apim.toml" <<TOML
data_dir = "$work/data"
[admin]
listen = "127.0.0.1:$admin_port"
[gateway]
http_listen = "$http_listen"
https_listen = "$https_listen"
[log]
level = "warn"
TOML
if [ "${APIM_BENCH_POLICIES:-0}" = 1 ]; then
  sed -i 's/^level = .*/level = "warn,apim::gateway::access=info"/' "$work/apim.toml"
  "$bin" serve --config "$work/apim.toml" 2>"${APIM_BENCH_LOG_FILE:-$work/node.log}" &
else
  "$bin" serve --config "$work/apim.toml" &
fi
node=$!
for _ in $(seq 1 100); do
  [ -s "$work/data/admin.token" ] && break
  sleep 0.1
done
cli=("$bin" --data-dir "$work/data" --url "https://127.0.0.1:$admin_port")
policies='[]'
if [ "${APIM_BENCH_POLICIES:-0}" = 1 ]; then
  policies='[{"type":"api-key"},{"type":"rate-limit","requests":1000000,"per_seconds":1}]'
fi
cat > "$work/doc.yaml" <<YAML
apiVersion: apim/v1
kind: TenantConfig
tenant: bench
apis:
  - name: bench
    version: v1
    hosts: ["127.0.0.1"]
    base_path: /
    upstream: {targets: [{url: "http://${GW_UPSTREAM:-127.0.0.1:18080}"}]}
    policies: $policies
    lifecycle: published
plans:
  - name: open
consumers:
  - name: wrk
subscriptions:
  - {consumer: wrk, api: bench, plan: open, status: active}
YAML
"${cli[@]}" apply -f "$work/doc.yaml" >/dev/null
if [ "${APIM_BENCH_POLICIES:-0}" = 1 ]; then
  "${cli[@]}" -o json key create --tenant bench --consumer wrk |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])' >"${APIM_BENCH_KEY_FILE:-$work/key}"
fi
if [ "${GW_TLS:-0}" = 1 ]; then
  "${cli[@]}" certificate --tenant bench create bench \
    --set "certificate=@$GW_TLS_CERT" --set "private_key=@$GW_TLS_KEY" >/dev/null
fi
wait "$node"
