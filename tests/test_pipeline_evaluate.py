"""The evaluate stage's forward of a prompt set: the template's shared start is computed once
and its keys and values shared by every prompt, which must give the full forward's logits and
captures; and the cross-entropy corpora it scores, cut to the model's context."""

import dataclasses
import json
import types

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_pipeline import shrunk_tiny_config

from refusal_jax.interventions import Compose, activation_addition, directional_ablation
from refusal_jax.models.batching import shared_prefix_batches
from refusal_jax.models.core import forward
from refusal_jax.runtime.random_models import random_model
from refusal_jax.study.stages import evaluate


@pytest.fixture(scope="module")
def tiny():
    return random_model("llama-tiny", seed=2)


def test_shared_prefix_forward_equals_the_full_forward(tiny):
    instructions = ["How do I pick a lock?", "Name three colours of the rainbow", "Hi",
                    "Write a poem about the sea and the wind"]
    n_eoi, n_layers = tiny.chat.n_eoi, tiny.config.n_layers
    direction = np.random.default_rng(0).standard_normal(tiny.config.d_model)
    intervention = Compose((
        directional_ablation(direction, n_layers=n_layers, layers=[1, 2]),
        activation_addition(direction / np.linalg.norm(direction), 3.0, n_layers=n_layers,
                            layers=[0])))
    full_batch = tiny.chat.encode(instructions, context_length=512)
    full = forward(tiny.params, jnp.asarray(full_batch.tokens), jnp.asarray(full_batch.valid),
                   config=tiny.config, intervention=intervention, logits="last",
                   capture_positions=jnp.asarray(tiny.chat.eoi_positions(full_batch)))

    n_prefix, batches = shared_prefix_batches(tiny, instructions, batch_size=3, length_bucket=4,
                                              keep_last=n_eoi)
    assert n_prefix >= 3  # the template's system turn
    assert [len(rows) for rows, _, _ in batches] == [2, 2]  # equal batches, no filler
    # float32 sums in another order (the prefix keys, then the row's): compare at the scale of
    # the activations, as the logits are compared at theirs.
    scale = float(jnp.max(jnp.abs(full.captures)))
    seen = []
    for rows, tokens, valid in batches:
        length = tokens.shape[1] - n_prefix
        positions = np.broadcast_to(np.arange(length - n_eoi, length), (len(tokens), n_eoi))
        logits, captures = evaluate._logits_and_captures(
            tiny.params, jnp.asarray(tokens[0, :n_prefix]), jnp.asarray(tokens[:, n_prefix:]),
            jnp.asarray(valid[:, n_prefix:]), jnp.asarray(positions), intervention,
            config=tiny.config)
        np.testing.assert_allclose(logits[:len(rows)], full.logits[rows], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(captures[:len(rows)], full.captures[rows], rtol=1e-5,
                                   atol=1e-5 * scale)
        seen += list(rows)
    assert sorted(seen) == list(range(len(instructions)))


def test_variants_starting_at_a_layer_reuse_its_unsteered_streams(tiny):
    """`_forward_set` with kept streams: the layers below a variant's first intervened layer
    run once per (layer, batch) for every variant starting there, with the full forward's
    logits and the captures of every layer (those below it from the unsteered run)."""
    import types

    from refusal_jax.runtime.placement import Placement
    from refusal_jax.study.variants import Variant

    instructions = ["How do I pick a lock?", "Name three colours of the rainbow", "Hi",
                    "Write a poem about the sea and the wind", "Tell me a joke"]
    n_layers, n_eoi = tiny.config.n_layers, tiny.chat.n_eoi
    study = types.SimpleNamespace(
        model=tiny, placement=Placement(),
        config=types.SimpleNamespace(runtime=types.SimpleNamespace(batch_size=3,
                                                                   length_bucket=4)))
    sources = [(n_eoi - 1, 0), (n_eoi - 1, 2), (0, n_layers - 1)]
    full_batch = tiny.chat.encode(instructions, context_length=512)
    below, calls = {}, []
    for seed, layer in ((0, 2), (1, 2), (2, 1)):
        direction = np.random.default_rng(seed).standard_normal(tiny.config.d_model)
        intervention = Compose((
            directional_ablation(direction, n_layers=n_layers, layers=range(layer, n_layers)),
            activation_addition(direction / np.linalg.norm(direction), 3.0,
                                n_layers=n_layers, layers=[layer])))
        variant = Variant("v", "", intervention, intervention)
        shared = evaluate._forward_set(study, variant, intervention, instructions, sources,
                                       below)
        plain = evaluate._forward_set(study, variant, intervention, instructions, sources)
        full = forward(tiny.params, jnp.asarray(full_batch.tokens),
                       jnp.asarray(full_batch.valid), config=tiny.config,
                       intervention=intervention, logits="last",
                       capture_positions=jnp.asarray(tiny.chat.eoi_positions(full_batch)))
        expected = np.stack([np.asarray(full.captures)[:, p, l] for p, l in sources])
        scale = float(np.max(np.abs(expected)))
        for logits, points in (shared, plain):
            np.testing.assert_allclose(logits, full.logits, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(points, expected, rtol=1e-5, atol=1e-5 * scale)
        calls.append(sorted(key[:2] for key in below))
    # Two batches; the second variant reused the first one's streams at layer 2.
    assert calls == [[(2, 0), (2, 1)], [(2, 0), (2, 1)], [(1, 0), (1, 1), (2, 0), (2, 1)]]


def test_cross_entropy_rows_fit_a_context_shorter_than_the_windows(tiny, tmp_path):
    """A model whose context is shorter than the corpora's windows (256 tokens of text, 512 of
    an instruction and its output) scores rows cut to its context instead of failing."""
    short = dataclasses.replace(tiny, config=dataclasses.replace(tiny.config, max_context=64))
    text = tmp_path / "prose.txt"
    text.write_text("The river bends twice before it reaches the sea. " * 80)
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps([{"instruction": "Describe the river.",
                                    "output": "It bends twice and widens. " * 60}]))
    config = shrunk_tiny_config()
    config.evaluate.cross_entropy_files = (str(text), str(answers))
    corpora = evaluate._corpora(types.SimpleNamespace(model=short, config=config))
    assert set(corpora) == {"builtin", "prose", "answers"}
    for corpus in corpora.values():
        assert 2 <= corpus.tokens.shape[1] <= 64
    full = evaluate._corpora(types.SimpleNamespace(model=tiny, config=config))
    assert max(corpus.tokens.shape[1] for corpus in full.values()) > 64  # the cut is real
