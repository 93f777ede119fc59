#!/usr/bin/env bash
# The whole test suite: installs the registries and tools it needs, then runs every test
# (unit tests and the integration binary against real registries on loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
# The registry's own "delete" and token features are exercised by the tests; each test starts its
# own registries on free ports, so tests run in parallel safely.
exec cargo test --locked "$@"
