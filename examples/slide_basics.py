"""Open a slide, print what it is, read a region at 1 um/px and save a tissue overlay.

    python examples/slide_basics.py [SLIDE] [--out DIR]

Without SLIDE it fetches the CC0 sample slide (CMU-1-Small-Region) into the user cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from wsiproto.sample import sample_slide
from wsiproto.slide import Slide, detect_tissue
from wsiproto.slide.info import describe, format_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide", nargs="?")
    ap.add_argument("--out", default="out/slide_basics")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with Slide(args.slide or sample_slide()) as slide:
        print(format_info(describe(slide)))
        w, h = slide.size
        mpp = 1.0 if slide.mpp is not None else None
        region = slide.read_region((w // 4, h // 4), (512, 512), mpp=mpp,
                                   downsample=None if mpp else 2.0)
        Image.fromarray(region).save(out / "region.png")
        tissue = detect_tissue(slide)
        thumb, _ = slide.thumbnail(mpp=tissue.mpp) if tissue.mpp else slide.thumbnail(2048)
        overlay = thumb.copy()
        overlay[~tissue.mask] = (overlay[~tissue.mask] * 0.35).astype(np.uint8)
        Image.fromarray(overlay).save(out / "tissue.png")
    print(f"wrote {out / 'region.png'} and {out / 'tissue.png'}")


if __name__ == "__main__":
    main()
