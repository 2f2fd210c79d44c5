#!/usr/bin/env bash
# The GPU checks the generation issues ask for, as one command on one CUDA GPU:
#   1. bench.py on the paper and quick presets: training speeds, and the seconds to sample 64 maps with each
#      prior (the MaskGIT's paper-grid figure has a bar: 10 s on one GPU);
#   2. driver.py --preset paper --prior all on DATA_DIR: every prior trained on the paper preset's VQ-VAE and
#      judged, one summary table (the README's generation table, on the paper grid).
# It keeps the run in RUN_DIR and copies what a report needs (the two logs, metrics.json, the bench's JSON
# line, the sample grids and the which-are-real grid) into REPORT_DIR, flat, so that a remote runner can
# send back the report without the checkpoints.
#
#   bash gpu_checks.sh ../shared/realbrain                        # report in gpu_report/, run in runs/gpu-paper
#   bash gpu_checks.sh DATA_DIR REPORT_DIR [RUN_DIR]
#   PRESET=tiny DEVICE=cpu bash gpu_checks.sh DATA_DIR           # a rehearsal of the script on any machine
#
# PYTHON (default python3) runs the programs; an existing RUN_DIR is resumed, so a second call after a cut-off
# one finishes the run instead of starting it again.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)  # the programs; paths given are read from where it is called

data=${1:?usage: bash gpu_checks.sh DATA_DIR [REPORT_DIR] [RUN_DIR]}
preset=${PRESET:-paper}
device=${DEVICE:-cuda}
report=${2:-gpu_report}
run=${3:-runs/gpu-$preset}
py=${PYTHON:-python3}
mkdir -p "$report"

"$py" -c "import torch; print('torch', torch.__version__, '| device:',
          torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" | tee "$report/bench.log"
# bench's presets: the issue's paper grid, and quick next to the CPU figures of the README
bench_presets=$([ "$preset" = paper ] && echo paper,quick || echo "$preset")
"$py" "$here/bench.py" --presets "$bench_presets" --device "$device" --json 2>&1 | tee -a "$report/bench.log"
tail -n 1 "$report/bench.log" > "$report/bench.json"

resume=()
[ -f "$run/config.json" ] && resume=(--resume)
"$py" "$here/driver.py" --data-dir "$data" --preset "$preset" --prior all --device "$device" --run-dir "$run" \
    "${resume[@]}" 2>&1 | tee "$report/driver.log"

cp "$run/metrics.json" "$report/"
for figure in samples_maskgit samples_gan samples_pixelcnn which_are_real; do
    cp "$run/figures/$figure.png" "$report/" 2>/dev/null || echo "no $figure.png in $run/figures"
done
echo "report: $(ls "$report" | tr '\n' ' ')"
