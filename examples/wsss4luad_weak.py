"""Weakly supervised training on real WSSS4LUAD tissue, evaluated on held-out source images.

    python examples/wsss4luad_weak.py [--shared ../shared/data] [--out runs/wsss4luad]

1. Cuts ``wsss4luad/val`` (31 lung adenocarcinoma images with pixel masks: tumor epithelium,
   tumor-associated stroma, normal, background) into 224-px crops whose image-level label is the
   set of classes present in the crop's mask; the masks themselves are never used for training.
   The split is by source image: about 60% of the images train, 10% validate (checkpoint
   selection and presence thresholds), 30% are held out for the test (see
   ``wsiproto.data.crops``).
2. ``wsiproto train`` with ``dualproto-tiny`` on this CPU (random towers, frozen as in the
   method: no pretrained weights exist here).
3. ``wsiproto evaluate`` on the held-out crops in both protocols, next to two model-free
   baselines on the same pixels, printed as one Markdown table and saved as results.json.

WSSS4LUAD is for research use only: the generated crops stay in ``--out``, never commit them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def wsiproto(*args: str) -> str:
    """Run the wsiproto command line as a user would; its stdout."""
    cmd = [sys.executable, "-m", "wsiproto", *args]
    print("$ wsiproto " + " ".join(args), flush=True)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(HERE.parents[1] / "shared" / "data"))
    ap.add_argument("--out", default="runs/wsss4luad")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unfreeze", action="store_true",
                    help="train the (random) towers too; default: frozen, as in the method")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from wsiproto.data import build_mask_crops, open_dataset
    from wsiproto.evaluate import format_table, trivial_baselines

    source = Path(args.shared) / "wsss4luad" / "val"
    if not (source / "img").is_dir():
        sys.exit(f"wsss4luad_weak: error: {source}: no WSSS4LUAD images; pass --shared DIR")
    out = Path(args.out)
    data, run = out / "data", out / "run"
    t0 = time.perf_counter()
    if not (data / "manifest.json").is_file():
        build_mask_crops(source, data, seed=args.seed, overwrite=True)
    manifest = json.loads((data / "manifest.json").read_text())
    print(json.dumps(manifest.get("counts", {}), indent=None))

    train_args = ["train", "--data", str(data), "--out", str(run), "--preset", "dualproto-tiny",
                  "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                  "--lr", str(args.lr), "--seed", str(args.seed), "--quiet"]
    if args.unfreeze:
        train_args.append("--unfreeze")
    if (run / "train.json").is_file():
        train_args.append("--resume")
    wsiproto(*train_args)
    train_s = time.perf_counter() - t0

    results = {}
    for protocol in ("predicted", "oracle"):
        results[f"DualProtoSeg-tiny, {protocol}"] = json.loads(wsiproto(
            "evaluate", "--model", str(run), "--data", str(data), "--split", "test",
            "--protocol", protocol, "--quiet"))
    test = open_dataset(data, "test", kind="wsss4luad")
    train = open_dataset(data, "train", kind="wsss4luad")
    base = trivial_baselines(test, train.labels)
    names = test.table.names
    full = names + [test.table.background_name]
    results["baseline: majority class everywhere (predicted)"] = base["majority"].summary(full)
    results["baseline: image's commonest true class (oracle)"] = base["oracle_fill"].summary(full)

    table = format_table(results, names)
    sources = len(manifest.get("splits", {}).get("test", []))
    print(f"\nheld-out test: {len(test)} crops from {sources} source images; training + "
          f"evaluation took {time.perf_counter() - t0:.0f} s (training {train_s:.0f} s)\n")
    print(table)
    keep = ("mIoU", "mDice", "FwIoU", "IoU")
    (out / "results.json").write_text(json.dumps(
        {k: {m: v[m] for m in keep} for k, v in results.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
