"""The benchmark harness's own arithmetic (bench.peers), which the BENCHMARKS.md tables rest on."""

from __future__ import annotations

import itertools

import pytest

from bench.peers import PAIR_BLOCK, paired_ratio


def test_paired_ratio_subtracts_the_ideal_blocks_and_leaves_out_the_step_after_each():
    """Steps of 1 s with a block of ideal steps (0.5 s each) after every PAIR_BLOCK-th step; the
    step right after a block is slowed (the host carries state over) and must not count, nor must
    the warm-up steps."""
    steps = 3 * PAIR_BLOCK
    block_s = [PAIR_BLOCK * 0.5 if k % PAIR_BLOCK == PAIR_BLOCK - 1 else 0.0 for k in range(steps)]
    durations = [1.5 if k > 0 and block_s[k - 1] else 1.0 for k in range(steps)]
    durations[0] = 9.0  # warm-up
    stamps = [0.0, *itertools.accumulate(d + b for d, b in zip(durations, block_s))]
    result = paired_ratio(stamps, [0.5] * (3 * PAIR_BLOCK), block_s, warmup=1)
    assert result["full_s"] == pytest.approx([1.0] * len(result["full_s"]))
    assert len(result["full_s"]) == steps - 1 - 2  # minus the warm-up and the two steps after a block
    assert result["ratio"] == pytest.approx(2.0)
