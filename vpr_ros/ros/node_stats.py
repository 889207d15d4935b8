"""Counters, rates and latency percentiles of the localizer node (ROS-free, thread-safe).

Reported on /diagnostics once a second and in the `vpr eval bag --realtime` report.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from typing import Deque, Dict, Optional

import numpy as np


class NodeStats:
    def __init__(self, window_s: float = 5.0, latency_samples: int = 500):
        self._lock = threading.Lock()
        self.window_s = float(window_s)
        self._inputs: Deque[float] = deque()
        self._outputs: Deque[float] = deque()
        self._latency: Dict[str, Deque[float]] = defaultdict(lambda: deque(maxlen=latency_samples))
        self.processed = 0
        self.bad_frames = 0
        self.degenerate_frames = 0
        self.errors = 0
        self.confident = 0
        self.last_input: Optional[float] = None
        self.last_confidence: Optional[float] = None
        self.last_error: str = ""

    def _trim(self, q: Deque[float], now: float) -> None:
        while q and q[0] < now - self.window_s:
            q.popleft()

    def input(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._inputs.append(now)
            self._trim(self._inputs, now)
            self.last_input = now

    def output(self, timings_ms: Dict[str, float], confidence: float, confident: bool) -> None:
        now = time.monotonic()
        with self._lock:
            self._outputs.append(now)
            self._trim(self._outputs, now)
            self.processed += 1
            self.confident += int(bool(confident))
            self.last_confidence = float(confidence)
            for stage, ms in timings_ms.items():
                if ms is not None and np.isfinite(ms):
                    self._latency[stage].append(float(ms))

    def bad(self, message: str) -> None:
        with self._lock:
            self.bad_frames += 1
            self.last_error = message

    def degenerate(self, message: str) -> None:
        """A frame that decoded but carries no place information (dark, uniform, tiny, ...)."""
        with self._lock:
            self.degenerate_frames += 1
            self.last_error = message

    def error(self, message: str) -> None:
        with self._lock:
            self.errors += 1
            self.last_error = message

    def snapshot(self) -> dict:
        now = time.monotonic()
        with self._lock:
            self._trim(self._inputs, now)
            self._trim(self._outputs, now)
            span = self.window_s
            latency = {}
            for stage, values in self._latency.items():
                if values:
                    arr = np.fromiter(values, dtype=np.float64)
                    latency[stage] = {"mean": float(arr.mean()),
                                      "p50": float(np.percentile(arr, 50)),
                                      "p95": float(np.percentile(arr, 95)),
                                      "max": float(arr.max())}
            return {
                "input_rate_hz": len(self._inputs) / span,
                "processing_rate_hz": len(self._outputs) / span,
                "frames_processed": self.processed,
                "frames_bad": self.bad_frames,
                "frames_degenerate": self.degenerate_frames,
                "errors": self.errors,
                "confident_matches": self.confident,
                "seconds_since_input": None if self.last_input is None else now - self.last_input,
                "last_confidence": self.last_confidence,
                "last_error": self.last_error,
                "latency_ms": latency,
            }
