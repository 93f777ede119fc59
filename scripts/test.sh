#!/usr/bin/env bash
# The whole test suite: installs the registries and tools it needs, then runs every test (unit
# tests and the integration binary against real registries on loopback ports), then the
# integration binary again with every service on PostgreSQL (MIRROR_TEST_DATABASE=postgres; the
# store's conformance suite runs on both backends either way).
# Arguments go to both cargo runs (a filter: scripts/test.sh drift). MIRROR_TEST_BACKENDS=sqlite
# (or postgres) runs one pass only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
# Each test starts its own registries on free ports, so tests run in parallel safely.
backends=${MIRROR_TEST_BACKENDS:-sqlite postgres}
for backend in $backends; do
    case $backend in
    sqlite) cargo test --locked "$@" ;;
    postgres) MIRROR_TEST_DATABASE=postgres cargo test --locked --test it "$@" ;;
    *) echo "MIRROR_TEST_BACKENDS: unknown backend $backend (sqlite, postgres)" >&2; exit 2 ;;
    esac
done
