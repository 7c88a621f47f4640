"""allot: per-layer allocation of model compression."""
