"""Training DualProtoSeg from image-level labels (`wsiproto train`).

A run folder (``--out RUN``) holds::

    train.json        the settings (checked on --resume), dataset summary, environment
    log.jsonl         one JSON object per line: start, every N steps, every epoch, end
    last/             the latest epoch: model.safetensors + config.json (a loadable model)
                      + trainer_state.pt (optimizer, epoch, step, best so far)
    best/             the model with the best validation mIoU so far (or the last epoch when
                      the dataset has no validation split); what `wsiproto segment --model RUN`
                      and `wsiproto evaluate --model RUN` use
    metrics.json      the final validation metrics of best/ in both protocols
    cache/            backbone features, with --cache-features

Checkpoints are written to a temporary folder and swapped in, so ``last/`` and ``best/`` are
always complete. ``--resume`` continues after the last finished epoch; because the data order and
every augmentation are functions of ``(seed, epoch, image index)`` and the optimizer state is
saved, an interrupted-then-resumed run ends with the same weights as an uninterrupted one.

Choices where the method leaves room (the reference hyper-parameters are the defaults of the
``dualproto-vitb16`` preset, see its ``train`` section):

* learning rate: AdamW, poly decay ``lr * (1 - step / total) ** 0.9`` per step, no warm-up;
* validation each epoch in the ``oracle`` protocol (the published one) on the ``val`` split; the
  same pass calibrates per-class presence thresholds (max F1 of the image-level presence) for
  the ``predicted`` protocol, stored in the checkpoint's config. ``--select-by predicted`` adds
  a second pass per epoch and selects by the predicted-protocol mIoU instead;
* without a validation split, thresholds are calibrated at the end on up to 1024 training
  images (their weak labels are exactly what presence predicts);
* mixed precision: bf16 autocast on CUDA (no loss scaling needed), fp32 on CPU;
* ``--cache-features`` (frozen backbone only): the backbone's four block outputs for every
  training image are computed once per dihedral view (``--cache-views`` of the 8 flips and
  90-degree rotations, drawn per image and epoch like the on-the-fly augmentation) and stored as
  float16 in a memory-mapped file; epochs then run only the trainable head. Images are centre
  cropped (or resized) to the tile size for the cache, so random crops of larger patches are off.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsiproto.errors import WsiprotoError
from wsiproto.files import write_json_atomic, write_text_atomic

RUN_FILES = ("train.json", "log.jsonl", "metrics.json", "last", "best", "cache")
STATE_FILE = "trainer_state.pt"
CALIBRATION_IMAGES = 1024
# Dihedral views (90-degree rotations k, left-right flip): cached views are the first N.
VIEWS = ((0, False), (0, True), (2, False), (2, True), (1, False), (1, True), (3, False), (3, True))


class SimulatedInterrupt(RuntimeError):
    """Raised by ``stop_after_steps`` (tests): the run stops as if killed after that step."""


@dataclass
class TrainOptions:
    data: str
    out: str
    preset: str = "dualproto-tiny"
    pretrained: str | None = None
    unfreeze: bool = False
    kind: str = "auto"
    csv: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    poly_power: float | None = None
    seed: int = 0
    device: str = "auto"
    workers: int | None = None
    resume: bool = False
    overwrite: bool = False
    val_split: str = "auto"
    select_by: str = "oracle"
    max_val: int | None = None
    cache_features: bool = False
    cache_views: int = 8
    log_every: int = 10
    quiet: bool = False
    stop_after_steps: int | None = None

    # Settings that define the run; --resume refuses to continue with others.
    IDENTITY = ("data", "preset", "pretrained", "unfreeze", "kind", "csv", "epochs", "batch_size",
                "lr",
                "weight_decay", "poly_power", "seed", "val_split", "select_by", "max_val",
                "cache_features", "cache_views")


# --- small helpers ----------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WsiprotoError("--device cuda was asked for but PyTorch sees no CUDA device",
                            hint="use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise WsiprotoError(f"unknown device {device!r}", hint="use auto, cpu or cuda")
    return device


def default_workers() -> int:
    """Loader processes: all but one core for decoding, at most 8; none on a single core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * max(0.0, 1.0 - step / max(total, 1)) ** power


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace folder ``final`` by ``tmp`` so that a complete version is always on disk."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _recover(final: Path) -> None:
    """After a crash inside :func:`_swap_in`: bring back ``final`` from ``.old``; drop ``.tmp``."""
    old = final.with_name(final.name + ".old")
    tmp = final.with_name(final.name + ".tmp")
    if not final.exists() and old.exists():
        old.rename(final)
    for leftover in (old, tmp):
        if leftover.exists():
            shutil.rmtree(leftover)


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), int(index)])


class EpochSampler:
    """Yields ``(index, epoch)``: a permutation drawn from ``(seed, epoch)``, so the data order
    of any epoch is known without replaying the ones before it."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([int(self.seed), int(epoch), 7919]).permutation(self.n)

    def __iter__(self):
        epoch = self.epoch
        return iter([(int(i), epoch) for i in self.order(epoch)])

    def __len__(self) -> int:
        return self.n


class AugmentedItems:
    """Training items ``(image float32 [3, t, t], labels [C])`` with augmentation drawn from
    ``(seed, epoch, index)``: random crop to the tile size (larger patches), random flip and
    90-degree rotation. Torch-free until ``to_tensor``; picklable for loader workers."""

    def __init__(self, dataset, tile: int, mean, std, seed: int, augment: bool = True):
        self.dataset, self.tile, self.mean, self.std = dataset, tile, tuple(mean), tuple(std)
        self.seed, self.augment = seed, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        from wsiproto.data.transforms import random_crop, random_flip_rotate, target_to_tensor, to_tensor

        index, epoch = key
        rng = item_rng(self.seed, epoch, index)
        rgb, labels = self.dataset[index]
        rgb, _ = random_crop(rgb, None, self.tile, rng)
        if self.augment:
            rgb, _ = random_flip_rotate(rgb, None, rng)
        return to_tensor(rgb, self.mean, self.std), target_to_tensor(labels)


# --- feature cache -------------------------------------------------------------------------

class FeatureCache:
    """Frozen-backbone block outputs per training image and dihedral view, float16 on disk.

    ``features.npy`` is a memory-mapped ``[N, V, 4, width, h, w]`` array, ``done.npy`` marks the
    images whose views are complete (written after the data are flushed, so an interrupted build
    resumes where it stopped), ``meta.json`` says what the cache belongs to.
    """

    def __init__(self, folder: Path, paths: list[str], model, views: int):
        self.folder = Path(folder)
        self.views = int(views)
        bb = model.backbone
        grid = (bb.image_size[0] // bb.patch_size[0], bb.image_size[1] // bb.patch_size[1])
        self.shape = (len(paths), self.views, 4, bb.vision_width, grid[0], grid[1])
        self.meta = {"images": len(paths), "views": self.views, "shape": list(self.shape),
                     "dtype": "float16", "backbone": _backbone_digest(model),
                     "paths_sha256": _digest_lines(paths)}
        self.array = None
        self.done = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 2

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path, data_path = self.folder / "meta.json", self.folder / "features.npy"
        done_path = self.folder / "done.npy"
        same = False
        if meta_path.is_file() and data_path.is_file() and done_path.is_file():
            try:
                same = json.loads(meta_path.read_text()) == self.meta
            except json.JSONDecodeError:
                same = False
        if not same:
            _check_disk(self.folder, self.nbytes)
            for p in (meta_path, data_path, done_path):
                p.unlink(missing_ok=True)
            np.lib.format.open_memmap(data_path, mode="w+", dtype=np.float16, shape=self.shape).flush()
            np.save(done_path, np.zeros(self.shape[0], bool))
            write_json_atomic(meta_path, self.meta)
        self.array = np.load(data_path, mmap_mode="r+")
        self.done = np.load(done_path)

    def missing(self) -> np.ndarray:
        return np.flatnonzero(~self.done)

    def build(self, model, dataset, *, device, batch_size: int, autocast: bool,
              progress: Callable[[int], None] | None = None) -> int:
        """Compute the features of every image not done yet; returns how many were computed."""
        import torch

        from wsiproto.data.transforms import center_crop, flip_rotate, to_tensor

        todo = self.missing()
        cfg, tile = model.config, int(model.config.tile_size)
        done_path = self.folder / "done.npy"
        per_batch = max(1, batch_size // self.views)
        for start in range(0, len(todo), per_batch):
            chunk = todo[start:start + per_batch]
            tiles = []
            for i in chunk:
                rgb, _ = dataset[int(i)]
                rgb, _ = center_crop(rgb, None, tile)
                for k, flip in VIEWS[:self.views]:
                    view, _ = flip_rotate(rgb, None, k, flip)
                    tiles.append(to_tensor(view, cfg.mean, cfg.std))
            x = torch.stack(tiles).to(device)
            with torch.inference_mode(), _autocast(device, autocast):
                blocks = model.backbone.visual_features(x)
            feats = torch.stack([b.float() for b in blocks], dim=1).to(torch.float16).cpu().numpy()
            feats = feats.reshape(len(chunk), self.views, *feats.shape[1:])
            order = np.argsort(chunk)
            self.array[chunk[order]] = feats[order]
            self.array.flush()
            self.done[chunk] = True
            np.save(done_path, self.done)
            if progress is not None:
                progress(len(chunk))
        return len(todo)

    def blocks(self, indices: np.ndarray, views: np.ndarray, device, dtype):
        import torch

        feats = torch.from_numpy(np.ascontiguousarray(self.array[indices, views]))
        feats = feats.to(device=device)
        return [feats[:, k].to(dtype).contiguous() for k in range(feats.shape[1])]


def _backbone_digest(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in model.backbone.vision_state().items():  # what the features depend on
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes()[:4096])
        h.update(str(float(t.float().sum())).encode())
    return h.hexdigest()[:16]


def _digest_lines(lines: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _check_disk(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if need > free * 0.95:
        raise WsiprotoError(f"the feature cache needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB "
                            "are free", path=folder,
                            hint="lower --cache-views, free disk space or train without --cache-features")


class _autocast:
    """bf16 autocast on CUDA when asked, nothing otherwise."""

    def __init__(self, device: str, enabled: bool):
        self.enabled = enabled and str(device).startswith("cuda")
        self.ctx = None

    def __enter__(self):
        if self.enabled:
            import torch

            self.ctx = torch.autocast(device_type="cuda", dtype=torch.bfloat16)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


# --- the run folder --------------------------------------------------------------------------

class RunLog:
    """Appends JSON lines to ``log.jsonl`` (flushed per line)."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, epoch: int) -> None:
        """Drop entries of epochs after ``epoch`` (work an interrupted run will redo)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the interruption
            if int(entry.get("epoch", 0)) <= epoch:
                keep.append(line)
        write_text_atomic(self.path, "".join(k + "\n" for k in keep))

    def write(self, event: str, **fields: Any) -> None:
        entry = {"event": event, "time": round(time.time(), 3), **fields}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")


def _prepare_run(opts: TrainOptions, settings: dict) -> tuple[Path, dict | None]:
    """Create or check the run folder; returns it and the saved trainer state when resuming."""
    run = Path(opts.out).expanduser()
    if run.exists() and not run.is_dir():
        raise WsiprotoError("--out exists and is not a folder", path=run, hint="choose another --out")
    existing = run / "train.json"
    if existing.exists() and opts.overwrite:
        for name in RUN_FILES:
            for p in (run / name, run / (name + ".tmp"), run / (name + ".old")):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    elif existing.exists() and not opts.resume:
        raise WsiprotoError("the folder already holds a training run", path=run,
                            hint="pass --resume to continue it, --overwrite to start over, "
                                 "or choose another --out")
    elif opts.resume and not existing.exists():
        raise WsiprotoError("nothing to resume: no train.json", path=run,
                            hint="start the run without --resume")
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise WsiprotoError(f"cannot write the run folder ({err.strerror or err})", path=run,
                            hint="choose a writable --out") from None
    if not opts.resume:
        return run, None
    saved = json.loads(existing.read_text(encoding="utf-8"))
    before = saved.get("settings", {})
    changed = [f"{k} {before.get(k)!r} -> {settings.get(k)!r}" for k in TrainOptions.IDENTITY
               if before.get(k) != settings.get(k)]
    if changed:
        raise WsiprotoError("--resume with other settings than the run started with: "
                            + "; ".join(changed), path=existing,
                            hint="resume with the same settings, or start a new run in another --out")
    _recover(run / "last")
    _recover(run / "best")
    state_path = run / "last" / STATE_FILE
    if not state_path.is_file():
        return run, None  # killed before the first epoch ended: start again
    import torch

    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable state is the same user problem
        raise WsiprotoError(f"the trainer state is unreadable ({type(err).__name__})", path=state_path,
                            hint="delete the run's last/ folder to restart from scratch") from None
    return run, state


def _save_checkpoint(model, folder: Path, state: dict | None = None) -> None:
    import torch

    from wsiproto.model import save_model

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tmp)
    if state is not None:
        torch.save(state, tmp / STATE_FILE)
    _swap_in(tmp, folder)


# --- training ----------------------------------------------------------------------------------

def _open_splits(opts: TrainOptions, echo):
    from wsiproto.data import open_dataset

    train_set = open_dataset(opts.data, "train", kind=opts.kind, csv=opts.csv)
    if train_set.labels.sum() == 0:
        raise WsiprotoError("no training image carries any class label", path=opts.data,
                            hint="check the label spelling in the file names or CSV")
    val_set = None
    if opts.val_split not in ("auto", "none", "val", "test"):
        raise WsiprotoError(f"unknown validation split {opts.val_split!r}",
                            hint="use auto, none, val or test")
    if opts.val_split != "none":
        split = "val" if opts.val_split == "auto" else opts.val_split
        try:
            val_set = open_dataset(opts.data, split, kind=train_set.kind, csv=opts.csv,
                                   classes=train_set.table)
        except WsiprotoError as err:
            quiet_miss = ("no val folder", "empty split", "needs pixel masks")
            if opts.val_split != "auto" or not any(m in str(err) for m in quiet_miss):
                raise
            echo(f"no validation split in {opts.data}: best/ will be the last epoch")
        if val_set is not None and set(val_set.paths) & set(train_set.paths):
            if opts.val_split != "auto":
                raise WsiprotoError(f"the {split} split shares images with the training split",
                                    path=opts.data, hint="add a 'split' column to the CSV")
            echo(f"validation images overlap the training images in {opts.data}: no validation")
            val_set = None
        if val_set is not None and opts.max_val and len(val_set) > opts.max_val:
            pick = np.sort(np.random.default_rng(opts.seed).choice(len(val_set), opts.max_val, replace=False))
            val_set.paths = [val_set.paths[i] for i in pick]
            val_set.mask_paths = [val_set.mask_paths[i] for i in pick]
    return train_set, val_set


def _resolved_hparams(opts: TrainOptions) -> dict:
    from wsiproto.model import load_preset

    defaults = load_preset(opts.preset).get("train", {})
    out = {}
    for key, fallback in (("epochs", 20), ("batch_size", 16), ("lr", 1e-3),
                          ("weight_decay", 1e-3), ("poly_power", 0.9)):
        value = getattr(opts, key)
        out[key] = value if value is not None else defaults.get(key, fallback)
    if out["epochs"] < 1 or out["batch_size"] < 1 or out["lr"] <= 0:
        raise WsiprotoError("--epochs and --batch-size must be >= 1 and --lr positive")
    return out


def _validate(model, val_set, *, select_by: str, device, autocast: bool, batch_size: int,
              workers: int, quiet: bool) -> dict:
    """Oracle metrics + calibrated thresholds (+ predicted metrics when selecting by them)."""
    from tqdm import tqdm

    from wsiproto.evaluate import calibrate_thresholds, evaluate_dataset

    with tqdm(total=len(val_set), desc="validation", unit="img", disable=quiet, leave=False) as bar:
        res = evaluate_dataset(model, val_set, protocols=("oracle",), device=device,
                               autocast=autocast, batch_size=batch_size, workers=workers,
                               progress=bar.update)
    thresholds = calibrate_thresholds(res.probs, res.labels)
    out = {"oracle": _brief(res.summary("oracle")), "thresholds": thresholds}
    if select_by == "predicted":
        with tqdm(total=len(val_set), desc="validation (predicted)", unit="img", disable=quiet,
                  leave=False) as bar:
            res2 = evaluate_dataset(model, val_set, protocols=("predicted",), thresholds=thresholds,
                                    device=device, autocast=autocast, batch_size=batch_size,
                                    workers=workers, progress=bar.update)
        out["predicted"] = _brief(res2.summary("predicted"))
    return out


def _brief(summary: dict) -> dict:
    return {k: summary[k] for k in ("mIoU", "mDice", "FwIoU", "IoU")}


def _calibrate_on_train(model, train_set, *, seed: int, device, autocast: bool,
                        batch_size: int) -> list[float]:
    from wsiproto.evaluate import calibrate_thresholds, predict_pairs

    n = len(train_set)
    pick = np.sort(np.random.default_rng(seed).choice(n, min(n, CALIBRATION_IMAGES), replace=False))
    tile = int(model.config.tile_size)
    from wsiproto.data.transforms import center_crop

    probs, labels = [], []
    for start in range(0, len(pick), batch_size):
        pairs = []
        for i in pick[start:start + batch_size]:
            rgb, lab = train_set[int(i)]
            pairs.append((center_crop(rgb, None, tile)[0], lab))
        _, p, lab = predict_pairs(model, pairs, protocols=(), device=device, autocast=autocast)
        probs.append(p)
        labels.append(lab)
    return calibrate_thresholds(np.concatenate(probs), np.concatenate(labels))


def train(opts: TrainOptions, echo: Callable[[str], None] = print) -> dict:
    """Train (or resume) a run; returns the final summary (also in ``metrics.json``)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from wsiproto import __version__
    from wsiproto.model import create_model, list_presets

    if opts.preset not in list_presets():
        raise WsiprotoError(f"unknown preset {opts.preset!r}",
                            hint=f"choose one of {', '.join(list_presets())}")
    if opts.select_by not in ("oracle", "predicted"):
        raise WsiprotoError(f"--select-by must be oracle or predicted, got {opts.select_by!r}")
    if opts.cache_views not in (1, 2, 4, 8):
        raise WsiprotoError(f"--cache-views must be 1, 2, 4 or 8, got {opts.cache_views}")
    if opts.pretrained is not None and not Path(opts.pretrained).expanduser().is_file():
        raise WsiprotoError("pretrained weights file not found", path=opts.pretrained,
                            hint="pass a local tower weights file of the preset's backbone "
                                 "(e.g. CONCH's pytorch_model.bin for dualproto-conch)")
    hp = _resolved_hparams(opts)
    data_root = str(Path(opts.data).expanduser().resolve())
    settings = {**{k: getattr(opts, k) for k in TrainOptions.IDENTITY}, **hp, "data": data_root,
                "pretrained": None if opts.pretrained is None else Path(opts.pretrained).name}
    train_set, val_set = _open_splits(opts, echo)
    run, state = _prepare_run(opts, settings)
    device = resolve_device(opts.device)
    cuda = device.startswith("cuda")
    workers = default_workers() if opts.workers is None else max(0, int(opts.workers))

    torch.manual_seed(opts.seed)
    model = create_model(opts.preset, classes=train_set.table, pretrained=opts.pretrained,
                         unfreeze=opts.unfreeze, seed=opts.seed)
    if model.backbone.found is not None:
        echo(f"weights {Path(opts.pretrained).name}: {model.backbone.found}")
    if opts.cache_features and not model.backbone.frozen:
        raise WsiprotoError("--cache-features needs a frozen backbone", hint="drop --cache-features")
    log = RunLog(run / "log.jsonl")
    start_epoch, step, best = 0, 0, {"epoch": None, "metric": None}
    counts = train_set.class_counts()
    if state is None:
        write_json_atomic(run / "train.json", {
            "settings": settings, "wsiproto_version": __version__,
            "dataset": {"kind": train_set.kind, "train_images": len(train_set),
                        "val_images": len(val_set) if val_set is not None else 0,
                        "classes": train_set.table.names,
                        "train_label_counts": dict(zip(train_set.table.names, counts.tolist()))},
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "device": device, "workers": workers},
        })
        if (run / "log.jsonl").exists():
            (run / "log.jsonl").unlink()
        log.write("start", epoch=0, settings=settings, parameters=model.parameter_counts())
    else:
        from wsiproto.model import load_model

        saved = load_model(run / "last")
        model.load_state_dict(saved.state_dict())
        model.config.thresholds = list(saved.config.thresholds)
        del saved
        start_epoch, step, best = int(state["epoch"]), int(state["step"]), dict(state["best"])
        log.truncate_after(start_epoch)
        log.write("resume", epoch=start_epoch, step=step)
        echo(f"resuming {run} after epoch {start_epoch} (step {step})")
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])

    epochs, batch = hp["epochs"], hp["batch_size"]
    steps_per_epoch = math.ceil(len(train_set) / batch)
    total_steps = epochs * steps_per_epoch
    cfg = model.config
    tile = int(cfg.tile_size)
    cache = None
    if opts.cache_features:
        cache = FeatureCache(run / "cache", train_set.paths, model, opts.cache_views)
        cache.open()
        todo = len(cache.missing())
        if todo:
            t0 = time.perf_counter()
            with tqdm(total=todo, desc=f"caching features ({opts.cache_views} views)", unit="img",
                      disable=opts.quiet) as bar:
                cache.build(model, train_set, device=device, batch_size=max(batch, 8), autocast=cuda,
                            progress=bar.update)
            seconds = time.perf_counter() - t0
            log.write("cache", epoch=start_epoch, images=todo, views=opts.cache_views,
                      seconds=round(seconds, 2), bytes=cache.nbytes)
            echo(f"cached backbone features of {todo} images x {opts.cache_views} views in "
                 f"{seconds:.1f} s ({cache.nbytes / 2**20:.0f} MiB)")
        loader = None
    else:
        items = AugmentedItems(train_set, tile, cfg.mean, cfg.std, opts.seed)
        sampler = EpochSampler(len(train_set), opts.seed)
        loader = DataLoader(items, batch_size=batch, sampler=sampler, num_workers=workers,
                            pin_memory=cuda, persistent_workers=False,
                            prefetch_factor=4 if workers else None)
    order = EpochSampler(len(train_set), opts.seed)
    labels_all = torch.from_numpy(train_set.labels)

    def batches(epoch: int):
        if loader is not None:
            loader.sampler.epoch = epoch
            yield from loader
            return
        idx = order.order(epoch)
        for s in range(0, len(idx), batch):
            chunk = np.sort(idx[s:s + batch])
            views = np.array([item_rng(opts.seed, epoch, i).integers(opts.cache_views) for i in chunk])
            yield cache.blocks(chunk, views, device, torch.float32), labels_all[chunk]

    started = time.perf_counter()
    for epoch in range(start_epoch + 1, epochs + 1):
        model.train()
        t0, seen, loss_sum, n_steps = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{epochs}", unit="step",
                   disable=opts.quiet, leave=False)
        for x, y in batches(epoch):
            lr = poly_lr(hp["lr"], step, total_steps, hp["poly_power"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            y = y.to(device, non_blocking=cuda)
            with _autocast(device, cuda):
                if cache is not None:
                    out = model.forward_blocks(x, (tile, tile), cams=False)
                else:
                    out = model(x.to(device, non_blocking=cuda), cams=False)
                loss, parts = model.loss(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            n_steps += 1
            seen += len(y)
            loss_value = float(loss.detach())
            loss_sum += loss_value
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.1f}")
            bar.update(1)
            if step % max(1, opts.log_every) == 0 or n_steps == steps_per_epoch:
                log.write("step", epoch=epoch, step=step, loss=round(loss_value, 6), lr=lr,
                          images_per_s=round(rate, 2),
                          **{k: round(float(v), 6) for k, v in parts.items()})
            if opts.stop_after_steps is not None and step >= opts.stop_after_steps:
                bar.close()
                raise SimulatedInterrupt(f"stopped after step {step}")
        bar.close()
        train_seconds = time.perf_counter() - t0
        record = {"train_loss": round(loss_sum / max(n_steps, 1), 6), "images": seen,
                  "train_images_per_s": round(seen / max(train_seconds, 1e-9), 2),
                  "seconds": round(train_seconds, 2)}
        improved = True
        if val_set is not None:
            val = _validate(model, val_set, select_by=opts.select_by, device=device, autocast=cuda,
                            batch_size=max(batch, 16), workers=workers, quiet=opts.quiet)
            model.config.thresholds = val["thresholds"]
            record["val"] = val
            metric = val[opts.select_by]["mIoU"]
            metric = -1.0 if metric is None else metric
            improved = best["metric"] is None or metric > best["metric"]
            if improved:
                best = {"epoch": epoch, "metric": metric}
        else:
            best = {"epoch": epoch, "metric": None}
        state_out = {"epoch": epoch, "step": step, "best": best, "optimizer": optimizer.state_dict()}
        if improved:
            _save_checkpoint(model, run / "best")
        _save_checkpoint(model, run / "last", state_out)
        log.write("epoch", epoch=epoch, step=step, best_epoch=best["epoch"], **record)
        msg = (f"epoch {epoch}/{epochs}: loss {record['train_loss']:.4f}, "
               f"{record['train_images_per_s']:.1f} img/s")
        if "val" in record:
            msg += f", val mIoU ({opts.select_by}) {record['val'][opts.select_by]['mIoU']}"
            msg += " (best)" if improved else f" (best: epoch {best['epoch']})"
        echo(msg)

    return _finish(run, model, train_set, val_set, opts, best, device, cuda, workers, log,
                   time.perf_counter() - started)


def _finish(run: Path, model, train_set, val_set, opts: TrainOptions, best: dict, device: str,
            cuda: bool, workers: int, log: RunLog, seconds: float) -> dict:
    """Final metrics of best/ (val, both protocols) or train-set calibration; metrics.json."""
    from wsiproto.evaluate import evaluate_dataset
    from wsiproto.model import load_model, save_model

    best_model = load_model(run / "best", device=device)
    summary: dict[str, Any] = {"run": str(run), "best_epoch": best["epoch"],
                               "select_by": opts.select_by, "train_seconds": round(seconds, 1)}
    if val_set is not None:
        res = evaluate_dataset(best_model, val_set, protocols=("predicted", "oracle"),
                               device=device, autocast=cuda, batch_size=16, workers=workers)
        summary["val"] = {p: {**_brief(res.summary(p)), "pixel_accuracy": res.summary(p)["pixel_accuracy"]}
                          for p in ("predicted", "oracle")}
        summary["val_images"] = len(val_set)
    else:
        thresholds = _calibrate_on_train(best_model, train_set, seed=opts.seed, device=device,
                                         autocast=cuda, batch_size=16)
        best_model.config.thresholds = thresholds
        tmp = run / "best.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_model(best_model, tmp)
        _swap_in(tmp, run / "best")
        summary["calibrated_on"] = f"{min(len(train_set), CALIBRATION_IMAGES)} training images"
    summary["thresholds"] = dict(zip(best_model.config.classes.names, best_model.config.thresholds))
    write_json_atomic(run / "metrics.json", summary)
    log.write("end", epoch=int(best["epoch"] or 0), **{k: v for k, v in summary.items() if k != "run"})
    return summary
