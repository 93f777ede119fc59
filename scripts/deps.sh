#!/usr/bin/env bash
# Installs what mirror-mirror's tests, demo and benchmarks need when it is missing (Debian/Ubuntu):
# the CNCF distribution registry, skopeo (an independent client), htpasswd, openssl; nginx (fronts
# with other registries' rules), buildah and podman (realistic images, a user's pull); jq (the GitHub
# Action's script), Chromium and a CJK font (the status page's test); tinyproxy (a real HTTP proxy),
# docker-credential-pass with pass and gnupg (a real credential helper); wrk and time for the benchmark.
set -euo pipefail

declare -A want=(
  [docker-registry]=docker-registry
  [skopeo]=skopeo
  [htpasswd]=apache2-utils
  [openssl]=openssl
  [curl]=curl
  [nginx]=nginx-light
  [podman]=podman
  [buildah]=buildah
  [jq]=jq
  [chromium]=chromium
  [fc-list]=fontconfig
  [tinyproxy]=tinyproxy
  [docker-credential-pass]=golang-docker-credential-helpers
  [pass]=pass
  [gpg]=gnupg
  [wrk]=wrk
  [/usr/bin/time]=time
)
missing=()
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${want[$cmd]}")
done
# schemathesis (scripts/api-contract.sh) installs from PyPI into a venv.
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
# The status page's test looks at the Chinese page in Chromium: it needs a CJK font.
if ! command -v fc-list >/dev/null 2>&1 || [ -z "$(fc-list :lang=zh 2>/dev/null)" ]; then
  missing+=(fonts-noto-cjk)
fi
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || { echo "error: $cmd is still missing after apt-get install ${want[$cmd]}" >&2; exit 1; }
done
