#!/usr/bin/env bash
# Seeds and objectives on XTREME Tatoeba: fine-tunes multilingual-e5-small with each objective
# and seed at the README's budget, scoring XTREME's 36 Tatoeba languages after training. The
# starting model is evaluated once, by the first run; the others reuse that evaluation
# (--before-from). A run whose evaluation.json exists is skipped, so the script can be stopped
# and started again.
#
#   examples/pretrain_xnli/seeds.sh MODEL_DIR OUT_DIR [OBJECTIVES] [SEEDS] [TAG FLAGS...]
#
# OBJECTIVES and SEEDS are space-separated lists (default: "ml-ctl sentence-cz-nce
# sentence-infonce" and "0 1 2"); runs go seed by seed, so a partial campaign stays balanced.
# TAG and the flags after it make a variant: runs OUT_DIR/OBJECTIVE-TAG-seedN with those flags
# added, e.g. `... ml-ctl "0 1 2" word8 --word-layers 8`.
# PRETRAIN_XNLI names the binary to run (default: cargo's release build of the example).
set -euo pipefail
model=${1:?model directory}
out=${2:?output directory}
objectives=${3:-ml-ctl sentence-cz-nce sentence-infonce}
seeds=${4:-0 1 2}
tag=${5:+-$5}
extra=("${@:6}")
here=$(cd "$(dirname "$0")/../.." && pwd)
if [ -z "${PRETRAIN_XNLI:-}" ]; then
  cargo build --release --example pretrain_xnli --manifest-path "$here/Cargo.toml"
  PRETRAIN_XNLI=$here/target/release/examples/pretrain_xnli
fi
a=$here/tests/fixtures/align
mkdir -p "$out"
# Any finished run of this directory has the starting model's evaluation.
first=$(find "$out" -mindepth 2 -maxdepth 2 -name evaluation.json -printf '%h\n' 2>/dev/null | sort | head -1)
for seed in $seeds; do
  for objective in $objectives; do
    name=$objective$tag-seed$seed
    run=$out/$name
    if [ -f "$run/evaluation.json" ]; then
      continue
    fi
    rm -rf "$run"
    reuse=()
    if [ -n "$first" ]; then reuse=(--before-from "$first"); fi
    echo "== $run ($(date -u +%FT%TZ))"
    /usr/bin/time -v "$PRETRAIN_XNLI" --model "$model" --objective "$objective" --seed "$seed" \
      --steps 120 --batch-size 32 --max-len 32 --lr 2e-5 --head-lr 1e-3 --warmup 12 \
      --freeze-embeddings \
      --gold "$a/roen.gold" --gold-input "$a/roen.src-tgt" \
      --gold "$a/jaen.gold" --gold-input "$a/jaen.src-tgt" \
      --tatoeba xtreme "${reuse[@]}" "${extra[@]}" --out "$run" 2> >(tee "$out/$name.log" >&2)
    first=${first:-$run}
  done
done
