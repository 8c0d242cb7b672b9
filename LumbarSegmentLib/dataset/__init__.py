"""Exported cases (image + label + case.json) and the frozen held-out split: the one contract
between annotation and training."""
