"""Small helpers used by every layer: argument checks, module/RNG utilities, BatchNorm re-estimation, eval data."""
