"""Which kept attributes an edit flips, per edit (the project's classifier, val faces, the model's gain).

Source of the per-edit table in weights/candidates/README.md ("Why preservation stays near 90 %").
Run: ``python .ci/preservation_flips.py weights/stgan [--faces 200]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.checkpoint import load_pretrained
from models.precision import resolve_precision
from training.data import CachedFaces
from training.evaluate import load_generator
from training.metrics import evaluate_generator

log = logging.getLogger("preservation_flips")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--faces", type=int, default=200)
    p.add_argument("--classifier", default="weights/classifier")
    p.add_argument("--cache-dir", default=".cache/datasets/celebahq-128")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    gen, gain = load_generator(args.model)
    attrs = tuple(gen.config.attributes)
    clf, clf_info = load_pretrained(args.classifier)
    x, c = (d := CachedFaces(args.cache_dir, "val", attrs, limit=args.faces)).get(torch.arange(len(d)))
    amp = resolve_precision("auto", torch.device("cpu")) == "bf16"
    m = evaluate_generator(gen, x, c, attrs, clf, tuple(clf_info.attributes), amp=amp, gain=gain, kept_flips=True)
    for name in attrs:
        top = sorted(((v, a) for a, v in m["kept_flips"][name].items()), reverse=True)[:4]
        log.info(
            "%-20s preservation %5.1f %% (implied left out %5.1f %%); flips: %s",
            name,
            m["preservation"][name] * 100,
            m["preservation_excl_implied"][name] * 100,
            ", ".join(f"{a} {v * 100:.0f} %" for v, a in top),
        )


if __name__ == "__main__":
    main()
