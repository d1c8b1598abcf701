#!/usr/bin/env bash
# The GPU check of the trainer (run on a GPU machine; never by the tests). Writes logs under $1.
#   1. the preflight of the demo set-up on the GPU
#   2. the demo, both stages, bf16 on the GPU
#   3. a short full-size run: random full-size weights, the demo ABC data, 300 optimizer steps
#   4. the demo through torchrun with one process (NCCL), stopped by SIGTERM, then resumed
set -u
out=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" >> "$out/gpu.txt"

python3 test_lora_setup.py --demo > "$out/1_preflight.log" 2>&1; echo "preflight rc=$?" >> "$out/summary.txt"

python3 train_clamp3_lora.py --demo --output-dir /tmp/gpu_demo > "$out/2_demo.log" 2>&1
echo "demo rc=$?" >> "$out/summary.txt"

python3 train_clamp3_lora.py --preset full --text-model demo/tokenizer --stages abc \
    --abc-train demo/abc_train.jsonl --abc-eval demo/abc_eval.jsonl --batch-size 32 --epochs 50 \
    --warmup-steps 20 --checkpoints-per-epoch 1 --num-workers 8 --output-dir /tmp/gpu_full \
    > "$out/3_full.log" 2>&1
echo "full-size rc=$?" >> "$out/summary.txt"
cp /tmp/gpu_full/logs/lora/ABC_history.json "$out/3_full_history.json" 2>/dev/null
cp /tmp/gpu_full/logs/lora/ABC_curves.png "$out/3_full_curves.png" 2>/dev/null

torchrun --standalone --nproc_per_node=1 train_clamp3_lora.py --demo --epochs 4 \
    --output-dir /tmp/gpu_ddp --fault-inject sigterm@15 > "$out/4_torchrun_stop.log" 2>&1
echo "torchrun sigterm rc=$? (expect 143 or torchrun's non-zero)" >> "$out/summary.txt"
torchrun --standalone --nproc_per_node=1 train_clamp3_lora.py --demo --epochs 4 \
    --output-dir /tmp/gpu_ddp --resume auto > "$out/4_torchrun_resume.log" 2>&1
echo "torchrun resume rc=$?" >> "$out/summary.txt"
cat "$out/summary.txt"
