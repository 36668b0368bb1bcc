#!/usr/bin/env bash
# The whole benchmark suite on one GPU, in one go (about 7 minutes on an H200):
# versions and the card, then `python -m benchmarks.loop_forms` and `python -m
# benchmarks.suite`, then the optimized HLO of every sweep it compiled (for reading fusions),
# archived. Results land in $OUT (default
# bench_results/gpu). Extra arguments go to the suite (e.g. --quick, --sections members).
set -u
OUT=${OUT:-bench_results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" || true
# one seed's loop forms first (about a minute): does a scan without control flow, or the
# while loop in CUDA graphs (while+graphs), beat the driver's while loop on this card?
# (benchmarks/loop_forms.py)
quick=""
for a in "$@"; do [ "$a" = "--quick" ] && quick="--quick"; done
timeout 210 "$PY" -m benchmarks.loop_forms $quick --json "$OUT/loop_forms.json" || true
OCLJAX_DUMP_HLO="$OUT/hlo" "$PY" -m benchmarks.suite --out "$OUT" --timeout 420 "$@"
status=$?
if [ -d "$OUT/hlo" ]; then
  tar czf "$OUT/hlo.tgz" -C "$OUT" hlo && rm -rf "$OUT/hlo"
fi
exit "$status"
