"""The One Euro filter (Casiez, Roussel and Vogel, CHI 2012) over arrays of points: a low-pass
filter whose cutoff rises with speed, so a still face's landmarks stop jittering while a
moving face is followed without lag.

Speeds are taken in face sizes per second (the caller passes the face's size), so one set of
parameters suits a 60 px face and a 600 px one.
"""
from __future__ import annotations

import math

import numpy as np

# At rest the points are smoothed below 1 Hz; each face size per second of movement adds 4 Hz.
MIN_CUTOFF_HZ = 1.0
BETA = 4.0
DERIVATIVE_CUTOFF_HZ = 1.0


def _alpha(cutoff_hz: float, dt: float) -> float:
    tau = 1.0 / (2 * math.pi * cutoff_hz)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """Filters one array of points (any shape) sampled at `fps`."""

    def __init__(self, fps: float, min_cutoff: float = MIN_CUTOFF_HZ, beta: float = BETA,
                 derivative_cutoff: float = DERIVATIVE_CUTOFF_HZ):
        self.dt = 1.0 / fps if fps > 0 else 1.0 / 25
        self.min_cutoff, self.beta, self.derivative_cutoff = min_cutoff, beta, derivative_cutoff
        self.value: np.ndarray | None = None
        self.speed: np.ndarray | None = None

    def reset(self) -> None:
        self.value = self.speed = None

    def __call__(self, points: np.ndarray, scale: float = 1.0, steps: int = 1) -> np.ndarray:
        """The filtered points; `scale`: the face's size in pixels; `steps`: frames since the
        last call (a gap stretches the time step)."""
        points = np.asarray(points, np.float32)
        if self.value is None or self.value.shape != points.shape:
            self.value, self.speed = points.copy(), np.zeros_like(points)
            return self.value.copy()
        dt = self.dt * max(1, steps)
        speed = (points - self.value) / (dt * max(scale, 1.0))
        a_d = _alpha(self.derivative_cutoff, dt)
        self.speed = a_d * speed + (1 - a_d) * self.speed
        # One cutoff per point from its speed (norm over the coordinates of the last axis).
        magnitude = np.linalg.norm(self.speed, axis=-1, keepdims=True)
        cutoff = self.min_cutoff + self.beta * magnitude
        tau = 1.0 / (2 * np.pi * cutoff)
        a = 1.0 / (1.0 + tau / dt)
        self.value = a * points + (1 - a) * self.value
        return self.value.copy()
