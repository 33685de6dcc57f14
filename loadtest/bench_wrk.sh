#!/usr/bin/env bash
# Cross-check of `neogate loadtest` with wrk (a C load generator): the same buffered chat
# request, closed loop, against a loopback OpenAI-compatible URL.
#
#   loadtest/bench_wrk.sh URL [CONNECTIONS] [SECONDS] [MODEL] [KEY]
#   loadtest/bench_wrk.sh http://127.0.0.1:8080 32 10 llama-3.1-8b sk-...
#
# wrk comes from Debian (`apt-get install wrk`). Loopback URLs only, like the load generator.
set -euo pipefail

url=${1:?usage: bench_wrk.sh URL [CONNECTIONS] [SECONDS] [MODEL] [KEY]}
conns=${2:-32}
secs=${3:-10}
model=${4:-bench-model}
key=${5:-}

command -v wrk >/dev/null || { echo "wrk not found: apt-get install wrk" >&2; exit 2; }

hostport=${url#*://}
hostport=${hostport%%/*}
host=${hostport%:*}
host=${host#[}
host=${host%]}
case "$host" in
  localhost|127.*|::1) ;;
  *) echo "refusing non-loopback host $host" >&2; exit 2 ;;
esac

base=${url%/}
case "$base" in
  */chat/completions) ;;
  */v1) base="$base/chat/completions" ;;
  *) base="$base/v1/chat/completions" ;;
esac

lua=$(mktemp --suffix=.lua)
trap 'rm -f "$lua"' EXIT
prompt=$(printf 'the %.0s' $(seq 1 64))
cat >"$lua" <<EOF
wrk.method = "POST"
wrk.body = '{"model":"$model","messages":[{"role":"user","content":"$prompt"}],"max_tokens":16,"stream":false}'
wrk.headers["Content-Type"] = "application/json"
$( [ -n "$key" ] && echo "wrk.headers[\"Authorization\"] = \"Bearer $key\"" )
local non2xx = 0
response = function(status, headers, body)
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
end
EOF

# One wrk thread: on a 2-core machine the server under test needs the other core.
exec wrk -t1 -c"$conns" -d"${secs}s" --latency -s "$lua" "$base"
