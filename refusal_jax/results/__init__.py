"""The study's results: the ``results.json`` schema and its Markdown rendering."""
