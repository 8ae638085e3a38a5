"""Quality evaluation: RULER-style synthetic tasks, scored exact-match (see README)."""
