"""Reproduce wsiproto's bundled default model (``wsiproto/model/default``) from ../shared/data.

    python examples/train_default_model.py [--shared ../shared/data] [--out runs/default-model]
        [--install]

1. Builds weakly labelled 224-px mosaics from the real H&E tiles of Kather 2016 and
   CRC-VAL-HE-7K (``wsiproto.data.build_tile_mosaics``: TUMOR/TUM -> TUM, STROMA/STR -> STR,
   LYMPHO/LYM -> LYM, DEBRIS/DEB -> NEC, EMPTY/ADIPOSE/ADI -> background, other classes left
   out); one tile per class of each source is held out of training, and the test mosaics are
   made from those held-out tiles only, with exact masks.
2. ``wsiproto train`` with ``dualproto-tiny`` on this CPU: the towers are random (no pretrained
   weights exist here) and frozen as in the method; the prompts, prototypes, refiner and pyramid
   heads learn.
3. Stores the best checkpoint as float16 (under 10 MB) and evaluates *that stored model* on the
   held-out test mosaics in both protocols, next to two model-free baselines.
4. With ``--install``: copies the stored model into ``wsiproto/model/default`` and writes its
   MODEL_CARD.md with the numbers just measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE_DEFAULT = HERE.parent / "wsiproto" / "model" / "default"
SETTINGS = {"n_train": 2000, "n_eval": 200, "seed": 0}
TRAIN = ["--preset", "dualproto-tiny", "--epochs", "10", "--batch-size", "16", "--lr", "1e-3",
         "--seed", "0"]


def wsiproto(*args: str) -> str:
    cmd = [sys.executable, "-m", "wsiproto", *args]
    print("$ wsiproto " + " ".join(args), flush=True)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def model_card(results: dict, table: str, manifest: dict, train_s: float, command: str,
               size_mb: float) -> str:
    used = manifest.get("tiles_used", {})
    tiles_used = json.dumps({k: len(v) for k, v in used.items()}) if isinstance(used, dict) else used
    n_held = len(manifest.get("tiles", {}).get("holdout", []))
    cpu = platform.processor() or platform.machine()
    pred = results["DualProtoSeg-tiny, predicted"]
    orac = results["DualProtoSeg-tiny, oracle"]
    return f"""# wsiproto default model: dualproto-tiny on colorectal H&E tiles

A small DualProtoSeg model (`dualproto-tiny`: open_clip ViT 4 x 128 and text tower 4 x 128 with
random weights, frozen as in the method since no pretrained vision-language weights were
available; the CoOp prompts, image prototypes, refiner and pyramid heads are trained)
that `wsiproto segment` and `wsiproto demo` use when no `--model` is given. Classes: the BCSS
table, TUM (tumour), STR (stroma), LYM (lymphocytes), NEC (necrosis / debris) and background.
Input: 224-px tiles at 0.5 um/px (about 20x). Stored as float16 safetensors ({size_mb:.1f} MB).

**A demonstration model, not for diagnosis or any clinical use.** It has seen a few dozen
colorectal tiles; expect it to be wrong on other organs, stains, scanners and magnifications.

## Data and licence

Real H&E tiles from ../shared/data, both CC BY 4.0:

- Kather JN et al., "Multi-class texture analysis in colorectal cancer histology", Sci Rep 2016
  (Kather 2016, 150-px tiles at 0.495 um/px);
- Kather JN et al., "Predicting survival from colorectal cancer histology slides using deep
  learning", PLoS Med 2019 (CRC-VAL-HE-7K, 224-px tiles at 0.5 um/px).

Mapping: TUMOR/TUM -> TUM, STROMA/STR -> STR, LYMPHO/LYM -> LYM, DEBRIS/DEB -> NEC,
EMPTY/ADIPOSE/ADI -> background; COMPLEX, MUCOSA, MUC, MUS, NORM are left out. Training images
are {SETTINGS['n_train']} mosaics (2-4 regions of random layout, or a single region) whose
image-level label is the set of classes present; masks are never used in training. One tile per
class of each source ({n_held} tiles) is held out, and the {SETTINGS['n_eval']} test mosaics are
made from held-out tiles only, so the test numbers below are on tissue the model never saw
(but from the same two collections). Tiles per split: {tiles_used}.

## Reproduce

```console
{command}
```

Training took {train_s / 60:.0f} min on {os.cpu_count()} CPU cores ({cpu}).
Retraining gives the same weights on the same software up to float rounding (seeded data
order, augmentation and initialisation); other torch builds or CPUs may differ within noise.

## Held-out test mosaics ({SETTINGS['n_eval']} images, IoU %)

{table}

`predicted`: presence from the model's own class probabilities (thresholds calibrated on the
validation mosaics), what you get on a slide. `oracle`: presence from the true image labels,
the protocol of published BCSS-WSSS numbers. Predicted mIoU {100 * pred['mIoU']:.1f}, oracle
mIoU {100 * orac['mIoU']:.1f}.

## Limits

- Colorectal H&E only, at ~0.5 um/px; other tissue gets one of the four classes anyway.
- Mosaics are not slides: region borders in training images are straight or smooth, and the
  tiles come from two collections only.
- A random-init tiny tower, not a pathology foundation model: use `dualproto-vitb16` with real
  weights (`wsiproto train --preset dualproto-vitb16 --pretrained FILE`) for research.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(HERE.parents[1] / "shared" / "data"))
    ap.add_argument("--out", default="runs/default-model")
    ap.add_argument("--install", action="store_true",
                    help="copy the model into wsiproto/model/default with its model card")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from wsiproto.data import build_tile_mosaics, open_dataset
    from wsiproto.evaluate import format_table, trivial_baselines
    from wsiproto.model import load_model, save_model

    tiles = Path(args.shared) / "tiles"
    out = Path(args.out)
    data, run, stored = out / "data", out / "run", out / "model"
    if not (data / "manifest.json").is_file():
        build_tile_mosaics(tiles, data, overwrite=True, **SETTINGS)
    manifest = json.loads((data / "manifest.json").read_text())

    t0 = time.perf_counter()
    train_args = ["train", "--data", str(data), "--out", str(run), *TRAIN, "--quiet"]
    if (run / "train.json").is_file():
        train_args.append("--resume")
    wsiproto(*train_args)
    train_s = time.perf_counter() - t0
    if (run / "metrics.json").is_file():
        train_s = json.loads((run / "metrics.json").read_text()).get("train_seconds", train_s)

    save_model(load_model(run / "best"), stored, half=True)
    results = {}
    for protocol in ("predicted", "oracle"):
        results[f"DualProtoSeg-tiny, {protocol}"] = json.loads(wsiproto(
            "evaluate", "--model", str(stored), "--data", str(data), "--split", "test",
            "--protocol", protocol, "--quiet", "--save", str(out / f"eval-test-{protocol}.json")))
    test = open_dataset(data, "test", kind="bcss")
    train_set = open_dataset(data, "train", kind="bcss")
    names = test.table.names
    full = names + [test.table.background_name]
    base = trivial_baselines(test, train_set.labels)
    results["baseline: majority class everywhere (predicted)"] = base["majority"].summary(full)
    results["baseline: image's commonest true class (oracle)"] = base["oracle_fill"].summary(full)
    table = format_table(results, names)
    print(table)
    (out / "results.json").write_text(json.dumps(
        {k: {m: v[m] for m in ("mIoU", "mDice", "FwIoU", "IoU")} for k, v in results.items()},
        indent=2) + "\n")

    if args.install:
        size_mb = sum(f.stat().st_size for f in stored.iterdir()) / 1e6
        command = "python examples/train_default_model.py --install"
        card = model_card(results, table, manifest, train_s, command, size_mb)
        tmp = PACKAGE_DEFAULT.with_name("default.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(stored, tmp)
        (tmp / "MODEL_CARD.md").write_text(card)
        if PACKAGE_DEFAULT.exists():
            shutil.rmtree(PACKAGE_DEFAULT)
        tmp.rename(PACKAGE_DEFAULT)
        print(f"installed {PACKAGE_DEFAULT} ({size_mb:.1f} MB)")


if __name__ == "__main__":
    main()
