"""Is data loading the bottleneck of `wsiproto train`? Training images/s over the model's own
train-step images/s on the same batch.

    python benchmarks/train_loader.py [--preset dualproto-tiny] [--images 512] [--batch-size 16]
        [--workers N] [--tiles ../shared/data/tiles]

1. Builds a BCSS-WSSS-format tree of ``--images`` 224-px PNG mosaics from the real tiles in
   ``../shared/data/tiles`` (or, without them, textured noise PNGs of the same size).
2. Model alone: forward + backward + AdamW step on one batch already in memory (normalised
   tensors), repeated; images/s.
3. `wsiproto train` for 2 epochs without validation (reading PNGs, augmentation, loader
   workers, logging and the per-epoch checkpoint included); its own per-epoch training rate
   (``train_images_per_s`` in log.jsonl) of the second epoch, so the loader start-up is counted
   once, as in a long run, and the model's first-call warm-up not at all.

Last line: ``loader_efficiency=<ratio>`` (target >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def build_data(root: Path, n: int, tiles: Path) -> str:
    if tiles.is_dir():
        from wsiproto.data import build_tile_mosaics

        build_tile_mosaics(tiles, root, n_train=n, n_eval=0, n_val=0, seed=0)
        return f"{n} mosaics of real tiles from {tiles}"
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    for i in range(n):
        base = rng.integers(80, 230, size=(28, 28, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(base).resize((224, 224), Image.BICUBIC)).astype(np.int16)
        img = np.clip(img + rng.integers(-20, 20, size=img.shape), 0, 255).astype(np.uint8)
        label = "".join(str(int(v)) for v in rng.integers(0, 2, size=4))
        Image.fromarray(img).save(root / "train" / f"p{i:05d}+0[{label}].png")
    return f"{n} textured noise PNGs (no real tiles at {tiles})"


def model_alone(preset: str, batch: int, steps: int) -> float:
    import torch

    from wsiproto.model import create_model

    model = create_model(preset, seed=0).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, 3, 224, 224)
    y = (torch.rand(batch, 4) > 0.5).float()

    def step():
        loss, _ = model.loss(model(x, cams=False), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="dualproto-tiny")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None, help="loader processes (default: train's)")
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiles"
    ap.add_argument("--tiles", default=str(shared))
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from wsiproto.train import TrainOptions, default_workers, train

    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsiproto-loader-"))
    data = work / "data"
    if not data.exists():
        print("data:", build_data(data, args.images, Path(args.tiles)))
    workers = default_workers() if args.workers is None else args.workers
    print(f"cpu count {os.cpu_count()}, torch threads {torch.get_num_threads()}, loader workers {workers}")

    steps = max(4, args.images // args.batch_size // 2)
    own = model_alone(args.preset, args.batch_size, steps)
    print(f"model alone: {own:.1f} images/s (forward + backward + step, batch {args.batch_size}, "
          f"{steps} steps on one batch in memory)")

    run = work / "run"
    t0 = time.perf_counter()
    train(TrainOptions(data=str(data), out=str(run), preset=args.preset, epochs=2,
                       batch_size=args.batch_size, val_split="none", workers=workers, quiet=True,
                       overwrite=True), echo=lambda m: None)
    wall = time.perf_counter() - t0
    epochs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "epoch"]
    rates = [e["train_images_per_s"] for e in epochs]
    per_epoch = ", ".join(f"epoch {e['epoch']} {r:.1f}" for e, r in zip(epochs, rates))
    print(f"wsiproto train: {per_epoch} "
          f"images/s ({args.images} PNGs per epoch; whole run {wall:.1f} s incl. checkpoints and "
          "threshold calibration)")
    print(f"loader_efficiency={rates[-1] / own:.3f}")


if __name__ == "__main__":
    main()
