"""The export: a recipe or a trial written as a mergekit YAML + checkpoint (`export`), its model card
(`modelcard`, from `templates/`). Whether a recipe runs in stock mergekit is the recipe's own question:
`evomerge.merge.portability`.

Import from the modules; this package imports nothing itself."""
