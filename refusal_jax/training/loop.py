"""The LoRA training loop: seeded fixed-composition batches, logging, orbax checkpoints.

Every example is encoded once to `seq_len` tokens, and the frozen layers below the adapter's
`first_layer` are run once per example (`refusal_jax.training.prefix`); each step then gathers its
rows and trains the upper layers only.

A run is resumable: the adapter and optimiser state are saved with orbax every
`checkpoint_every` steps (and at the end) under `checkpoint_dir`; a new run with the same
directory restores the latest step and continues with the batches it would have drawn, so an
interrupted run ends with the same adapter as an uninterrupted one.

With `refuse_opening_weight` or `answer_opening_weight` above 0 the loss adds the refusal-opening
term of `refusal_jax.training.objective` (R: `refusal_jax.text.chat.refusal_token_ids`): the rows of
the group named `REFUSAL_GROUP` are to open a refusal, all others not to, except benign rows whose
own reply opens with a token of R (left out, weight 0). Both weights 0 (the default) train on
the cross-entropy alone. With `decision_targets` (per example, e.g. a probe's probability that the
request is harmful) those soft targets replace the group labels, and the term alone trains the
decision on the rows it covers (see `refusal_jax.training.objective`); the benign rows it leaves
out keep their whole cross-entropy, as without targets.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from refusal_jax.models.io.adapter import LORA_TARGETS, LoraAdapter, init_adapter
from refusal_jax.models.loading import Model
from refusal_jax.text.chat import refusal_token_ids
from refusal_jax.training.examples import Example, encode_examples
from refusal_jax.training.mixture import batch_indices
from refusal_jax.training.objective import OpeningTerm, make_optimizer, reply_start, train_step
from refusal_jax.training.prefix import prefix_hidden

REFUSAL_GROUP = "refusal"  # the data group whose replies are refusals


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one LoRA run (all recorded in the adapter's provenance)."""

    steps: int = 200
    per_batch: tuple[tuple[str, int], ...] = (("refusal", 3), ("style_matched", 5),
                                              ("harmless", 4))
    seq_len: int = 64
    decision_tokens: int = 4  # the first reply tokens weighted by decision_weight in the loss
    decision_weight: float = 4.0
    refuse_opening_weight: float = 0.0  # weight of -log p_R on REFUSAL_GROUP rows
    answer_opening_weight: float = 0.0  # weight of -log(1 - p_R) on the other rows
    learning_rate: float = 2e-3
    warmup_steps: int = 8
    weight_decay: float = 0.0
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS
    first_layer: int = 8
    seed: int = 0
    checkpoint_every: int = 10
    keep_checkpoints: int | None = 2  # None keeps every checkpoint (for checkpoint selection)
    log_every: int = 1


@dataclasses.dataclass
class TrainResult:
    adapter: LoraAdapter
    losses: list[tuple[int, float]]  # (step, loss) of the steps run in this process
    seconds_per_step: float


@dataclasses.dataclass(frozen=True)
class EncodedGroup:
    """One data group encoded once: TokenBatch arrays and the frozen prefix's output [N, T, D]."""

    tokens: np.ndarray
    valid: np.ndarray
    loss_mask: np.ndarray
    hidden: np.ndarray


def encode_group(model: Model, examples: Sequence[Example], *, seq_len: int, first_layer: int,
                 decision_tokens: int = 0, decision_weight: float = 1.0,
                 chunk: int = 32) -> EncodedGroup:
    """Encodes `examples` (see `encode_examples`) and runs the layers below `first_layer` on
    them, `chunk` at a time."""
    batch = encode_examples(model.chat, examples, seq_len=seq_len,
                            context_length=model.config.max_context,
                            decision_tokens=decision_tokens, decision_weight=decision_weight)
    hidden = []
    for start in range(0, len(examples), chunk):
        rows = np.arange(start, start + chunk) % len(examples)  # fixed shape: wrap around
        states = prefix_hidden(model.params, batch.tokens[rows], batch.valid[rows],
                               config=model.config, n_layers=first_layer)
        hidden.append(np.asarray(states)[:min(chunk, len(examples) - start)])
    return EncodedGroup(tokens=batch.tokens, valid=batch.valid, loss_mask=batch.loss_mask,
                        hidden=np.concatenate(hidden))


def opening_weights(group: str, tokens: np.ndarray, loss_mask: np.ndarray,
                    refusal_ids: Sequence[int], config: TrainConfig
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (refuse, weight) of the refusal-opening term for the encoded rows of `group`."""
    rows = len(tokens)
    if group == REFUSAL_GROUP:
        return np.ones(rows, np.float32), np.full(rows, config.refuse_opening_weight, np.float32)
    first = tokens[np.arange(rows), np.asarray(reply_start(loss_mask))]
    opens_refusal = np.isin(first, np.asarray(refusal_ids))
    return (np.zeros(rows, np.float32),
            np.where(opens_refusal, 0.0, config.answer_opening_weight).astype(np.float32))


def _checkpoint_manager(checkpoint_dir: str | Path, keep: int | None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(checkpoint_dir).absolute(), options=options)


def _fresh_state(model: Model, config: TrainConfig):
    optimizer = make_optimizer(learning_rate=config.learning_rate, steps=config.steps,
                               warmup_steps=config.warmup_steps,
                               weight_decay=config.weight_decay)
    adapter = init_adapter(model.config, jax.random.key(config.seed), rank=config.rank,
                           alpha=config.alpha, targets=config.targets,
                           first_layer=config.first_layer)
    return optimizer, adapter, optimizer.init(adapter)


def checkpoint_steps(checkpoint_dir: str | Path) -> list[int]:
    """The steps saved under `checkpoint_dir` (ascending; empty when there are none)."""
    if not Path(checkpoint_dir).is_dir():
        return []
    manager = _checkpoint_manager(checkpoint_dir, None)
    steps = sorted(manager.all_steps())
    manager.close()
    return steps


def restore_adapter(model: Model, config: TrainConfig, checkpoint_dir: str | Path,
                    step: int) -> LoraAdapter:
    """The adapter saved at `step` of the run `config` under `checkpoint_dir`."""
    steps = checkpoint_steps(checkpoint_dir)
    if step not in steps:
        raise ValueError(f"no checkpoint of step {step} in {checkpoint_dir} (saved: {steps}); "
                         "pass one of the saved steps")
    _, adapter, opt_state = _fresh_state(model, config)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                      {"adapter": adapter, "opt_state": opt_state})
    manager = _checkpoint_manager(checkpoint_dir, None)
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    manager.close()
    return restored["adapter"]


def _check_decision_targets(targets: Mapping[str, np.ndarray], sizes: Mapping[str, int],
                            config: TrainConfig) -> None:
    if not (config.refuse_opening_weight > 0 and config.answer_opening_weight > 0):
        raise ValueError("decision_targets train the decision through the opening term: set "
                         "refuse_opening_weight and answer_opening_weight above 0")
    if set(targets) != set(sizes):
        raise ValueError(f"decision_targets must hold the groups {sorted(sizes)}; missing "
                         f"{sorted(set(sizes) - set(targets))}, unknown "
                         f"{sorted(set(targets) - set(sizes))}")
    for name, size in sizes.items():
        values = np.asarray(targets[name], np.float64)
        if values.shape != (size,):
            raise ValueError(f"decision_targets[{name!r}] must hold one target per example "
                             f"({size}), got shape {values.shape}")
        if not np.all((values >= 0) & (values <= 1)):  # also catches NaN
            raise ValueError(f"decision_targets[{name!r}] must be probabilities in [0, 1]")


def train_adapter(model: Model, groups: Mapping[str, Sequence[Example]], config: TrainConfig,
                  checkpoint_dir: str | Path, *, stop_at: int | None = None,
                  decision_targets: Mapping[str, np.ndarray] | None = None) -> TrainResult:
    """Trains a LoRA adapter on `groups` (resuming from `checkpoint_dir` when it holds steps).

    `stop_at` ends this process's run early, after that many steps in all (checkpointed);
    a later call continues to `config.steps`. `decision_targets` (group -> [n] probabilities
    of refusing) are the opening term's soft targets (see the module docstring).
    """
    if config.refuse_opening_weight < 0 or config.answer_opening_weight < 0:
        raise ValueError(f"refuse_opening_weight and answer_opening_weight must be >= 0 (0 leaves "
                         f"the term out), got {config.refuse_opening_weight} and "
                         f"{config.answer_opening_weight}")
    if decision_targets is not None:
        _check_decision_targets(decision_targets, {name: len(groups[name])
                                                   for name, _ in config.per_batch}, config)
    stop_at = config.steps if stop_at is None else min(stop_at, config.steps)
    per_batch = dict(config.per_batch)
    optimizer, adapter, opt_state = _fresh_state(model, config)
    manager = _checkpoint_manager(checkpoint_dir, config.keep_checkpoints)
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                          {"adapter": adapter, "opt_state": opt_state})
        restored = manager.restore(start, args=ocp.args.StandardRestore(abstract))
        adapter, opt_state = restored["adapter"], restored["opt_state"]
        logging.info("resumed from step %d in %s", start, checkpoint_dir)

    use_opening = config.refuse_opening_weight > 0 or config.answer_opening_weight > 0
    refusal_ids = refusal_token_ids(model.tokenizer) if use_opening else ()
    refusal_ids_array = jnp.asarray(refusal_ids, jnp.int32)
    encoded, opening = {}, {}
    if start < stop_at:
        for name in per_batch:
            encoded[name] = encode_group(model, groups[name], seq_len=config.seq_len,
                                         first_layer=config.first_layer,
                                         decision_tokens=config.decision_tokens,
                                         decision_weight=config.decision_weight)
            if use_opening:
                refuse, weight = opening_weights(name, encoded[name].tokens,
                                                 encoded[name].loss_mask, refusal_ids, config)
                teacher = None
                if decision_targets is not None:
                    refuse = np.asarray(decision_targets[name], np.float32)
                    teacher = (weight > 0).astype(np.float32)
                opening[name] = (refuse, weight, teacher)
            logging.info("encoded %s: %d examples", name, len(groups[name]))
    sizes = {name: len(groups[name]) for name in per_batch}
    losses, timed = [], []
    for step in range(start, stop_at):
        began = time.perf_counter()
        rows = batch_indices(sizes, per_batch, step, config.seed)
        batch = {field: jnp.asarray(np.concatenate(
                     [getattr(encoded[name], field)[rows[name]] for name in per_batch]))
                 for field in ("hidden", "tokens", "valid", "loss_mask")}
        term = None
        if use_opening:
            refuse, weight, teacher = (
                None if opening[name][i] is None else
                jnp.asarray(np.concatenate([opening[name][i][rows[name]] for name in per_batch]))
                for i in range(3))
            term = OpeningTerm(refuse=refuse, weight=weight, refusal_ids=refusal_ids_array,
                               teacher=teacher)
        adapter, opt_state, loss = train_step(adapter, opt_state, model.params, **batch,
                                              opening=term, optimizer=optimizer,
                                              config=model.config)
        loss = float(loss)
        seconds = time.perf_counter() - began
        if step > start:  # the first step of a process includes compilation
            timed.append(seconds)
        losses.append((step, loss))
        if step % config.log_every == 0 or step == config.steps - 1:
            logging.info("step %d / %d  loss %.4f  %.1f s", step + 1, config.steps, loss, seconds)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == stop_at:
            manager.save(step + 1, args=ocp.args.StandardSave(
                {"adapter": adapter, "opt_state": opt_state}))
    manager.wait_until_finished()
    manager.close()
    return TrainResult(adapter=adapter, losses=losses,
                       seconds_per_step=sum(timed) / len(timed) if timed else float("nan"))
