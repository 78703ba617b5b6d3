"""Merging: a recipe expanded to per-tensor parameters (`plan`), mergekit's kernels or bit-identical faster ones
(`kernels`), run tensor by tensor into a resident model or a stream (`materialize`); methods by name (`methods`).

Import from the modules: `recipe.py` validates against `merge.methods`, so this package imports nothing itself.
"""
