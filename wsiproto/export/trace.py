"""Pixel-exact polygon tracing of class labels, vectorised, with seams left open for stitching.

A region's boundary is made of *darts*: unit pixel edges walked with the region on the right.
A traced pixel ``(r, c)`` of value ``v`` owns up to four darts, on the sides whose neighbour is
not ``v``::

    T  top     (c, r)     -> (c+1, r)      walking east
    R  right   (c+1, r)   -> (c+1, r+1)    walking south
    B  bottom  (c+1, r+1) -> (c, r+1)      walking west
    L  left    (c, r+1)   -> (c, r)        walking north

(vertices are pixel corners ``(x, y)``; y grows downwards). At a dart's end vertex the boundary
turns left when both pixels ahead are ``v``, goes straight when only the one ahead-right is, and
turns right otherwise; where two pixels of ``v`` touch only at a corner it therefore turns right,
so regions are 4-connected (two pixels touching at a corner are two objects). Outer rings come
out with a positive shoelace area, holes with a negative one.

``trace_labels`` computes all of this with whole-array numpy operations (no per-pixel or
per-vertex Python): the *corner* darts (those that turn) and the *run starts* (darts that do
not continue a straight run) are found with shifted comparisons, band by band of rows (the
vertical darts on the transposed block); a run's k-th start and k-th corner in scan order
belong together, so each corner's next corner is a lookup in a dense image of run starts; the
rings are the cycles of that permutation (``scipy.sparse.csgraph``: strongly connected
components, then one depth-first pass). Only corner vertices are kept, so rings have no
collinear vertices. A region touching itself at a corner (a "pinched" ring) is flagged; the
GeoJSON writer cuts such rings into valid loops.

Seams: a block edge that is an *internal seam* (the block continues in a neighbour that this
call cannot see) is traced as if the outside were empty, and every ring that touches it is cut
there into *chains*: the pieces of the ring between two seam vertices, without the darts that
lie on the seam. :class:`SeamStitcher` later joins chains across seams, deciding each seam
vertex with the same turn rule on the pixels on both sides (one row or column per side, kept in
:class:`BlockTrace.strips`), so a region crossing seams comes out exactly as a single pass
over the whole map would trace it. Holes are attached to their outer ring inside the block with
a vectorised scan along the row (the run of the region left of the hole's leftmost edge starts
at a dart of the same region); holes whose region touches a seam go to the stitcher with the
chain that scan ended on (whose stitched ring is then the hole's outer ring), or failing that
are matched by geometry (smallest same-class outer ring around a point inside the hole).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

T, R, B, L = 0, 1, 2, 3


@dataclass
class Rings:
    """Rings of several polygons: vertex ``coords`` [N, 2] (x, y; global label px; each ring
    stored once, not closed), ``ring_start`` [n_rings + 1] offsets, ``ring_poly`` [n_rings]
    polygon of each ring (rings sorted by polygon, the outer ring first), ``poly_value``,
    ``poly_area`` (px^2, holes subtracted), ``poly_length`` (perimeter px, holes included),
    ``poly_pinched`` (a ring touches itself at a vertex: valid only after make_valid)."""

    coords: np.ndarray
    ring_start: np.ndarray
    ring_poly: np.ndarray
    poly_value: np.ndarray
    poly_area: np.ndarray
    poly_length: np.ndarray
    poly_pinched: np.ndarray

    @classmethod
    def empty(cls) -> Rings:
        z = np.zeros(0, np.int64)
        return cls(np.zeros((0, 2), np.int64), np.zeros(1, np.int64), z, z.astype(np.uint8),
                   z, z, z.astype(bool))

    def __len__(self) -> int:
        return len(self.poly_value)

    def polygon_rings(self, i: int) -> list[np.ndarray]:
        """The rings (unclosed [n, 2] arrays) of polygon ``i``, outer first."""
        idx = np.flatnonzero(self.ring_poly == i)
        return [self.coords[self.ring_start[k] : self.ring_start[k + 1]] for k in idx]


@dataclass
class BlockTrace:
    """What tracing one block yields (see module doc).

    ``closed``: the complete polygons (their region does not touch an internal seam).
    ``chains``: ``(value, coords [n, 2])`` open pieces of rings, from a seam vertex to a seam
    vertex. ``holes``: ``(value, coords, ref)`` complete hole rings whose region touches a
    seam; ``ref`` is the index of a chain of the same region (whose ring, once stitched, is
    the hole's outer ring or another of its holes) or -1. ``strips``: the block's traced
    labels (others as 0) along its four edges (top row, bottom row, left column, right
    column). ``text``/``counts``: the closed polygons as GeoJSON features, when a
    formatter has serialised them (then ``closed`` may be dropped). ``pixel_counts``: optional
    histogram of the block's label values.
    """

    y0: int
    x0: int
    shape: tuple[int, int]
    closed: Rings | None
    chains: list[tuple[int, np.ndarray]]
    holes: list[tuple[int, np.ndarray]]
    strips: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    text: str | None = None
    counts: dict[int, int] = field(default_factory=dict)
    pixel_counts: np.ndarray | None = None

    # -------------------------------------------------------------- persistence (resume)
    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` (``.npz``) atomically; ``text`` must be set (closed polygons are
        not stored, only their features)."""
        if self.text is None:
            raise ValueError("format the closed polygons before saving a BlockTrace")
        path = Path(path)

        def pack(items):
            vals = np.array([it[0] for it in items], np.uint8)
            sizes = np.array([len(it[1]) for it in items], np.int64)
            coords = (np.concatenate([it[1] for it in items]) if items
                      else np.zeros((0, 2), np.int64)).astype(np.int64)
            return vals, sizes, coords

        cv, cs, cc = pack(self.chains)
        hv, hs, hc = pack(self.holes)
        counts = np.array(sorted(self.counts.items()), np.int64).reshape(-1, 2)
        arrays = {
            "meta": np.array([self.y0, self.x0, *self.shape], np.int64),
            "chain_values": cv, "chain_sizes": cs, "chain_coords": cc,
            "hole_values": hv, "hole_sizes": hs, "hole_coords": hc,
            "hole_refs": np.array([ref for _, _, ref in self.holes], np.int64),
            "top": self.strips[0], "bottom": self.strips[1], "left": self.strips[2],
            "right": self.strips[3], "feature_counts": counts,
            "text": np.frombuffer(self.text.encode("utf-8"), np.uint8),
        }
        if self.pixel_counts is not None:
            arrays["pixel_counts"] = np.asarray(self.pixel_counts, np.int64)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BlockTrace:
        with np.load(path, allow_pickle=False) as z:
            y0, x0, h, w = (int(v) for v in z["meta"])

            def unpack(prefix):
                vals, sizes, coords = (z[f"{prefix}_values"], z[f"{prefix}_sizes"],
                                       z[f"{prefix}_coords"])
                parts = np.split(coords, np.cumsum(sizes)[:-1]) if len(sizes) else []
                return [(int(v), c) for v, c in zip(vals, parts)]

            holes = [(v, c, int(ref)) for (v, c), ref in zip(unpack("hole"), z["hole_refs"])]
            return cls(
                y0, x0, (h, w), None, unpack("chain"), holes,
                (z["top"], z["bottom"], z["left"], z["right"]),
                text=z["text"].tobytes().decode("utf-8"),
                counts={int(v): int(n) for v, n in z["feature_counts"]},
                pixel_counts=z["pixel_counts"] if "pixel_counts" in z.files else None,
            )


def open_sides(y0: int, x0: int, shape: tuple[int, int], label_shape: tuple[int, int]):
    """Which edges of a block at (y0, x0) are internal seams: (top, bottom, left, right)."""
    h, w = shape
    H, W = label_shape
    return (y0 > 0, y0 + h < H, x0 > 0, x0 + w < W)


def _before(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return np.searchsorted(sorted_keys, keys, side="right") - 1


def _ring_order(succ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes of the permutation ``succ`` listed cycle by cycle in cycle order, and the cycle
    start flags: the cycles are the strongly connected components; one depth-first pass from a
    virtual root linked to one node of each lists them."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components, depth_first_order

    n = len(succ)
    nodes = np.arange(n + 1, dtype=np.int32)
    ones = np.ones(n, np.int8)
    graph = csr_matrix((ones, succ.astype(np.int32), nodes), shape=(n, n))
    n_cycles, cycle = connected_components(graph, directed=True, connection="strong")
    reps = np.empty(n_cycles, np.int32)
    reps[cycle[::-1]] = nodes[n - 1 :: -1]  # the first node of each cycle
    indices = np.concatenate([succ.astype(np.int32), reps])
    indptr = np.append(nodes, n + n_cycles)
    rooted = csr_matrix((np.ones(n + n_cycles, np.int8), indices, indptr), shape=(n + 1, n + 1))
    order = depth_first_order(rooted, n, directed=True, return_predecessors=False)[1:]
    is_rep = np.zeros(n, bool)
    is_rep[reps] = True
    return order, is_rep[order]


def _buffer(scratch: dict | None, name: str, shape: tuple[int, int], dtype=bool) -> np.ndarray:
    """An uninitialised C-contiguous array, kept in ``scratch`` between calls: fresh large
    arrays cost a page fault per page on first write, about a third of the tracing time."""
    n = shape[0] * shape[1]
    if scratch is None:
        return np.empty(shape, dtype)
    buf = scratch.get(name)
    if buf is None or buf.size < n or buf.dtype != np.dtype(dtype):
        buf = scratch[name] = np.empty(n, dtype)
    return buf[:n].reshape(shape)


def _shifted_starts(x, same, tmp, start, forward: bool) -> None:
    """Run starts along rows: darts ``x`` whose neighbour dart in the walking direction's
    opposite (left when ``forward``, else right) does not continue into them (``same``: that
    neighbour pixel has the dart's value)."""
    np.copyto(start, x)
    if forward:
        np.logical_and(x[:, :-1], same[:, 1:], out=tmp[:, 1:])
        tmp[:, 0] = False
    else:
        np.logical_and(x[:, 1:], same[:, :-1], out=tmp[:, :-1])
        tmp[:, -1] = False
    np.logical_not(tmp, out=tmp)
    start &= tmp


_BAND = 64  # rows per band: the work masks of a band stay in the CPU cache


def _layout_darts(p: np.ndarray, transposed: bool, scratch: dict | None, run_starts: bool):
    """Corners and run starts of the two dart types that walk along the rows of the padded
    layout ``p`` ([n + 2, m + 2], zero border): T (east) and B (west) on the row-major layout,
    R (south) and L (north) on the transposed one. Works band by band of rows.

    A dart exists where the pixel on its side differs; it turns at its end unless the pixel
    ahead is the same and the diagonal one ahead is not, and turns left when both are the same;
    it starts a run unless the dart behind it (same value) continues into it. Returns, per
    type, (corner indices, left-turn flags, pinch flags (right turn at a corner-only
    contact), run-start indices), indices row-major in this layout; and the row-major indices
    of the pixels that start a horizontal run (L darts) when ``run_starts``."""
    n, m = p.shape[0] - 2, p.shape[1] - 2
    band = min(_BAND, n)
    names = ("t", "eqE", "eqW", "x", "s", "corner", "left", "start", "tmp")
    full = {k: _buffer(scratch, f"band_{k}", (band, m)) for k in names}
    out = [([], [], [], []), ([], [], [], [])]
    starts_out = []
    for a in range(0, n, band):
        b = min(a + band, n)
        buf = {key: v[: b - a] for key, v in full.items()}
        C = p[a + 1 : b + 1, 1:-1]
        N, S = p[a:b, 1:-1], p[a + 2 : b + 2, 1:-1]
        NE, SE = p[a:b, 2:], p[a + 2 : b + 2, 2:]
        SW, NW = p[a + 2 : b + 2, :-2], p[a:b, :-2]
        t, eqE, eqW = buf["t"], buf["eqE"], buf["eqW"]
        np.not_equal(C, 0, out=t)
        np.equal(p[a + 1 : b + 1, 2:], C, out=eqE)
        np.equal(p[a + 1 : b + 1, :-2], C, out=eqW)
        types = ((S, SE, eqE, eqW, True), (N, NW, eqW, eqE, False)) if transposed else \
            ((N, NE, eqE, eqW, True), (S, SW, eqW, eqE, False))
        x, s, corner, left = buf["x"], buf["s"], buf["corner"], buf["left"]
        for (side, diag, ahead, back, forward), acc in zip(types, out):
            np.not_equal(side, C, out=x)
            x &= t
            np.equal(diag, C, out=s)
            np.logical_not(ahead, out=corner)
            corner |= s
            corner &= x
            np.logical_and(ahead, s, out=left)
            left &= x
            f = np.flatnonzero(corner)
            acc[0].append(f + a * m)
            acc[1].append(left.ravel()[f])
            acc[2].append(~ahead.ravel()[f] & s.ravel()[f])
            _shifted_starts(x, back, buf["tmp"], buf["start"], forward)
            acc[3].append(np.flatnonzero(buf["start"]) + a * m)
        if run_starts:
            tmp = buf["tmp"]
            np.logical_not(eqW, out=tmp)
            tmp &= t
            starts_out.append(np.flatnonzero(tmp) + a * m)
    types = [tuple(np.concatenate(parts) for parts in acc) for acc in out]
    return types[0], types[1], (np.concatenate(starts_out) if run_starts else None)


def trace_labels(labels: np.ndarray, y0: int, x0: int, values, *,
                 label_shape: tuple[int, int] | None = None,
                 scratch: dict | None = None) -> BlockTrace:
    """Trace the regions of the given label ``values`` in one block (see module doc).

    ``label_shape``: the whole map; block edges inside it are seams (None: no seams, the block
    is the whole map). ``scratch``: a dict where the large work arrays are kept for the next
    call (one per thread; saves page faults).
    """
    lab = np.ascontiguousarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {lab.shape}")
    if lab.dtype != np.uint8:
        lab = lab.astype(np.uint8)
    h, w = lab.shape
    sides = open_sides(y0, x0, (h, w), label_shape) if label_shape else (False,) * 4
    vals = sorted({int(v) for v in values if 0 < int(v) < 256})
    traced = _buffer(scratch, "t", (h, w))
    if vals == list(range(1, len(vals) + 1)):  # the usual 1..K: one comparison, no lookup
        np.less_equal(lab, len(vals), out=traced)
    else:
        lut = np.zeros(256, bool)
        lut[vals] = True
        np.take(lut, lab, out=traced)
    pad = _buffer(scratch, "pad", (h + 2, w + 2), np.uint8)
    pad[0], pad[-1], pad[:, 0], pad[:, -1] = 0, 0, 0, 0
    np.multiply(lab, traced, out=pad[1:-1, 1:-1])  # untraced values never match a traced one
    if not pad.any():
        z = np.zeros
        return BlockTrace(y0, x0, (h, w), Rings.empty(), [], [],
                          (z(w, np.uint8), z(w, np.uint8), z(h, np.uint8), z(h, np.uint8)))
    strips = (pad[1, 1:-1].copy(), pad[-2, 1:-1].copy(), pad[1:-1, 1].copy(), pad[1:-1, -2].copy())
    # Horizontal darts (T, B) on the row-major layout, vertical ones (R, L) on the transposed
    # layout, where runs along a column are contiguous.
    (fT, lT, pT, sT), (fB, lB, _, sB), run_starts = _layout_darts(pad, False, scratch, True)
    padt = _buffer(scratch, "padt", (w + 2, h + 2), np.uint8)
    np.copyto(padt, pad.T)
    (fR, lR, pR, sR), (fL, lL, _, sL), _ = _layout_darts(padt, True, scratch, False)

    # Corner darts are the nodes: T and B in row-major order (key r*w + c), R and L in
    # column-major order (key c*h + r). The k-th run start of a type (same order) begins the
    # run that ends at its k-th corner, so "the corner at the end of the run starting at this
    # dart" is a lookup in a dense rank image.
    rT, cT = np.divmod(fT, w)
    rB, cB = np.divmod(fB, w)
    cR, rR = np.divmod(fR, h)
    cL, rL = np.divmod(fL, h)
    nT, nR, nB, nL = len(fT), len(fR), len(fB), len(fL)
    oR, oB, oL = nT, nT + nR, nT + nR + nB
    n = oL + nL

    # The run starts of all four types as one sorted key list (type k's keys offset by k * hw;
    # each type's starts are sorted and node ids follow the same type order), so the node id
    # of the corner that ends the run starting at a key is that key's rank: a binary search,
    # instead of a dense [4, h, w] image (64 MB per 2048^2 block and thread).
    hw = h * w
    for idx, count in ((sT, nT), (sR, nR), (sB, nB), (sL, nL)):
        if len(idx) != count:
            raise AssertionError("run starts and corners do not pair up")
    start_keys = np.concatenate([sT, sR + hw, sB + 2 * hw, sL + 3 * hw])

    # The next corner of every corner: the run starting right after its turn
    # (T: left -> L(r-1, c+1), right -> R(r, c); R: T(r+1, c+1) / B(r, c);
    #  B: R(r+1, c-1) / L(r, c); L: B(r-1, c-1) / T(r, c)).
    key = np.concatenate([
        np.where(lT, 3 * hw + (cT + 1) * h + rT - 1, hw + cT * h + rT),
        np.where(lR, (rR + 1) * w + cR + 1, 2 * hw + rR * w + cR),
        np.where(lB, hw + (cB - 1) * h + rB + 1, 3 * hw + cB * h + rB),
        np.where(lL, 2 * hw + (rL - 1) * w + cL - 1, rL * w + cL),
    ])
    succ = np.searchsorted(start_keys, key)
    del start_keys, key

    # End vertices (local x, y) and value of every corner.
    vx = np.concatenate([cT + 1, cR + 1, cB, cL])
    vy = np.concatenate([rT, rR + 1, rB + 1, rL])
    flat = lab.ravel()
    value = np.concatenate([flat[fT], flat[rR * w + cR], flat[fB], flat[rL * w + cL]])

    order, starts = _ring_order(succ)
    ring_of_pos = np.cumsum(starts) - 1
    n_rings = int(ring_of_pos[-1]) + 1
    ring_start = np.flatnonzero(starts)
    ring_end = np.append(ring_start[1:], n)
    ring_of = np.empty(n, np.int64)
    ring_of[order] = ring_of_pos
    X, Y = vx[order].astype(np.int64), vy[order].astype(np.int64)
    nxt = np.arange(1, n + 1)
    nxt[ring_end - 1] = ring_start
    cross = X * Y[nxt] - X[nxt] * Y
    area2 = np.add.reduceat(cross, ring_start)
    length = np.add.reduceat(np.abs(X[nxt] - X) + np.abs(Y[nxt] - Y), ring_start)
    ring_value = value[order[ring_start]]
    outer = area2 > 0

    top, bottom, left, right = sides
    on_seam = np.zeros(n, bool)
    if top:
        on_seam |= Y == 0
    if bottom:
        on_seam |= Y == h
    if left:
        on_seam |= X == 0
    if right:
        on_seam |= X == w
    ring_open = np.logical_or.reduceat(on_seam, ring_start)

    # Pinched rings: both corners of a corner-only contact lie on the same ring
    # (T(r, c) with B(r-1, c+1), R(r, c) with L(r+1, c+1)).
    pinched = np.zeros(n_rings, bool)
    i = np.flatnonzero(pT)
    if len(i):
        a = ring_of[i]
        b = ring_of[oB + np.searchsorted(fB, (rT[i] - 1) * w + cT[i] + 1)]
        pinched[a[a == b]] = True
    i = np.flatnonzero(pR)
    if len(i):
        a = ring_of[oR + i]
        b = ring_of[oL + np.searchsorted(fL, (cR[i] + 1) * h + rR[i] + 1)]
        pinched[a[a == b]] = True

    # Parent of every ring: outer and open rings are roots; a closed hole looks left along the
    # row from its leftmost edge (an R dart) to the start of that run of its region, an L dart
    # of a ring of the same region (or the block's left seam); repeated until a root. ``hop``
    # keeps the position of the L corner where the last step landed.
    AT_SEAM = -1
    parent = np.arange(n_rings)
    hop = np.full(n_rings, -1)
    holes = np.flatnonzero(~outer & ~ring_open)
    if len(holes):
        is_r = (order >= oR) & (order < oB)
        cand = np.flatnonzero(is_r & ~outer[ring_of_pos] & ~ring_open[ring_of_pos])
        # leftmost R corner of every closed hole ring
        o = np.lexsort((X[cand], ring_of_pos[cand]))
        cand = cand[o]
        first = np.r_[True, ring_of_pos[cand][1:] != ring_of_pos[cand][:-1]]
        cand = cand[first]
        hole_rings = ring_of_pos[cand]
        pr, pc = Y[cand] - 1, X[cand] - 1  # the R dart's pixel
        run0 = run_starts[_before(run_starts, pr * w + pc)]
        rc = run0 - pr * w  # column where the run starts
        at_seam = (rc == 0) & left
        node = np.clip(oL + _before(fL, rc * h + pr), 0, n - 1)
        pos_of = np.empty(n, np.int64)
        pos_of[order] = np.arange(n)
        parent[hole_rings] = np.where(at_seam, AT_SEAM, ring_of[node])
        hop[hole_rings] = np.where(at_seam, -1, pos_of[node])
        root = outer | ring_open
        for _ in range(n_rings):
            p = parent
            step = (p >= 0) & ~root[np.maximum(p, 0)]
            if not step.any():
                break
            hop = np.where(step, hop[np.maximum(p, 0)], hop)
            parent = np.where(step, p[np.maximum(p, 0)], p)

    # Closed polygons: outer rings not on a seam, with the holes whose root is one of them.
    closed_root = (parent >= 0) & outer[np.maximum(parent, 0)] & ~ring_open[np.maximum(parent, 0)]
    closed_ring = ~ring_open & closed_root
    keep = np.flatnonzero(closed_ring)
    poly_of_outer = np.full(n_rings, -1)
    outers = np.flatnonzero(closed_ring & outer)
    poly_of_outer[outers] = np.arange(len(outers))
    ring_poly = poly_of_outer[parent[keep]]
    o = np.lexsort((~outer[keep], ring_poly))
    keep, ring_poly = keep[o], ring_poly[o]
    sizes = ring_end[keep] - ring_start[keep]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    idx = np.repeat(ring_start[keep] - offsets[:-1], sizes) + np.arange(offsets[-1])
    coords = np.stack([X[idx] + x0, Y[idx] + y0], axis=1)
    closed = Rings(
        coords=coords,
        ring_start=offsets,
        ring_poly=ring_poly,
        poly_value=ring_value[outers].astype(np.uint8),
        poly_area=np.bincount(ring_poly, weights=area2[keep], minlength=len(outers)) / 2,
        poly_length=np.bincount(ring_poly, weights=length[keep], minlength=len(outers)),
        poly_pinched=np.bincount(ring_poly, weights=pinched[keep], minlength=len(outers)) > 0,
    )

    # The chains of the open rings, then the holes whose region reaches a seam: each with the
    # chain its row scan ended on (its region's ring there), or -1 (it ended on the seam).
    chains = []
    chain_at: dict[int, tuple[int, int, np.ndarray, np.ndarray]] = {}
    for r in np.flatnonzero(ring_open):
        s, e = ring_start[r], ring_end[r]
        k, starts_, ends_, pieces = _cut_chains(X[s:e], Y[s:e], h, w, sides, x0, y0)
        chain_at[int(r)] = (k, len(chains), starts_, ends_)
        chains.extend((int(ring_value[r]), c) for c in pieces)
    deferred = []
    for r in np.flatnonzero(~ring_open & ~outer & ~closed_root):
        s, e = ring_start[r], ring_end[r]
        ref = -1
        if parent[r] >= 0:  # landed on open ring parent[r] at position hop[r]
            k, base, starts_, ends_ = chain_at[int(parent[r])]
            ps, pe = ring_start[parent[r]], ring_end[parent[r]]
            seg = (hop[r] - ps - 1 - k) % (pe - ps)  # the segment ending at that corner
            j = int(np.searchsorted(starts_, seg, side="right")) - 1
            if j >= 0 and seg <= ends_[j]:
                ref = base + j
        deferred.append((int(ring_value[r]), np.stack([X[s:e] + x0, Y[s:e] + y0], axis=1),
                         ref))
    return BlockTrace(y0, x0, (h, w), closed, chains, deferred, strips)


def _cut_chains(xs, ys, h, w, sides, x0, y0):
    """Split one open ring (corner vertices, cyclic) at its seam-lying segments: returns the
    rotation ``k`` applied (segment i of the ring is segment (i - k) mod n after it), the
    first and last segment of every chain, and the chains' vertices."""
    top, bottom, left, right = sides
    yn = np.roll(ys, -1)
    horiz = ys == yn
    seam = np.zeros(len(xs), bool)  # segment i: vertex i -> vertex i + 1
    if top:
        seam |= horiz & (ys == 0)
    if bottom:
        seam |= horiz & (ys == h)
    if left:
        seam |= ~horiz & (xs == 0)
    if right:
        seam |= ~horiz & (xs == w)
    k = int(np.argmax(seam))  # rotate so that the ring starts with a seam segment
    xs, ys, seam = np.roll(xs, -k), np.roll(ys, -k), np.roll(seam, -k)
    m = len(xs)
    starts = np.flatnonzero(~seam & np.roll(seam, 1))
    ends = np.flatnonzero(~seam & np.roll(seam, -1))
    out = []
    for s, e in zip(starts, ends):
        idx = np.arange(s, e + 2) % m
        out.append(np.stack([xs[idx] + x0, ys[idx] + y0], axis=1).astype(np.int64))
    return k, starts, ends, out


def split_pinches(ring: np.ndarray) -> list[np.ndarray]:
    """Cut a ring that passes through a vertex twice (a region touching itself at a corner)
    into simple loops at those vertices. Loops of a planar ring nest like brackets, so each
    pair of visits closes one loop (innermost first)."""
    keys = ring[:, 0].astype(np.int64) * (1 << 32) + ring[:, 1]
    order = np.argsort(keys, kind="stable")
    same = np.flatnonzero(keys[order][1:] == keys[order][:-1])
    if not len(same):
        return [ring]
    pairs = sorted(((int(order[i]), int(order[i + 1])) for i in same),
                   key=lambda p: p[1] - p[0])
    used = np.zeros(len(ring), bool)
    loops = []
    for i, j in pairs:
        span = np.arange(i, j)
        span = span[~used[span]]
        used[span] = True
        loops.append(ring[span])
    loops.append(ring[~used])
    return [lp for lp in loops if len(lp) >= 4]


# ---------------------------------------------------------------------------------- stitching
def _first_dart(p0, p1) -> tuple[int, int, int]:
    """(type, row, col) of the first dart of the straight segment p0 -> p1."""
    (xa, ya), (xb, yb) = (int(v) for v in p0), (int(v) for v in p1)
    if ya == yb:
        return (T, ya, xa) if xb > xa else (B, ya - 1, xa - 1)
    return (R, ya, xa - 1) if yb > ya else (L, ya - 1, xa)


def _last_dart(p0, p1) -> tuple[int, int, int]:
    """(type, row, col) of the last dart of the straight segment p0 -> p1."""
    (xa, ya), (xb, yb) = (int(v) for v in p0), (int(v) for v in p1)
    if ya == yb:
        return (T, yb, xb - 1) if xb > xa else (B, yb - 1, xb)
    return (R, yb - 1, xb - 1) if yb > ya else (L, yb, xb)


def drop_collinear(ring: np.ndarray) -> np.ndarray:
    """A cyclic rectilinear ring (unclosed [n, 2]) without vertices in straight runs."""
    ext = np.concatenate([ring[-1:], ring, ring[:1]])
    prev, cur, nxt = ext[:-2], ext[1:-1], ext[2:]
    straight = ((prev[:, 0] == cur[:, 0]) & (cur[:, 0] == nxt[:, 0])) | \
        ((prev[:, 1] == cur[:, 1]) & (cur[:, 1] == nxt[:, 1]))
    return ring[~straight]


def ring_area2(ring: np.ndarray) -> int:
    """Twice the signed (shoelace) area of a cyclic ring; > 0 for outer rings."""
    x, y = ring[:, 0].astype(np.int64), ring[:, 1].astype(np.int64)
    return int(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) + x[-1] * y[0] - x[0] * y[-1])


def inner_point(ring: np.ndarray) -> tuple[float, float]:
    """A point just left of the ring's first edge (inside a hole ring, outside an outer one)."""
    (xa, ya), (xb, yb) = ring[0], ring[1]
    dx, dy = np.sign(xb - xa), np.sign(yb - ya)
    return (xa + 0.5 * dx + 0.5 * dy, ya + 0.5 * dy - 0.5 * dx)


class SeamStitcher:
    """Joins the chains of traced blocks across seams into rings, and rings into polygons.

    Blocks lie on a grid of ``chunk_shape`` over a map of ``label_shape``. Feed every block of
    a grid row with ``add``, then ``finish_row`` for the rows in order (rows without blocks
    too); completed polygons go to ``emit(value, rings)`` (rings: unclosed [n, 2] arrays, outer
    first). What is held between rows: the chains and holes of regions still open at the
    current seam, and two rows of seam pixels.
    """

    def __init__(self, label_shape, chunk_shape, emit):
        self.H, self.W = (int(v) for v in label_shape)
        self.ch, self.cw = (int(v) for v in chunk_shape)
        self.emit = emit
        self.rows = -(-self.H // self.ch)
        self.next_row = 0
        self._blocks: dict[int, list[BlockTrace]] = {}
        self._pieces: dict[int, tuple[int, np.ndarray]] = {}
        self._start: dict[tuple[int, int, int], int] = {}
        self._unresolved: list[int] = []
        self._succ: dict[int, int] = {}
        self._head_of_tail: dict[int, int] = {}
        self._tail_of_head: dict[int, int] = {}
        self._next_id = 0
        self._holes: list[tuple[int, np.ndarray]] = []  # matched by geometry
        self._hole_points: list = []  # a point inside each of them
        self._waiting: dict[int, list[tuple[int, np.ndarray]]] = {}  # by the piece they name
        self._prev_bottom = np.zeros(self.W, np.uint8)
        self._hseam: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._vseam: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        self.held_max = 0

    def held(self) -> int:
        return len(self._pieces) + len(self._holes) + sum(map(len, self._waiting.values()))

    def add(self, trace: BlockTrace) -> None:
        row = trace.y0 // self.ch
        if row < self.next_row:
            raise ValueError(f"block ({trace.y0}, {trace.x0}) arrived after its row was stitched")
        self._blocks.setdefault(row, []).append(trace)

    # -------------------------------------------------------------- pieces and links
    def _piece(self, value: int, coords: np.ndarray) -> None:
        pid = self._next_id
        self._next_id += 1
        self._pieces[pid] = (value, coords)
        self._start[_first_dart(coords[0], coords[1])] = pid
        self._head_of_tail[pid] = pid
        self._tail_of_head[pid] = pid
        self._unresolved.append(pid)

    def _pix(self, py: int, px: int, vx: int, vy: int) -> int:
        if py < 0 or px < 0 or py >= self.H or px >= self.W:
            return 0
        hs = self._hseam.get(vy)
        if hs is not None:
            return int(hs[0][px] if py == vy - 1 else hs[1][px])
        y_top, lc, rc = self._vseam[vx]
        return int((lc if px == vx - 1 else rc)[py - y_top])

    def _next_dart(self, pid: int) -> tuple[int, int, int]:
        value, coords = self._pieces[pid]
        kind, r, c = _last_dart(coords[-2], coords[-1])
        vx, vy = int(coords[-1][0]), int(coords[-1][1])
        if kind == T:
            ahead_r, ahead_l = (r, c + 1), (r - 1, c + 1)
            left, straight, right = (L, r - 1, c + 1), (T, r, c + 1), (R, r, c)
        elif kind == R:
            ahead_r, ahead_l = (r + 1, c), (r + 1, c + 1)
            left, straight, right = (T, r + 1, c + 1), (R, r + 1, c), (B, r, c)
        elif kind == B:
            ahead_r, ahead_l = (r, c - 1), (r + 1, c - 1)
            left, straight, right = (R, r + 1, c - 1), (B, r, c - 1), (L, r, c)
        else:
            ahead_r, ahead_l = (r - 1, c), (r - 1, c - 1)
            left, straight, right = (B, r - 1, c - 1), (L, r - 1, c), (T, r, c)
        if self._pix(*ahead_r, vx, vy) != value:
            return right
        return left if self._pix(*ahead_l, vx, vy) == value else straight

    def _link(self, a: int, b: int) -> list[int] | None:
        """Link piece a -> b; the ring's pieces when that closes one."""
        self._succ[a] = b
        head = self._head_of_tail.pop(a)
        tail = self._tail_of_head.pop(b)
        if head == b:  # a's path starts with b: a cycle
            ring, p = [b], self._succ[b]
            while p != b:
                ring.append(p)
                p = self._succ[p]
            return ring
        self._tail_of_head[head] = tail
        self._head_of_tail[tail] = head
        return None

    # -------------------------------------------------------------- seams
    def _seam_runs(self, lower: np.ndarray, upper: np.ndarray):
        """Runs of darts along a seam between two rows (or columns) of pixels: yields
        (value, start, stop, kind) with kind 0 for darts of ``lower``'s pixels, 1 for
        ``upper``'s; [start, stop) are pixel indices along the seam."""
        for kind, own, other in ((0, lower, upper), (1, upper, lower)):
            d = (own != 0) & (own != other)
            if not d.any():
                continue
            idx = np.flatnonzero(d)
            brk = np.flatnonzero((np.diff(idx) != 1) | (np.diff(own[idx].astype(np.int16)) != 0))
            starts = np.r_[idx[0], idx[brk + 1]]
            stops = np.r_[idx[brk] + 1, idx[-1] + 1]
            for s, e in zip(starts.tolist(), stops.tolist()):
                yield int(own[s]), s, e, kind

    def finish_row(self) -> None:
        """Stitch the next grid row (all of its blocks must have been added)."""
        i = self.next_row
        if i >= self.rows:
            raise ValueError("all rows are already stitched")
        self.next_row += 1
        Y0 = i * self.ch
        Y1 = min(Y0 + self.ch, self.H)
        blocks = self._blocks.pop(i, [])
        top = np.zeros(self.W, np.uint8)
        bottom = np.zeros(self.W, np.uint8)
        cols: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for b in blocks:
            w = b.shape[1]
            top[b.x0 : b.x0 + w] = b.strips[0]
            bottom[b.x0 : b.x0 + w] = b.strips[1]
            cols[b.x0] = (b.strips[2], b.strips[3])
            first = self._next_id
            for value, coords in b.chains:
                self._piece(value, coords)
            for value, coords, ref in b.holes:
                if ref >= 0:
                    self._waiting.setdefault(first + ref, []).append((value, coords))
                else:
                    self._add_hole(value, coords)
        # The horizontal seam at the top of this row.
        self._hseam = {}
        if i > 0:
            self._hseam[Y0] = (self._prev_bottom, top)
            for value, s, e, kind in self._seam_runs(top, self._prev_bottom):
                if kind == 0:  # T darts of the row below, walking east
                    self._piece(value, np.array([[s, Y0], [e, Y0]], np.int64))
                else:  # B darts of the row above, walking west
                    self._piece(value, np.array([[e, Y0], [s, Y0]], np.int64))
        # The vertical seams inside this row.
        self._vseam = {}
        zeros = np.zeros(Y1 - Y0, np.uint8)
        for X in range(self.cw, self.W, self.cw):
            lc = cols.get(X - self.cw, (zeros, zeros))[1]
            rc = cols.get(X, (zeros, zeros))[0]
            self._vseam[X] = (Y0, lc, rc)
            for value, s, e, kind in self._seam_runs(lc, rc):
                if kind == 0:  # R darts of the left column, walking south
                    self._piece(value, np.array([[X, Y0 + s], [X, Y0 + e]], np.int64))
                else:  # L darts of the right column, walking north
                    self._piece(value, np.array([[X, Y0 + e], [X, Y0 + s]], np.int64))
        self._prev_bottom = bottom
        # Resolve every piece whose end vertex is decided by now.
        limit = Y1 if Y1 < self.H else self.H + 1
        waiting, rings = [], []
        for pid in self._unresolved:
            end = self._pieces[pid][1][-1]
            if end[1] >= limit:
                waiting.append(pid)
                continue
            key = self._next_dart(pid)
            nxt = self._start.get(key)
            if nxt is None:
                raise RuntimeError(f"seam stitching found no continuation for {key}")
            ring = self._link(pid, nxt)
            if ring is not None:
                rings.append(ring)
        self._unresolved = waiting
        self.held_max = max(self.held_max, self.held())
        self._close_rings(rings)

    def finish(self) -> None:
        while self.next_row < self.rows:
            self.finish_row()
        if self._pieces or self._holes or self._waiting:
            raise RuntimeError(f"seam stitching left {len(self._pieces)} pieces and "
                               f"{len(self._holes) + len(self._waiting)} holes unmatched")

    def _add_hole(self, value: int, coords: np.ndarray) -> None:
        import shapely

        self._holes.append((value, coords))
        self._hole_points.append(shapely.Point(inner_point(coords)))

    def _close_rings(self, rings: list[list[int]]) -> None:
        import shapely

        outers: list[tuple[int, np.ndarray]] = []
        members: list[list[np.ndarray]] = []
        for ring in rings:
            parts, value, named = [], None, []
            for pid in ring:
                v, coords = self._pieces.pop(pid)
                self._succ.pop(pid, None)
                self._start.pop(_first_dart(coords[0], coords[1]), None)
                value = v if value is None else value
                parts.append(coords[:-1])
                named.extend(self._waiting.pop(pid, ()))
            coords = drop_collinear(np.concatenate(parts))
            if ring_area2(coords) > 0:
                outers.append((value, coords))
                members.append([coords] + [c for _, c in named])  # holes of this region
            else:
                self._add_hole(value, coords)
                for hole in named:  # holes of a region whose outer ring is elsewhere
                    self._add_hole(*hole)
        if not outers:
            return
        if self._holes:
            # The rest by geometry: the smallest outer ring of the same value around a point
            # inside the hole (an outer ring completes no earlier than the rings inside it).
            shells = shapely.polygons([shapely.linearrings(c) for _, c in outers])
            areas = shapely.area(shells)
            points = np.asarray(self._hole_points, dtype=object)
            # shells as the query side: shapely prepares them (indexed point-in-polygon)
            oi, hi = shapely.STRtree(points).query(shells, predicate="contains")
            best: dict[int, int] = {}
            for h_, o_ in zip(hi.tolist(), oi.tolist()):
                if self._holes[h_][0] != outers[o_][0]:
                    continue
                if h_ not in best or areas[o_] < areas[best[h_]]:
                    best[h_] = o_
            for h_, o_ in best.items():
                members[o_].append(self._holes[h_][1])
            keep = [k for k in range(len(self._holes)) if k not in best]
            self._holes = [self._holes[k] for k in keep]
            self._hole_points = [self._hole_points[k] for k in keep]
        for (value, _), rings_ in zip(outers, members):
            self.emit(value, rings_)


__all__ = ["BlockTrace", "Rings", "SeamStitcher", "drop_collinear", "inner_point",
           "open_sides", "ring_area2", "split_pinches", "trace_labels"]
