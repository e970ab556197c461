"""Reference values of C computed without rounding: exact integer arithmetic on the stored floats.

Every float32 (and bfloat16, float16) value is an integer multiple of 2⁻¹⁴⁹, so after scaling by 2¹⁴⁹ the dot
products are exact Python integers; only the final ``1 − s/√(ab)`` is rounded, at 120 decimal digits.
"""
from __future__ import annotations

import decimal

import numpy as np


def _integers(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.array_equal(x.astype(np.float32).astype(np.float64), x):
        raise ValueError("exact references need float32-representable values")
    return np.array([int(v) for v in x * 2.0**149], dtype=object)


def exact_cosine_dissimilarity(a: np.ndarray, b: np.ndarray) -> float:
    """``1 − ⟨a, b⟩ / (‖a‖‖b‖)`` correctly rounded to float64 (NaN for a zero vector)."""
    x, y = _integers(a), _integers(b)
    return exact_from_integers(x, y, x.dot(x), y.dot(y))


def integers(a: np.ndarray) -> np.ndarray:
    """The exact scaled integers of a float32-representable vector (for :func:`exact_from_integers`)."""
    return _integers(a)


def exact_from_integers(x: np.ndarray, y: np.ndarray, aa: int, bb: int) -> float:
    """:func:`exact_cosine_dissimilarity` from :func:`integers` and their squared norms (to reuse them)."""
    s = x.dot(y)
    if aa == 0 or bb == 0:
        return float("nan")
    with decimal.localcontext() as context:
        context.prec = 120
        return float(1 - decimal.Decimal(s) / (decimal.Decimal(aa) * decimal.Decimal(bb)).sqrt())


def landed_cosine_dissimilarity(a: np.ndarray, b: np.ndarray) -> float:
    """The landed code's exact form, kept as a float64 reference: ``½‖a/‖a‖ − b/‖b‖‖²``."""
    x, y = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    return float(0.5 * np.sum(np.square(x / np.linalg.norm(x) - y / np.linalg.norm(y))))
