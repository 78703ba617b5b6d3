"""The overfitting guard: the top trials re-scored on the validation subsets, and THE exported trial
(`guard`).

Import from the modules; this package imports nothing itself."""
