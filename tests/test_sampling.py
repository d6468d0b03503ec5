"""TSN segment sampling against hand-computed offsets (REFERENCE.md formulas)."""

import numpy as np
import pytest

from caer_jax.data import sampling

EVAL_CASES = {
    # num_frames -> offsets for num_segments=16, duration=1, worked out by hand:
    # tick = num_frames / 16, offset_i = int(tick / 2 + tick * i).
    1: [0] * 16,
    5: [0, 1, 2, 3, 4] + [4] * 11,
    16: list(range(16)),  # not > 16: the edge-padded range, which is all 16 frames
    17: [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16],  # tick 1.0625
    100: [3, 9, 15, 21, 28, 34, 40, 46, 53, 59, 65, 71, 78, 84, 90, 96],  # tick 6.25
    300: [9, 28, 46, 65, 84, 103, 121, 140, 159, 178, 196, 215, 234, 253, 271, 290],  # 18.75
}


@pytest.mark.parametrize("num_frames", sorted(EVAL_CASES))
def test_eval_indices_hand_computed(num_frames):
    got = sampling.eval_indices(num_frames, 16, 1)
    np.testing.assert_array_equal(got, EVAL_CASES[num_frames])
    assert got.shape == (16,) and np.issubdtype(got.dtype, np.integer)


def test_eval_indices_eight_segments():
    np.testing.assert_array_equal(sampling.eval_indices(3, 8, 1), [0, 1, 2, 2, 2, 2, 2, 2])
    # tick = 20 / 8 = 2.5: int(1.25 + 2.5 i)
    np.testing.assert_array_equal(sampling.eval_indices(20, 8, 1), [1, 3, 6, 8, 11, 13, 16, 18])


@pytest.mark.parametrize("num_frames", [1, 5, 15, 16, 17])
def test_train_indices_deterministic_when_short(num_frames):
    # <= 16 frames: edge-padded range; 16 and 17 frames: avg = 1 and randint(1) == 0, so
    # offset_i = i (the 17th frame of a 17-frame clip is never drawn, as in the reference).
    rng = np.random.default_rng(0)
    expected = np.minimum(np.arange(16), num_frames - 1)
    np.testing.assert_array_equal(sampling.train_indices(num_frames, 16, 1, rng), expected)


@pytest.mark.parametrize("num_frames,avg", [(100, 6), (300, 18), (33, 2)])
def test_train_indices_tsn(num_frames, avg):
    got = sampling.train_indices(num_frames, 16, 1, np.random.default_rng(7))
    jitter = np.random.default_rng(7).integers(avg, size=16)
    np.testing.assert_array_equal(got, np.arange(16) * avg + jitter)
    starts = np.arange(16) * avg
    assert np.all(got >= starts) and np.all(got < starts + avg)
    # Over many draws every frame of every segment is reached.
    rng = np.random.default_rng(1)
    seen = np.unique(
        np.concatenate([sampling.train_indices(num_frames, 16, 1, rng) for _ in range(400)])
    )
    np.testing.assert_array_equal(seen, np.arange(16 * avg))


def test_train_indices_sorted_random_branch():
    # duration 3, 17 frames: avg = (17 - 3 + 1) // 16 = 0 and 17 > 16, so sorted draws in [0, 15)
    # with replacement.
    got = sampling.train_indices(17, 16, 3, np.random.default_rng(3))
    np.testing.assert_array_equal(got, np.sort(np.random.default_rng(3).integers(15, size=16)))
    assert np.all(np.diff(got) >= 0) and got.min() >= 0 and got.max() < 15


def test_train_indices_reproducible_for_a_seed():
    a = [sampling.train_indices(100, 16, 1, np.random.default_rng(42)) for _ in range(3)]
    for x in a[1:]:
        np.testing.assert_array_equal(a[0], x)
    rng = np.random.default_rng(42)
    draws = {tuple(sampling.train_indices(100, 16, 1, rng)) for _ in range(10)}
    assert len(draws) > 1


def test_eval_short_clip_with_long_duration_does_not_crash():
    # 17 frames, duration 3: not > 16 + 2 and more frames than segments; the reference's edge pad
    # would fail here; the first 16 offsets are used.
    np.testing.assert_array_equal(sampling.eval_indices(17, 16, 3), np.arange(16))


def test_frame_indices_hold_last_frame():
    np.testing.assert_array_equal(
        sampling.frame_indices(np.array([0, 5]), 3, 7), [0, 1, 2, 5, 6, 6]
    )
    np.testing.assert_array_equal(sampling.frame_indices(np.array([2, 4]), 1, 7), [2, 4])


def test_rejects_empty_clip():
    with pytest.raises(ValueError, match="num_frames=0"):
        sampling.eval_indices(0, 16, 1)
    with pytest.raises(ValueError, match="num_frames=0"):
        sampling.train_indices(0, 16, 1, np.random.default_rng(0))
