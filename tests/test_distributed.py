"""torchrun with 2 CPU processes (gloo) follows the single-process run with the combined batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.launch import free_port
from training.checkpoints import read_training_checkpoint
from training.config import TrainConfig
from training.networks import build_generator

pytestmark = pytest.mark.slow  # starts servers / browsers / processes: CI runs it, `-m 'not slow'` skips it

ROOT = Path(__file__).resolve().parents[1]


def _settings(cache: Path, tmp_path: Path) -> list[str]:
    sets = [
        "disc_preset=discriminator-tiny",
        "batch_size=8",
        "amp=false",
        "sample_every=1000000",
        "eval_every=1000000",
        "log_every=1",
        "threads=1",
        f"cache_dir={cache}",
        f"classifier={tmp_path}/none",
    ]
    return [x for s in sets for x in ("--set", s)]


def test_two_gloo_ranks_match_one_process(prepared_cache: Path, tmp_path: Path) -> None:
    common = ["--preset", "stgan-tiny", "--max-steps", "3", *_settings(prepared_cache, tmp_path)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}

    def train(*launcher: str, run: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, *launcher, "-m", "training", "train", "--run-dir", str(tmp_path / run), *common]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    ddp = train("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), run="ddp")
    assert "rank 1 of 2" in ddp.stderr and "drifted" not in ddp.stderr  # ranks checked each step
    train(run="single")
    t_ddp, m_ddp = read_training_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.safetensors")
    t_one, m_one = read_training_checkpoint(tmp_path / "single" / "checkpoints" / "last.safetensors")
    assert m_ddp["step"] == m_one["step"] == "3"
    assert m_ddp["images_seen"] == m_one["images_seen"] == "24"
    worst = 0.0
    for key, value in t_one.items():
        if key.startswith(("G.", "D.", "G_ema.")) and value.is_floating_point():
            worst = max(worst, float((t_ddp[key] - value).abs().max()))
    assert worst < 1e-4, f"DDP and single-process parameters differ by {worst}"
    # the runs really moved the parameters away from their common start, so the comparison means something
    torch.manual_seed(0)
    _, g_init = build_generator(TrainConfig(preset="stgan-tiny"))
    moved = max(
        float((t_one[f"G.{k}"] - v).abs().max()) for k, v in g_init.state_dict().items() if v.is_floating_point()
    )
    assert moved > 100 * max(worst, 1e-7)
    assert torch.equal(t_ddp["G.encoder.0.1.num_batches_tracked"], t_one["G.encoder.0.1.num_batches_tracked"])


def test_shutdown_ends_the_process_group_the_training_started() -> None:
    import torch.distributed as dist

    from training import distributed

    distributed.shutdown()  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        distributed.shutdown()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
