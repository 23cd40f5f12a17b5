"""What `wsiproto train --cache-features` saves: training time with and without the frozen
backbone's features cached.

    python benchmarks/feature_cache.py [--preset dualproto-vitb16] [--images 32]
        [--batch-size 16] [--views 8] [--epochs-projected 20]

For each setting it runs `wsiproto train` for 2 epochs on the same generated patches (random
towers: speed does not depend on the weights) and reads log.jsonl: the one-off cache build time
and the second epoch's training images/s. It then projects a run of ``--epochs-projected``
epochs (the reference's 20): ``epochs x images / rate`` without the cache, ``build + epochs x
images / rate`` with it, and prints the saving. Disk use of the cache is printed too
(float16, ``views x 4 blocks x width x 14 x 14`` per image).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def write_patches(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    for i in range(n):
        base = rng.integers(80, 230, size=(28, 28, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(base).resize((224, 224), Image.BICUBIC))
        label = "".join(str(int(v)) for v in rng.integers(0, 2, size=4))
        Image.fromarray(img).save(root / "train" / f"p{i:05d}+0[{label}].png")


def run(data: Path, out: Path, preset: str, batch: int, cache_views: int | None) -> dict:
    from wsiproto.train import TrainOptions, train

    t0 = time.perf_counter()
    train(TrainOptions(data=str(data), out=str(out), preset=preset, epochs=2, batch_size=batch,
                       val_split="none", workers=0, quiet=True, overwrite=True,
                       cache_features=cache_views is not None, cache_views=cache_views or 8),
          echo=lambda m: None)
    wall = time.perf_counter() - t0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    cache = next((e for e in log if e["event"] == "cache"), None)
    epochs = [e for e in log if e["event"] == "epoch"]
    return {"rate": epochs[-1]["train_images_per_s"], "build_s": cache["seconds"] if cache else 0.0,
            "bytes": cache["bytes"] if cache else 0, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="dualproto-vitb16")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--views", default="8,1", help="cache views to measure, comma separated")
    ap.add_argument("--epochs-projected", type=int, default=20)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsiproto-cache-"))
    data = work / "data"
    if not data.exists():
        write_patches(data, args.images)
    n, epochs = args.images, args.epochs_projected
    print(f"{args.preset}, {n} patches, batch {args.batch_size}, cpu count {os.cpu_count()}")
    base = run(data, work / "plain", args.preset, args.batch_size, None)
    plain_total = epochs * n / base["rate"]
    print(f"{'setting':<22}{'build s':>9}{'epoch img/s':>13}{f'{epochs} epochs s':>14}{'saving':>8}"
          f"{'cache MiB/img':>15}")
    print(f"{'no cache':<22}{0:>9.1f}{base['rate']:>13.1f}{plain_total:>14.1f}{'':>8}{'':>15}")
    for views in [int(v) for v in args.views.split(",")]:
        res = run(data, work / f"cache{views}", args.preset, args.batch_size, views)
        total = res["build_s"] + epochs * n / res["rate"]
        print(f"{f'cache, {views} views':<22}{res['build_s']:>9.1f}{res['rate']:>13.1f}{total:>14.1f}"
              f"{1 - total / plain_total:>8.0%}{res['bytes'] / n / 2**20:>15.2f}")


if __name__ == "__main__":
    main()
