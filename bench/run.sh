#!/usr/bin/env bash
# The performance benchmark (issue 6): mirror-mirror vs skopeo vs the wire floor, and the service.
# usage: bench/run.sh [--wan] [--smoke] [--rounds N] [--big-mib N] [--images N] [--only abcdef] [--keep] [--no-build]
# Prints the results (markdown) on stdout and writes bench/results.md; progress on stderr.
# Everything runs on loopback; every process it starts is stopped when it ends (or on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
args=()
for a in "$@"; do
  case $a in
    --no-build) build=0 ;;
    -h | --help) exec python3 bench/bench.py --bin /dev/null --help ;;
    *) args+=("$a") ;;
  esac
done

for tool in docker-registry skopeo wrk curl python3 /usr/bin/time; do
  command -v "$tool" >/dev/null || {
    echo "error: $tool is missing (Debian: apt-get install docker-registry skopeo wrk curl python3 time)" >&2
    exit 1
  }
done
if [ "$build" = 1 ]; then
  cargo build --release --quiet >&2
fi
bin=$PWD/target/release/mirror-mirror
[ -x "$bin" ] || { echo "error: $bin is missing; run cargo build --release" >&2; exit 1; }

pid=
cleanup() { if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi; }
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM
script=bench/bench.py
for a in "${args[@]}"; do [ "$a" = --wan ] && script=bench/wan.py; done
python3 "$script" --bin "$bin" "${args[@]}" &
pid=$!
status=0
wait "$pid" || status=$?
pid=
exit "$status"
