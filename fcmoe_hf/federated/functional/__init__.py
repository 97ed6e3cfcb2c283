"""FC-MoE's math as pure functions over tensors (no files, no models): importance-aware weights (Eq. 2-3),
gradient consensus projection (Eq. 3-5) and local knowledge retention (Eq. 5-6), from arXiv:2606.15625."""
