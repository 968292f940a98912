"""How rare an attribute is in a split, and which other labels come with it (CelebA-format folder).

Source of the counts in README.md ("What limits realism"): of the training faces, how many are bald or
moustached, and what share of those are men, young, or have the other attributes listed.
Run: ``python .ci/label_stats.py [--data ../shared/datasets/celebahq-128] [--split train]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.data import SPLITS, read_index

log = logging.getLogger("label_stats")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/celebahq-128"))
    p.add_argument("--split", default="train", choices=sorted(SPLITS))
    p.add_argument("--attributes", default="Bald,Mustache,Eyeglasses,Pale_Skin,Blond_Hair,Brown_Hair")
    p.add_argument("--given", default="Male,Young", help="labels whose share among the attribute's faces is shown")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    index = read_index(args.data)
    labels = index.labels[index.split == SPLITS[args.split]].astype(bool)
    col = {a: i for i, a in enumerate(index.attr_names)}
    given = args.given.split(",")
    log.info("%s split: %d faces", args.split, len(labels))
    log.info("| attribute | faces | share | " + " | ".join(f"{g} among them" for g in given) + " |")
    log.info("|---|---|---|" + "---|" * len(given))
    for a in args.attributes.split(","):
        having = labels[labels[:, col[a]]]
        shares = " | ".join(f"{having[:, col[g]].mean():.1%}" if len(having) else "–" for g in given)
        log.info("| %s | %d | %.1f%% | %s |", a, len(having), 100 * len(having) / len(labels), shares)


if __name__ == "__main__":
    main()
