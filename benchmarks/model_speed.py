"""Forward and train-step throughput of the DualProtoSeg presets, and their parameter counts.

Printed figures, not a timed test. Towers are random-init (no weights are downloaded); speed does
not depend on the weights. ``dualproto-conch`` needs ``pip install 'wsiproto[conch]'``. Example::

    python benchmarks/model_speed.py --presets dualproto-tiny dualproto-vitb16 dualproto-conch \
        --batch-size 8
    python benchmarks/model_speed.py --device cuda --autocast bf16 --batch-size 64   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rate(fn, batch: int, steps: int, warmup: int = 1, rounds: int = 1) -> float:
    """Images/s of ``steps`` calls after a warm-up; the best of ``rounds`` timings (on a
    shared machine the best round is the one least disturbed by other jobs)."""
    for _ in range(warmup):
        fn()
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        best = max(best, batch * steps / (time.perf_counter() - start))
    return best


def bench(preset: str, batch: int, steps: int, device: str, autocast: str | None = None,
          rounds: int = 1) -> dict:
    import torch

    from wsiproto.model import create_model

    t0 = time.perf_counter()
    model = create_model(preset, seed=0, device=device)
    build_s = time.perf_counter() - t0
    counts = model.parameter_counts()
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = (torch.rand(batch, model.num_classes, device=device) > 0.5).float()
    amp = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if autocast == "bf16"
           else contextlib.nullcontext())

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    model.eval()

    def forward():
        with torch.inference_mode(), amp:
            model(images)
        sync()

    fwd = _rate(forward, batch, steps, rounds=rounds)

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=1e-3)

    def train_step():
        with amp:
            out = model(images, cams=False)
            loss, _ = model.loss(out, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    train = _rate(train_step, batch, steps, rounds=rounds)
    return {"preset": preset, "build_s": build_s, "forward_img_s": fwd, "train_img_s": train,
            **counts, "prototypes": model.num_prototypes, "blocks": model.backbone.blocks}


def _default_presets() -> list[str]:
    import importlib.util

    conch = importlib.util.find_spec("conch") is not None
    return ["dualproto-tiny", "dualproto-vitb16"] + (["dualproto-conch"] if conch else [])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=None,
                        help="default: tiny, vitb16 and conch (when wsiproto[conch] is installed)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed iterations after one warm-up")
    parser.add_argument("--rounds", type=int, default=1,
                        help="timings per figure, the best kept (for machines shared with other jobs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", default=None, choices=("bf16",),
                        help="mixed precision as `wsiproto train` uses it on a GPU")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {args.device}, batch {args.batch_size}, "
          f"{args.steps} timed steps, best of {args.rounds}, autocast {args.autocast or 'off'}")
    header = f"{'preset':<18} {'forward img/s':>14} {'train img/s':>12} {'trainable':>12} " \
             f"{'frozen':>12} {'prototypes':>10}  blocks"
    print(header)
    for preset in args.presets or _default_presets():
        r = bench(preset, args.batch_size, args.steps, args.device, args.autocast, args.rounds)
        print(f"{r['preset']:<18} {r['forward_img_s']:>14.1f} {r['train_img_s']:>12.1f} "
              f"{r['trainable']:>12,} {r['frozen']:>12,} {r['prototypes']:>10}  {r['blocks']}",
              flush=True)


if __name__ == "__main__":
    main()
