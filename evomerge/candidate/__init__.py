"""A merge candidate: the search space (a point <-> a recipe: `space`), the default merges scored beside the
search (`portfolio`, labelled by `baseline`), and the Evaluator that merges a candidate in memory and scores it
(`evaluator`).

Import from the modules; this package imports nothing itself."""
