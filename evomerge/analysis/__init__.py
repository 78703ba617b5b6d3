"""Plots (matplotlib, Agg backend, PNG files): one module per figure family, e.g. `evomerge.plots.audit`."""
