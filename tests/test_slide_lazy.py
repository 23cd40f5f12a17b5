"""``Slide.to_dask``: the slide as a lazy dask array at a chosen pixel size."""

from __future__ import annotations

import pickle

import numpy as np

from conftest import SYNTH_H, SYNTH_W
from wsiproto.slide import Slide


def test_to_dask_equals_reading_the_frame(synthetic_svs):
    path, _ = synthetic_svs
    with Slide(path) as slide:
        arr = slide.to_dask(mpp=1.0, chunk=700)
        assert arr.shape == (SYNTH_H // 2, SYNTH_W // 2, 3) and arr.dtype == np.uint8
        assert arr.chunks[0][0] == 700 and arr.npartitions > 4
        whole = slide.read_region((0, 0), (SYNTH_W // 2, SYNTH_H // 2), mpp=1.0)
        np.testing.assert_array_equal(arr.compute(scheduler="threads", num_workers=2), whole)
        # a part computes only its blocks; the array survives pickling (distributed)
        part = arr[650:760, 1390:1410].compute()
        np.testing.assert_array_equal(part, whole[650:760, 1390:1410])
        again = pickle.loads(pickle.dumps(arr))
        np.testing.assert_array_equal(again[:5, :5].compute(), whole[:5, :5])
        level0 = slide.to_dask(chunk=1024)
        assert level0.shape == (SYNTH_H, SYNTH_W, 3)
