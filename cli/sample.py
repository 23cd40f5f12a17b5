"""``wsiproto sample``: fetch the CC0 sample slide into the cache and print its path."""

from __future__ import annotations

EXAMPLE = "wsiproto sample                            # fetch CMU-1-Small-Region.svs, print its path"


def register(sub) -> None:
    from . import add_command

    p = add_command(
        sub, "sample", "fetch the sample slide (CMU-1-Small-Region, CC0) and print its path",
        EXAMPLE,
    )
    p.add_argument("--refresh", action="store_true", help="download again even if cached")
    p.set_defaults(func=run)


def run(args) -> int:
    from wsiproto.sample import sample_slide

    print(sample_slide(refresh=args.refresh))
    return 0
