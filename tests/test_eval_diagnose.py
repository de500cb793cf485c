"""NLL diagnosis: eviction events from the cache arithmetic, spike metrics, per-token files."""

from __future__ import annotations

import numpy as np
import pytest

from fastdecode.errors import ConfigError
from fastdecode.eval.diagnose import (
    diagnose,
    eviction_events,
    read_per_token,
    spike_at,
    write_per_token,
)
from fastdecode.eval.ppl import EvalSpec, PPLResult, attended


def test_events_strict_window():
    kv = attended(EvalSpec(mode="window", sink=0, window=4), 10)
    np.testing.assert_array_equal(kv, [1, 2, 3, 4, 5, 5, 5, 5, 5, 5])
    steps, dropped = eviction_events(kv)
    np.testing.assert_array_equal(steps, [5, 6, 7, 8, 9])  # step 5 no longer sees token 0
    assert (dropped == 1).all()


def test_events_lazy_streaming():
    # S=2, W=4, R=3: the window overruns to 6 and is cut back to 4 every 3 steps
    kv = attended(EvalSpec(mode="streaming", sink=2, window=4, compress_every=3), 16)
    steps, dropped = eviction_events(kv)
    np.testing.assert_array_equal(steps, [9, 12, 15])
    assert (dropped == 3).all()
    assert kv.max() == 2 + 4 + 3  # S + W + R keys at most (itself included)


def test_dense_has_no_events():
    steps, _ = eviction_events(attended(EvalSpec(mode="dense", sink=0), 50))
    assert steps.size == 0


def test_spike_metrics_on_a_known_curve():
    nll = np.full(400, 2.0)
    nll[200:210] += 3.0  # a 10-token spike of +3 nats right at the event
    m = spike_at(nll, 200, before=100, after=100, smooth=1)
    assert m["baseline"] == pytest.approx(2.0)
    assert m["peak"] == pytest.approx(3.0) and m["peak_offset"] == 0
    assert m["area"] == pytest.approx(30.0)
    assert m["width"] == 10 and not m["persistent"]
    # a step that never recovers is persistent: width = the horizon
    nll2 = np.concatenate((np.full(200, 2.0), np.full(200, 3.0)))
    m2 = spike_at(nll2, 200, before=50, after=64, smooth=8)
    assert m2["persistent"] and m2["width"] == 64 and m2["area"] == pytest.approx(64.0)


def _result(spec, nll):
    kv = attended(spec, nll.size)
    return PPLResult(spec, nll, kv.astype(np.int64), 1.0)


def test_diagnose_paired_with_reference_and_event_aligned():
    spec = EvalSpec(mode="streaming", sink=2, window=30, compress_every=16)
    n = 400
    rng = np.random.default_rng(0)
    dense = rng.uniform(1, 5, n)  # text difficulty: noisy
    kv = attended(spec, n)
    steps, _ = eviction_events(kv)
    nll = dense.copy()
    for e in steps:  # each lazy eviction costs +1 nat for 3 steps
        nll[e:e + 3] += 1.0
    d = diagnose(_result(spec, nll), reference=dense, reference_label="dense", before=16,
                 after=16, smooth=1)
    assert d["signal"] == "nll - reference" and d["reference"] == "dense"
    assert d["events"]["first_step"] == steps[0] and not d["events"]["strict"]
    fe = d["first_event"]
    assert fe["baseline"] == pytest.approx(0.0) and fe["peak"] == pytest.approx(1.0)
    assert fe["area"] == pytest.approx(3.0) and fe["width"] == 3
    ea = d["event_aligned"]
    assert ea["period"] == 16 and ea["events_used"] >= 10
    assert ea["peak"] == pytest.approx(1.0) and ea["width"] == 3
    assert ea["area"] == pytest.approx(3.0)
    # without the reference the same spike is measured against the noisy text
    raw = diagnose(_result(spec, nll), before=16, after=16, smooth=1)
    assert raw["signal"] == "nll" and raw["reference"] is None


def test_diagnose_strict_has_no_event_alignment_and_validates():
    spec = EvalSpec(mode="window", sink=0, window=8)
    d = diagnose(_result(spec, np.ones(50)), before=4, after=4, smooth=2)
    assert d["events"]["strict"] and d["event_aligned"] is None
    assert d["first_event"]["step"] == 9
    with pytest.raises(ConfigError):
        diagnose(_result(spec, np.ones(50)), smooth=0)
    with pytest.raises(ConfigError, match="reference"):
        diagnose(_result(spec, np.ones(50)), reference=np.ones(49))


@pytest.mark.parametrize("suffix", [".csv", ".npz"])
def test_per_token_file_round_trip(tmp_path, suffix):
    spec = EvalSpec(mode="window", sink=0, window=3)
    ids = list(range(11))
    nll = np.linspace(0.5, 3.0, 10)
    res = _result(spec, nll)
    path = write_per_token(res, ids, tmp_path / f"x{suffix}")
    cols = read_per_token(path)
    np.testing.assert_allclose(cols["nll"], nll, atol=1e-6)
    np.testing.assert_array_equal(cols["kv_len"], res.kv_len)
    np.testing.assert_array_equal(cols["input_id"], ids[:10])
    np.testing.assert_array_equal(cols["target_id"], ids[1:])
    np.testing.assert_array_equal(cols["dropped"], res.dropped)
