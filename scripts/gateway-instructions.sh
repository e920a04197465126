#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: nginx's plain proxying, the
# gateway's plain proxying, and the gateway with its policies on (API key, rate limit, access
# log, metrics), each under the same wrk load. Unlike CPU time on this shared machine, the
# count does not drift with the neighbours' load: it tells two builds apart by a fraction of a
# percent where the CPU-time benchmarks need many rounds. It counts user-space instructions
# only (not the kernel's work on the sockets, more than half of a request's CPU time here;
# see the README) and varies by about 1% with how requests batch under the load.
#
# Every process runs under valgrind (about 50 times slower), all on CPU 1, wrk on CPU 0;
# traffic stays on 127.0.0.1 and every process started here is stopped on exit.
#
# Usage, from the repository root after `cargo build --release`:
#   scripts/gateway-instructions.sh [-d SECONDS] [-c CONNS] [--only "nginx plain policies"]
#     [--keep DIR] [--mangled] [--cache] [--atomics]
# --keep DIR keeps each target's callgrind files (and its request count) in DIR/<target>, for
# `callgrind_annotate --inclusive=yes` (the release build keeps its symbol table: functions
# show by name; see the README). --mangled keeps the names as the binary has them (for
# scripts/hot-symbols.sh). --cache adds callgrind's cache simulation (the machine's L1 caches)
# and gives the instruction cache's misses per request too (about twice as slow). --atomics
# adds, per request, the locked instructions executed (atomic read-modify-writes, each a few ns
# that the count does not weigh) and the clock readings (scripts/callgrind-atomics.py).
set -euo pipefail
export LC_ALL=C
here="$(cd "$(dirname "$0")/.." && pwd)"
duration=10 conns=50 only="nginx plain policies" keep="" demangle=yes cache=no atomics=no
while [ $# -gt 0 ]; do
  case "$1" in
    -d) duration="$2"; shift 2 ;;
    -c) conns="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --keep) keep="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    --mangled) demangle=no; shift ;;
    --cache) cache=yes; shift ;;
    --atomics) atomics=yes; shift ;;
    *) echo "usage: $0 [-d SECONDS] [-c CONNS] [--only \"nginx plain policies\"] [--keep DIR] [--mangled] [--cache] [--atomics]" >&2; exit 2 ;;
  esac
done
for bin in nginx wrk taskset setsid valgrind callgrind_control curl; do
  command -v "$bin" >/dev/null || { echo "missing $bin (apt-get install -y nginx wrk valgrind)" >&2; exit 2; }
done
if [ "$atomics" = yes ]; then
  for bin in python3 objdump; do
    command -v "$bin" >/dev/null || { echo "missing $bin (apt-get install -y python3 binutils)" >&2; exit 2; }
  done
fi
bin="${APIM_BIN:-$here/target/release/apim}"
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 2; }

up_port=18380 ngx_port=18381 apim_port=18390
# shellcheck source=scripts/loopback.sh
. "$here/scripts/loopback.sh"
upstream_and_proxy_confs "$up_port" "$ngx_port"
start 1 nginx -c "$work/up/nginx.conf" -p "$work/up"
# (callgrind_control reaches a process of its own user only: nginx's worker runs as root here
# when the script does)
if [ "$(id -u)" = 0 ]; then sed -i '1i user root;' "$work/px/nginx.conf"; fi

mkdir "$work/cg"
vg=(valgrind --tool=callgrind --demangle=$demangle --cache-sim=$cache --dump-instr=$atomics --trace-children=yes --callgrind-out-file="$work/cg/cg.%p")
# the gateway's command under valgrind (the CLI calls of the candidate script run as they are)
cat >"$work/apim" <<SH
#!/usr/bin/env bash
if [ "\$1" = serve ]; then exec ${vg[*]} "$bin" "\$@"; fi
exec "$bin" "\$@"
SH
chmod +x "$work/apim"

# wait_ok URL [HEADER]: until it answers 200 (valgrind starts slowly, more so with the cache
# simulation), at most 240 s
wait_ok() {
  local code=""
  for _ in $(seq 1 480); do
    code=$(curl -s -o /dev/null -w '%{http_code}' ${2:+-H "$2"} "$1" || true)
    [ "$code" = 200 ] && return 0
    sleep 0.5
  done
  echo "$1 answers $code" >&2
  return 1
}

# control COMMAND URL [HEADER] PIDS...: sends callgrind COMMAND (-z zero, -d dump) to each of
# PIDS; a process only takes it when it runs, so a request wakes the servers (a process that
# stays asleep, nginx's master, is left out after a few seconds)
control() {
  local command=$1 url=$2 header=$3 p
  local -a asked=()
  shift 3
  for p in "$@"; do
    timeout 10 callgrind_control "$command" "$p" >/dev/null 2>&1 &
    asked+=($!)
  done
  sleep 0.5
  curl -s -o /dev/null ${header:+-H "$header"} "$url" || true
  for p in "${asked[@]}"; do wait "$p" || true; done
}

# measure NAME GROUP URL [HEADER]: instructions per request of the valgrind processes in GROUP
measure() {
  local name=$1 group=$2 url=$3 header=${4:-} n total=0 misses=0 f
  local -a pids
  mapfile -t pids < <(pgrep -g "$group")
  control -z "$url" "$header" "${pids[@]}"
  rm -f "$work"/cg/cg.*.[0-9]*
  n=$(taskset -c 0 wrk -t1 -c"$conns" -d"${duration}s" ${header:+-H "$header"} "$url" |
    awk '/requests in/ {print $1}')
  control -d "$url" "$header" "${pids[@]}"
  sleep 1
  for f in "$work"/cg/cg.*.[0-9]*; do
    [ -f "$f" ] || continue
    total=$((total + $(awk '/^totals:/ {print $2}' "$f")))
    # (with the cache simulation, the fourth event is I1mr: the instruction cache's misses)
    misses=$((misses + $(awk '/^totals:/ {print ($5 == "" ? 0 : $5)}' "$f")))
  done
  [ "${n:-0}" -gt 0 ] || { echo "$name: no request served" >&2; return 1; }
  printf '%-9s %8d requests  %7d instructions per request' "$name" "$n" $((total / n))
  if [ "$cache" = yes ]; then printf '  %5d instruction-cache misses' $((misses / n)); fi
  printf '\n'
  if [ "$atomics" = yes ]; then
    python3 "$here/scripts/callgrind-atomics.py" "$n" "$work"/cg/cg.*.[0-9]* | sed 's/^/          /'
  fi
  if [ -n "${keep:-}" ]; then
    mkdir -p "$keep/$name"
    cp "$work"/cg/cg.*.[0-9]* "$keep/$name/"
    echo "$n" >"$keep/$name/requests"
  fi
}

for target in $only; do
  case $target in
    nginx)
      start 1 "${vg[@]}" nginx -c "$work/px/nginx.conf" -p "$work/px"
      group=$started
      wait_ok "http://127.0.0.1:$ngx_port/"
      measure nginx "$group" "http://127.0.0.1:$ngx_port/"
      kill -TERM -- "-$group" 2>/dev/null || true
      ;;
    plain | policies)
      policies=0
      [ "$target" = policies ] && policies=1
      rm -f "$work/key"
      GW_UPSTREAM="127.0.0.1:$up_port" GW_LISTEN="127.0.0.1:$apim_port" GW_PORT="$apim_port" \
        APIM_BIN="$work/apim" APIM_BENCH_POLICIES=$policies APIM_BENCH_KEY_FILE="$work/key" \
        APIM_BENCH_LOG_FILE="$work/apim.log" start 1 "$here/scripts/gateway-candidate.sh"
      group=$started
      header=""
      if [ $policies = 1 ]; then
        for _ in $(seq 1 240); do [ -s "$work/key" ] && break; sleep 0.5; done
        header="x-api-key: $(cat "$work/key")"
      fi
      wait_ok "http://127.0.0.1:$apim_port/" "$header"
      measure "$target" "$group" "http://127.0.0.1:$apim_port/" "$header"
      kill -TERM -- "-$group" 2>/dev/null || true
      sleep 1
      ;;
    *) echo "unknown target $target (nginx, plain, policies)" >&2; exit 2 ;;
  esac
done
