"""Safety tuning of the refusal model organism: LoRA training with optax, self-distillation of
the base model's answers, and the behavioural evaluation of the result."""
