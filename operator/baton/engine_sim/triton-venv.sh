#!/usr/bin/env bash
# Create (once per machine) the Python environment that runs the engine simulator's Triton front end.
#
#   bash operator/baton/engine_sim/triton-venv.sh [REPO_DIR]      # prints the venv's python on stdout
#
# PyTriton ships a Triton Inference Server whose Python-backend stub is linked against the *system*
# libpython3.11 (Debian's). The interpreter that runs the models must be the same build: a venv made from
# another CPython 3.11 (pyenv, conda, python.org) starts Triton but fails at model load with
# `'_thread.RLock' object has no attribute '_recursion_count'`. So the venv is made from
# /usr/bin/python3.11 (override with BATON_TRITON_PYTHON), whatever python runs the tests.
#
# Location: $BATON_TRITON_VENV, else ${XDG_CACHE_HOME:-~/.cache}/baton-triton-venv/<key>, the key covering
# the pinned versions and the interpreter, so every clone on the machine (CI included) reuses it and a
# version bump makes a new one. The repo's package is installed editable (no dependency resolution
# beyond its own requirements); when another clone calls, or pyproject.toml changed, it is re-installed
# from that checkout (seconds).
# Idempotent and safe to run concurrently (flock). Progress goes to stderr; stdout is only the path.
set -euo pipefail

PYTRITON_VERSION=0.7.0
PY=${BATON_TRITON_PYTHON:-/usr/bin/python3.11}
REPO=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)}
REPO=$(cd "$REPO" && pwd)

say() { echo "[triton-venv] $*" >&2; }
die() { echo "[triton-venv] error: $*" >&2; exit 1; }

if [ ! -x "$PY" ] && [ "$PY" = /usr/bin/python3.11 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  say "installing Debian's python3.11 (apt-get)"
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv libpython3.11 >&2
fi
[ -x "$PY" ] || die "$PY not found: PyTriton needs Debian's python3.11 (as root: apt-get update && apt-get install -y python3.11 python3.11-venv libpython3.11)"
[ -f "$REPO/pyproject.toml" ] || die "$REPO is not the Baton repository (no pyproject.toml)"
PYVER=$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
case "$PYVER" in 3.11.*) ;; *) die "$PY is Python $PYVER; PyTriton's Triton build needs 3.11" ;; esac
"$PY" -c 'import venv, ensurepip' 2>/dev/null || die "$PY lacks venv/ensurepip (as root: apt-get install -y python3.11-venv)"

# the versions everything else in the venv is pinned to (pip freeze of a venv the tests passed with)
CONSTRAINTS=$REPO/operator/baton/engine_sim/triton-constraints.txt
[ -f "$CONSTRAINTS" ] || die "$CONSTRAINTS is missing"
KEY="py$PYVER-pytriton$PYTRITON_VERSION"
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/baton-triton-venv
VENV=${BATON_TRITON_VENV:-$CACHE/$KEY}
mkdir -p "$(dirname "$VENV")"

exec 9>"$VENV.lock"
flock 9

done_marker=$VENV/.baton-complete
repo_marker=$VENV/.baton-repo
# which checkout the editable install points at, and its requirements
repo_id="$REPO $(cat "$REPO/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -c1-16)"
if [ ! -f "$done_marker" ] || ! "$VENV/bin/python" -c 'import pytriton' 2>/dev/null; then
  start=$(date +%s)
  say "creating $VENV from $PY (Python $PYVER), nvidia-pytriton==$PYTRITON_VERSION"
  say "first run: ~110 MB of wheels (Triton server included), ~0.5 GB installed, 1-2 minutes; later runs reuse it"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" --upgrade pip >&2
  # setuptools: Baton's build backend (pyproject's build-system), used in the venv itself below
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" \
    "nvidia-pytriton==$PYTRITON_VERSION" "setuptools>=77" >&2
  # the build backend is in the venv: later re-installs (another clone) need nothing from the network
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" --no-build-isolation \
    -e "$REPO" >&2
  echo "$repo_id" >"$repo_marker"
  "$VENV/bin/python" -c 'import pytriton, baton.engine_sim.triton_frontend' >&2 \
    || die "the new venv cannot import pytriton and baton.engine_sim.triton_frontend"
  touch "$done_marker"
  say "done in $(( $(date +%s) - start ))s; size $(du -sh "$VENV" | cut -f1)"
elif [ "$(cat "$repo_marker" 2>/dev/null)" != "$repo_id" ]; then
  say "pointing the editable install at $REPO (and installing its requirements)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" --no-build-isolation \
    -e "$REPO" >&2
  echo "$repo_id" >"$repo_marker"
fi

echo "$VENV/bin/python"
