"""The training configuration: one typed dataclass, saved inside every checkpoint (nanoGPT style)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.attributes import STGAN_ATTRIBUTES
from models.config import config_from_dict, config_to_dict
from models.precision import PRECISIONS

COMPILE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    preset: str = "stgan-cpu"
    disc_preset: str = "discriminator-cpu"
    #: Overrides applied to the generator preset, e.g. {"base_channels": 16}.
    generator_overrides: dict[str, Any] = field(default_factory=dict)
    attributes: tuple[str, ...] = STGAN_ATTRIBUTES
    # data
    data: str = "../shared/datasets/celebahq-128"
    cache_dir: str = ".cache/datasets/celebahq-128"
    batch_size: int = 32
    hflip: bool = True
    #: Fraction of the batch whose target flips one random attribute (the rest get the labels of
    #: another image of the batch, as STGAN/AttGAN sample them).
    single_flip_fraction: float = 0.5
    #: Relative odds of each attribute being the one flipped, e.g. {"Bald": 4, "Mustache": 3}; the others
    #: weigh 1. Empty: uniform (and the same random draws as before the field existed).
    flip_weights: dict[str, float] = field(default_factory=dict)
    # optimisation
    total_steps: int = 200_000
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    #: Multiply both learning rates by 0.1 from this step on (STGAN: after half the epochs).
    lr_decay_step: int = 100_000
    n_critic: int = 1
    #: "nsgan" (logistic loss + lazy R1) or "wgan" (Wasserstein + gradient penalty, as the papers).
    gan_loss: str = "nsgan"
    lambda_gp: float = 10.0
    r1_gamma: float = 1.0
    r1_interval: int = 4
    lambda_rec: float = 100.0
    #: With a mask head: L1 of the raw (unblended) decoder output against the input at zero difference.
    lambda_rec_raw: float = 100.0
    lambda_g_cls: float = 10.0
    #: BCE of D's classifier on the fake, averaged over only the attributes each edit changes: the
    #: mean over all attributes hides an edit that did not happen behind the ones kept.
    lambda_g_cls_changed: float = 0.0
    #: D's classifier on the edit against D's reading of the input face (soft targets), over only the
    #: attributes each edit keeps (losses.kept_attribute_consistency): preservation. The mean BCE of
    #: ``lambda_g_cls`` pushes kept attributes towards their labels, which the served models met while
    #: their Bald, Mustache and No Beard edits still aged and masculinised the face (the project's
    #: classifier: preservation 75-85 % on those rows). Costs one no-grad D pass per step; 0: off.
    lambda_g_cls_kept: float = 0.0
    #: Leave the attributes an edit implies in the data (``models.attributes.IMPLIED_VALUES``: a
    #: moustache comes with No_Beard = 0 and Male = 1) out of G's classification losses: neither held
    #: at the source's value by ``lambda_g_cls`` and ``lambda_g_cls_kept``, nor pushed to change.
    #: Off, a moustache on a woman is asked to read as a moustache, as female and as beardless at
    #: once, which no face in the data does.
    free_implied_attributes: bool = False
    lambda_d_cls: float = 1.0
    #: BCE of D's classifier on the (detached) edits towards their *source* value, over only the
    #: attributes each edit changes. D's classifier otherwise learns from real faces alone, so off the
    #: face manifold its verdict is arbitrary and G can satisfy it with a pattern instead of the
    #: attribute (stgan-v2 at step 13500: D took 99-100 % of its Bald, Eyeglasses and Mustache edits
    #: for flipped, the independent classifier 4-7 %). With this term an edit only counts for D once
    #: it looks like real faces with the attribute. 0 turns it off (AttGAN/STGAN).
    lambda_d_cls_fake: float = 0.0
    #: The attributes the fake term covers (empty: all of the run's). The term is a second adversarial
    #: game: D learns to read G's current edits as their source, G chases whatever D does not yet
    #: reject, and the edits can drift from the attribute. Continuing the served MU-GAN with it on
    #: every attribute lost woman -> man 94 -> 33 % in 2,000 steps (the release's own D took the drifted
    #: edits for male, 92 %, and its real ones for female); without it (session 33) Male, Mustache and
    #: the background held or improved within 1,000 steps, but Bald, the rarest label, fell 77 -> 11 %
    #: while D took 99 % of its edits for bald; at 0.25 on all, 750 steps kept every slider (Bald 89 %).
    #: Limited here, the covered terms keep the weight they have in the full term (``fake_attribute_bce``).
    d_cls_fake_attributes: tuple[str, ...] = ()
    #: Class-balanced BCE for D's classifier on real faces: positives weigh 0.5/p and negatives
    #: 0.5/(1-p) (p: the attribute's training frequency), capped at this; 1 turns it off. Rare labels
    #: (Bald 2 %, Mustache 6 %) are otherwise all but ignored by D's classifier, which G is judged by.
    d_cls_balance_max: float = 1.0
    #: Differences are scaled per edited sample by a factor drawn from U(1, diff_scale_max), so a
    #: served edit gain up to this value stays inside what the generator trained on.
    diff_scale_max: float = 1.0
    lambda_mask_l1: float = 0.2
    lambda_mask_tv: float = 1.0
    #: L1 of the edit's change off the face (losses.background_map: 0 on the face, 1 at the crop's
    #: borders), so colour edits do not recolour the background; 0 turns it off.
    lambda_background: float = 0.0
    #: The mask's L1 is weighted 1 + w * r^2 (r: distance from the crop's centre, 1 at the corners),
    #: so opening the mask over the background (corners, borders of the aligned crop) costs more.
    mask_border_weight: float = 0.0
    #: Per edited image, the mask's mean is pushed above this floor (see losses.mask_regularisation).
    mask_floor: float = 0.05
    lambda_mask_floor: float = 10.0
    #: With a mask head: the mean of the mask at zero difference (the reconstruction's), pushed towards 0
    #: so the overlay marks nothing when no slider moves. In training mode it was already ~0.002 for
    #: MU-GAN; the open mask seen at inference (0.37) came from BatchNorm statistics (see
    #: ``joint_decode``), which this term cannot reach. A guard; mugan-v4 trains with 1.
    lambda_mask_rec: float = 0.0
    #: Decode the edit and the reconstruction as one batch (see losses.generator_pass): BatchNorm then
    #: normalises them in training as it does at inference. False: two decodes, as every run before
    #: 2026-11-30 did (one resumed from then switches unless given ``--set joint_decode=false``).
    joint_decode: bool = True
    #: Share of the batch also decoded at zero difference for the reconstruction terms (``lambda_rec``,
    #: ``lambda_rec_raw``, ``lambda_mask_rec``): the first ``max(1, round(f * B))`` faces of each
    #: (shuffled) batch. Every face is still edited. The reconstruction is a second decode of the batch,
    #: about 36 % of a STGAN-cpu step's multiply-adds at 1; at 0.25 a step does 1.37x fewer (MU-GAN-cpu
    #: 1.43x), but warm-started from the served STGAN it edited 2-3 points less at every validation of a
    #: 2,000-step A/B; the same A/B on MU-GAN was level within its noise (bench/RESULTS.md). Recipes keep 1.
    rec_fraction: float = 1.0
    #: G's BatchNorm layers run with fixed statistics in training (eval mode; their scale and shift still
    #: learn), so a face's edit no longer depends on the other faces of its batch and training computes
    #: exactly what inference serves. When the freeze starts (a new run, or a resumed one not frozen
    #: before) the statistics are re-estimated once from G's own training passes and G_ema restarts as
    #: a copy of G (an average of weights normalised another way would mix two functions); validation
    #: then keeps them. A run warm-started from a release trained this way keeps the release's.
    #: For the late phase of a run: MU-GAN v4's live G at step 12753 edited val faces 5.9 levels
    #: differently (max 240) in training mode than in eval mode, joint decode or not.
    #: Lower ``lr_g`` with it: Adam's moments were estimated through BatchNorm's normalisation, and
    #: without it the same step size is far larger in effect (MU-GAN v4, one-off, 3 steps after the
    #: freeze: raw reconstruction L1 0.052 -> 0.11 at 2e-4; 0.052 -> 0.041 at 2e-5).
    freeze_batchnorm: bool = False
    ema_decay: float = 0.999
    #: Before each validation (and so in every ``best`` checkpoint) the EMA generator's BatchNorm
    #: statistics are re-estimated from its own activations on this many training batches
    #: (:mod:`training.batchnorm`); between validations they follow the live generator's by the same
    #: EMA as the weights. 0: copy the live generator's statistics every step (the old behaviour).
    ema_bn_batches: int = 16
    # machinery
    seed: int = 0
    device: str = "auto"
    #: "auto": bf16 autocast only where the device has bf16 units (AMX / avx512-bf16, or a bf16 GPU).
    precision: str = "auto"
    channels_last: bool = True
    #: ``torch.compile`` (inductor) of the generator's forward and backward pass (:meth:`Trainer.generator_pass`):
    #: "auto" compiles on a CPU with a C++ compiler, for a generator of a million parameters or more, in a
    #: one-process run (bf16 STGAN-cpu on the 2-core EPYC with avx512-bf16: 1.11x the images/s; MU-GAN-cpu
    #: 1.02x; bench/RESULTS.md); "on" wherever torch.compile runs; "off" never. A compile that fails leaves
    #: training eager, with a warning.
    compile_generator: str = "auto"
    #: The same for the discriminator (:meth:`Trainer.discriminator`): "auto" compiles where the generator
    #: pass would (a discriminator of a million parameters or more). AOTAutograd has no double backward: an
    #: R1 step's real pass and penalty compile as one function (``losses.real_pass_with_r1``); WGAN-GP's
    #: gradient penalty keeps D eager.
    compile_discriminator: str = "auto"
    threads: int = 0
    log_every: int = 10
    sample_every: int = 500
    eval_every: int = 1000
    eval_images: int = 500
    #: Val faces of the realism probe at every validation (matched KID×1000 and background change of
    #: their 13 single edits, :mod:`training.realism`), which checkpoint selection is penalised by; 0: off.
    eval_realism_faces: int = 0
    #: Edit gain the val selection measures at (released models are served at a calibrated gain > 1).
    eval_gain: float = 1.0
    #: Training checkpoint this run was warm-started from (``train --init-from``); "" for a fresh run.
    init_from: str = ""
    checkpoint_every_minutes: float = 10.0
    classifier: str = "weights/classifier"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0.0 < self.rec_fraction <= 1.0:
            raise ValueError(f"rec_fraction must be in (0, 1], got {self.rec_fraction}")
        if self.diff_scale_max < 1.0:
            raise ValueError(f"diff_scale_max must be >= 1, got {self.diff_scale_max}")
        if self.compile_generator not in COMPILE_MODES:
            raise ValueError(f"compile_generator must be one of {COMPILE_MODES}, got {self.compile_generator!r}")
        if self.compile_discriminator not in COMPILE_MODES:
            raise ValueError(
                f"compile_discriminator must be one of {COMPILE_MODES}, got {self.compile_discriminator!r}"
            )
        if self.gan_loss not in ("nsgan", "wgan"):
            raise ValueError(f"gan_loss must be 'nsgan' or 'wgan', got {self.gan_loss!r}")
        object.__setattr__(self, "attributes", tuple(self.attributes))  # frozen: set once, here
        object.__setattr__(self, "d_cls_fake_attributes", tuple(self.d_cls_fake_attributes))
        if not set(self.d_cls_fake_attributes) <= set(self.attributes):
            raise ValueError(
                f"d_cls_fake_attributes must name attributes of this run ({', '.join(self.attributes)}), "
                f"got {self.d_cls_fake_attributes}"
            )
        unknown = sorted(set(self.flip_weights) - set(self.attributes))
        if (
            unknown
            or any(w < 0 for w in self.flip_weights.values())
            or (self.flip_weights and not any(self.flip_weights.get(a, 1.0) > 0 for a in self.attributes))
        ):
            raise ValueError(
                f"flip_weights must give attributes of this run ({', '.join(self.attributes)}) weights >= 0, "
                f"not all 0; got {self.flip_weights}"
            )

    @property
    def uses_r1(self) -> bool:
        """Whether D's updates carry the lazy R1 penalty (every ``r1_interval``-th step)."""
        return self.gan_loss == "nsgan" and self.r1_gamma > 0

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        if "amp" in data:  # checkpoints before `precision`: amp=True meant "bf16 where it helps"
            data.setdefault("precision", "auto" if data.pop("amp") else "fp32")
        return config_from_dict(cls, data)
