"""OASIS-size rehearsal: the whole pipeline at 1x, 2x and 6x the size of ../shared/realbrain, on built-in slices.

    python rehearse.py --out /tmp/rehearsal                           # 1x 2x 6x, paper preset, 1 epoch each
    python rehearse.py --out /tmp/rehearsal --scales 1 2 --epochs 2 --prior-epochs 1

realbrain holds 50/6/6 cases of 32 slices (1600/192/192); 6x is 300/36/36 cases (9600/1152/1152 slices), the
size of OASIS-1's 9664/1120/544. The built-in generator writes the largest scale's slices at 256 px once
(kept under --out; the smaller scales link its first cases), then for each scale `driver.py --preset paper`
runs in a fresh process with a short schedule, and its metrics.json gives the wall time and peak memory of
each stage (data, VQ-VAE, prior, evaluation). The table
ends with each stage's growth exponent between the smallest and the largest scale: time ~ slices^exponent,
so 1 is linear, 2 quadratic. Writes --out/rehearsal.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from dataset import SPLITS, split_folder_name
from runs import at_least
from synthetic import write_synthetic_dataset

ROOT = Path(__file__).resolve().parent
REALBRAIN_CASES = (50, 6, 6)
STAGES = ("data_s", "vqvae_s", "maskgit_s", "evaluation_s", "total_s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the slice sets, runs and rehearsal.json")
    p.add_argument("--scales", type=at_least(1), nargs="+", default=[1, 2, 6],
                   help="multiples of realbrain's 50/6/6 cases (default: 1 2 6)")
    p.add_argument("--preset", default="paper", help="driver.py preset (default: paper)")
    p.add_argument("--epochs", type=at_least(1), default=1, help="VQ-VAE epochs (default: 1)")
    p.add_argument("--prior-epochs", type=at_least(1), default=1, help="MaskGIT epochs (default: 1)")
    p.add_argument("--samples", type=at_least(2), default=64, help="generated slices measured (default: 64)")
    p.add_argument("--device", default="auto", help="driver.py --device (default: auto)")
    return p.parse_args(argv)


def slice_sets(args) -> dict[int, Path]:
    """{scale: data folder}: the largest scale's slices written once, each smaller scale the first cases of
    each of its splits, linked (generating 256 px slices costs more than a short training run)."""
    largest = max(args.scales)
    full = args.out / f"data-{largest}x"
    if not full.exists():
        write_synthetic_dataset(full, cases=tuple(largest * c for c in REALBRAIN_CASES), size=256)
    folders = {largest: full}
    for scale in set(args.scales) - {largest}:
        folders[scale] = args.out / f"data-{scale}x"
        for split, count in zip(SPLITS, REALBRAIN_CASES):
            src, dst = full / split_folder_name(split), folders[scale] / split_folder_name(split)
            if dst.exists():
                continue
            dst.mkdir(parents=True)
            keep = sorted({p.name.split("_slice_")[0] for p in src.glob("*.png")})[:scale * count]
            for png in src.glob("*.png"):
                if png.name.split("_slice_")[0] in keep:
                    (dst / png.name).symlink_to(png.resolve())
    return folders


def run_scale(args, scale: int, data: Path) -> dict:
    cases = tuple(scale * c for c in REALBRAIN_CASES)
    run = args.out / f"run-{scale}x"
    cmd = [sys.executable, str(ROOT / "driver.py"), "--data-dir", str(data), "--preset", args.preset,
           "--run-dir", str(run), "--epochs", str(args.epochs), "--maskgit-epochs", str(args.prior_epochs),
           "--samples", str(args.samples), "--device", args.device, "--cache-dir", str(args.out / "cache")]
    if not (run / "metrics.json").exists():  # a scale already rehearsed is read back, not run again
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    metrics = json.loads((run / "metrics.json").read_text())
    return {"scale": scale, "slices": 32 * sum(cases), "train_slices": 32 * cases[0], "timing": metrics["timing"],
            "peak_memory_mb": metrics["peak_memory_mb"], "test_ssim": metrics["test"]["ssim"]}


def table(rows: list[dict]) -> str:
    head = ["scale", "slices", *(f"{s[:-2]} s" for s in STAGES), *(f"{s[:-2]} MB" for s in STAGES[:-1])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['scale']}x | {r['slices']} | " + " | ".join(f"{r['timing'][s]:.0f}" for s in STAGES)
                     + " | " + " | ".join(f"{r['peak_memory_mb'][s]:.0f}" for s in STAGES[:-1]) + " |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        growth = math.log(b["slices"] / a["slices"])
        exp = [math.log(b["timing"][s] / a["timing"][s]) / growth for s in STAGES]
        lines.append("| time ~ slices^ | | " + " | ".join(f"{e:.2f}" for e in exp) + " |" + " |" * (len(STAGES) - 1))
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    folders = slice_sets(args)
    rows = [run_scale(args, s, folders[s]) for s in sorted(args.scales)]
    (args.out / "rehearsal.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
