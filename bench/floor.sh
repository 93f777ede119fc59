#!/usr/bin/env bash
# The wire floor: the least an image copy can do over HTTP, with no verification at all.
# Each blob is one `curl` GET piped into one monolithic PUT (POST an upload session, then
# `curl -T - PUT <location>&digest=…`); then each child manifest, then the top one by tag, each one
# GET piped into one PUT. Blobs (and child manifests) run JOBS at a time, as mirror-mirror's --jobs.
#
# usage: floor.sh SRC_REGISTRY/SRC_REPO DST_REGISTRY/DST_REPO JOBS PLAN
# PLAN lines: `blob DIGEST` | `child DIGEST MEDIA_TYPE` | `top DIGEST TAG MEDIA_TYPE` (written by bench.py)
set -euo pipefail
src=$1 dst=$2 jobs=$3 plan=$4
export SRC_REG=${src%%/*} SRC_REPO=${src#*/} DST_REG=${dst%%/*} DST_REPO=${dst#*/}

blob() {
  local d=$1 loc sep
  loc=$(curl -sSf -X POST -D - -o /dev/null "http://$DST_REG/v2/$DST_REPO/blobs/uploads/" |
    tr -d '\r' | awk 'tolower($1) == "location:" { print $2 }')
  case $loc in http*) ;; *) loc="http://$DST_REG$loc" ;; esac
  sep='?'
  case $loc in *\?*) sep='&' ;; esac
  curl -sSf "http://$SRC_REG/v2/$SRC_REPO/blobs/$d" |
    curl -sSf -X PUT -T - -H 'Content-Type: application/octet-stream' -o /dev/null "$loc${sep}digest=$d"
}

manifest() {
  local d=$1 ref=$2 mt=$3
  curl -sSf -H "Accept: $mt" "http://$SRC_REG/v2/$SRC_REPO/manifests/$d" |
    curl -sSf -X PUT -T - -H "Content-Type: $mt" -o /dev/null "http://$DST_REG/v2/$DST_REPO/manifests/$ref"
}
export -f blob manifest

awk '$1 == "blob" { print $2 }' "$plan" | xargs -r -P "$jobs" -n 1 bash -c 'blob "$1"' _
awk '$1 == "child" { print $2, $2, $3 }' "$plan" | xargs -r -P "$jobs" -L 1 bash -c 'manifest "$@"' _
awk '$1 == "top" { print $2, $3, $4 }' "$plan" | xargs -r -L 1 bash -c 'manifest "$@"' _
