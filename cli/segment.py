"""``wsiproto segment SLIDE``: class-label OME-Zarr pyramid, QuPath GeoJSON, summary, overlay."""

from __future__ import annotations

from pathlib import Path

from .info import BACKEND_HELP, backend_choices
from .options import non_negative_int, positive_float, positive_int

EXAMPLE = ("wsiproto segment slide.svs --model runs/bcss --out results   "
           "# -> results/slide/slide.ome.zarr, .geojson, summary.json, overlay.png")


def output_list(text: str) -> list[str]:
    """``--outputs a,b``: names of registered sinks."""
    import argparse

    from wsiproto.segment.sinks import available

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in available()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown output {', '.join(unknown) or '(none)'}: choose from "
            f"{', '.join(available())}")
    return names


def add_segment_options(p) -> None:
    """Options shared by ``segment`` and ``cohort``."""
    p.add_argument("--model", default=None,
                   help="model folder (save_model output or a `wsiproto train` run folder); "
                        "default: the small demo model bundled with wsiproto")
    p.add_argument("--out", default="wsiproto-out", help="output folder (default: wsiproto-out)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the model runs (auto: CUDA when available)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast on a GPU, fp32 on a CPU; bf16 casts the model "
                        "(faster on CPUs with AMX)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation (flips x brightness; 9x the model work)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="tiles per model batch (default: 32 on CPU, 128 on GPU)")
    p.add_argument("--mpp", type=positive_float, default=None,
                   help="level-0 pixel size of the slide in um/px; needed for slides without "
                        "one, and overrides the slide's own (a warning names both)")
    p.add_argument("--roi", default=None, metavar="GEOJSON",
                   help="segment only inside these regions: a GeoJSON exported from QuPath "
                        "(annotations; level-0 pixels of the slide)")
    p.add_argument("--roi-class", default=None, metavar="NAME",
                   help="with --roi: only the annotations of this QuPath class")
    p.add_argument("--overlap", type=non_negative_int, default=None,
                   help="pixels shared by neighbouring tiles (default: a quarter of the tile)")
    p.add_argument("--chunk-size", type=positive_int, default=2048,
                   help="output chunk side in label pixels, a multiple of 512 (default 2048)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="chunks in inference at once; default: 1 with the model on a CPU, "
                        "on a GPU enough to fill two batches (at least 2, at most half the "
                        "cores)")
    from wsiproto.segment.options import DEFAULT_OUTPUTS
    from wsiproto.segment.sinks import available

    p.add_argument("--outputs", type=output_list, default=list(DEFAULT_OUTPUTS),
                   metavar="NAME[,NAME]",
                   help=f"what to write, by name: {', '.join(available())} (default: "
                        f"{','.join(DEFAULT_OUTPUTS)})")
    p.add_argument("--ngff-version", default="0.5", choices=("0.5", "0.4"),
                   help="OME-Zarr version (0.4 for QuPath and other Java tools)")
    p.add_argument("--objects", default="annotation", choices=("annotation", "detection"),
                   help="QuPath object type of the GeoJSON features")
    p.add_argument("--gzip", action="store_true", help="write .geojson.gz")
    p.add_argument("--probabilities", action="store_true",
                   help="also store per-class uint8 probabilities in the OME-Zarr")
    p.add_argument("--no-image", action="store_true",
                   help="do not store the RGB image the labels annotate (smaller output)")
    p.add_argument("--backend", default="auto", choices=backend_choices(), help=BACKEND_HELP)
    p.add_argument("--overwrite", action="store_true",
                   help="replace results written with a different configuration")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub) -> None:
    from . import add_command

    p = add_command(sub, "segment", "segment one slide into OME-Zarr labels and QuPath GeoJSON",
                    EXAMPLE)
    p.add_argument("slide", help="slide file (.svs, .tif, .ndpi, .mrxs, .scn, DICOM ...)")
    add_segment_options(p)
    p.set_defaults(func=run)


def options_from_args(args):
    from pathlib import Path

    from wsiproto.segment import SegmentOptions

    return SegmentOptions(
        out=Path(args.out), overlap=args.overlap, chunk=args.chunk_size, mpp=args.mpp,
        backend=args.backend, outputs=tuple(args.outputs), ngff_version=args.ngff_version,
        objects=args.objects,
        gzip=args.gzip, probabilities=args.probabilities, image=not args.no_image,
        roi=args.roi, roi_class=args.roi_class,
        overwrite=args.overwrite, quiet=args.quiet, workers=args.workers,
    )


def check_inputs(slide: str, model: str | None, roi: str | None = None) -> None:
    """Fail fast, before heavy imports, on a slide, model folder or ROI file that cannot be
    used (the ROI is fully checked against the slide once it is open)."""
    from wsiproto.segment.predictor import resolve_model_dir
    from wsiproto.slide.source import resolve

    resolve(slide)
    resolve_model_dir(model)
    if roi is not None and not Path(roi).expanduser().is_file():
        from wsiproto.errors import WsiprotoError

        raise WsiprotoError("no such ROI file", path=roi,
                            hint="pass the .geojson exported from QuPath with --roi")


def run(args) -> int:
    import sys

    from wsiproto.segment import runtime, segment_slide
    from wsiproto.segment.predictor import load_predictor

    # Inputs first, in milliseconds: loading the model imports torch (seconds).
    check_inputs(args.slide, args.model, args.roi)
    with runtime() as rt:
        predictor = load_predictor(args.model, device=args.device, precision=args.precision,
                                   tta=args.tta)
        rt.freeze()
        opts = options_from_args(args)
        opts.batch_size = args.batch_size or predictor.default_batch_size
        result = segment_slide(args.slide, predictor, opts,
                               echo=lambda m: print(f"wsiproto: {m}", file=sys.stderr))
    print_outputs(result.summary)
    return 0


def print_outputs(summary: dict) -> None:
    """The slide's tissue, class shares and output files, on stdout."""
    from pathlib import Path

    folder = Path(summary["outputs"]["folder"])
    pct = ", ".join(f"{k} {v:.1f}%" for k, v in summary["class_percent_of_tissue"].items())
    print(f"{summary['slide']['path']}: tissue {summary['tissue_area_mm2']:.2f} mm^2 ({pct})")
    for name in summary["outputs"]["files"] + ["summary.json"]:
        print(f"  {folder / name}")
