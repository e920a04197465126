#!/usr/bin/env bash
# User and system CPU time per plain proxied request of nginx and of one or two apim builds,
# each on its own port, in alternating rounds: each round runs every target once, so the
# targets of a round meet the same moment of a shared machine. The times are the processes'
# utime and stime (/proc/<pid>/stat, in ticks) over a wrk run, divided by the requests served;
# wrk on CPU 0, the upstream (nginx answering `200 ok`) and the proxies on CPU 1. Traffic
# stays on 127.0.0.1; every process started here is stopped on exit.
#
# Usage, from the repository root after `cargo build --release`:
#   scripts/gateway-alternation.sh [-r ROUNDS] [-d SECONDS] [-c CONNS] [A [B]]
# A and B are apim binaries (A defaults to target/release/apim).
set -euo pipefail
export LC_ALL=C
here="$(cd "$(dirname "$0")/.." && pwd)"
rounds=8 duration=4 conns=50
while [ $# -gt 0 ]; do
  case "$1" in
    -r) rounds="$2"; shift 2 ;;
    -d) duration="$2"; shift 2 ;;
    -c) conns="$2"; shift 2 ;;
    -*) echo "usage: $0 [-r ROUNDS] [-d SECONDS] [-c CONNS] [A [B]]" >&2; exit 2 ;;
    *) break ;;
  esac
done
builds=("${@:-$here/target/release/apim}")
[ ${#builds[@]} -le 2 ] || { echo "at most two apim binaries" >&2; exit 2; }
for b in "${builds[@]}"; do [ -x "$b" ] || { echo "no apim binary at $b" >&2; exit 2; }; done
for bin in nginx wrk taskset setsid curl; do
  command -v "$bin" >/dev/null || { echo "missing $bin (apt-get install -y nginx wrk curl)" >&2; exit 2; }
done

up_port=18780 ngx_port=18781
# shellcheck source=scripts/loopback.sh
. "$here/scripts/loopback.sh"
upstream_and_proxy_confs "$up_port" "$ngx_port"
start 1 nginx -c "$work/up/nginx.conf" -p "$work/up"
start 1 nginx -c "$work/px/nginx.conf" -p "$work/px"
names=(nginx) target_groups=("$started") ports=("$ngx_port")
for i in "${!builds[@]}"; do
  port=$((18790 + i))
  APIM_BIN="${builds[$i]}" GW_UPSTREAM="127.0.0.1:$up_port" GW_LISTEN="127.0.0.1:$port" \
    GW_PORT="$port" start 1 "$here/scripts/gateway-candidate.sh"
  labels=(A B)
  names+=("apim-${labels[$i]}") target_groups+=("$started") ports+=("$port")
done
for port in "${ports[@]}"; do
  for _ in $(seq 1 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/" || true)" = 200 ] && break
    sleep 0.2
  done
done

# ticks GROUP: the user and system ticks of every process of the group
ticks() {
  local u=0 s=0 p a b
  for p in $(pgrep -g "$1"); do
    read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat" 2>/dev/null || echo "0 0")
    u=$((u + a)) s=$((s + b))
  done
  echo "$u $s"
}

hz=$(getconf CLK_TCK)
for r in $(seq 1 "$rounds"); do
  for i in "${!names[@]}"; do
    read -r u0 s0 < <(ticks "${target_groups[$i]}")
    n=$(taskset -c 0 wrk -t1 -c"$conns" -d"${duration}s" "http://127.0.0.1:${ports[$i]}/" |
      awk '/requests in/ {print $1}')
    read -r u1 s1 < <(ticks "${target_groups[$i]}")
    awk -v r="$r" -v t="${names[$i]}" -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$hz" \
      'BEGIN { printf "round %d %-7s user %.2f sys %.2f total %.2f us/req\n", r, t,
               u * 1e6 / hz / n, s * 1e6 / hz / n, (u + s) * 1e6 / hz / n }'
  done
done | tee "$work/rounds"
echo "means over $rounds rounds at $conns connections (µs per request):"
awk '{u[$3] += $5; s[$3] += $7; t[$3] += $9; k[$3]++}
  END { for (x in k) printf "%-7s user %.2f sys %.2f total %.2f\n", x, u[x]/k[x], s[x]/k[x], t[x]/k[x] }' \
  "$work/rounds" | sort
