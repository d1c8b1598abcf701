#!/usr/bin/env bash
# The multi-GPU check of the trainer, for a machine with 2 GPUs (never run by the tests). ONE call
# of its own, under 10 minutes:
#     bash bench/multi_gpu.sh OUT_DIR                 # 2 GPUs: NCCL, bf16
#     DEVICE=cpu bash bench/multi_gpu.sh OUT_DIR      # the same checks on the CPU (gloo, fp32), to try it
#     bash bench/multi_gpu.sh --help                  # this text
# Environment: DEVICE (cuda, the default, or cpu), BUDGET_S (seconds for the whole run, default 520),
# STEPS (the letters of the steps to run, default abcdef; the others are reported as SKIP),
# EFF_MIN (the scaling efficiency that passes, default 0.8), TRAINER_FLAGS (extra flags for every
# trainer run, e.g. --no-cuda-graphs), DDP_VARIANT (ddp_step.py's --variant, default fast).
# Each step writes its log into OUT_DIR (trainer outputs under OUT_DIR/runs), and each check one line
# into OUT_DIR/summary.txt: PASS or FAIL, then its numbers (SKIP: does not apply with DEVICE=cpu).
# A failed step never stops the script. Every command runs under `timeout`, and the whole run keeps
# within BUDGET_S seconds (default 520, so that the call with its set-up stays under 10 minutes):
# each step's timeout is cut so that the later steps keep their minimum, and a step with too little
# time left is not started (FAIL, "no time"). On 2 H100s, step a alone took ~3 minutes (the
# full-size model compiled and its graphs captured in each run): 270 s was too little for all steps.
# Trainer runs: the demo set-up (tiny preset, bundled data), ABC stage only, seed 0.
#   a. nvidia-smi (GPUs, driver, topology), then bench/ddp_step.py -- the trainer's step under DDP,
#      full-size model, 512 patches, 128 text tokens, batch 32 per GPU, bf16 -- with 1 process, then
#      2: samples/s, ms/step, peak memory each, and the scaling efficiency
#      total(2) / (2 x total(1)), PASS when >= EFF_MIN (default 0.8; not judged on the CPU).
#   b. equality: the demo's ABC stage (tiny preset) trained by 1 process with --batch-size 16 and by
#      torchrun with 2 processes and --batch-size 8: the same global batch, seed and data order. Dropout
#      is OFF (--lora-dropout 0 --encoder-dropout 0): each rank draws its own dropout masks, so with
#      dropout the two runs differ by design (tests/test_distributed_sampler.py does the same on the
#      CPU). The two adapters (adapters/lora_abc_adapter/adapter_model.safetensors) are compared tensor
#      by tensor: max abs diff and max norm-relative error |a-b|/|b|; PASS when the relative error is
#      <= 1e-2 (bf16 on the GPU; 1e-5 on the CPU, where everything runs in fp32).
#   c. SIGTERM: a 2-process demo run gets a real SIGTERM, sent to the torchrun launcher as soon as its
#      steps log (logs/lora/ABC_steps.jsonl) shows it in the middle of epoch 2 or later. PASS when the
#      launcher exits non-zero, no trainer process is left, exactly one emergency checkpoint exists
#      and the resume command is printed. Then the same command with --resume auto (2 processes) must
#      resume from that checkpoint and finish: rc 0, the final adapter written.
#   d. OOM: --fault-inject oom@3:1 (an out-of-memory error in the forward pass of step 3 on rank 1
#      only), 2 processes, `timeout 120`: rc 0 (no hang), and step 3 skipped as "oom" in rank 0's
#      steps log and history. Rank 0 itself had no error: had it not skipped too, its collectives
#      would no longer match rank 1's and the job would hang (or fail) instead.
#   e. only if time is left: c's run without the interruption; its adapter against the resumed one.
#      The difference is reported, not judged (exactness is not required on the GPU).
#   f. only on the GPU and if time is left: b again with --precision fp32 (no bf16 rounding; attention
#      then runs as SDPA over padded rows), PASS when the relative error is <= 1e-4. If b fails its
#      bf16 tolerance, this tells rounding noise (f passes) from a real difference (f fails too).
set -u
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
    sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
out=${1:?usage: [DEVICE=cpu] [BUDGET_S=520] [EFF_MIN=0.8] bash bench/multi_gpu.sh OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1   # the repository root
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-520}
STEPS=${STEPS:-abcdef}
EFF_MIN=${EFF_MIN:-0.8}
runs=$out/runs
summary=$out/summary.txt
rm -rf "$runs" "$out"/ddp_*.json
mkdir -p "$runs"
: > "$summary"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# NVLink multicast stays off (DDP here does not need it; shared GPU hosts require it off)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset CLAMP3_LORA_FAULTS CLAMP3_LORA_TEST_NO_RNG_RESTORE

if [ "$DEVICE" = cpu ]; then
    dev=(--device cpu)              # the trainer never falls back to the CPU by itself
    ddp_flags=(--smoke --device cpu)
    eq_tol=1e-5; stop_epochs=8
else
    dev=()
    ddp_flags=(--variant "${DDP_VARIANT:-fast}")
    eq_tol=1e-2; stop_epochs=12
fi
eq_epochs=2
trainer=(train_clamp3_lora.py --demo --stages abc --seed 0 --dist-timeout-s 90 "${dev[@]}" ${TRAINER_FLAGS:-})
torchrun2=(torchrun --standalone --nproc_per_node=2)

started=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - started))); }
# limit N RESERVE: a step's timeout: N seconds, or less so that RESERVE seconds stay for the later
# steps (the sum of their minimum times: a 30 s, b 30 s each, c1 40 s, c2 30 s, d 30 s)
limit() { local t=$(($(left) - $2)); ((t > $1)) && t=$1; ((t < 1)) && t=1; echo "$t"; }
want() { [[ $STEPS == *$1* ]]; }
# enough N RESERVE NAME: whether the step NAME can start: its letter is in STEPS (else SKIP) and it
# has at least N seconds of its own (else FAIL)
enough() {
    want "${3:0:1}" || { check SKIP "$3" "not in STEPS=$STEPS"; return 1; }
    (($(limit 100000 "$2") >= $1)) && return 0
    check FAIL "$3" "no time: $(left) s of the ${BUDGET_S} s budget left"
    return 1
}
check() { printf '%-4s  %-24s %s\n' "$1" "$2" "$3" | tee -a "$summary"; }
say() { echo "== $(date +%T) (+$((SECONDS - started)) s) $*"; }
# sweep MARKER: kill (by id) any process left over whose command line holds the unique MARKER
sweep() {
    local pids
    pids=$(pgrep -f -- "$1" | grep -vx "$$")
    [ -n "$pids" ] && { echo "killing left-over processes: $pids"; kill -KILL $pids 2>/dev/null; }
    return 0
}
# compare OUT_A OUT_B EPOCHS TOL: the two runs' adapters (and final epoch weights, loss curves)
compare() {
    python3 - "$@" <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
from clamp3_lora import checkpoint
a, b, epochs, tol = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])

def errors(x, y):
    """(max abs diff, max norm-relative error and its tensor, relative error of all tensors together)"""
    assert set(x) == set(y), f"different tensors: {sorted(set(x) ^ set(y))}"
    x = {k: v.double() for k, v in x.items()}
    y = {k: v.double() for k, v in y.items()}
    worst = max(x, key=lambda k: (x[k] - y[k]).norm() / y[k].norm().clamp(min=1e-30))
    rel = ((x[worst] - y[worst]).norm() / y[worst].norm().clamp(min=1e-30)).item()
    total = sum(((x[k] - y[k]) ** 2).sum() for k in x).sqrt() / sum((y[k] ** 2).sum() for k in y).sqrt()
    return max((x[k] - y[k]).abs().max().item() for k in x), rel, worst, total.item()

adapter = lambda o: load_file(str(o / "adapters/lora_abc_adapter/adapter_model.safetensors"))
final = lambda o: checkpoint.read(o / f"logs/lora/ABC_checkpoint_epoch{epochs}.pth")["lora"]
best = lambda o: json.loads((o / "adapters/lora_abc_adapter/training_record.json").read_text())["epoch"]
losses = lambda o: [json.loads(l)["loss"] for l in (o / "logs/lora/ABC_steps.jsonl").read_text().splitlines()]
max_abs, rel, worst, total = errors(adapter(a), adapter(b))
f_abs, f_rel, _, _ = errors(final(a), final(b))
la, lb = losses(a), losses(b)
curve = max(abs(p - q) for p, q in zip(la, lb) if p is not None and q is not None) if len(la) == len(lb) else float("nan")
print(f"adapter ({len(adapter(a))} tensors, best epochs {best(a)}/{best(b)}): max abs diff {max_abs:.2e}, "
      f"max rel err {rel:.2e} ({worst.split('.layer.')[-1]}), all tensors {total:.2e}; final epoch-{epochs} "
      f"weights: max abs {f_abs:.2e}, max rel {f_rel:.2e}; loss curves ({len(la)}/{len(lb)} steps) "
      f"max diff {curve:.2e}; tolerance {tol:g}")
sys.exit(0 if rel <= tol else 1)
EOF
}

# --------------------------------------------------------------------------------------------
say "a. GPUs and DDP throughput (DEVICE=$DEVICE, budget $BUDGET_S s)"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpus', torch.cuda.device_count(), 'transformers', transformers.__version__, 'peft', peft.__version__)" \
    > "$out/a0_gpus.log" 2>&1
if command -v nvidia-smi > /dev/null; then
    { timeout 30 nvidia-smi; timeout 30 nvidia-smi topo -m; } >> "$out/a0_gpus.log" 2>&1
    gpus=$(timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)
    count=$(echo "$gpus" | grep -c .)
    status=FAIL; [ "$count" -ge 2 ] && status=PASS
    check $status "a0 gpus" "$count GPU(s): $(echo "$gpus" | sort | uniq -c | sed 's/^ *//' | paste -sd';'); $(head -1 "$out/a0_gpus.log")"
else
    [ "$DEVICE" = cpu ] && status=SKIP || status=FAIL
    check $status "a0 gpus" "no nvidia-smi; $(head -1 "$out/a0_gpus.log")"
fi

for n in 1 2; do
    name="a$n ddp_step nproc=$n"
    reserve=$((n == 1 ? 190 : 160))
    enough $((n == 1 ? 60 : 100)) $reserve "$name" || continue
    timeout -k 20 "$(limit $((n == 1 ? 180 : 150)) $reserve)" torchrun --standalone \
        --nproc_per_node=$n bench/ddp_step.py --out "$out" "${ddp_flags[@]}" > "$out/a${n}_ddp_step.log" 2>&1
    rc=$?
    sweep "ddp_step.py --out $out"
    if [ $rc = 0 ] && [ -f "$out/ddp_$n.json" ]; then
        check PASS "$name" "$(python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(
            f\"{r['samples_per_s_total']:.1f} samples/s total (per rank {', '.join(f'{x:.1f}' for x in r['samples_per_s_per_rank'])}), \"
            f\"{r['ms_per_step']:.2f} ms/step, peak {r['peak_gib']:.2f} GiB (reserved {r.get('reserved_gib', 0):.2f}), batch {r['batch_per_rank']}/rank, world {r['world_size']} \"
            f\"({r['backend']}), {r['card']}, {r['preset']} {r['patches']} patches, warm-up {r['warmup_s']:.0f} s\")" "$out/ddp_$n.json")"
    else
        check FAIL "$name" "rc=$rc$([ $rc = 124 ] && echo ' (timed out)'); see a${n}_ddp_step.log"
    fi
done
if [ -f "$out/ddp_1.json" ] && [ -f "$out/ddp_2.json" ]; then
    line=$(python3 - "$out/ddp_1.json" "$out/ddp_2.json" "$EFF_MIN" "$DEVICE" <<'EOF'
import json, sys
one, two = (json.load(open(p)) for p in sys.argv[1:3])
efficiency = two["samples_per_s_total"] / (2 * one["samples_per_s_total"])
judged = sys.argv[4] != "cpu"
ok = efficiency >= float(sys.argv[3]) or not judged
print(("PASS" if ok else "FAIL") + f" efficiency {efficiency:.3f} = {two['samples_per_s_total']:.1f} / "
      f"(2 x {one['samples_per_s_total']:.1f}) samples/s; ms/step {one['ms_per_step']:.2f} -> "
      f"{two['ms_per_step']:.2f}; " + (f"threshold {sys.argv[3]}" if judged else "not judged on the CPU"))
EOF
    )
    check "${line%% *}" "a3 scaling 1->2" "${line#* }"
elif want a; then
    check FAIL "a3 scaling 1->2" "needs both ddp_1.json and ddp_2.json"
fi

# --------------------------------------------------------------------------------------------
say "b. 1 process (batch 16) == 2 processes (batch 8 each), dropout off"
eq=("${trainer[@]}" --epochs "$eq_epochs" --lora-dropout 0 --encoder-dropout 0)
rc1=skipped; rc2=skipped
if enough 30 130 "b1 one process"; then
    timeout -k 20 "$(limit 150 130)" python3 "${eq[@]}" --batch-size 16 --output-dir "$runs/b_one" \
        > "$out/b1_one_process.log" 2>&1
    rc1=$?
    sweep "$runs/b_one"
fi
if enough 30 100 "b2 two processes"; then
    timeout -k 20 "$(limit 120 100)" "${torchrun2[@]}" "${eq[@]}" --batch-size 8 --output-dir "$runs/b_two" \
        > "$out/b2_two_processes.log" 2>&1
    rc2=$?
    sweep "$runs/b_two"
fi
if [ "$rc1" = 0 ] && [ "$rc2" = 0 ]; then
    line=$(compare "$runs/b_two" "$runs/b_one" "$eq_epochs" "$eq_tol" 2> "$out/b3_compare.log")
    status=$?
    [ $status = 0 ] && status=PASS || status=FAIL
    check $status "b equality 1 vs 2 proc" "dropout 0, ${eq_epochs} epochs, global batch 16: ${line:-compare failed, see b3_compare.log}"
elif want b; then
    check FAIL "b equality 1 vs 2 proc" "trainer rc: 1 process $rc1, 2 processes $rc2 (124: timed out); see b1_*, b2_* logs"
fi

# --------------------------------------------------------------------------------------------
say "c. SIGTERM to the torchrun launcher mid-epoch, then --resume auto"
stop=("${trainer[@]}" --epochs "$stop_epochs" --batch-size 4 --output-dir "$runs/c_stop")
stopped=no
if enough 40 60 "c1 sigterm"; then
    t0=$SECONDS
    timeout -k 20 "$(limit 150 60)" "${torchrun2[@]}" "${stop[@]}" > "$out/c1_sigterm.log" 2>&1 &
    guard=$!    # the timeout process; the torchrun launcher is its child, the trainers are the launcher's
    steps=$runs/c_stop/logs/lora/ABC_steps.jsonl
    at=""
    while kill -0 $guard 2> /dev/null; do    # wait for a step in the middle of epoch 2 or later
        if [[ $(tail -n 1 "$steps" 2> /dev/null) =~ \"epoch\":\ ([0-9]+),\ \"batch\":\ ([0-9]+) ]]; then
            epoch=${BASH_REMATCH[1]}; batch=${BASH_REMATCH[2]}
            if ((epoch >= 2 && batch >= 4 && batch <= 16)); then at="epoch $epoch, batch $batch"; break; fi
        fi
        sleep 0.1
    done
    launcher=$(pgrep -P $guard | head -1)
    workers=$([ -n "$launcher" ] && pgrep -P "$launcher" -f train_clamp3_lora.py | paste -sd' ')
    if [ -n "$at" ] && [ -n "$launcher" ]; then
        ran=$((SECONDS - t0)); t0=$SECONDS
        echo "SIGTERM to the torchrun launcher $launcher (trainers: $workers) after $ran s, at $at"
        kill -TERM "$launcher"
        wait $guard
        rc=$?
        took=$((SECONDS - t0))
        left_over=""
        for pid in $launcher $workers $(pgrep -f -- "$runs/c_stop"); do
            kill -0 "$pid" 2> /dev/null && left_over="$left_over $pid"
        done
        sweep "$runs/c_stop"
        emergencies=$(find "$runs/c_stop/logs/lora" -name '*emergency*' | wc -l)
        saved=$(grep -c "emergency checkpoint (SIGTERM) saved" "$out/c1_sigterm.log")
        resume_line=$(grep -A1 "Resume with:" "$out/c1_sigterm.log" | tail -1 | sed 's/^ *//')
        where=$(python3 -c "import sys; from clamp3_lora import checkpoint; s = checkpoint.read(sys.argv[1]); \
p = s['progress']; print(f\"epoch {p['epoch'] + 1}, batch {p['batch']}, {p['optimizer_steps']} optimizer steps, world size {s['world_size']}\")" \
            "$runs/c_stop/logs/lora/ABC_emergency_checkpoint.pth" 2> /dev/null)
        status=PASS
        [ $rc = 0 ] || [ $rc = 124 ] || [ $rc = 137 ] && status=FAIL
        [ -z "$left_over" ] && [ "$emergencies" = 1 ] && [ "$saved" = 1 ] || status=FAIL
        [ "$(echo $workers | wc -w)" = 2 ] || status=FAIL   # the two trainers were found (and are gone)
        [[ $resume_line == *"torchrun --standalone --nproc_per_node=2 train_clamp3_lora.py"*"--resume auto"* ]] || status=FAIL
        [ $status = PASS ] && stopped=yes
        check $status "c1 sigterm" "sent after $ran s, at $at; launcher rc=$rc ${took} s later; trainer pids \
[$workers] and launcher $launcher, left over:${left_over:- none}; \
emergency checkpoints: $emergencies ($where); 'saved' lines: $saved; resume command: ${resume_line:-NOT PRINTED}"
    else
        kill -TERM "${launcher:-$guard}" 2> /dev/null; wait $guard
        sweep "$runs/c_stop"
        check FAIL "c1 sigterm" "the run never reached the middle of epoch 2 (ended or timed out first); see c1_sigterm.log"
    fi
fi
if [ $stopped = yes ] && enough 30 30 "c2 resume"; then
    timeout -k 20 "$(limit 150 30)" "${torchrun2[@]}" "${stop[@]}" --resume auto > "$out/c2_resume.log" 2>&1
    rc=$?
    sweep "$runs/c_stop"
    from=$(grep -o "resumed from [^ ]*: epoch [0-9]*, batch [0-9]*/[0-9]*" "$out/c2_resume.log" | head -1)
    adapter=$runs/c_stop/adapters/lora_abc_adapter/adapter_model.safetensors
    status=FAIL
    [ $rc = 0 ] && [ -f "$adapter" ] && [ -f "$runs/c_stop/logs/lora/ABC_finished.json" ] \
        && [[ $from == *ABC_emergency_checkpoint.pth* ]] && status=PASS
    check $status "c2 resume auto" "rc=$rc; ${from:-no 'resumed from' line}; final adapter $([ -f "$adapter" ] && echo written || echo MISSING)"
elif [ $stopped != yes ] && want c; then
    check FAIL "c2 resume auto" "not run: c1 failed"
fi

# --------------------------------------------------------------------------------------------
say "d. OOM injected on rank 1 at step 3"
if enough 30 0 "d oom on rank 1"; then
    t=$(limit 120 0)
    timeout -k 20 "$t" "${torchrun2[@]}" "${trainer[@]}" --epochs 2 --batch-size 8 \
        --fault-inject oom@3:1 --output-dir "$runs/d_oom" > "$out/d_oom.log" 2>&1
    rc=$?
    sweep "$runs/d_oom"
    line=$(python3 - "$runs/d_oom" <<'EOF'
import json, sys
from pathlib import Path
logs = Path(sys.argv[1]) / "logs/lora"
steps = [json.loads(l) for l in (logs / "ABC_steps.jsonl").read_text().splitlines()]
skipped = [(s["step"], s["skipped"]) for s in steps if s["skipped"]]
history = json.loads((logs / "ABC_history.json").read_text())
total = {k: sum(e["skipped"][k] for e in history) for k in history[0]["skipped"]}
ok = skipped == [(3, "oom")] and total["oom"] == 1 and sum(total.values()) == 1
print(("ok" if ok else "bad") + f" skipped steps {skipped}; history skipped {total}; {len(steps)} steps logged")
EOF
    )
    warned=$(grep -c "(step 3) skipped: oom" "$out/d_oom.log")
    status=FAIL
    [ $rc = 0 ] && [[ $line == ok* ]] && [ "$warned" = 1 ] && status=PASS
    check $status "d oom on rank 1" "rc=$rc$([ $rc = 124 ] && echo " (timed out after $t s)"); ${line#* }; warning lines: $warned"
fi

# --------------------------------------------------------------------------------------------
if [ $stopped = yes ] && [ "$(left)" -ge 60 ]; then
    say "e. c's run without the interruption, against the resumed one"
    t0=$SECONDS
    timeout -k 20 "$(limit 120 0)" "${torchrun2[@]}" "${trainer[@]}" --epochs "$stop_epochs" --batch-size 4 \
        --output-dir "$runs/e_full" > "$out/e_uninterrupted.log" 2>&1
    rc=$?
    ran=$((SECONDS - t0))
    sweep "$runs/e_full"
    if [ $rc = 0 ]; then
        line=$(compare "$runs/c_stop" "$runs/e_full" "$stop_epochs" 1e30 2> "$out/e_compare.log")
        check PASS "e resumed vs whole run" "reported, not judged (dropout on); the whole run took $ran s: \
${line:-compare failed, see e_compare.log}"
    else
        check FAIL "e resumed vs whole run" "uninterrupted run rc=$rc; see e_uninterrupted.log"
    fi
else
    check SKIP "e resumed vs whole run" "$( [ $stopped = yes ] && echo "no time: $(left) s left" || echo "needs c's stopped run")"
fi

# --------------------------------------------------------------------------------------------
if ! want f; then
    check SKIP "f equality fp32" "not in STEPS=$STEPS"
elif [ "$DEVICE" = cpu ]; then
    check SKIP "f equality fp32" "b already ran in fp32 on the CPU"
elif [ "$(left)" -ge 80 ]; then
    say "f. b again in fp32"
    timeout -k 20 "$(limit 150 20)" python3 "${eq[@]}" --precision fp32 --batch-size 16 --output-dir "$runs/f_one" \
        > "$out/f1_one_process_fp32.log" 2>&1
    rc1=$?
    sweep "$runs/f_one"
    timeout -k 20 "$(limit 150 0)" "${torchrun2[@]}" "${eq[@]}" --precision fp32 --batch-size 8 \
        --output-dir "$runs/f_two" > "$out/f2_two_processes_fp32.log" 2>&1
    rc2=$?
    sweep "$runs/f_two"
    if [ $rc1 = 0 ] && [ $rc2 = 0 ]; then
        line=$(compare "$runs/f_two" "$runs/f_one" "$eq_epochs" 1e-4 2> "$out/f3_compare.log")
        status=$?
        [ $status = 0 ] && status=PASS || status=FAIL
        check $status "f equality fp32" "as b, --precision fp32: ${line:-compare failed, see f3_compare.log}"
    else
        check FAIL "f equality fp32" "trainer rc: 1 process $rc1, 2 processes $rc2 (124: timed out); see f1_*, f2_* logs"
    fi
else
    check SKIP "f equality fp32" "no time: $(left) s left"
fi

echo "total $((SECONDS - started)) s; DEVICE=$DEVICE" | tee -a "$summary"
echo "---- $summary"
cat "$summary"
! grep -q '^FAIL' "$summary"
