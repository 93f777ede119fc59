#!/usr/bin/env bash
# The main command: brings mirror-mirror up on this machine.
#
# With MIRROR_TARGET set, it builds and runs `mirror-mirror serve` with your configuration (see the
# README's configuration table). Without it, it installs and starts two local CNCF distribution
# registries ("upstream" and "mirror"), pushes a small two-platform image upstream, starts the service
# pointed at them, and prints the curl lines that mirror the image and look up its trusted digest.
# Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --locked
bin=$PWD/target/release/mirror-mirror

if [ -n "${MIRROR_TARGET:-}" ]; then
  exec "$bin" serve
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r up_pid up_port < <(scripts/registry.sh "$work/upstream")
pids+=("$up_pid")
read -r mi_pid mi_port < <(scripts/registry.sh "$work/mirror")
pids+=("$mi_pid")
digest=$(python3 scripts/make-image.py "$work/image" --tag 1.0)
skopeo copy --quiet --all --dest-tls-verify=false "oci:$work/image:1.0" "docker://127.0.0.1:$up_port/demo/hello:1.0"

listen=${MIRROR_LISTEN:-127.0.0.1:8080}
token=$(openssl rand -hex 24)
export MIRROR_LISTEN=$listen
export MIRROR_DATABASE=${MIRROR_DATABASE:-$work/mirror-mirror.db}
export MIRROR_TARGET=127.0.0.1:$mi_port/mirror
export MIRROR_ALLOWED_SOURCES=127.0.0.1:$up_port
export MIRROR_API_TOKENS=demo=$token
"$bin" serve &
pids+=("$!")
for _ in $(seq 1 100); do
  curl -fsS -o /dev/null "http://$listen/healthz" 2>/dev/null && break
  sleep 0.1
done
curl -fsS -o /dev/null "http://$listen/healthz"

cat <<TXT

mirror-mirror is serving on http://$listen
  upstream registry: 127.0.0.1:$up_port  holds demo/hello:1.0 = $digest (linux/amd64 + linux/arm64)
  mirror registry:   127.0.0.1:$mi_port  mirrors go under 127.0.0.1:$mi_port/mirror
  database:          $MIRROR_DATABASE

Mirror the image:
  curl -sS -X POST http://$listen/mirror -H 'Authorization: Bearer $token' -H 'Content-Type: application/json' -d '{"image": "127.0.0.1:$up_port/demo/hello:1.0"}'

Watch the job, then look up the trusted digest and the pull line:
  curl -sS http://$listen/jobs/1
  curl -sS http://$listen/images/127.0.0.1:$up_port/demo/hello
  curl -sS http://$listen/digests/$digest

Ctrl-C stops the service and both registries.
TXT
wait "${pids[-1]}"
