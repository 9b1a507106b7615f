"""Evaluation: refusal metrics, KL, cross-entropy, safety judge, multiple choice, geometry and the
k-curve."""
