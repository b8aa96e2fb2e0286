"""Kornia's augmentations next to rable_nb.augment: images/s and dispatched ops per view.

The project does not depend on kornia (its own views were faster); to repeat the
comparison recorded in rable_nb/engine/augment.py:

    pip install kornia==0.9.0
    OMP_NUM_THREADS=1 python scripts/bench_kornia.py --device cpu --batch-size 256

Kornia's nearest equivalents: weak = RandomResizedCrop(32, 0.2–1) + flip +
ColorJitter(.4,.4,.4,.1, p=.8) + RandomGrayscale(.2), per image like ours; strong =
RandomResizedCrop + flip + RandAugment(n=3, m=15, our 13 non-identity ops) +
RandomErasing(square, ≤ 1/4 of the image, fill .5). Kornia's RandAugment picks the three
ops once per batch with one fixed magnitude (ours: per image, random magnitudes), so it
computes fewer ops per call than ours does: the comparison favours kornia.
"""
import argparse
import json

import kornia.augmentation as K
import torch
from kornia.augmentation.auto import RandAugment

from rable_nb.engine import augment
from rable_nb.engine.networks import pick_device

POLICY = [[("auto_contrast", 0, 1)], [("equalize", 0, 1)], [("rotate", -30.0, 30.0)],
          [("posterize", 4.0, 8.0)], [("solarize", 0.0, 1.0)], [("color", 0.05, 1.95)],
          [("contrast", 0.05, 1.95)], [("brightness", 0.05, 1.95)],
          [("sharpness", 0.05, 1.95)], [("shear_x", -0.3, 0.3)], [("shear_y", -0.3, 0.3)],
          [("translate_x", -0.3, 0.3)], [("translate_y", -0.3, 0.3)]]


def kornia_views(device) -> dict:
    crop_flip = [K.RandomResizedCrop((32, 32), scale=(0.2, 1.0)), K.RandomHorizontalFlip()]
    weak = K.AugmentationSequential(*crop_flip, K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
                                    K.RandomGrayscale(p=0.2)).to(device)
    strong = K.AugmentationSequential(*crop_flip, RandAugment(n=3, m=15, policy=POLICY),
                                      K.RandomErasing(scale=(1 / 1024, 0.25), ratio=(1.0, 1.0),
                                                      value=0.5, p=1.0)).to(device)
    # kornia draws from the global generator: the view's generator is not used
    return {"kornia_weak": lambda x, generator=None: weak(x),
            "kornia_strong": lambda x, generator=None: strong(x)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, nargs="*", default=[256])
    args = parser.parse_args()
    views = {"weak": augment.weak_view, "strong": augment.strong_view,
             **kornia_views(pick_device(args.device))}
    print(json.dumps(augment.bench(args.device, args.batch_size, views)))


if __name__ == "__main__":
    main()
