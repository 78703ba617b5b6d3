"""All reading and writing of files: memory-mapped checkpoints (`checkpoint`), streaming safetensors shards
(`shards`), whole-or-nothing outputs (`atomic`), sha256 of files (`digest`), verification of an export against
the hashes its recipe recorded (`verify`), user YAML (`yamlfile`). Nothing here merges or scores.

Import from the modules (`merge/recipe.py` reads YAML through `io.yamlfile`), so this package imports nothing itself.
"""
