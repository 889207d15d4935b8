"""The place-belief filter suppresses isolated wrong matches and follows real moves."""

import numpy as np
import pytest

from vpr_ros.temporal import PlaceBeliefFilter


def line_map(n=60, spacing=20.0):
    pos = np.zeros((n, 3))
    pos[:, 1] = np.arange(n) * spacing
    return pos


def retrieval(best, n, rng, k=8, margin=0.05):
    """A retrieval list in which ``best`` wins by ``margin`` over random other places."""
    others = rng.choice([i for i in range(n) if i != best], size=k - 1, replace=False)
    sims = np.r_[0.8, 0.8 - margin - 0.1 * rng.random(k - 1)]
    return np.r_[best, others], sims


def test_isolated_wrong_match_is_suppressed():
    rng = np.random.default_rng(0)
    n = 60
    f = PlaceBeliefFilter(line_map(n), sigma_m=30.0)
    outputs = []
    truth = list(range(10, 30))
    for t, place in enumerate(truth):
        observed = 50 if t == 12 else place        # one look-alike frame far away
        idx, sims = retrieval(observed, n, rng)
        if t == 12:
            # the true place is still among the candidates, just not first
            idx[3], sims[3] = place, 0.77
        best, mass = f.update(idx, sims)
        outputs.append(best)
        assert 0.0 <= mass <= 1.0
    assert outputs[12] != 50
    assert abs(outputs[12] - truth[12]) <= 1
    assert sum(abs(o - t) <= 1 for o, t in zip(outputs, truth)) >= len(truth) - 1


def test_filter_recovers_after_a_real_jump():
    rng = np.random.default_rng(1)
    n = 60
    f = PlaceBeliefFilter(line_map(n), sigma_m=30.0, kidnap_prob=0.05)
    for place in range(5, 15):
        f.update(*retrieval(place, n, rng))
    # The robot is carried to place 45 and keeps seeing it consistently.
    outs = [f.update(*retrieval(p, n, rng))[0] for p in range(45, 55)]
    assert abs(outs[-1] - 54) <= 1
    assert sum(abs(o - p) <= 1 for o, p in zip(outs, range(45, 55))) >= 6


def test_first_frame_equals_single_image_answer_and_reset():
    rng = np.random.default_rng(2)
    f = PlaceBeliefFilter(line_map(30), sigma_m=30.0)
    idx, sims = retrieval(7, 30, rng)
    assert f.update(idx, sims)[0] == 7
    f.reset()
    assert f.belief is None
    idx, sims = retrieval(20, 30, rng)
    assert f.update(idx, sims)[0] == 20


def test_filter_rejects_bad_parameters():
    with pytest.raises(ValueError):
        PlaceBeliefFilter(np.zeros((0, 3)))
    with pytest.raises(ValueError):
        PlaceBeliefFilter(line_map(5), sigma_m=0)
    with pytest.raises(ValueError):
        PlaceBeliefFilter(line_map(5), kidnap_prob=1.0)
