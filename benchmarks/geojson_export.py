"""GeoJSON export speed and size on a synthetic 40k x 40k label map held in a chunked zarr array.

The map is generated chunk by chunk from smooth global fields (large tissue regions of three
classes crossing many chunk seams, plus scattered small islands), written to an on-disk zarr
array (512-px chunks), then read back block by block (``--block``, the segment pipeline's chunk
size) and traced with ``trace_block`` and ``GeoJSONWriter.add_trace`` as the segment pipeline
does (there, tracing runs inside the chunk tasks). No full-resolution array ever exists. Prints
features/s, file size, the most ring pieces held between rows, and peak RSS.

    python benchmarks/geojson_export.py [--size 40000] [--block 2048] [--gzip]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from wsiproto.export.geojson import GeoJSONWriter, trace_block

CLASSES = [(1, "TUM", (200, 0, 0)), (2, "STR", (0, 160, 0)), (3, "LYM", (0, 0, 200))]


def synthetic_block(y0: int, x0: int, h: int, w: int, size: int) -> np.ndarray:
    """Labels of one block, a pure function of global coordinates (seamless across chunks)."""
    y = (np.arange(y0, y0 + h, dtype=np.float32)[:, None] / size) * 2 * np.pi
    x = (np.arange(x0, x0 + w, dtype=np.float32)[None, :] / size) * 2 * np.pi
    tissue = np.sin(3 * x + 0.4) * np.cos(2 * y + 1.1) + 0.5 * np.sin(11 * x + 7 * y)
    kind = np.sin(23 * x - 0.7) + np.cos(19 * y + 0.3) + 0.6 * np.sin(61 * (x + y))
    lab = np.where(kind > 0.5, 1, np.where(kind < -0.6, 3, 2)).astype(np.uint8)
    lab[tissue < 0.1] = 0
    islands = np.sin(400 * x) * np.sin(410 * y + 3 * x) > 0.93  # small lymphocyte-like blobs
    lab[islands & (tissue >= 0.1)] = 3
    return lab


def make_map(root: Path, size: int, chunk: int):
    arr = zarr.create_array(str(root / "labels.zarr"), shape=(size, size), chunks=(chunk, chunk),
                            dtype="uint8", fill_value=0)
    for y0 in range(0, size, chunk):
        for x0 in range(0, size, chunk):
            h, w = min(chunk, size - y0), min(chunk, size - x0)
            arr[y0 : y0 + h, x0 : x0 + w] = synthetic_block(y0, x0, h, w, size)
    return arr


def export(arr, out: Path, block: int, gz: bool) -> dict:
    size = arr.shape
    t_trace = 0.0
    scratch: dict = {}
    with GeoJSONWriter(out, classes=CLASSES, scale=2.0, mpp=0.25, gzip=gz,
                       chunk_shape=(block, block), label_shape=size, rows_in_order=True) as gj:
        for y0 in range(0, size[0], block):
            for x0 in range(0, size[1], block):
                labels = arr[y0 : y0 + block, x0 : x0 + block]
                if labels.any():
                    t = time.perf_counter()
                    trace = trace_block(labels, y0, x0, gj.formatter, scratch=scratch)
                    t_trace += time.perf_counter() - t
                    gj.add_trace(trace)
        t = time.perf_counter()
        stats = gj.close()
        stats["close_s"] = time.perf_counter() - t
        stats["held_max"] = gj.held_max
    stats["trace_s"] = t_trace
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=40_000)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--gzip", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        arr = make_map(root, args.size, 512)
        t_make = time.perf_counter() - t0
        out = root / ("map.geojson.gz" if args.gzip else "map.geojson")
        t0 = time.perf_counter()
        stats = export(arr, out, args.block, args.gzip)
        total = time.perf_counter() - t0
        n = stats["total_features"]
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"label map        {args.size} x {args.size} px, blocks {args.block} "
              f"(generated + written in {t_make:.1f} s)")
        print(f"features         {n} {stats['features']}")
        print(f"export time      {total:.1f} s (tracing {stats['trace_s']:.1f} s, the rest "
              f"stitching, reading and writing; close {stats['close_s']:.1f} s)")
        print(f"held at seams    {stats['held_max']} ring pieces and holes at most")
        print(f"throughput       {n / total:.0f} features/s, "
              f"{args.size * args.size / total / 1e6:.1f} Mpx/s")
        print(f"file size        {stats['bytes'] / 1e6:.1f} MB ({stats['bytes'] / max(n, 1):.0f} B/feature)")
        print(f"peak RSS         {rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
