#!/usr/bin/env bash
# One prepared pass over every GPU figure the issues ask for, sized for a short lease of one GPU:
# VQ-GAN encode/decode beside the CLIP image encoder (tokenize.py), training tokens/s and MFU against
# HF OPT with MFU by both counts and the data-wait share (train.py), the decode engine against HF generate() and
# the bandwidth bound (generate.py), and cm3 serve under load (serve.py), bf16.
# Each step has its own time limit, so one slow compile cannot eat the others; logs go to OUT_DIR.
#
#   benchmarks/gpu_check.sh OUT_DIR                       # on the GPU machine (python3 = its torch)
#   MODEL=tiny VQ=demo benchmarks/gpu_check.sh /tmp/g     # a quick rehearsal of the script on a CPU
#
# The repository root is the `cm3` package: it is made importable through a symlink, so nothing needs
# installing beyond torch (and transformers for the HF peer; open_clip for the CLIP row, skipped without).
set -u
out=${1:?usage: gpu_check.sh OUT_DIR}
py=${PYTHON:-python3}
model=${MODEL:-350m}
vq=${VQ:-f8-8192}
tokens=${TOKENS:-1024}
seq=${SEQ:-4096}  # the training targets are set at 4096 tokens
mkdir -p "$out"
pkg=$(mktemp -d)
ln -s "$(cd "$(dirname "$0")/.." && pwd)" "$pkg/cm3"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
here=$(dirname "$0")

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT_DIR/NAME.log, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 12 "$out/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

step env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    $py -c 'import torch; print(torch.__version__, torch.cuda.is_available())'"
step tokenize 60 "$py" "$here/tokenize.py" --preset "$vq" --batch-size 64 --batches 10 --json "$out/tokenize.json"
step tokenize_b256 45 "$py" "$here/tokenize.py" --preset "$vq" --batch-size 256 --batches 4
step train_eager 90 "$py" "$here/train.py" --preset "$model" --batch 8 --seq-len "$seq" --steps 3 --rounds 2
step train_compiled 180 "$py" "$here/train.py" --preset "$model" --batch 8 --seq-len "$seq" --steps 5 --rounds 2 \
    --compile
# the decode engine (compiled step, CUDA graphs) vs HF generate() at 16 images and alone at 64, the bandwidth bound,
# int8, and whether its codes equal the eager step's
step generate 420 "$py" "$here/generate.py" --preset "$model" --tokens "$tokens" --images 16 64 --repeats 1 --int8 \
    --check
# cm3 serve under load (needs ray[serve] on the GPU machine): concurrency 1, 8, 32 against the engine alone
step serve 300 "$py" "$here/serve.py" --preset "$model" --max-batch-images 16 --requests 2
