"""The study's stages: extract, select, infer, evaluate, report."""
