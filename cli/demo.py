"""``wsiproto demo``: the sample slide segmented by the bundled default model."""

from __future__ import annotations

EXAMPLE = "wsiproto demo                     # sample slide -> OME-Zarr labels, GeoJSON, overlay"


def register(sub) -> None:
    from . import add_command

    p = add_command(
        sub, "demo",
        "fetch the sample slide (CMU-1-Small-Region) and segment it with the default model",
        EXAMPLE)
    p.add_argument("--out", default=None,
                   help="output folder (default: demo/ in the cache folder, beside the sample "
                        "slide: $WSIPROTO_CACHE or ~/.cache/wsiproto)")
    p.add_argument("--model", default=None, help="another model folder (default: the bundled one)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--ngff-version", default="0.4", choices=("0.5", "0.4"),
                   help="OME-Zarr version (default 0.4, which QuPath and napari-ome-zarr read)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace earlier demo results made with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys
    import time
    from pathlib import Path

    from wsiproto.sample import cache_dir, sample_slide
    from wsiproto.segment import SegmentOptions, runtime, segment_slide
    from wsiproto.segment.predictor import load_predictor

    def echo(message: str) -> None:
        print(f"wsiproto: {message}", file=sys.stderr)

    t0 = time.perf_counter()
    slide = sample_slide()
    out = Path(args.out) if args.out else cache_dir() / "demo"
    with runtime() as rt:
        predictor = load_predictor(args.model, device=args.device)
        rt.freeze()
        opts = SegmentOptions(out=out, batch_size=predictor.default_batch_size,
                              ngff_version=args.ngff_version, overwrite=args.overwrite,
                              quiet=args.quiet)
        summary = segment_slide(slide, predictor, opts, echo=echo).summary
    folder = Path(summary["outputs"]["folder"]).resolve()
    zarr_path = folder / summary["outputs"]["ome_zarr"]
    geojson = folder / summary["outputs"]["geojson"]
    overlay = folder / summary["outputs"]["overlay"]
    model = summary.get("model", {})
    pct = ", ".join(f"{k} {v:.1f}%" for k, v in summary["class_percent_of_tissue"].items())
    print(f"""wsiproto demo: {slide.name} segmented in {time.perf_counter() - t0:.0f} s
  model:    {model.get('source') or 'bundled default'} ({model.get('preset', '?')}; \
a demo model, not for diagnosis)
  tissue:   {summary['tissue_area_mm2']:.2f} mm^2 ({pct})

outputs in {folder}:
  {overlay.name:<32} thumbnail with the class map and a legend: open it first
  {zarr_path.name:<32} OME-Zarr {args.ngff_version} image + class-label pyramid
  {geojson.name:<32} class polygons for QuPath
  summary.json                     areas, timings, settings

QuPath:  open {slide}
         then File > Import objects > {geojson}
         (or drag the .geojson onto the open slide)
napari:  napari --plugin napari-ome-zarr {zarr_path}
         (pip install "napari[pyqt6]" napari-ome-zarr; the labels layer "tissue" opens
         hidden: tick its eye to see the classes)""")
    return 0
