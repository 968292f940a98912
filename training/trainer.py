"""The GAN training loop: STGAN, MU-GAN, AttGAN and StarGAN share it (they differ in config only).

Every step is a pure function of (state, step): the batch comes from :class:`StepSampler` and all
randomness from :func:`step_generator`, so ``--resume`` continues bit-exactly. The loss sums are in
:mod:`training.losses`, the checkpoint format in :mod:`training.checkpoints`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from models.attributes import condition_vector, exclusive_groups_for
from models.checkpoint import (
    DISCRIMINATOR_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    atomic_write_bytes,
    check_state_dict,
    load_pretrained,
    read_config,
    read_tensors,
)
from models.config import config_to_dict
from models.device import has_cxx_compiler
from models.generators import convert_upsampling, grow_state_dict, widen_state_dict
from models.precision import autocast, describe_cpu_bf16, resolve_precision
from training import distributed, losses
from training.batchnorm import Batch, batchnorm_layers, freeze_batchnorm, recompute_batchnorm
from training.checkpoints import load_networks, load_optimizers, read_training_checkpoint, write_training_checkpoint
from training.config import TrainConfig
from training.curves import validation_scalars
from training.data import CachedFaces, DatasetError, StepSampler, sample_targets, step_generator
from training.metrics import evaluate_generator, selection_score
from training.networks import build_discriminator, build_generator
from training.visualize import edit_grid

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device, self.rank, self.world_size = distributed.init(cfg.device)
        if cfg.batch_size % self.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {self.world_size} ranks")
        self.is_main = self.rank == 0
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.precision = resolve_precision(cfg.precision, self.device)
        # channels_last pays with bf16 (oneDNN's AMX kernels) and on GPUs; fp32 on an AVX2 CPU ran a
        # G forward + backward 8-10 % slower in it (2.60 s vs 2.78 s, batch 16, 1 thread, EPYC).
        use_channels_last = cfg.channels_last and (self.precision == "bf16" or self.device.type == "cuda")
        self.memory_format = torch.channels_last if use_channels_last else torch.contiguous_format
        if self.is_main:
            cpu = describe_cpu_bf16() if self.device.type == "cpu" else self.device.type
            log.info("precision %s -> %s (%s)", cfg.precision, self.precision, cpu)
        self.arch, self.G = build_generator(cfg)
        self.D = build_discriminator(cfg, self.G.config.image_size)
        self.G.to(self.device, memory_format=self.memory_format)
        self.D.to(self.device, memory_format=self.memory_format)
        if self.world_size > 1:
            distributed.convert_batchnorm(self.G, self.device)
            distributed.broadcast_parameters(self.G)
            distributed.broadcast_parameters(self.D)
        #: D reads a step's real and fake batches in one pass where it normalises each image on its own.
        self.joint_d_batches = self.D.config.norm != "batch"
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        # fused Adam: one kernel over all parameters (G's step 147 -> 41 ms on one EPYC core)
        fused = self.device.type in ("cpu", "cuda")
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2), fused=fused)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2), fused=fused)
        self.train_set = CachedFaces(cfg.cache_dir, "train", tuple(cfg.attributes))
        self.val_set = CachedFaces(cfg.cache_dir, "val", tuple(cfg.attributes), limit=cfg.eval_images)
        if self.train_set.image_size != self.G.config.image_size:
            raise DatasetError(
                f"cache images are {self.train_set.image_size} px but the model expects {self.G.config.image_size}"
            )
        self.sampler = StepSampler(len(self.train_set), cfg.batch_size, cfg.seed)
        self.groups = exclusive_groups_for(list(cfg.attributes))
        self.label_frequency = self.train_set.labels.mean(0)
        self.flip_weights = (
            torch.tensor([float(cfg.flip_weights.get(a, 1.0)) for a in cfg.attributes]) if cfg.flip_weights else None
        )
        self.mask_weight_map = (
            losses.border_weight_map(self.G.config.image_size, cfg.mask_border_weight).to(self.device)
            if cfg.mask_border_weight > 0
            else None
        )
        self.background_weight = losses.background_map(self.G.config.image_size).to(self.device)
        self.step = 0
        self.elapsed = 0.0
        self.images_seen = 0
        self.best_score = -math.inf
        self.best_metrics: dict[str, Any] = {}
        self.batchnorm_frozen = False  # cfg.freeze_batchnorm: set once the statistics are fixed
        self.classifier, self.classifier_attributes = self._load_classifier()
        #: The compiled generator pass (:meth:`generator_pass`): None until the first step decides, False: eager.
        self._compiled_pass: Callable[..., tuple[torch.Tensor | None, ...]] | Literal[False] | None = None
        #: The compiled discriminator (:meth:`discriminator`): None until the first step decides, False: eager.
        self._compiled_D: nn.Module | Literal[False] | None = None
        #: The compiled R1 step's real pass (:func:`losses.real_pass_with_r1`), set with ``_compiled_D``.
        self._compiled_r1: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self.writer = None
        self._realism_inputs: Any = None  # training.realism.RealismInputs, built at the first probe

    # ------------------------------------------------------------------ pieces
    def _load_classifier(self) -> tuple[nn.Module | None, tuple[str, ...]]:
        path = Path(self.cfg.classifier)
        if not (path / "config.json").is_file():
            log.info("no classifier at %s: validation reports PSNR/SSIM only", path)
            return None, ()
        model, info = load_pretrained(path, self.device)
        missing = [a for a in self.cfg.attributes if a not in info.attributes]
        if missing:
            log.warning("classifier at %s lacks %s; not used", path, missing)
            return None, ()
        return model.to(memory_format=self.memory_format), info.attributes

    def _autocast(self) -> Any:
        return autocast(self.device, self.precision)

    def _set_lr(self) -> None:
        factor = 0.1 if self.step >= self.cfg.lr_decay_step else 1.0
        for group in self.opt_G.param_groups:
            group["lr"] = self.cfg.lr_g * factor
        for group in self.opt_D.param_groups:
            group["lr"] = self.cfg.lr_d * factor

    def _batch(self, step: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's slice of the step's global batch: images, source labels, target labels."""
        idx = self.sampler.indices(step)
        flip = torch.rand(len(idx), generator=gen) < 0.5 if self.cfg.hflip else None
        c_all = self.train_set.labels[idx]
        c_trg = sample_targets(c_all, gen, self.groups, self.cfg.single_flip_fraction, self.flip_weights)
        n = len(idx) // self.world_size
        mine = slice(self.rank * n, (self.rank + 1) * n)
        x, c = self.train_set.get(idx[mine], None if flip is None else flip[mine])
        x = x.to(self.device).contiguous(memory_format=self.memory_format)
        return x, c.to(self.device), c_trg[mine].to(self.device)

    def _conditions(
        self, c_src: torch.Tensor, c_trg: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's conditions for the edit (difference scaled by U(1, diff_scale_max)) and for
        the reconstruction (zero difference) of the batch's first faces (``rec_fraction``)."""
        mode = self.G.config.conditioning
        scale: float | torch.Tensor = 1.0
        if self.cfg.diff_scale_max > 1.0:  # drawn after everything else, so older recipes keep their randomness
            u = torch.rand(c_src.shape[0], 1, generator=gen).to(self.device)
            scale = 1.0 + (self.cfg.diff_scale_max - 1.0) * u
        cond = condition_vector(c_src, c_trg - c_src, mode, scale)
        n_rec = max(1, round(self.cfg.rec_fraction * c_src.shape[0]))
        cond_rec = condition_vector(c_src[:n_rec], torch.zeros_like(c_src[:n_rec]), mode)
        return cond, cond_rec

    def recompute_ema_batchnorm(self) -> int:
        """Re-estimate G_ema's BatchNorm statistics from its own activations on ``ema_bn_batches``
        training batches drawn as training steps draw them (:mod:`training.batchnorm`). Every rank
        runs it on its slice (SyncBatchNorm averages across ranks). Returns the batches used."""
        n = self.cfg.ema_bn_batches
        if n <= 0 or self.batchnorm_frozen or not batchnorm_layers(self.G_ema):
            return 0  # frozen: G_ema keeps the statistics G trains with
        with torch.no_grad(), self._autocast():
            return recompute_batchnorm(self.G_ema, self._bn_batches(n), joint=self.cfg.joint_decode)

    def _bn_batches(self, n: int) -> Iterator[Batch]:
        """``n`` training batches drawn as training steps draw them, a function of the step."""
        for i in range(n):
            gen = step_generator(self.cfg.seed, self.step, salt=1_000 + i)
            x_real, c_src, c_trg = self._batch(self.step + i, gen)
            yield (x_real, *self._conditions(c_src, c_trg, gen))

    def start_batchnorm_freeze(self) -> None:
        """``freeze_batchnorm``: re-estimate G's statistics from its own training passes (as many
        batches as ``ema_bn_batches``, at least 8), fix them, and restart G_ema as a copy of G."""
        n = max(self.cfg.ema_bn_batches, 8)
        if batchnorm_layers(self.G):
            with torch.no_grad(), self._autocast():
                recompute_batchnorm(self.G, self._bn_batches(n), joint=self.cfg.joint_decode)
        self.G_ema.load_state_dict(self.G.state_dict())
        self.batchnorm_frozen = True
        log.info("BatchNorm statistics of G fixed at step %d (%d batches); G_ema restarts from G", self.step, n)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.step
        self._set_lr()
        if cfg.freeze_batchnorm:
            if not self.batchnorm_frozen:
                self.start_batchnorm_freeze()
            freeze_batchnorm(self.G)  # idempotent; recompute_batchnorm restores train mode
        gen = step_generator(cfg.seed, step)
        x_real, c_src, c_trg = self._batch(step, gen)
        cond, cond_rec = self._conditions(c_src, c_trg, gen)
        logs: dict[str, float] = {}

        # ---- the generator runs once: D learns from its edit detached, G's loss reads the same pass
        # after D's update. With n_critic > 1 the earlier critic steps draw their own no-grad edits.
        g_pass = self.generator_pass(x_real, cond, cond_rec)
        if self._compiled_D is None:
            self._compiled_D = self._compile_discriminator(x_real, g_pass.x_fake)

        # ---- discriminator
        self.D.requires_grad_(True)
        for i in range(cfg.n_critic):
            if i == cfg.n_critic - 1:
                x_fake = g_pass.x_fake.detach().float()
            else:
                with torch.no_grad(), self._autocast():
                    x_fake = self.G(x_real, cond)[0].float()
            use_r1 = cfg.uses_r1 and step % cfg.r1_interval == 0
            r1_pass = self._compiled_r1 if use_r1 else None
            # a double backward through D (R1 unless compiled as one function, WGAN-GP): eager, batches apart
            double_backward = cfg.gan_loss == "wgan" or (use_r1 and r1_pass is None)
            d_loss, lg = losses.discriminator_loss(
                self.discriminator(double_backward),
                x_real,
                x_fake,
                c_src,
                cfg,
                label_frequency=self.label_frequency,
                use_r1=use_r1,
                rng=gen,
                autocast=self._autocast,
                c_trg=c_trg,
                joint_batches=self.joint_d_batches and not double_backward,
                r1_pass=r1_pass,
            )
            logs |= lg
            self.opt_D.zero_grad(set_to_none=True)
            d_loss.backward()
            distributed.average_gradients(self.D)
            self.opt_D.step()
        logs["d_loss"] = d_loss.item()

        # ---- generator
        self.D.requires_grad_(False)
        g_loss, lg = self._generator_loss(g_pass, x_real, c_src, c_trg)
        logs |= lg
        self.opt_G.zero_grad(set_to_none=True)
        g_loss.backward()
        distributed.average_gradients(self.G)
        self.opt_G.step()
        logs["g_loss"] = g_loss.item()
        self._update_ema()
        self.step += 1
        self.images_seen += cfg.batch_size
        return logs

    def generator_objective(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """G's loss on ``step``'s batch and conditions with D as it is now, updating nothing: the
        quantity the generator half of :meth:`train_step` minimises (there D has just taken its step).
        For diagnostics such as bench/g_precision.py; the caller calls ``backward``."""
        gen = step_generator(self.cfg.seed, step)
        x_real, c_src, c_trg = self._batch(step, gen)
        cond, cond_rec = self._conditions(c_src, c_trg, gen)
        self.D.requires_grad_(False)
        return self._generator_loss(self.generator_pass(x_real, cond, cond_rec), x_real, c_src, c_trg)

    def _generator_loss(
        self, g_pass: losses.GeneratorPass, x_real: torch.Tensor, c_src: torch.Tensor, c_trg: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """:func:`losses.generator_loss` of ``g_pass`` with this run's D, loss weights and autocast."""
        return losses.generator_loss(
            g_pass,
            self.discriminator(),
            x_real,
            c_src,
            c_trg,
            self.cfg,
            background_weight=self.background_weight,
            mask_weight_map=self.mask_weight_map,
            autocast=self._autocast,
        )

    def generator_pass(self, x_real: torch.Tensor, cond: torch.Tensor, cond_rec: torch.Tensor) -> losses.GeneratorPass:
        """:func:`losses.generator_pass` of G, compiled with ``torch.compile`` where ``compile_generator``
        says so (decided, compiled and tried at the first call)."""
        if self._compiled_pass is None:
            self._compiled_pass = self._compile_generator_pass(x_real, cond, cond_rec) or False
        if self._compiled_pass:
            return losses.GeneratorPass(*self._compiled_pass(x_real, cond, cond_rec))
        return losses.generator_pass(self.G, x_real, cond, cond_rec, self._autocast, self.cfg.joint_decode)

    def should_compile_generator(self) -> bool:
        """``compile_generator``: "on", "off", or "auto": on a CPU with a C++ compiler (inductor's CPU
        backend), for a generator of a million parameters or more (a tiny one trains a step in
        milliseconds, less than compiling would ever save), in a one-process run (the distributed batch
        norm's collectives are not measured compiled)."""
        return self._should_compile(self.cfg.compile_generator, self.G)

    def should_compile_discriminator(self) -> bool:
        """``compile_discriminator``, by the rule of :meth:`should_compile_generator`."""
        return self._should_compile(self.cfg.compile_discriminator, self.D)

    def _should_compile(self, mode: str, network: nn.Module) -> bool:
        if mode != "auto":
            return mode == "on"
        n_params = sum(p.numel() for p in network.parameters())
        return self.device.type == "cpu" and has_cxx_compiler() and n_params >= 1_000_000 and self.world_size == 1

    def discriminator(self, double_backward: bool = False) -> nn.Module:
        """D for this call: its compiled form (:meth:`_compile_discriminator`, at the first step) unless a
        double backward goes through it (WGAN-GP, or R1 without its compiled pass: AOTAutograd has none) or
        compiling failed. The compiled module shares D's parameters."""
        if double_backward or not isinstance(self._compiled_D, nn.Module):
            return self.D
        return self._compiled_D

    def _compile_discriminator(self, x_real: torch.Tensor, x_fake: torch.Tensor) -> nn.Module | Literal[False]:
        """torch.compile of D where ``compile_discriminator`` says so, compiled now by one trial of each
        kind of call a step makes, on this step's batches: D's update (real and fake batches together; on
        an R1 step the real pass with its penalty as one function, :func:`losses.real_pass_with_r1`, and
        the fake batch alone), G's loss through D frozen (and, for ``lambda_g_cls_kept``, D on the real
        faces without grad). False: not asked for, or it failed. Eager, D took a fifth of a bf16 MU-GAN-cpu
        step on the AMX Xeon: small convs whose casts, activations and instance norms compile into a few
        kernels."""
        if not self.should_compile_discriminator():
            return False
        compiled = torch.compile(self.D, dynamic=False)
        discriminator, autocast = self.D, self._autocast
        x_fake = x_fake.detach()
        joint = self.joint_d_batches
        x_update = torch.cat([x_real, x_fake.float()]) if joint else x_real

        def real_pass_with_r1(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return losses.real_pass_with_r1(discriminator, x, autocast)

        compiled_r1 = torch.compile(real_pass_with_r1, dynamic=False)

        def trial() -> None:
            params = list(self.D.parameters())
            trainable = [p.requires_grad for p in params]
            try:
                self.D.requires_grad_(True)
                with self._autocast():
                    outputs = compiled(x_update)
                torch.autograd.grad(sum(t.float().sum() for t in outputs), params)
                if self.cfg.uses_r1:  # an R1 step: the real pass with its penalty, the fake batch alone
                    with self._autocast():
                        outputs = (*compiled_r1(x_real), *(compiled(x_fake.float()) if joint else ()))
                    torch.autograd.grad(sum(t.float().sum() for t in outputs), params)
                self.D.requires_grad_(False)
                x_in = x_fake.clone().requires_grad_(True)
                with self._autocast():
                    outputs = compiled(x_in)
                torch.autograd.grad(sum(t.float().sum() for t in outputs), x_in)
                if self.cfg.lambda_g_cls_kept > 0:
                    with torch.no_grad(), self._autocast():
                        compiled(x_real)
            finally:
                for p, flag in zip(params, trainable, strict=True):
                    p.requires_grad_(flag)

        if not self._trial_compile("the discriminator", self.D, trial):
            return False
        self._compiled_r1 = compiled_r1 if self.cfg.uses_r1 else None
        return compiled

    def _trial_compile(self, what: str, network: nn.Module, trial: Callable[[], None]) -> bool:
        """Run ``trial`` (the compiled calls: inductor compiles at the first of each), ``network``'s buffers
        restored afterwards; False, with a warning, where the compiler failed."""
        buffers = [b.clone() for b in network.buffers()]
        started = time.perf_counter()
        log.info("compiling %s (torch.compile, inductor; a minute or two the first time)", what)
        try:
            trial()
        except Exception as exc:  # any failure of the compiler leaves training eager, not stopped
            log.warning("%s stays eager: torch.compile failed (%s: %s)", what, type(exc).__name__, exc)
            return False
        finally:
            with torch.no_grad():
                for buffer, saved in zip(network.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
        log.info("%s compiled in %.0f s", what, time.perf_counter() - started)
        return True

    def _compile_generator_pass(
        self, x_real: torch.Tensor, cond: torch.Tensor, cond_rec: torch.Tensor
    ) -> Callable[..., tuple[torch.Tensor | None, ...]] | None:
        """The compiled pass, compiled now by one forward and backward on this batch (G's BatchNorm
        statistics restored afterwards, no gradient kept), or None: not asked for, or it failed."""
        if not self.should_compile_generator():
            return None
        generator, autocast, joint = self.G, self._autocast, self.cfg.joint_decode

        def run(x_real: torch.Tensor, cond: torch.Tensor, cond_rec: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            g_pass = losses.generator_pass(generator, x_real, cond, cond_rec, autocast, joint)
            return g_pass.x_fake, g_pass.mask_fake, g_pass.x_rec_raw, g_pass.mask_rec

        compiled = torch.compile(run, dynamic=False)

        def trial() -> None:
            outputs = [t for t in compiled(x_real, cond, cond_rec) if t is not None]
            params = [p for p in generator.parameters() if p.requires_grad]
            torch.autograd.grad(sum(t.float().mean() for t in outputs), params, allow_unused=True)

        return compiled if self._trial_compile("the generator pass", generator, trial) else None

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters(), strict=True):
            p_ema.lerp_(p, 1 - decay)
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers(), strict=True):
            if self.cfg.ema_bn_batches > 0 and not self.batchnorm_frozen and b.is_floating_point():
                b_ema.lerp_(b, 1 - decay)  # statistics re-estimated at validation drift as the weights do
            else:
                b_ema.copy_(b)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_path(self, name: str = "last") -> Path:
        return self.run_dir / "checkpoints" / f"{name}.safetensors"

    def save_checkpoint(self, name: str = "last") -> Path:
        path = self.checkpoint_path(name)
        if not self.is_main:
            return path
        metadata = {
            "train_config": json.dumps(self.cfg.to_dict()),
            "architecture": self.arch,
            "generator_config": json.dumps(config_to_dict(self.G.config)),
            "step": str(self.step),
            "precision": self.precision,
            "elapsed_seconds": repr(self.elapsed),
            "images_seen": str(self.images_seen),
            "best_score": repr(self.best_score),
            "best_metrics": json.dumps(self.best_metrics),
            "batchnorm_frozen": "1" if self.batchnorm_frozen else "0",
        }
        return write_training_checkpoint(path, self._networks(), self._optimizers(), metadata)

    def _networks(self) -> dict[str, nn.Module]:
        return {"G": self.G, "D": self.D, "G_ema": self.G_ema}

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt_G": self.opt_G, "opt_D": self.opt_D}

    def _load_networks(self, path: str | Path, widen: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """G, D and G_ema from a training checkpoint, and the step/time/image counters; returns its
        tensors and metadata for the caller's optimiser and selection state. ``widen`` (a warm
        start): a generator whose condition now enters more decoder layers (``n_inject_layers``)
        starts from the parent's weights widened with zeros, so its outputs are the parent's."""
        tensors, meta = read_training_checkpoint(path)
        if widen:
            tensors = self._widened(path, tensors)
        load_networks(path, tensors, self._networks())
        self.step = int(meta["step"])
        self.elapsed = float(meta["elapsed_seconds"])
        self.images_seen = int(meta["images_seen"])
        return tensors, meta

    def _widened(self, path: str | Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for prefix in ("G", "G_ema"):
            sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            try:
                sub, widened = widen_state_dict(sub, getattr(self, prefix))
            except ValueError as exc:
                raise CheckpointError(f"{path}: its {prefix} does not fit this run's network ({exc})") from None
            if widened and prefix == "G":
                log.info(
                    "widened %d tensors of %s's generator with zeros (new skip gates keep their own init): %s",
                    len(widened),
                    path,
                    ", ".join(widened),
                )
            out |= {f"{prefix}.{k}": v for k, v in sub.items()}
        return out

    def load_checkpoint(self, path: str | Path) -> None:
        tensors, meta = self._load_networks(path)
        load_optimizers(tensors, meta, self._optimizers(), self.memory_format)
        self.best_metrics = json.loads(meta.get("best_metrics", "{}"))
        self.batchnorm_frozen = meta.get("batchnorm_frozen") == "1"
        # re-scored, so a run resumed under a changed selection rule compares like with like
        self.best_score = selection_score(self.best_metrics) if self.best_metrics else float(meta["best_score"])

    def init_from(self, path: str | Path, fresh_discriminator: bool = False) -> None:
        """Warm start: the networks of another run's checkpoint or of a released model folder
        (``weights/<name>``), fresh optimisers and selection. The run's config names the parent
        (``init_from``, set when the config was built), for the card.

        The step, wall-time and image counters carry on from the parent, so cards report the total
        training a model has had. The generator config may differ from the parent's where the
        tensors keep their shapes (e.g. ``conditioning``), and a ``deconv`` parent warm-starts a
        ``resize`` generator (its up-sampling kernels converted); anything else fails loudly here.
        A release without a discriminator starts D afresh only with ``fresh_discriminator``.
        """
        if Path(path).is_dir():
            parent_frozen = self._load_release(Path(path), fresh_discriminator)
        else:
            _, meta = self._load_networks(path, widen=True)
            parent_frozen = meta.get("batchnorm_frozen") == "1"
        if self.cfg.freeze_batchnorm and parent_frozen:
            # G's weights learnt with the parent's fixed statistics: keep them and G_ema. Re-estimating
            # them (and restarting G_ema from G) took MU-GAN from PSNR 100 / edit 90 % to 30.7 dB / 51 %.
            self.batchnorm_frozen = True
            log.info("%s trained with fixed BatchNorm statistics: this run keeps them", path)
        self.best_score, self.best_metrics = -math.inf, {}

    def _load_release(self, folder: Path, fresh_discriminator: bool) -> bool:
        """Load a release's networks and counters; True when it was trained with fixed BatchNorm statistics."""
        doc = read_config(folder)
        d_path = folder / DISCRIMINATOR_FILE
        if not d_path.is_file() and not fresh_discriminator:
            raise CheckpointError(
                f"{folder}: no {DISCRIMINATOR_FILE}, so fine-tuning would start with an untrained discriminator; "
                "pass --fresh-discriminator to accept that"
            )
        tensors = read_tensors(folder / WEIGHTS_FILE)
        if getattr(self.G.config, "upsample", "deconv") == "resize":
            tensors = convert_upsampling(tensors, self.G)
        tensors = {k: v.float() for k, v in tensors.items()}
        old_attrs = tuple(doc.get("attributes") or doc["config"]["attributes"])
        new_attrs = tuple(self.cfg.attributes)
        grow = len(new_attrs) > len(old_attrs)
        if new_attrs[: len(old_attrs)] != old_attrs:
            raise CheckpointError(
                f"{folder}: the run's attributes must start with the release's ({', '.join(old_attrs)}), "
                "new ones appended (--add-attributes)"
            )
        if grow:  # --add-attributes: the new conditioning inputs and D's new head rows start at zero
            tensors = grow_state_dict(tensors, self.G, len(old_attrs), len(new_attrs))
        else:  # more injection or late skip levels than the release: zero-widened, same outputs
            try:
                tensors, widened = widen_state_dict(tensors, self.G)
            except ValueError as exc:
                raise CheckpointError(f"{folder}: its generator does not fit this run's network ({exc})") from None
            if widened:
                log.info("widened %d tensors of %s's generator: %s", len(widened), folder, ", ".join(widened))
        for module in (self.G, self.G_ema):
            try:
                check_state_dict(module.state_dict(), tensors)
            except CheckpointError as exc:
                raise CheckpointError(f"{folder}: its generator does not fit this run's network ({exc})") from None
            module.load_state_dict(tensors)
        if d_path.is_file():
            d_tensors = {k: v.float() for k, v in read_tensors(d_path).items()}
            if grow:
                d_tensors = grow_state_dict(d_tensors, self.D, len(old_attrs), len(new_attrs))
            try:
                check_state_dict(self.D.state_dict(), d_tensors)
            except CheckpointError as exc:
                raise CheckpointError(f"{d_path}: does not fit this run's discriminator ({exc})") from None
            self.D.load_state_dict(d_tensors)
        else:
            log.warning("%s has no discriminator: D starts from scratch (--fresh-discriminator)", folder)
        training = doc.get("training") or {}
        self.step = int(training.get("steps") or 0)
        self.images_seen = int(training.get("images_seen") or 0)
        self.elapsed = float(training.get("wall_hours") or 0.0) * 3600
        return bool((training.get("train_config") or {}).get("freeze_batchnorm"))

    # ------------------------------------------------------------------ validation and samples
    def validate(self) -> dict[str, Any]:
        if self.classifier is None:  # it may have been trained since this run started
            self.classifier, self.classifier_attributes = self._load_classifier()
        x = self.val_set.get(torch.arange(len(self.val_set)))
        metrics = evaluate_generator(
            self.G_ema,
            x[0],
            x[1],
            tuple(self.cfg.attributes),
            self.classifier,
            self.classifier_attributes,
            batch_size=50,
            device=self.device,
            amp=self.precision == "bf16",
            gain=self.cfg.eval_gain,
            discriminator=self.D,
        )
        if self.cfg.eval_realism_faces > 0:
            metrics["realism"] = self._realism_probe()
        metrics["score"] = selection_score(metrics)
        metrics["step"] = self.step
        return metrics

    def _realism_probe(self) -> dict[str, Any] | None:
        """Matched KID and background change of the val edits (see ``eval_realism_faces``)."""
        from training.realism import (
            RealismConfig,
            RealismUnavailableError,
            SplitFaces,
            realism_inputs,
            realism_on_split,
        )

        n = self.cfg.eval_realism_faces
        probe = RealismConfig(n_faces=n, n_combined=0, subset_size=13 * n)
        try:
            if self._realism_inputs is None:  # once per run: the val split, Inception; the floor is train_set
                floor = SplitFaces.of(self.train_set, "train")
                self._realism_inputs = realism_inputs(self.cfg.cache_dir, "val", tuple(self.cfg.attributes), floor)
            report = realism_on_split(
                self.G_ema,
                self.cfg.cache_dir,
                "val",
                self.cfg.eval_gain,
                probe,
                self.precision,
                self.device,
                inputs=self._realism_inputs,
            )
        except RealismUnavailableError as exc:
            log.warning("no realism probe: %s", exc)
            return None
        keys = ("kid_x1000", "kid_x1000_worst", "background_change_worst", "background_change", "protocol")
        return {k: report[k] for k in keys}

    def write_samples(self) -> Path | None:
        if not self.is_main:
            return None
        x, c = self.val_set.get(torch.arange(min(8, len(self.val_set))))
        grid = edit_grid(
            self.G_ema, x.to(self.device), c.to(self.device), tuple(self.cfg.attributes), amp=self.precision == "bf16"
        )
        out = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        grid.save(self.run_dir / "samples" / "latest.png")
        return out

    # ------------------------------------------------------------------ the loop
    def fit(self, max_minutes: float | None = None, max_steps: int | None = None) -> None:
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config_json = (json.dumps(cfg.to_dict(), indent=2) + "\n").encode()
            atomic_write_bytes(self.run_dir / "train_config.json", config_json)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # pragma: no cover
                log.warning("tensorboard not installed: no scalars written")
        end_step = cfg.total_steps if max_steps is None else min(cfg.total_steps, self.step + max_steps)
        deadline = time.monotonic() + max_minutes * 60 if max_minutes else math.inf
        last_ckpt = time.monotonic()
        bar = tqdm(
            total=end_step,
            initial=self.step,
            desc=cfg.preset,
            unit="it",
            mininterval=5.0,
            dynamic_ncols=True,
            disable=not self.is_main,
        )
        window_t, window_imgs = time.monotonic(), 0
        log.info("training %s from step %d to %d on %s", cfg.preset, self.step, end_step, self.device)
        stop = _StopFlag()
        while self.step < end_step and not self._should_stop(deadline, stop):
            t0 = time.monotonic()
            logs = self.train_step()
            self.elapsed += time.monotonic() - t0
            window_imgs += cfg.batch_size
            bar.update(1)
            if self.step % cfg.log_every == 0:
                distributed.check_in_sync(self.G)
                rate = window_imgs / max(time.monotonic() - window_t, 1e-9)
                window_t, window_imgs = time.monotonic(), 0
                logs["images_per_s"] = rate
                bar.set_postfix(
                    {
                        k: f"{logs[k]:.3g}"
                        for k in ("d_loss", "g_cls", "g_rec", "mask_mean", "images_per_s")
                        if k in logs
                    }
                )
                if self.writer is not None:
                    for k, v in logs.items():
                        self.writer.add_scalar(f"train/{k}", v, self.step)
            if self.step % cfg.sample_every == 0:
                self.write_samples()
            if self.step % cfg.eval_every == 0:
                self.recompute_ema_batchnorm()  # on every rank: SyncBatchNorm under torchrun
                if self.is_main:
                    self._validate_and_select()
            if time.monotonic() - last_ckpt > cfg.checkpoint_every_minutes * 60:
                self.save_checkpoint()
                last_ckpt = time.monotonic()
        bar.close()
        stop.restore()
        if stop.requested:
            log.info("signal %s received: checkpointing and stopping", stop.requested)
        self.save_checkpoint()
        self.write_samples()
        if self.writer is not None:
            self.writer.close()
        distributed.check_in_sync(self.G)
        log.info("stopped at step %d (%.1f min of training in total)", self.step, self.elapsed / 60)

    def _should_stop(self, deadline: float, stop: _StopFlag) -> bool:
        """Time limit or signal; under torchrun every rank stops at the same step (any rank may ask)."""
        want = time.monotonic() >= deadline or stop.requested is not None
        if self.world_size > 1:
            flag = torch.tensor([1.0 if want else 0.0], device=self.device)
            torch.distributed.all_reduce(flag)
            want = bool(flag.item() > 0)
        return want

    def _validate_and_select(self) -> None:
        metrics = self.validate()
        realism = metrics.get("realism") or {}
        with open(self.run_dir / "val_metrics.jsonl", "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for tag, value in validation_scalars(metrics).items():
                self.writer.add_scalar(tag, value, self.step)
        log.info(
            "val step %d: psnr %.2f ssim %.3f edit %s (D takes %s) preserve %s (implied out %s) KIDx1000 %s "
            "background %s score %.4f",
            self.step,
            metrics["psnr"],
            metrics["ssim"],
            f"{metrics.get('mean_edit_success', float('nan')):.3f}",
            f"{metrics.get('mean_d_edit_success', float('nan')):.3f}",
            f"{metrics.get('mean_preservation', float('nan')):.3f}",
            f"{metrics.get('mean_preservation_excl_implied', float('nan')):.3f}",
            f"{realism.get('kid_x1000', float('nan')):.1f}",
            f"{realism.get('background_change_worst', float('nan')):.2f}",
            metrics["score"],
        )
        if metrics["score"] > self.best_score:
            self.best_score, self.best_metrics = metrics["score"], metrics
            self.save_checkpoint("best")
        self.save_checkpoint()


class _StopFlag:
    """SIGTERM / SIGINT end the loop after the current step, so the run checkpoints before exiting."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
