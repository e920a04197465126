# Shared by the gateway's loopback measurement scripts (sourced, not run): a work directory and
# the process groups started, both removed or stopped on exit, and nginx configurations.

work="$(mktemp -d)"
groups=()
cleanup() {
  for g in "${groups[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
  sleep 0.5
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

# nginx_conf DIR SERVER_BLOCKS: a one-worker nginx configuration in DIR/nginx.conf, with its
# temporary files in DIR, no access log, and long-lived keep-alive connections.
nginx_conf() {
  mkdir -p "$1"
  cat >"$1/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $1/cb; proxy_temp_path $1/px; fastcgi_temp_path $1/fc;
  uwsgi_temp_path $1/uw; scgi_temp_path $1/sc;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  $2
}
CONF
}

# start CPUS COMMAND...: runs COMMAND in its own process group (pinned to CPUS unless empty),
# output in the work directory; the group is stopped on exit and left in $started.
start() {
  local cpus="$1"
  shift
  if [ -n "$cpus" ]; then
    setsid taskset -c "$cpus" "$@" >"$work/out.${#groups[@]}" 2>&1 &
  else
    setsid "$@" >"$work/out.${#groups[@]}" 2>&1 &
  fi
  started=$!
  groups+=("$started")
}

# upstream_and_proxy_confs UP_PORT PROXY_PORT: the upstream nginx (answering `200 ok`) in
# $work/up and nginx's keep-alive reverse proxy to it in $work/px, as the shared benchmark
# configures them.
upstream_and_proxy_confs() {
  nginx_conf "$work/up" "server { listen 127.0.0.1:$1 backlog=4096; location / { default_type text/plain; return 200 \"ok\"; } }"
  nginx_conf "$work/px" "upstream backend { server 127.0.0.1:$1; keepalive 256; keepalive_requests 10000000; keepalive_timeout 120s; }
  server { listen 127.0.0.1:$2 backlog=4096; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
}
