#!/usr/bin/env bash
# The GitHub Action's logic (action.yml calls it), runnable anywhere with the variables Actions sets.
#
#   scripts/action.sh install   puts mirror-mirror on PATH: a release binary checked against its
#                               published .sha256, else `cargo install --locked` from the tag
#   scripts/action.sh run       copies each image of INPUT_IMAGES under INPUT_TARGET, writes the job
#                               summary and the `result` output; exits 1 naming the first failure
#
# Environment (action.yml maps its inputs to these):
#   INPUT_IMAGES            one image reference per line (blank lines and # comments ignored)
#   INPUT_TARGET            repository prefix, e.g. ghcr.io/acme/mirror
#   INPUT_LAYOUT            how sources are named under the target: nested (default) or flat
#                           (`copy --layout`, the service's MIRROR_TARGET_LAYOUT)
#   INPUT_PLATFORMS         optional: comma- or newline-separated; each passed as `copy --platform`
#   INPUT_REGISTRY_USERNAME, INPUT_REGISTRY_PASSWORD
#                           credentials for the target registry; when empty and the target is on
#                           ghcr.io: DEFAULT_USERNAME / DEFAULT_PASSWORD (github.actor, github.token);
#                           else the runner's Docker config (docker login) is used as it is
#   INPUT_VERSION           release tag to install (install only; default: the action's own ref)
#   MIRROR_MIRROR_BIN       the binary to run (default: mirror-mirror on PATH)
#   MIRROR_RELEASE_BASE     where releases live (default https://github.com/$ACTION_REPOSITORY/releases/download)
#   GITHUB_STEP_SUMMARY, GITHUB_OUTPUT, RUNNER_TEMP, GITHUB_PATH   as Actions sets them
set -euo pipefail

die() {
  echo "::error title=mirror-mirror::$*"
  echo "error: $*" >&2
  exit 1
}

# Writes a Docker config with the target's credentials (merged over the existing one) and points
# DOCKER_CONFIG at it.
login() {
  local host=$1 user=${INPUT_REGISTRY_USERNAME:-} pass=${INPUT_REGISTRY_PASSWORD:-}
  if [[ -z $user && -z $pass && $host == ghcr.io ]]; then
    user=${DEFAULT_USERNAME:-}
    pass=${DEFAULT_PASSWORD:-}
  fi
  if [[ -z $pass ]]; then
    return 0
  fi
  [[ -n $user ]] || die "registry-password is set but registry-username is empty"
  local dir="${RUNNER_TEMP:-${TMPDIR:-/tmp}}/mirror-mirror-docker-config"
  mkdir -p "$dir"
  chmod 700 "$dir"
  local existing="${DOCKER_CONFIG:-$HOME/.docker}/config.json"
  local base='{}'
  if [[ -f $existing ]]; then base=$(cat "$existing"); fi
  local auth
  auth=$(printf '%s:%s' "$user" "$pass" | base64 -w0)
  jq --arg host "$host" --arg auth "$auth" '.auths[$host] = {auth: $auth}' <<<"$base" >"$dir/config.json"
  chmod 600 "$dir/config.json"
  export DOCKER_CONFIG=$dir
}

cmd_run() {
  local bin=${MIRROR_MIRROR_BIN:-mirror-mirror}
  local target=${INPUT_TARGET:-}
  target=${target%/}
  target=${target,,}
  [[ -n $target ]] || die "the input target is empty: give a repository prefix such as ghcr.io/acme/mirror"
  [[ $target == */* || $target == *.* || $target == *:* ]] ||
    die "target $target does not name a registry: write it in full, such as ghcr.io/acme/mirror"
  local images=()
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line%%#*}
    line="${line#"${line%%[![:space:]]*}"}"
    line="${line%"${line##*[![:space:]]}"}"
    [[ -n $line ]] && images+=("$line")
  done <<<"${INPUT_IMAGES:-}"
  ((${#images[@]})) || die "the input images is empty: give one image reference per line"

  login "${target%%/*}"
  local layout=${INPUT_LAYOUT:-nested}
  local flags=(--json --layout "$layout")
  local p
  if [[ -n ${INPUT_PLATFORMS:-} ]]; then
    "$bin" copy --help 2>/dev/null | grep -q -- '--platform' ||
      die "platforms is set, but this mirror-mirror ($("$bin" --version 2>/dev/null)) has no copy --platform: leave platforms empty (the whole index is copied) or use a release that has it"
    for p in $(tr ',\n' '  ' <<<"$INPUT_PLATFORMS"); do flags+=(--platform "$p"); done
  fi

  local results='[]' failed=0 first_error='' rows=''
  local src dst out err json reason rc note
  err=$(mktemp)
  for src in "${images[@]}"; do
    dst=$target
    echo "mirror-mirror copy $src $dst ${flags[*]}" >&2
    if out=$("$bin" copy "$src" "$dst" "${flags[@]}" 2>"$err"); then
      cat "$err" >&2
      # digest: the official digest the pull line serves (with one platform, that child's as the
      # official index lists it); a subset of several platforms pulls a rebuilt index, which is
      # not official: digest is then the official index's, and the row says so.
      json=$(jq -c --arg src "$src" '{source: $src, ok: true, digest: (if .index_rebuilt == true then .source_digest else .target_digest end), target: .target, pull: .pull, platforms: .platforms, bytes_moved: .bytes_moved} + (if .subset == true then {subset: true, index_rebuilt: .index_rebuilt, source_index_digest: .source_index_digest, children: .children} else {} end)' <<<"$out")
      note=''
      if [[ $(jq -r '.index_rebuilt // false' <<<"$json") == true ]]; then
        note=" (platforms $(jq -r '.platforms | join(", ")' <<<"$json"): a rebuilt index, NOT an official digest; children: $(jq -r '[.children[] | .platform + " " + .digest] | join(", ")' <<<"$json"))"
      elif [[ $(jq -r '.subset // false' <<<"$json") == true ]]; then
        note=" (platform $(jq -r '.platforms[0]' <<<"$json") of $(jq -r .source_index_digest <<<"$json"))"
      fi
      rows+="| \`$src\` | \`$(jq -r .digest <<<"$json")\`$note | \`docker pull $(jq -r .pull <<<"$json")\` |"$'\n'
    else
      rc=$?
      cat "$err" >&2
      reason=$(grep '^error: ' "$err" | tail -n 1 | sed 's/^error: //' || true)
      [[ -n $reason ]] || reason="mirror-mirror copy exited with status $rc and said nothing"
      echo "::error title=mirror-mirror copy $src::$reason"
      json=$(jq -nc --arg src "$src" --arg dst "$dst" --arg e "$reason" '{source: $src, ok: false, target: $dst, error: $e}')
      rows+="| \`$src\` | failed | ${reason//|/\\|} |"$'\n'
      failed=$((failed + 1))
      [[ -n $first_error ]] || first_error="$src: $reason"
    fi
    results=$(jq -c --argjson r "$json" '. + [$r]' <<<"$results")
  done
  rm -f "$err"

  if [[ -n ${GITHUB_STEP_SUMMARY:-} ]]; then
    {
      echo "### mirror-mirror: ${#images[@]} image(s) under \`$target\`"
      echo
      echo "| source | official digest | mirror pull line |"
      echo "|---|---|---|"
      printf '%s' "$rows"
    } >>"$GITHUB_STEP_SUMMARY"
  fi
  local result
  result=$(jq -c --arg target "$target" --argjson failed "$failed" '{target: $target, failed: $failed, images: .}' <<<"$results")
  if [[ -n ${GITHUB_OUTPUT:-} ]]; then
    echo "result=$result" >>"$GITHUB_OUTPUT"
  fi
  echo "$result"
  if ((failed)); then
    echo "error: $failed of ${#images[@]} copies failed; first: $first_error" >&2
    exit 1
  fi
}

cmd_install() {
  local version=${INPUT_VERSION:-}
  [[ -n $version ]] || version=${ACTION_REF:-}
  [[ $version == v* ]] || die "no release to install: set the input version to a release tag such as v0.1.0 (the action's ref ${ACTION_REF:-<none>} is not one)"
  local arch
  case "$(uname -m)" in
    x86_64 | amd64) arch=x86_64 ;;
    aarch64 | arm64) arch=aarch64 ;;
    *) arch=$(uname -m) ;;
  esac
  local name="mirror-mirror-$version-$arch-unknown-linux-musl"
  local base=${MIRROR_RELEASE_BASE:-https://github.com/${ACTION_REPOSITORY:-}/releases/download}
  local dir="${RUNNER_TEMP:-${TMPDIR:-/tmp}}/mirror-mirror-bin"
  mkdir -p "$dir"
  if curl -fsSL --retry 3 -o "$dir/$name" "$base/$version/$name" &&
    curl -fsSL --retry 3 -o "$dir/$name.sha256" "$base/$version/$name.sha256"; then
    local want got
    want=$(awk '{print $1; exit}' "$dir/$name.sha256")
    got=$(sha256sum "$dir/$name" | awk '{print $1}')
    if [[ $want != "$got" ]]; then
      rm -f "$dir/$name"
      die "$name from $base/$version hashes to sha256:$got, but its published .sha256 says $want: not installing it"
    fi
    install -m 0755 "$dir/$name" "$dir/mirror-mirror"
    rm -f "$dir/$name" "$dir/$name.sha256"
    echo "installed $name (sha256:$got)" >&2
  else
    echo "no release binary $name at $base/$version; building with cargo install --locked" >&2
    command -v cargo >/dev/null || die "no release binary for $version and no cargo to build it"
    cargo install --locked --root "$dir/cargo" --git "https://github.com/${ACTION_REPOSITORY:-}" --tag "$version" mirror-mirror >&2 ||
      die "cargo install of mirror-mirror $version failed"
    install -m 0755 "$dir/cargo/bin/mirror-mirror" "$dir/mirror-mirror"
  fi
  "$dir/mirror-mirror" --version >&2
  if [[ -n ${GITHUB_PATH:-} ]]; then echo "$dir" >>"$GITHUB_PATH"; fi
  echo "$dir/mirror-mirror"
}

case "${1:-}" in
  run) cmd_run ;;
  install) cmd_install ;;
  *)
    echo "usage: $0 run | install" >&2
    exit 2
    ;;
esac
