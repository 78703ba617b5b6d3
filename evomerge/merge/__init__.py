"""Merging: a recipe (`recipe`: mergekit YAML + the `evomerge:` provenance block; `portability`: whether stock
mergekit reproduces it) expanded to per-tensor parameters (`plan`), run tensor by tensor (`materialize`) into a
resident model or a stream by a named kernel set (`kernels`: evomerge-1 or mergekit-0.1.5); methods by name
(`methods`, facts in `registry`).

Import from the modules: `recipe.py` validates against `merge.methods`, so this package imports nothing itself.
"""
