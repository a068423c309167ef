#!/usr/bin/env bash
# PESC against the dense-LoRA control at equal data, steps and learning rate, over several seeds
# (issue #16), then scored on the large held-out set through the server with default flags and
# compared with a paired bootstrap (python -m training compare).
#
#   bash training/pesc_vs_dense.sh            # everything still missing, then eval + compare
#   SEEDS="1" STAGE=train bash training/pesc_vs_dense.sh   # only the runs of seed 1
#
# Resumable: a finished run (its config.json says "trained") is skipped and an unfinished one
# continues from its checkpoint, bit for bit.  The PESC and dense runs of one seed train side by
# side with one thread each: on a small host two single-thread runs waste less than one
# two-thread run whose OpenMP team stalls whenever anything else wakes up.
set -euo pipefail

PY=${PY:-python}
RUNS=${RUNS:-runs/pvd}
DATA=${DATA:-$RUNS/data}
STEPS=${STEPS:-175}
SEEDS=${SEEDS:-"0 1 2"}
STAGE=${STAGE:-all}  # all | train | eval
OUT=${OUT:-training/results/pesc_vs_dense}
TRAIN="--data $DATA/train.jsonl --lr 0.0005 --max-len 512 --steps $STEPS --no-progress --resume --threads 1"

trained() { [ -f "$1/config.json" ] && grep -q '"status": "trained"' "$1/config.json"; }

if [ "$STAGE" != eval ]; then
  mkdir -p "$RUNS"
  [ -f "$DATA/train.jsonl" ] || $PY -m training data --out "$DATA" > "$RUNS/data.log" 2>&1
  for s in $SEEDS; do
    [ -f "$RUNS/crafted-$s/config.json" ] || $PY -m training craft --base smollm2 --num-experts 8 --topk 2 \
      --adapter-dim 64 --seed "$s" --out "$RUNS/crafted-$s"
    pids=()
    if ! trained "$RUNS/pesc-$s"; then
      $PY -m training train --model "$RUNS/crafted-$s" --out "$RUNS/pesc-$s" --seed "$s" $TRAIN \
        --note "#16 PESC seed $s" >> "$RUNS/pesc-$s.log" 2>&1 &
      pids+=($!)
    fi
    if ! trained "$RUNS/dense-$s"; then
      $PY -m training train --model smollm2 --out "$RUNS/dense-$s" --seed "$s" $TRAIN \
        --note "#16 dense control seed $s" >> "$RUNS/dense-$s.log" 2>&1 &
      pids+=($!)
    fi
    for pid in "${pids[@]}"; do wait "$pid"; done
  done
fi

if [ "$STAGE" != train ]; then
  first=${SEEDS%% *}
  # The untrained craft first: its routers are random, so its routing is the floor against which
  # the trained experts' specialisation (mutual information between domain and expert) counts.
  models=("$RUNS/crafted-$first") labels=("crafted-$first")
  for s in $SEEDS; do
    trained "$RUNS/pesc-$s" && trained "$RUNS/dense-$s" || { echo "seed $s is not trained yet" >&2; exit 1; }
    models+=("$RUNS/pesc-$s" "$RUNS/dense-$s") labels+=("pesc-$s" "dense-$s")
  done
  baselines=()
  for m in "${models[@]:0:${#models[@]}-1}"; do baselines+=(--baseline "$m"); done
  $PY -m training eval --model "${models[-1]}" "${baselines[@]}" --labels "$(IFS=,; echo "${labels[*]}")" \
    --heldout large --serving defaults --out "$OUT"
  pesc=() dense=()
  for s in $SEEDS; do pesc+=("pesc-$s") dense+=("dense-$s"); done
  $PY -m training compare "$OUT/eval.json" --arm "PESC=$(IFS=,; echo "${pesc[*]}")" \
    --arm "dense=$(IFS=,; echo "${dense[*]}")" --out "$OUT"
fi
