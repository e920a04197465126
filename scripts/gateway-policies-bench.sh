#!/usr/bin/env bash
# Proxy CPU per request of the gateway with its policies on (API key, rate limit, access log,
# metrics) against nginx's plain proxying, measured the way ../shared/bench/gateway-bench.sh
# measures (which cannot send an API key): the proxy's CPU time from
# /proc/<pid>/task/*/schedstat over a wrk run, divided by the requests served; wrk on CPU 0,
# the upstream (nginx answering `200 ok`) and the proxy under test on CPU 1; targets run in
# alternating rounds and the table gives medians. Traffic stays on 127.0.0.1; every process
# started here is stopped on exit.
#
# Usage, from the repository root after `cargo build --release`:
#   scripts/gateway-policies-bench.sh [-r ROUNDS] [-d SECONDS] [-c "50 1"]
set -euo pipefail
export LC_ALL=C
here="$(cd "$(dirname "$0")/.." && pwd)"
rounds=3 duration=4 conns="50 1"
while [ $# -gt 0 ]; do
  case "$1" in
    -r) rounds="$2"; shift 2 ;;
    -d) duration="$2"; shift 2 ;;
    -c) conns="$2"; shift 2 ;;
    *) echo "usage: $0 [-r ROUNDS] [-d SECONDS] [-c \"50 1\"]" >&2; exit 2 ;;
  esac
done
for bin in nginx wrk taskset setsid python3; do
  command -v "$bin" >/dev/null || { echo "missing $bin (apt-get install -y nginx wrk)" >&2; exit 2; }
done
[ -x "$here/target/release/apim" ] || { echo "build first: cargo build --release" >&2; exit 2; }

up_port=18280 ngx_port=18281 apim_port=18290
# shellcheck source=scripts/loopback.sh
. "$here/scripts/loopback.sh"
upstream_and_proxy_confs "$up_port" "$ngx_port"
start 1 nginx -c "$work/up/nginx.conf" -p "$work/up"
start 1 nginx -c "$work/px/nginx.conf" -p "$work/px"
ngx_group=$started
GW_UPSTREAM="127.0.0.1:$up_port" GW_LISTEN="127.0.0.1:$apim_port" GW_PORT="$apim_port" \
  APIM_BENCH_POLICIES=1 APIM_BENCH_KEY_FILE="$work/key" APIM_BENCH_LOG_FILE="$work/apim.log" \
  start 1 "$here/scripts/gateway-candidate.sh"
apim_group=$started
for _ in $(seq 1 100); do
  [ -s "$work/key" ] && break
  sleep 0.1
done
[ -s "$work/key" ] || { echo "the gateway did not start:" >&2; cat "$work/out.2" >&2; exit 1; }
key="$(cat "$work/key")"
for _ in $(seq 1 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "x-api-key: $key" "http://127.0.0.1:$apim_port/" || true)
  [ "$code" = 200 ] && break
  sleep 0.1
done
[ "$code" = 200 ] || { echo "the gateway answers $code with the key" >&2; exit 1; }
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$apim_port/")
[ "$code" = 401 ] || { echo "the API key policy is not enforced (no key: $code)" >&2; exit 1; }

cpu_ns() { # process group -> CPU ns of all its threads
  local total=0 p
  for p in $(pgrep -g "$1"); do
    total=$((total + $(cat /proc/"$p"/task/*/schedstat 2>/dev/null | awk '{s+=$1} END{printf "%.0f", s}')))
  done
  echo "$total"
}
results="$work/results.tsv"
for r in $(seq 1 "$rounds"); do
  for c in $conns; do
    for target in nginx apim; do
      if [ "$target" = nginx ]; then
        group=$ngx_group port=$ngx_port hdr=()
      else
        group=$apim_group port=$apim_port hdr=(-H "x-api-key: $key")
      fi
      before=$(cpu_ns "$group")
      out=$(taskset -c 0 timeout $((duration + 30)) wrk -t1 -c"$c" -d"${duration}s" "${hdr[@]}" "http://127.0.0.1:$port/")
      after=$(cpu_ns "$group")
      reqs=$(awk '/requests in/{print $1}' <<<"$out")
      bad=$(awk '/Non-2xx/{print $NF}' <<<"$out")
      if [ -n "$bad" ] && [ "$bad" != 0 ]; then
        echo "$target c=$c: $bad answers were not 2xx" >&2
        exit 1
      fi
      us=$(python3 -c "print(f'{($after - $before) / 1000 / $reqs:.1f}')")
      printf '%s\t%s\t%s\t%s\n' "$target" "$c" "$reqs" "$us" >>"$results"
      echo "round $r $target c=$c: $reqs requests, $us us/req" >&2
    done
  done
done
sleep 0.3
logged=$(grep -c '"target":"apim::gateway::access"' "$work/apim.log" || true)
echo "access-log lines written by apim: $logged" >&2
[ "$logged" -gt 0 ] || { echo "the access log was not on" >&2; exit 1; }
python3 - "$results" "$duration" <<'EOF'
import statistics, sys
from collections import defaultdict
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
us, rps = defaultdict(list), defaultdict(list)
for target, c, reqs, u in rows:
    us[(target, c)].append(float(u))
    rps[(target, c)].append(int(reqs) / float(sys.argv[2]))
print("| conns | nginx plain px us/req | apim with policies px us/req | apim / nginx | apim req/s |")
print("|---:|---:|---:|---:|---:|")
for c in sorted({c for _, c in us}, key=lambda c: -int(c)):
    n, a = statistics.median(us[("nginx", c)]), statistics.median(us[("apim", c)])
    print(f"| {c} | {n:.1f} | {a:.1f} | {a / n:.2f} | {statistics.median(rps[('apim', c)]):,.0f} |")
EOF
