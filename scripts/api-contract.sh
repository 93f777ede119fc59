#!/usr/bin/env bash
# The API contract: runs schemathesis (from PyPI, in a venv under target/) with every check against
# the service's own /openapi.json, the service started on two local registries with a bearer token.
# Any mismatch between what the description says and what the service answers fails the run.
# Bounded: --max-examples 20 per operation, well under 3 minutes on 2 cores.
#   scripts/api-contract.sh [path/to/mirror-mirror]   (default: target/release, else target/debug)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
SCHEMATHESIS_VERSION=4.32.5
venv=target/schemathesis-venv
if ! "$venv/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
fi
bin=${1:-}
if [ -z "$bin" ]; then
  if [ -x target/release/mirror-mirror ]; then bin=target/release/mirror-mirror; else
    cargo build --locked; bin=target/debug/mirror-mirror; fi
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

read -r up_pid up_port < <(scripts/registry.sh "$work/upstream")
pids+=("$up_pid")
read -r mi_pid mi_port < <(scripts/registry.sh "$work/mirror")
pids+=("$mi_pid")
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
token=$(openssl rand -hex 24)
MIRROR_LISTEN=127.0.0.1:$port MIRROR_DATABASE=$work/m.db MIRROR_TARGET=127.0.0.1:$mi_port/mirror \
  MIRROR_ALLOWED_SOURCES=127.0.0.1:$up_port MIRROR_API_TOKENS=ci=$token MIRROR_LOG=warn \
  MIRROR_DRIFT_INTERVAL=0 MIRROR_GITHUB_WEBHOOK_SECRETS=contract-secret-0123456789 \
  "$bin" serve >"$work/serve.log" 2>&1 &
pids+=("$!")
for _ in $(seq 1 100); do
  curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null && break
  sleep 0.1
done
started=$(date +%s)
status=0
"$venv/bin/st" run "http://127.0.0.1:$port/openapi.json" \
  --checks all --max-examples 20 --workers 1 --request-timeout 20 \
  --header "Authorization: Bearer $token" || status=$?
echo "schemathesis: exit $status in $(( $(date +%s) - started )) s" >&2
if [ "$status" != 0 ]; then
  echo "--- service log (last 40 lines)" >&2
  tail -n 40 "$work/serve.log" >&2
fi
exit "$status"
