"""Evaluation of completions and logits: refusal metrics (`refusal`)."""
