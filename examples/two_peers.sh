#!/usr/bin/env bash
# A host and a gateway as two processes on this machine, the way two machines
# would run them: the host's first line hands its address to the gateway.
#   bash examples/two_peers.sh
# Ends with one completion through the gateway; both peers stop on exit.
set -euo pipefail
home=$(mktemp -d /tmp/gpunexus-two-peers.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$home"; }
trap cleanup EXIT

mkfifo "$home/host.out" "$home/gateway.out"
GPUNEXUS_HOME="$home/host" gpunexus node serve --model tiny --backend reference --price 0.20 \
    --listen /ip4/127.0.0.1/tcp/0 >"$home/host.out" &
pids+=($!)
exec 3<"$home/host.out"
read -r first <&3                       # "peer: /ip4/127.0.0.1/tcp/PORT/p2p/12D3KooW..."
peer=${first#peer: }
echo "host:    $peer"

GPUNEXUS_HOME="$home/gateway" gpunexus node gateway --port 0 --bootstrap "$peer" >"$home/gateway.out" &
pids+=($!)
exec 4<"$home/gateway.out"
read -r first <&4                       # "base_url: http://127.0.0.1:PORT/v1"
base_url=${first#*: }
echo "gateway: $base_url"

for _ in $(seq 100); do                 # the offer arrives over gossipsub within a heartbeat or two
    curl -fsS "$base_url/models" | grep -q '"tiny' && break
    sleep 0.2
done
curl -fsS "$base_url/chat/completions" -H 'content-type: application/json' \
    -d '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}'
echo
