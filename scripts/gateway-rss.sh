#!/usr/bin/env bash
# Resident memory of the gateway holding idle keep-alive connections: starts an upstream (nginx
# answering `200 ok`) and a node (scripts/gateway-candidate.sh, plain proxying), reads the
# node's VmRSS, opens N connections that each make one proxied request and stay open, and reads
# VmRSS again; then closes them and opens N new ones whose requests are all in flight at once. Loopback only; everything
# started here is stopped on exit.
#
# Usage, from the repository root after `cargo build --release`:
#   scripts/gateway-rss.sh [N]        (default 1000)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
n="${1:-1000}"
command -v nginx >/dev/null || { echo "missing nginx (apt-get install -y nginx)" >&2; exit 2; }
[ -x "$here/target/release/apim" ] || { echo "build first: cargo build --release" >&2; exit 2; }
up_port=18380 gw_port=18390
# shellcheck source=scripts/loopback.sh
. "$here/scripts/loopback.sh"
nginx_conf "$work/up" "server { listen 127.0.0.1:$up_port backlog=4096; location / { return 200 \"ok\"; } }"
start "" nginx -c "$work/up/nginx.conf" -p "$work/up"
GW_UPSTREAM="127.0.0.1:$up_port" GW_LISTEN="127.0.0.1:$gw_port" GW_PORT="$gw_port" \
  start "" "$here/scripts/gateway-candidate.sh"
node_group=$started
for _ in $(seq 1 100); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$gw_port/" || true)" = 200 ] && break
  sleep 0.1
done
pid=$(pgrep -g "$node_group" -f "apim serve" | head -1)
[ -n "$pid" ] || { echo "the node did not start:" >&2; cat "$work/out.1" >&2; exit 1; }
python3 - "$gw_port" "$pid" "$n" <<'EOF'
import re, socket, sys, time
port, pid, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def rss():
    return int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1)) / 1024

def answered(s):
    s.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"ok"):
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit("a connection was closed")
        data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"unexpected answer: {data[:80]!r}")

request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
idle = rss()
print(f"idle node: {idle:.1f} MiB")
one_by_one = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(request)
    answered(s)
    one_by_one.append(s)
time.sleep(1)
print(f"{n} idle keep-alive connections (one request each, one after another): {rss():.1f} MiB")
for s in one_by_one:
    s.close()
time.sleep(1)
burst = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(request)
    burst.append(s)
for s in burst:
    answered(s)
time.sleep(1)
print(f"{n} idle keep-alive connections (their requests all in flight at once): {rss():.1f} MiB")
EOF
