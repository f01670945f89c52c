#!/usr/bin/env bash
# Every GPU figure issue #12 asks for, from one short GPU session (prepared without a GPU;
# not yet run). Each step has its own timeout, prints its figures as they are measured and
# writes JSON under $OUT, so a slow step loses only itself.
#
#   bash benchmarks/gpu_session.sh            # every group (about 14 min: over one 10-min call)
#   bash benchmarks/gpu_session.sh quick      # ceiling (3 and 6 threads) + 192x384x384 with and without mirror (~6 min)
#   bash benchmarks/gpu_session.sh large      # the 8x volume (384x768x768), both runs (~8 min)
#
# Figures: pipeline ceiling on CUDA (Mvox/s, time split, partial sums in memory);
# benchmarks/predict.py --device cuda --preset nnunet, with and without --mirror, on
# 192x384x384 and 8x larger: speed ratio to stock nnU-Net, share of pure forward throughput,
# peak RSS and peak GPU memory; at the end a summary with the 8x RSS growth and the Scroll-4
# (11174 x 3440 x 3340 voxels) projection from each measured rate.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-session}
WORK=${WORK:-/tmp/scrollseg-gpu-session}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)  # absolute: the children run elsewhere
groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(quick large)

step() {  # step NAME SECONDS COMMAND...: run with a timeout, log, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "=== $name (at most ${limit} s) $(date -u +%H:%M:%S)"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} $(date -u +%H:%M:%S)"
}

predict() {  # predict NAME SECONDS FACTOR [--mirror]
    local name=$1 limit=$2 factor=$3
    shift 3
    step "$name" "$limit" "$PY" benchmarks/predict.py --device cuda --preset nnunet \
        --shape 192 384 384 --chunk 128 --batch-size 2 --seconds 10 --factors "$factor" \
        --workdir "$WORK" --out-json "$OUT/$name.json" "$@"
}

for g in "${groups[@]}"; do
    case $g in
    quick)
        step env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv;
            "$0" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"' "$PY"
        step ceiling-cuda-small 60 "$PY" benchmarks/pipeline_ceiling.py --device cuda \
            --work "$WORK/ceiling" --out-json "$OUT/ceiling-cuda-small.json"
        step ceiling-cuda-nnunet 90 "$PY" benchmarks/pipeline_ceiling.py --device cuda \
            --preset nnunet --shape 192 384 384 --chunk 128 --batch-size 2 \
            --work "$WORK/ceiling" --out-json "$OUT/ceiling-cuda-nnunet.json"
        # host threads: does the default 3 keep up once the device does the sums?
        step ceiling-cuda-nnunet-t6 90 "$PY" benchmarks/pipeline_ceiling.py --device cuda \
            --preset nnunet --shape 192 384 384 --chunk 128 --batch-size 2 --threads 6 \
            --work "$WORK/ceiling" --out-json "$OUT/ceiling-cuda-nnunet-t6.json"
        predict predict-nnunet-1x 110 1
        predict predict-nnunet-1x-mirror 150 1 --mirror
        ;;
    large)
        predict predict-nnunet-8x 220 2
        predict predict-nnunet-8x-mirror 300 2 --mirror
        ;;
    *) echo "unknown group $g (quick, large)" ;;
    esac
done

# summary of what was measured: 8x RSS growth, Scroll-4 projection
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
scroll4 = 11174 * 3440 * 3340
summary = {}
for mirror in ("", "-mirror"):
    rows = {}
    for size in ("1x", "8x"):
        f = out / f"predict-nnunet-{size}{mirror}.json"
        if f.exists():
            runs = json.loads(f.read_text()).get("runs", [])
            if runs:
                rows[size] = runs[-1]
    for size, r in rows.items():
        s = r["scrollseg"]
        line = {
            "mvox_per_s": round(s["voxels_per_s"] / 1e6, 2),
            "share_of_pure_forward": round(r["scrollseg_share_of_forward"], 3),
            "speed_ratio_to_nnunet": round(r["speed_ratio"], 2) if "speed_ratio" in r else None,
            "peak_rss_mb": round(s["peak_rss_mb"]),
            "peak_gpu_mb": s.get("peak_gpu_mb"),
            "scroll4_hours": round(scroll4 / s["voxels_per_s"] / 3600, 2),
        }
        summary[f"{size}{mirror or '-no-mirror'}"] = line
        print(f"{size}{mirror or ' no mirror'}: {line}")
    if len(rows) == 2:
        growth = rows["8x"]["scrollseg"]["peak_rss_mb"] / rows["1x"]["scrollseg"]["peak_rss_mb"]
        summary[f"rss_growth_8x{mirror or '-no-mirror'}"] = round(growth, 2)
        print(f"peak RSS growth for 8x voxels{mirror}: {growth:.2f}x (target <= 1.25)")
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"wrote {out / 'summary.json'}")
EOF
