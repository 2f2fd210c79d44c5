"""DistributedDataParallel on CPU with gloo: identical codebooks on every rank, one run folder from torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runs import close_distributed
from synthetic import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]


def _train_rank(rank: int, world: int, data_dir: str, out: str) -> None:
    os.environ.update(OASIS_VQVAE_CACHE=f"{out}/cache{rank}")
    torch.set_num_threads(1)
    # A file rendezvous: no port to pick, so no race with other processes for one.
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    from config import preset
    from dataset import load_splits
    from train import train_vqvae

    cfg = preset("tiny")
    model, _ = train_vqvae(cfg, load_splits(data_dir, cfg.model.image_size), f"{out}/run", "cpu")
    torch.save({"codebook": model.quantizer.codebook, "decoder": model.decoder.state_dict()}, f"{out}/rank{rank}.pt")
    close_distributed()


def _flush_with_nan_on_rank_1(rank: int, world: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    from train import NullWriter, TrainingDiverged, flush_losses

    pending = [torch.tensor([1.0]), torch.tensor([float("nan") if rank == 1 else 2.0])]
    try:
        flush_losses(pending, ("loss",), 2, NullWriter(), "vqvae", Path(out) / "missing.pt")
    except TrainingDiverged as e:
        Path(f"{out}/rank{rank}.txt").write_text(str(e))
    close_distributed()


def test_nan_on_one_rank_stops_every_rank(tmp_path):
    mp.spawn(_flush_with_nan_on_rank_1, args=(2, str(tmp_path)), nprocs=2, join=True)
    assert "another rank" in (tmp_path / "rank0.txt").read_text()
    assert "nan" in (tmp_path / "rank1.txt").read_text()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_synthetic_dataset(root / "data", cases=(2, 1, 1), size=32, progress=False)
    return root


def test_codebooks_identical_on_both_ranks(data):
    mp.spawn(_train_rank, args=(2, str(data / "data"), str(data)), nprocs=2, join=True)
    a, b = (torch.load(data / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(a["codebook"], b["codebook"])
    for k in a["decoder"]:
        assert torch.equal(a["decoder"][k], b["decoder"][k]), k
    assert (data / "run" / "vqvae_last.pt").is_file()


def _train_gan_rank(rank: int, world: int, data_dir: str, out: str) -> None:
    os.environ.update(OASIS_VQVAE_CACHE=f"{out}/cache{rank}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    import dataclasses

    from config import preset
    from dataset import load_splits
    from train import STAGES, train_prior, train_vqvae

    cfg = preset("tiny")
    cfg.gan = dataclasses.replace(cfg.gan, r1_every=1)  # the R1 penalty on every critic step
    data = load_splits(data_dir, cfg.model.image_size)
    vqvae, _ = train_vqvae(cfg, data, f"{out}/run", "cpu")
    prior, _ = train_prior("gan", cfg, vqvae, data, f"{out}/run", "cpu")
    stage = STAGES["gan"](cfg, vqvae, data, torch.device("cpu"), False)
    stage.critic.load_state_dict(torch.load(f"{out}/run/gan_last.pt", weights_only=True)["models"]["critic"])
    # Weights only: BatchNorm's running statistics are each rank's own (rank 0 alone samples and saves).
    torch.save({"prior": dict(prior.named_parameters()), "critic": stage.critic.state_dict()}, f"{out}/gan{rank}.pt")
    close_distributed()


def test_gan_with_penalty_trains_identically_on_both_ranks(data, tmp_path):
    write = tmp_path / "gan"
    write.mkdir()
    mp.spawn(_train_gan_rank, args=(2, str(data / "data"), str(write)), nprocs=2, join=True)
    a, b = (torch.load(write / f"gan{r}.pt", weights_only=True) for r in (0, 1))
    for part in ("prior", "critic"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_torchrun_driver_writes_one_run_folder(data, tmp_path):
    env = dict(os.environ, OASIS_VQVAE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "driver.py"), "--data-dir", str(data / "data"), "--preset", "tiny", "--device", "cpu",
           "--run-dir", str(tmp_path / "run"), "--maskgit-head", "sequential", "--mirror"]  # the quick preset's MaskGIT
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and "ssim" in metrics["test"]
    assert [p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != "cache"] == ["run"]
    assert proc.stdout.count("summary") == 1  # rank 0 alone reports
