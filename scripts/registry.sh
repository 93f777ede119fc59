#!/usr/bin/env bash
# Starts an anonymous CNCF distribution registry on a free loopback port, in the background.
# usage: scripts/registry.sh DIR   → prints "PID PORT"; storage, config and log live in DIR.
set -euo pipefail
dir=$1
mkdir -p "$dir/storage"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$dir/config.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
YML
docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  if curl -fsS -o /dev/null "http://127.0.0.1:$port/v2/" 2>/dev/null; then
    echo "$pid $port"
    exit 0
  fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
echo "error: docker-registry did not start on 127.0.0.1:$port; its log:" >&2
tail -n 20 "$dir/registry.log" >&2
exit 1
