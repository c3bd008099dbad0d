#!/usr/bin/env bash
# The GPU checks in one prepared run, for the device machine (or any machine with CUDA):
#   1. the CUDA-marked test;  2. the user's command on cuda and on cpu, at once (a 16-core machine);
#   3. TorchCartPole stepping alone;  4. where the time goes: torch.profiler and the host syncs;
#   5. the fast suite.  Tables, figures and the trace land under $OUT (default bench/results/gpu);
#   tee the output for the rest:  bench/gpu_check.sh 2>&1 | tee $OUT/log.txt
#   DEVICE=cpu bench/gpu_check.sh 20    # a dry run here: 20 iterations instead of 2000
set -u
OUT=${OUT:-bench/results/gpu}; DEVICE=${DEVICE:-cuda}; ITERS=${1:-2000}
mkdir -p "$OUT"; export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PY:-python3}
stamp() { echo "== $(date +%T) $*"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  $PY -c "import torch, gymnasium, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'gymnasium', gymnasium.__version__, 'numpy', numpy.__version__, 'cpus', __import__('os').cpu_count())"
} 2>&1

stamp "1. CUDA-marked test"
timeout 120 $PY -m pytest -q -p no:cacheprovider -m cuda test_ppo_cartpole.py 2>&1 | tail -5

stamp "2. the user's command, --episodes $ITERS, on $DEVICE and on cpu (at once)"
users() {  # device, run folder: whole-process seconds into <folder>.wall
  local t0=$EPOCHREALTIME
  timeout 360 $PY ppo_cartpole.py --episodes "$ITERS" --device "$1" --out-dir "$2" > "$2.log" 2>&1
  echo "rc=$? wall=$(awk "BEGIN{print $EPOCHREALTIME - $t0}")" > "$2.wall"
}
rm -rf runs/gpu-check; mkdir -p runs/gpu-check
users "$DEVICE" runs/gpu-check/dev & users cpu runs/gpu-check/cpu & wait
$PY - "$OUT" <<'EOF' 2>&1 | tee "$OUT/users_command.md"
import json, sys
from pathlib import Path
sys.path.insert(0, "bench")
import long_run
print("| device | backend, envs | whole s | env-steps/s | solve: env steps | solve: s | after solve | last 10% "
      "| min last-100 after | final.pt greedy | best.pt greedy | goal |\n" + "|---" * 12 + "|")
for name in ("dev", "cpu"):
    run = Path("runs/gpu-check") / name
    wall = (run.parent / f"{name}.wall").read_text().split()
    try:
        s, summary = long_run.seed_stats(run, 1), json.loads((run / "summary.json").read_text())
    except Exception as exc:  # a failed run: its log's tail says why
        print(f"| {name} | failed: {wall} {exc!r} |", (run.parent / f"{name}.log").read_text()[-2000:])
        continue
    c, f = summary["config"], long_run.fmt
    print(f"| {c['device']} | {c['env_backend']}, {c['num_envs']} | {wall[1][5:]} | {summary['steps_per_second']:,.0f} "
          f"| {f(s['solved_at_step'], 0)} | {f(summary['solved_at_seconds'])} | {f(s['after_solve_mean'])} "
          f"| {f(s['last10_mean'])} | {f(s['min_mean100_after_solve'])} | {f(s['final_greedy'])} "
          f"| {f(s['best_greedy'])} | {'yes' if long_run.meets_goal(s) else 'no'} |")
    print({k: v for k, v in summary.items() if k != "config"}, file=sys.stderr)
EOF
cp runs/gpu-check/dev/training.png "$OUT/training_dev.png" 2>/dev/null
cp runs/gpu-check/dev/agent.gif "$OUT/agent_dev.gif" 2>/dev/null
tail -c 1500 runs/gpu-check/dev.log

stamp "3. stepping alone, and 4. profile and host syncs"
timeout 150 $PY - "$OUT" "$DEVICE" <<'EOF' 2>&1 | tee "$OUT/stepping_profile.txt"
import collections, gzip, shutil, sys, warnings
from pathlib import Path
import torch
sys.path.insert(0, "bench")
import env_bench
import ppo_cartpole as ppo
out, device = Path(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
print("| envs | TorchCartPole", device, "env-steps/s |\n|---|---|")
for n in (1024, 4096, 16384, 65536, 262144):
    print(f"| {n:,} | {env_bench.torch_stepping(n, device) / 1e6:,.1f}M |", flush=True)

def run(iterations, folder):
    return ppo.main(["--device", device, "--episodes", str(iterations), "--no-plot", "--no-gif",
                     "--out-dir", f"runs/gpu-check/{folder}"])

run(3, "warm")  # CUDA context, kernels, allocator
activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
with torch.profiler.profile(activities=activities) as prof:
    run(10, "profile")
averages = prof.key_averages()
print("\nprofile of 10 iterations, by self CPU time:")
print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
if device == "cuda":
    print("by CUDA time:")
    print(averages.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=50))
    count = collections.Counter()
    for e in averages:
        if any(k in e.key for k in ("Synchronize", "cudaMemcpy", "Memcpy DtoH", "aten::item", "_local_scalar_dense")):
            count[e.key] = e.count
    print("sync-ish events:", dict(count))
    prof.export_chrome_trace(str(out / "trace.json"))
    with open(out / "trace.json", "rb") as f, gzip.open(out / "trace.json.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    (out / "trace.json").unlink()
    # every host synchronisation in 5 iterations, by the line that asked for it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(5, "syncs")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    print("host syncs in 5 iterations, by line:", where.most_common())
EOF

stamp "5. the fast suite"
timeout 150 $PY -m pytest -q -p no:cacheprovider -m "not slow" 2>&1 | tail -15
stamp done
