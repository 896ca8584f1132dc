#!/usr/bin/env bash
# The GPU measurements on a machine without network: the train-step benchmark on SD 1.5 at
# 512 px under bf16 autocast, one OFT layer at SD 1.5's shapes under bf16 against PEFT, the
# train step of the 100 M-parameter SD-shaped UNet, SD 1.5's checkpointed step recomputing the
# Cayley blocks against keeping them, then a 4-step run of the embedded base under
# trainer=fsdp on one GPU (FSDP is GPU only). About 6 minutes on one H100; each run has
# a time limit (under 9 minutes in all), and results are written as they come, so a run cut
# short keeps what it measured.
#
# `bash benchmarks/gpu.sh sdxl` runs instead SDXL's train step at 1024 px, batch 4, gradient
# checkpointing and bf16 autocast: peak memory and time of the control encoder alone, OFT, COFT
# and ControlNet, each in a fresh process (under 5 minutes). Sections can be listed together.
#
# The machine needs Python 3.12 with torch (CUDA), lightning, transformers, peft,
# opencv-python-headless and safetensors. diffusers, Hydra and the few packages they add that
# those do not bring come from the wheel folder `make gpu-wheels` fills (GPU_WHEELS, default
# .gpu-wheels); they are installed into a temporary folder put first on PYTHONPATH, and the
# machine's own packages stay as they are.
#
#     bash benchmarks/gpu.sh [sd15 oft_layers sd100m recompute fsdp | sdxl]   # JSON + Markdown in $OUT if set, else outputs/benchmarks
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
RESULTS=${OUT:-outputs/benchmarks}
mkdir -p "$RESULTS"

SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
"$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())"

# `timeout` signals its whole process group, so the per-method worker processes stop with it.
run() {  # run SECONDS NAME ARGS...
    local limit=$1 name=$2
    shift 2
    timeout "$limit" "$PYTHON" benchmarks/train_step.py --device cuda --precision bf16 \
        --out "$RESULTS/train_step_$name.json" "$@" || echo "train_step $name ended early (status $?)"
}
for section in ${*:-sd15 oft_layers sd100m recompute fsdp}; do
    case $section in
    sd15) run 240 sd15_bf16 --models sd15 --repeats 5 --warmup 2 ;;
    oft_layers)
        timeout 60 "$PYTHON" benchmarks/oft_layers.py --device cuda --dtype bf16 --repeats 11 \
            --out "$RESULTS/oft_layers_bf16.json" > "$RESULTS/oft_layers_bf16.txt" || echo "oft_layers ended early (status $?)" ;;
    sd100m) run 120 sd100m_bf16 --models sd100m --repeats 5 --warmup 2 ;;
    recompute)
        timeout 50 "$PYTHON" benchmarks/recompute.py --model sd15 --batch 16 --device cuda --dtype bf16 --repeats 3 \
            --modes recompute keep --out "$RESULTS/recompute_sd15_bf16.json" || echo "recompute ended early (status $?)" ;;
    fsdp)  # One GPU: conftrl.train refuses FSDP over several until the watchers gather its shards.
        timeout 60 "$PYTHON" -m conftrl.train experiment=canny_coft trainer=fsdp trainer.devices=1 \
            trainer.max_steps=4 trainer.val_check_interval=2 logger=csv hydra.run.dir="$RESULTS/fsdp_run" \
            > "$RESULTS/fsdp_run.txt" 2>&1 || echo "fsdp run ended early (status $?)" ;;
    sdxl) run 280 sdxl_bf16 --models sdxl --methods floor oft coft controlnet --repeats 3 --warmup 1 ;;
    *) echo "unknown section $section (sd15, oft_layers, sd100m, recompute, fsdp, sdxl)" >&2; exit 2 ;;
    esac
done
ls -l "$RESULTS"
