"""Synthetic drives made from a recorded one: stops, crawling, speed-ups, reversing, kidnaps.

A benchmark's query sequence is one drive at one speed.  A robot stops, crawls, speeds up,
backs up and is sometimes carried elsewhere.  :func:`make_drive` returns, for a recorded
sequence of ``n`` frames (in driving order), the frame indices of such a drive: a stop
repeats a frame, crawling repeats each frame, a speed-up skips frames, reversing steps
back, a kidnap jumps far.  Replaying the recorded frames in that order gives a realistic
drive with exact ground truth (each frame keeps its recorded position).

:func:`simulated_odometry` makes wheel-odometry-like positions for such a drive (travelled
distance with a relative error, in an odometry frame unrelated to the map) for tests and
studies of the odometry input; it is a simulation, clearly not the robot's ground truth
input in any product path.
"""

from __future__ import annotations

import numpy as np

KINDS = ("normal", "stops", "crawl", "speedup", "reverse", "kidnap", "variable", "shuffled")


def make_drive(n: int, kind: str, seed: int = 0) -> np.ndarray:
    """Frame indices (into a recorded drive of n frames) of a synthetic drive of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown drive kind {kind!r}; expected one of {KINDS}")
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return np.arange(n)
    if kind == "shuffled":
        return rng.permutation(n)
    seq = []
    i = 0
    if kind == "kidnap":
        # drive the first third, then the robot is carried to the last third and drives on
        third = n // 3
        return np.r_[np.arange(third), np.arange(n - third, n)]
    while i < n and len(seq) < 3 * n:
        if kind == "stops":
            seq.append(i)
            if rng.random() < 0.08:
                seq += [i] * int(rng.integers(4, 12))      # stand still for a while
            i += 1
        elif kind == "crawl":
            seq += [i] * int(rng.integers(2, 4))           # half to a third of map speed
            i += 1
        elif kind == "speedup":
            seq.append(i)
            i += int(rng.integers(2, 4))                   # two to three times map speed
        elif kind == "reverse":
            seq.append(i)
            if rng.random() < 0.05 and i > 12:
                back = int(rng.integers(4, 10))            # back up, then go on
                seq += list(range(i - 1, i - back, -1))
                i -= back
            i += 1
        elif kind == "variable":
            r = rng.random()
            if r < 0.1:
                seq += [i] * int(rng.integers(3, 10))
            elif r < 0.25:
                seq += [i] * int(rng.integers(1, 3))
            elif r < 0.45:
                i += int(rng.integers(1, 3))
            elif r < 0.5 and i > 10:
                back = int(rng.integers(2, 6))
                seq += list(range(i, max(i - back, 0), -1))
                i = max(i - back, 0)
            seq.append(min(i, n - 1))
            i += 1
    return np.clip(np.asarray(seq, dtype=np.int64), 0, n - 1)


def simulated_odometry(positions: np.ndarray, relative_error: float = 0.05,
                       seed: int = 0) -> np.ndarray:
    """(Q, 3) odometry positions: each true step with a relative length error, accumulated
    (so the error drifts) in an odometry frame rotated and shifted against the map."""
    rng = np.random.default_rng(seed)
    p = np.asarray(positions, dtype=np.float64)
    steps = np.diff(p[:, :2], axis=0)
    steps = steps * np.clip(1.0 + relative_error * rng.standard_normal((len(steps), 1)), 0.0, None)
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    out = np.zeros((len(p), 3))
    out[1:, :2] = np.cumsum(steps @ rot.T, axis=0) + rng.uniform(-100, 100, 2)
    out[0, :2] = out[1, :2] - (steps[0] @ rot.T if len(steps) else 0.0)
    return out
