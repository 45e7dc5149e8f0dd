#!/usr/bin/env bash
# Every GPU check in one short run, on a CUDA machine where `python3 -c "import celltron"` works
# (run from the repository root). Each step has its own time limit, logs to OUT/NAME.log and
# prints its tail, so one failing step does not hide the others.
#
#   bash benchmarks/gpu_checks.sh [OUT]        # default runs/gpu_checks
#
# On a machine whose Python has torch, lightning and huggingface_hub but not the rest (the lent
# H200 image: Python 3.12, transformers 5.17), bring wheels built for it and put them first:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl zarr==3.1.6 anndata==0.12.19 numcodecs==0.16.6 donfig==0.8.1.post1 array-api-compat==1.16.0 \
#       legacy-api-wrap==1.5 natsort==8.4.0 scverse-misc==0.0.3 session-info2==0.4.1 google-crc32c==1.9.0 \
#       transformers==5.24.0 torchdata==0.11.0 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 \
#       annotated-types==0.8.0 typing-inspection==0.4.5
#   DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
#   (there) pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#
# Steps: the GPU-marked tests (varlen attention, bf16 embeddings); forward+backward throughput
# and MFU of each family, padded vs packed (benchmarks/model_throughput.py); pretraining the
# 104M Geneformer on the demo corpus in bf16 with packed batches (metrics.csv has MFU), also under
# DeepSpeed ZeRO-2 when deepspeed imports; GRN in-silico deletion speed and `celltron embed`
# speed with that model.
set -uo pipefail
OUT=${1:-runs/gpu_checks}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc, $((SECONDS - start)) s"
    grep -v -E "it/s]|s/it]|Warning|warn\(" "$OUT/$name.log" | tail -n "${TAIL:-12}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"

CORPUS=$OUT/demo_corpus
$PY -c "from pathlib import Path; from celltron.corpus.demo import build_demo_corpus; build_demo_corpus(Path('$CORPUS'), progress=False)"

step gpu_tests 150 $PY -m pytest -q -m gpu -p no:cacheprovider tests/model_zoo/test_gpu.py tests/lab/test_embed.py
TAIL=20 step model_throughput 150 $PY -m benchmarks.model_throughput --device cuda --steps 10

COMMON=(--set logging.wandb=false --set logging.progress_bar=false --set trainer.log_every=10 --set trainer.val_every=100
        --set data.val_batches=4 --set trainer.checkpoint_every=100000)
step pretrain_104M_bf16 200 $PY -m celltron.cli pretrain configs/pretrain/geneformer_104M.yaml --corpus "$CORPUS" \
    --out "$OUT/p104" --strategy ddp --devices 1 --max-steps 150 "${COMMON[@]}"
$PY - "$OUT/p104/metrics.csv" <<'EOF'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("tokens_per_s")]
late = rows[len(rows) // 2:]
mean = lambda key: sum(float(r[key]) for r in late if r[key]) / max(1, sum(1 for r in late if r[key]))
print(f"104M pretraining, second half of the run: tokens/s {mean('tokens_per_s'):,.0f}  MFU {mean('mfu'):.1%}  "
      f"data wait {mean('data_wait'):.1%}  last loss {rows[-1]['loss']}")
EOF

DEMO=celltron/data/demo/pbmc3k_raw.h5ad
step grn_in_silico_104M 100 $PY -m celltron.cli grn --model "$OUT/p104/export" --data "$DEMO" --method in-silico \
    --out "$OUT/grn104" --max-cells 200 --top-genes 500
step embed_104M 90 $PY -m celltron.cli embed --model "$OUT/p104/export" --data "$DEMO" --out "$OUT/embedded.h5ad" \
    --batch-size 64 --no-progress
$PY - "$OUT" <<'EOF'
import sys, time
from celltron.lab.embed import embed
start = time.perf_counter(); cells = embed(sys.argv[1] + "/p104/export", "celltron/data/demo/pbmc3k_raw.h5ad", batch_size=64)
print(f"embed, 104M geneformer, bf16: {len(cells) / (time.perf_counter() - start):,.0f} cells/s (model load included)")
EOF

if $PY -c "import deepspeed" 2>/dev/null; then
    step pretrain_104M_zero2 120 $PY -m celltron.cli pretrain configs/pretrain/geneformer_104M.yaml --corpus "$CORPUS" \
        --out "$OUT/p104_zero2" --strategy deepspeed_stage_2 --devices 1 --max-steps 60 "${COMMON[@]}"
fi
echo "=== done"
