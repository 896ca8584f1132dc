#!/usr/bin/env bash
# The GPU measurements on a machine without network: the train-step benchmark on SD 1.5 at
# 512 px under bf16 autocast, one OFT layer at SD 1.5's shapes under bf16 against PEFT, the
# train step of the 100 M-parameter SD-shaped UNet, SD 1.5's checkpointed step recomputing the
# Cayley blocks against keeping them, then 4-step runs of the embedded base under
# trainer=fsdp (FSDP is GPU only) on one GPU and, on a machine with two, over two GPUs, each
# checked for its adapter. About 7 minutes on one H100; each run has a time limit, and results
# are written as they come, so a run cut short keeps what it measured.
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
    fsdp)  # 4 steps of trainer=fsdp on one GPU, then over two when there are two; each must write its adapter.
        gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
        for devices in 1 2; do
            [ "$devices" -le "$gpus" ] || { echo "fsdp on $devices GPUs skipped: $gpus GPU(s)"; continue; }
            dir="$RESULTS/fsdp_${devices}gpu"
            timeout 150 "$PYTHON" -m torch.distributed.run --nproc-per-node "$devices" -m conftrl.train \
                experiment=canny_coft trainer=fsdp trainer.devices="$devices" trainer.max_steps=4 \
                trainer.val_check_interval=2 logger=csv hydra.run.dir="$dir" > "$dir.txt" 2>&1 \
                || echo "fsdp on $devices GPU(s) ended early (status $?)"
            if [ -f "$dir/adapter/conftrl.yaml" ]; then echo "fsdp on $devices GPU(s): adapter written"
            else echo "fsdp on $devices GPU(s): no adapter"; fi
        done ;;
    sdxl) run 280 sdxl_bf16 --models sdxl --methods floor oft coft controlnet --repeats 3 --warmup 1 ;;
    *) echo "unknown section $section (sd15, oft_layers, sd100m, recompute, fsdp, sdxl)" >&2; exit 2 ;;
    esac
done
ls -l "$RESULTS"
