"""Evaluation: refusal metrics, KL, cross-entropy, safety judge, multiple choice, geometry, k-curve."""
