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
from models.attributes import condition_vector, exclusive_groups_for, implied_changes
from models.checkpoint import load_pretrained
from training.data import CachedFaces
from training.evaluate import load_generator
from training.metrics import flip_targets

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
    gen.eval()
    attrs = tuple(load_pretrained(args.model)[1].attributes)
    clf, clf_info = load_pretrained(args.classifier)
    idx = [clf_info.attributes.index(a) for a in attrs]
    x, c = (d := CachedFaces(args.cache_dir, "val", attrs, limit=args.faces)).get(torch.arange(len(d)))
    groups = exclusive_groups_for(list(attrs))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pred_src = (clf(x).float()[:, idx] > 0).float()
        encoded = gen.encode(x)
        for i, name in enumerate(attrs):
            c_trg = flip_targets(c, i, groups)
            x_edit, _ = gen.decode(encoded, condition_vector(c, c_trg - c, gen.config.conditioning, gain))
            pred = (clf(x_edit.float()).float()[:, idx] > 0).float()
            kept = (c_trg == c).float()
            kept[:, i] = 0
            flips = ((pred != pred_src).float() * kept).sum(0) / kept.sum(0).clamp_min(1)
            kept_share = ((pred == pred_src).float() * kept).sum() / kept.sum()
            kept_free = kept * (1 - implied_changes(c, c_trg, attrs))
            free_share = ((pred == pred_src).float() * kept_free).sum() / kept_free.sum()
            top = sorted(((flips[j].item(), attrs[j]) for j in range(len(attrs)) if j != i), reverse=True)[:4]
            log.info(
                "%-20s preservation %5.1f %% (implied left out %5.1f %%); flips: %s",
                name,
                kept_share * 100,
                free_share * 100,
                ", ".join(f"{a} {v * 100:.0f} %" for v, a in top),
            )


if __name__ == "__main__":
    main()
