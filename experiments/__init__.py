"""The scripts behind the write-ups in docs/. Run them from the project root as modules, e.g.
`python -m experiments.chat_sft`, so the project's own modules import without any sys.path edits."""
