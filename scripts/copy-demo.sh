#!/usr/bin/env bash
# The main job on a fresh machine: installs the registry and tools, starts two local CNCF
# distribution registries ("upstream" and "mirror"), pushes a small two-platform image upstream,
# copies it with `mirror-mirror copy`, and shows that the mirror serves the same digest.
# Everything it started is stopped when it ends (or on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --locked
bin=target/release/mirror-mirror

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

read -r up_pid up_port < <(scripts/registry.sh "$work/upstream")
pids+=("$up_pid")
read -r mi_pid mi_port < <(scripts/registry.sh "$work/mirror")
pids+=("$mi_pid")
echo "upstream registry: 127.0.0.1:$up_port   mirror registry: 127.0.0.1:$mi_port"

digest=$(python3 scripts/make-image.py "$work/image" --tag 1.0)
skopeo copy --quiet --all --dest-tls-verify=false "oci:$work/image:1.0" "docker://127.0.0.1:$up_port/demo/hello:1.0"
echo "pushed 127.0.0.1:$up_port/demo/hello:1.0 ($digest, linux/amd64 + linux/arm64)"
echo
echo "\$ mirror-mirror copy 127.0.0.1:$up_port/demo/hello:1.0 127.0.0.1:$mi_port/mirror/demo/hello"
pull=$("$bin" copy "127.0.0.1:$up_port/demo/hello:1.0" "127.0.0.1:$mi_port/mirror/demo/hello")
echo "$pull"
echo
served=$(skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$mi_port/mirror/demo/hello:1.0" | sha256sum | cut -d' ' -f1)
echo "skopeo: the mirror's tag 1.0 serves sha256:$served"
if [ "sha256:$served" != "$digest" ]; then
  echo "error: digest changed ($digest upstream)" >&2
  exit 1
fi
skopeo copy --quiet --all --src-tls-verify=false "docker://$pull" "oci:$work/check" >/dev/null
echo "skopeo copied every platform and blob back from the mirror and verified each digest: same digest, byte-exact"
