"""Segment one slide from Python and read the results back.

    python examples/segment_slide.py SLIDE --model MODEL_DIR [--out results]

Shows the library calls behind `wsiproto segment`: load a saved model as a tile predictor, run
the chunked pipeline, then read the label pyramid (zarr) and the GeoJSON it wrote.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import zarr

from wsiproto.segment import SegmentOptions, segment_slide
from wsiproto.segment.predictor import load_predictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="results")
    args = ap.parse_args()

    predictor = load_predictor(args.model)  # device auto: CUDA when available
    summary = segment_slide(args.slide, predictor, SegmentOptions(out=Path(args.out)), echo=print).summary
    folder = Path(summary["outputs"]["folder"])

    labels = zarr.open_group(str(folder / summary["outputs"]["ome_zarr"]), mode="r")["labels/tissue"]
    print("label levels:", [labels[k].shape for k in sorted(labels.array_keys(), key=int)])
    print("class % of tissue:", summary["class_percent_of_tissue"])
    features = json.loads((folder / summary["outputs"]["geojson"]).read_text())["features"]
    print(f"{len(features)} GeoJSON features; first: {features[0]['properties'] if features else None}")


if __name__ == "__main__":
    main()
