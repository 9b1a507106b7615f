"""Tests of the LoRA adapter (refusal_jax.models.io.adapter) and the training code that fits it
(refusal_jax.training), on tiny models."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import planted_model
import pytest

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.core import forward
from refusal_jax.models.io.adapter import (
    LORA_TARGETS,
    init_adapter,
    load_adapter,
    merge_adapter,
    save_adapter,
)
from refusal_jax.models.params import init_params
from refusal_jax.text import Prompt
from refusal_jax.text.chat import refusal_token_ids
from refusal_jax.training.completions import cached_greedy_completions, greedy_completions
from refusal_jax.training.evaluation import (
    completion_cross_entropy,
    probe_separation,
    refusal_opening_probabilities,
    refusal_separation,
    validation_score,
)
from refusal_jax.training.examples import Example, encode_examples, reply_example
from refusal_jax.training.loop import (
    TrainConfig,
    checkpoint_steps,
    opening_weights,
    restore_adapter,
    train_adapter,
)
from refusal_jax.training.mixture import batch_indices, drop_similar, exclude_instructions
from refusal_jax.training.objective import (
    OpeningTerm,
    adapter_loss,
    opening_loss,
    reply_loss,
    token_nll,
    token_nll_from,
)
from refusal_jax.training.prefix import prefix_hidden

CONFIG = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=5, n_heads=4,
                     n_kv_heads=2, head_dim=8, d_ff=48, max_context=64)


def _random_adapter(first_layer=2, rank=4, targets=LORA_TARGETS, seed=1):
    adapter = init_adapter(CONFIG, jax.random.key(seed), rank=rank, first_layer=first_layer,
                           targets=targets)
    leaves, treedef = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


def _batch():
    tokens = jax.random.randint(jax.random.key(2), (3, 12), 0, CONFIG.vocab_size)
    valid = jnp.arange(12)[None] >= jnp.array([[0], [3], [6]])
    loss_mask = jnp.broadcast_to((jnp.arange(12) >= 8).astype(jnp.float32), (3, 12))
    return tokens, valid, loss_mask


def test_fresh_adapter_is_the_identity(params):
    adapter = init_adapter(CONFIG, jax.random.key(1), rank=4)
    merged = merge_adapter(params, adapter)
    for before, after in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(merged)):
        np.testing.assert_array_equal(before, after)


def test_merge_adds_scaled_low_rank_product_from_first_layer(params):
    adapter = _random_adapter(first_layer=2, rank=4, targets=("q_proj", "down_proj"))
    merged = merge_adapter(params, adapter)
    assert adapter.scale == 16.0 / 4
    for target in ("q_proj", "down_proj"):
        weight, new = np.asarray(getattr(params.layers, target)), getattr(merged.layers, target)
        a, b = np.asarray(adapter.a[target]), np.asarray(adapter.b[target])
        expected = weight.copy()
        for layer in range(2, CONFIG.n_layers):
            expected[layer] += adapter.scale * a[layer - 2] @ b[layer - 2]
        np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(new[:2], weight[:2])  # frozen layers untouched
    np.testing.assert_array_equal(merged.layers.k_proj, params.layers.k_proj)


def test_save_load_round_trip(tmp_path, params):
    adapter = _random_adapter(first_layer=1, rank=2, targets=("o_proj", "up_proj"))
    path = save_adapter(tmp_path / "a.safetensors", adapter)
    loaded = load_adapter(path)
    assert (loaded.targets, loaded.rank, loaded.alpha, loaded.first_layer) == (
        ("o_proj", "up_proj"), 2, 16.0, 1)
    for target in adapter.targets:  # stored as float16
        np.testing.assert_array_equal(loaded.a[target],
                                      np.asarray(adapter.a[target], np.float16))
        np.testing.assert_array_equal(loaded.b[target],
                                      np.asarray(adapter.b[target], np.float16))
    merge_adapter(params, loaded)


def test_adapter_errors(tmp_path, params):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="targets"):
        init_adapter(CONFIG, key, targets=("lm_head",))
    with pytest.raises(ValueError, match="wrap it"):
        init_adapter(CONFIG, key, targets="q_proj")
    with pytest.raises(ValueError, match="rank"):
        init_adapter(CONFIG, key, rank=0)
    with pytest.raises(ValueError, match="first_layer"):
        init_adapter(CONFIG, key, first_layer=CONFIG.n_layers)
    other = dataclasses.replace(CONFIG, d_ff=40)
    with pytest.raises(ValueError, match="different model"):
        merge_adapter(params, init_adapter(other, key))
    with pytest.raises(FileNotFoundError, match="adapter file not found"):
        load_adapter(tmp_path / "missing.safetensors")
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a refusal_jax LoRA adapter"):
        load_adapter(tmp_path / "x.safetensors")


def test_upper_layer_loss_from_cached_prefix_equals_full_forward(params):
    tokens, valid, loss_mask = _batch()
    adapter = _random_adapter(first_layer=2)
    merged = merge_adapter(params, adapter)
    full_nll, full_count = token_nll(merged, tokens, valid, loss_mask, config=CONFIG)
    hidden = prefix_hidden(params, tokens, valid, config=CONFIG, n_layers=2)
    nll, count = token_nll_from(merged, hidden, tokens, valid, loss_mask, first_layer=2,
                                config=CONFIG)
    np.testing.assert_allclose(nll, full_nll, rtol=1e-5)
    np.testing.assert_array_equal(count, full_count)
    np.testing.assert_array_equal(count, [4, 4, 4])  # tokens 8..11 of each row
    loss = adapter_loss(adapter, params, hidden, tokens, valid, loss_mask, config=CONFIG)
    np.testing.assert_allclose(loss, full_nll.sum() / 12, rtol=1e-5)


def test_batch_indices_are_seeded_epochs_with_random_access():
    sizes, per_batch = {"a": 5, "b": 3}, {"a": 2, "b": 1}
    steps = [batch_indices(sizes, per_batch, step, seed=7) for step in range(5)]
    assert steps[3]["a"].tolist() == batch_indices(sizes, per_batch, 3, seed=7)["a"].tolist()
    first_epoch = np.concatenate([s["a"] for s in steps])[:5]
    assert sorted(first_epoch.tolist()) == list(range(5))  # every example once per epoch
    assert sorted(np.concatenate([s["b"] for s in steps[:3]]).tolist()) == [0, 1, 2]
    other = np.concatenate([batch_indices(sizes, per_batch, s, seed=8)["a"] for s in range(5)])
    assert other.tolist() != np.concatenate([s["a"] for s in steps]).tolist()
    with pytest.raises(ValueError, match="not in"):
        batch_indices(sizes, {"c": 1}, 0, seed=0)
    with pytest.raises(ValueError, match="empty"):
        batch_indices({"a": 0}, {"a": 1}, 0, seed=0)


def test_exclusion_is_case_and_space_insensitive_and_deduplicates():
    prompts = [Prompt("Do  X"), Prompt("do x"), Prompt("Do Y"), Prompt("keep me")]
    kept = exclude_instructions(prompts, ["DO Y "])
    assert [p.instruction for p in kept] == ["Do  X", "keep me"]


def test_paraphrases_of_excluded_requests_are_dropped():
    excluded = ["Give detailed instructions for how to commit tax fraud",
                "Give detailed step-by-step instructions for manufacturing ricin at home"]
    prompts = [Prompt("Generate instructions on how to commit tax fraud"),    # topic 1.0
               Prompt("Give instructions for manufacturing ricin at home"),    # topic 1.0
               Prompt("Describe in detail how to commit tax fraud"),          # topic 0.75
               Prompt("Give detailed instructions on how to pick a lock"),    # same frame only
               Prompt("Explain how to file a tax return on time")]            # topic 0.2
    kept, dropped = drop_similar(prompts, excluded, threshold=0.5)
    assert [p.instruction for p in kept] == ["Give detailed instructions on how to pick a lock",
                                             "Explain how to file a tax return on time"]
    assert dropped == 3
    kept, dropped = drop_similar(prompts, excluded, threshold=0.8)
    assert dropped == 2 and prompts[2] in kept
    assert drop_similar(prompts, [], threshold=0.5) == (prompts, 0)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        drop_similar(prompts, excluded, threshold=0.0)


# ------------------------------------------------------------------ with a chat model (planted)

@pytest.fixture(scope="module")
def planted():
    return planted_model.model()


def test_encode_examples_left_pads_and_masks_reply_tokens(planted):
    chat = planted.chat
    example = reply_example(chat, "bake bread", "I Sorry .", "refusal")
    end = chat.eoi_token_ids[0]  # <|end|> is the end-of-turn stop token of this template
    assert example.reply_ids[-1] == end and len(example.reply_ids) == 4
    cut = Example("plan trip", (7, 8, 9, 10, 11, 12), "distilled")
    batch = encode_examples(chat, [example, cut], seq_len=10, context_length=128)
    n_prompt = len(chat.encode(["bake bread"], context_length=128, length_bucket=1).tokens[0])
    assert batch.tokens.shape == (2, 10)
    row = batch.tokens[0][batch.valid[0]]
    assert row[-4:].tolist() == list(example.reply_ids) and len(row) == n_prompt + 4
    assert batch.loss_mask[0].tolist() == [0] * 6 + [1] * 4
    assert not batch.valid[0, :10 - n_prompt - 4].any()
    # the second reply is cut to fill the row, with no end-of-turn token
    assert batch.valid[1].all() and batch.loss_mask[1].sum() == 10 - n_prompt
    with pytest.raises(ValueError, match="no room for a reply"):
        encode_examples(chat, [example], seq_len=n_prompt, context_length=128)


def test_encode_examples_weights_the_first_reply_tokens(planted):
    chat = planted.chat
    example = reply_example(chat, "bake bread", "I Sorry .", "refusal")  # 4 reply tokens
    cut = Example("plan trip", (7, 8, 9, 10, 11, 12), "distilled")
    plain = encode_examples(chat, [example, cut], seq_len=10, context_length=128)
    batch = encode_examples(chat, [example, cut], seq_len=10, context_length=128,
                            decision_tokens=2, decision_weight=3.0)
    assert batch.loss_mask[0].tolist() == [0] * 6 + [3, 3, 1, 1]
    reply = plain.loss_mask[1] > 0  # the cut reply: its first two kept tokens are weighted
    assert batch.loss_mask[1][reply].tolist() == [3, 3] + [1] * (int(reply.sum()) - 2)
    assert (batch.tokens == plain.tokens).all() and (batch.valid == plain.valid).all()
    longer = encode_examples(chat, [example], seq_len=10, context_length=128,
                             decision_tokens=9, decision_weight=2.0)
    assert longer.loss_mask[0].tolist() == [0] * 6 + [2] * 4  # never beyond the reply
    for tokens, weight in ((-1, 2.0), (2, 0.0)):
        with pytest.raises(ValueError, match="decision_tokens must be >= 0"):
            encode_examples(chat, [example], seq_len=10, context_length=128,
                            decision_tokens=tokens, decision_weight=weight)


def test_completions_match_generation_order_and_cache(tmp_path, planted):
    instructions = planted_model.prompts(5, "harmful", seed=0) + ["cook rice"]
    replies = greedy_completions(planted, instructions, max_new_tokens=3, batch_size=4)
    single = [greedy_completions(planted, [text], max_new_tokens=3, batch_size=1)[0]
              for text in instructions[-2:]]
    assert replies[-2:] == single  # sorted into batches, returned in input order
    cached = cached_greedy_completions(tmp_path / "c.json", planted, instructions,
                                       max_new_tokens=3, batch_size=4)
    assert cached == replies
    stored = json.loads((tmp_path / "c.json").read_text())
    assert stored["request"]["instructions"] == instructions
    # a request overlapping the cache computes only the new instructions and adds them
    more = instructions[:2] + ["boil an egg"]
    added = cached_greedy_completions(tmp_path / "c.json", planted, more, max_new_tokens=3,
                                      batch_size=4)
    assert added[:2] == replies[:2]
    assert added[2] == greedy_completions(planted, ["boil an egg"], max_new_tokens=3,
                                          batch_size=1)[0]
    stored = json.loads((tmp_path / "c.json").read_text())
    assert stored["request"]["instructions"] == instructions + ["boil an egg"]
    # another length is another request: recomputed, and the cache replaced
    cached_greedy_completions(tmp_path / "c.json", planted, ["boil an egg"], max_new_tokens=2,
                              batch_size=4)
    stored = json.loads((tmp_path / "c.json").read_text())
    assert stored["request"]["max_new_tokens"] == 2
    assert stored["request"]["instructions"] == ["boil an egg"]
    with pytest.raises(ValueError, match="batch_size"):
        greedy_completions(planted, instructions, max_new_tokens=3, batch_size=0)


def _groups(planted):
    chat = planted.chat
    harmful = planted_model.prompts(6, "harmful", seed=1)
    harmless = planted_model.prompts(6, "harmless", seed=2)
    return {"refusal": [reply_example(chat, t, "Sorry .", "refusal") for t in harmful],
            "harmless": [reply_example(chat, t, "cook rice .", "harmless") for t in harmless]}


def test_training_lowers_the_loss_and_resumes_exactly(tmp_path, planted):
    groups = _groups(planted)
    config = TrainConfig(steps=6, per_batch=(("refusal", 2), ("harmless", 2)), seq_len=16,
                         learning_rate=1e-2, warmup_steps=1, rank=2, first_layer=2,
                         checkpoint_every=2, seed=3)
    whole = train_adapter(planted, groups, config, tmp_path / "whole")
    losses = [loss for _, loss in whole.losses]
    assert losses[-1] < losses[0]
    # an interrupted run (3 steps), resumed to 6, ends with the same adapter
    train_adapter(planted, groups, config, tmp_path / "parts", stop_at=3)
    resumed = train_adapter(planted, groups, config, tmp_path / "parts")
    assert [step for step, _ in resumed.losses] == [3, 4, 5]
    for a, b in zip(jax.tree_util.tree_leaves(whole.adapter),
                    jax.tree_util.tree_leaves(resumed.adapter)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # the tuned model scores the reply tokens better than the base model
    texts = [e.instruction for e in groups["refusal"]]
    replies = [list(e.reply_ids) for e in groups["refusal"]]
    tuned = merge_adapter(planted.params, whole.adapter)
    base_ce = completion_cross_entropy(planted, texts, replies, seq_len=16, batch_size=4)
    tuned_ce = completion_cross_entropy(planted, texts, replies, seq_len=16, batch_size=4,
                                        params=tuned)
    assert tuned_ce < base_ce


def test_kept_checkpoints_restore_the_adapter_of_their_step(tmp_path, planted):
    groups = _groups(planted)
    config = TrainConfig(steps=4, per_batch=(("refusal", 2), ("harmless", 2)), seq_len=16,
                         learning_rate=1e-2, warmup_steps=1, rank=2, first_layer=2,
                         checkpoint_every=1, keep_checkpoints=None, seed=3)
    result = train_adapter(planted, groups, config, tmp_path / "run")
    assert checkpoint_steps(tmp_path / "run") == [1, 2, 3, 4]
    assert checkpoint_steps(tmp_path / "absent") == []
    final = restore_adapter(planted, config, tmp_path / "run", 4)
    for a, b in zip(jax.tree_util.tree_leaves(result.adapter), jax.tree_util.tree_leaves(final)):
        np.testing.assert_array_equal(a, b)
    early = restore_adapter(planted, config, tmp_path / "run", 1)
    assert not np.allclose(jax.tree_util.tree_leaves(early)[0], jax.tree_util.tree_leaves(final)[0])
    with pytest.raises(ValueError, match="no checkpoint of step 5"):
        restore_adapter(planted, config, tmp_path / "run", 5)


def test_validation_score_is_harmful_minus_benign_refusal():
    rates = {"bad_a": 1.0, "bad_b": 0.5, "good_a": 0.25, "good_b": 0.0}
    assert validation_score(rates, ["bad_a", "bad_b"], ["good_a", "good_b"]) == 0.75 - 0.125
    with pytest.raises(ValueError, match="no refusal rate for the sets"):
        validation_score(rates, ["bad_a", "missing"], ["good_a"])
    with pytest.raises(ValueError, match="at least one harmful and one benign"):
        validation_score(rates, [], ["good_a"])


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _hand_log_mass(logits, starts, ids):
    """(log p_R, log(1 - p_R)) [B] from the logits before each reply, in float64 log space (so
    log(1 - p_R) stays exact when p_R is near 1)."""
    from scipy.special import logsumexp
    logits = np.asarray(logits, np.float64)
    log_refuse, log_answer = [], []
    for row, start in enumerate(starts):
        at = logits[row, start - 1]
        total, in_set = logsumexp(at), np.isin(np.arange(len(at)), ids)
        log_refuse.append(logsumexp(at[in_set]) - total)
        log_answer.append(logsumexp(at[~in_set]) - total)
    return np.array(log_refuse), np.array(log_answer)


def _hand_opening_loss(logits, starts, refuse, weight, ids):
    """The refusal-opening BCE computed directly: p_R from the logits before each reply."""
    log_refuse, log_answer = _hand_log_mass(logits, starts, ids)
    bce = -(refuse * log_refuse + (1 - refuse) * log_answer)
    return float(np.mean(weight * bce))


def test_opening_loss_is_the_binary_cross_entropy_of_refusal_token_mass():
    logits = jax.random.normal(jax.random.key(5), (3, 6, 8)) * 2.0
    starts = [3, 2, 5]  # first reply position of each row
    loss_mask = (np.arange(6)[None] >= np.array(starts)[:, None]).astype(np.float32)
    ids = np.array([1, 4], np.int32)
    refuse, weight = np.array([1.0, 0.0, 0.0]), np.array([0.5, 2.0, 1.0])
    term = OpeningTerm(refuse=jnp.asarray(refuse), weight=jnp.asarray(weight),
                       refusal_ids=jnp.asarray(ids))
    expected = _hand_opening_loss(logits, starts, refuse, weight, ids)
    np.testing.assert_allclose(opening_loss(logits, jnp.asarray(loss_mask), term), expected,
                               rtol=1e-5)
    # only the logits that predict the first reply token get a gradient, and descending it
    # raises the refusal logits of the row to refuse and lowers those of the rows to answer
    grad = np.asarray(jax.grad(opening_loss)(logits, jnp.asarray(loss_mask), term))
    for row, start in enumerate(starts):
        at = grad[row, start - 1]
        others = np.setdiff1d(np.arange(8), ids)
        if refuse[row]:
            assert (at[ids] < 0).all() and (at[others] > 0).all()
        else:
            assert (at[ids] > 0).all() and (at[others] < 0).all()
        np.testing.assert_array_equal(np.delete(grad[row], start - 1, axis=0), 0.0)


def test_adapter_loss_adds_the_opening_term_and_its_descent_moves_refusal_mass(params):
    tokens, valid, loss_mask = _batch()  # replies start at position 8
    adapter = _random_adapter(first_layer=2)
    hidden = prefix_hidden(params, tokens, valid, config=CONFIG, n_layers=2)
    ids = np.array([3, 7, 11], np.int32)
    refuse, weight = np.array([1.0, 0.0, 0.0]), np.array([1.0, 1.0, 3.0])
    term = OpeningTerm(refuse=jnp.asarray(refuse), weight=jnp.asarray(weight),
                       refusal_ids=jnp.asarray(ids))
    logits_of = jax.jit(lambda a: forward(merge_adapter(params, a), tokens, valid,
                                          config=CONFIG).logits)
    loss = jax.jit(adapter_loss, static_argnames="config")

    with_term = loss(adapter, params, hidden, tokens, valid, loss_mask, config=CONFIG,
                     opening=term)
    without = loss(adapter, params, hidden, tokens, valid, loss_mask, config=CONFIG)
    expected = _hand_opening_loss(logits_of(adapter), [8, 8, 8], refuse, weight, ids)
    np.testing.assert_allclose(with_term - without, expected, rtol=1e-4)

    def p_refuse(a):
        return np.asarray(jax.nn.softmax(logits_of(a)[:, 7])[:, ids].sum(-1))

    row_grad = jax.jit(jax.grad(lambda a, w: opening_loss(logits_of(a), loss_mask,
                                                          term._replace(weight=w))))
    for row in range(3):  # a small descent step on one row's term moves that row's p_R
        grads = row_grad(adapter, jnp.asarray(np.eye(3)[row]))
        stepped = jax.tree_util.tree_map(lambda x, g: x - 1e-3 * g, adapter, grads)
        before, after = p_refuse(adapter)[row], p_refuse(stepped)[row]
        assert after > before if refuse[row] else after < before


def _teacher_case():
    """Random logits and replies: row 0 opens with a refusal token, rows 1 and 2 do not."""
    logits = jax.random.normal(jax.random.key(6), (3, 6, 8)) * 2.0
    starts = np.array([3, 2, 4])
    loss_mask = (np.arange(6)[None] >= starts[:, None]).astype(np.float32)
    loss_mask[np.arange(3), starts] = 4.0  # a decision weight on the first reply token
    tokens = np.array(jax.random.randint(jax.random.key(7), (3, 6), 0, 8))
    ids = np.array([1, 4], np.int32)
    tokens[:, :] = np.where(np.isin(tokens, ids), 0, tokens)
    tokens[0, starts[0]] = 4
    return logits, jnp.asarray(tokens), jnp.asarray(loss_mask), starts, ids


def test_teacher_rows_leave_the_decision_to_the_opening_term():
    logits, tokens, loss_mask, starts, ids = _teacher_case()
    term = OpeningTerm(refuse=jnp.asarray([0.9, 0.2, 0.6]), weight=jnp.asarray([0.0, 0.0, 0.0]),
                       refusal_ids=jnp.asarray(ids), teacher=jnp.ones(3))
    # shifting every refusal logit where the first reply token is predicted changes p_R but no
    # token's probability given the decision: on teacher rows the cross-entropy does not move
    shift = np.zeros(logits.shape, np.float32)
    shift[np.arange(3)[:, None], (starts - 1)[:, None], ids[None]] = 3.0
    np.testing.assert_allclose(reply_loss(logits + shift, tokens, loss_mask, term),
                               reply_loss(logits, tokens, loss_mask, term), rtol=1e-5)
    hard = term._replace(teacher=jnp.zeros(3))
    assert abs(float(reply_loss(logits + shift, tokens, loss_mask, hard))
               - float(reply_loss(logits, tokens, loss_mask, hard))) > 1e-2

    # the value: the decision-free cross-entropy plus the opening term with soft targets
    weighted = term._replace(weight=jnp.asarray([1.0, 2.0, 0.5]), teacher=jnp.asarray([1.0, 1, 0]))
    log_probs = np.log(_softmax(np.asarray(logits, np.float64)))
    mask, total = np.asarray(loss_mask), 0.0
    for row, start in enumerate(starts):
        for t in range(start, 6):
            nll = -log_probs[row, t - 1, tokens[row, t]]
            if t == start and weighted.teacher[row]:
                p_refuse = np.exp(log_probs[row, t - 1, ids]).sum()
                decision = p_refuse if tokens[row, t] in ids else 1 - p_refuse
                nll += np.log(decision)
            total += mask[row, t] * nll
    expected = total / mask[:, 1:].sum() + _hand_opening_loss(
        logits, starts, np.asarray(weighted.refuse), np.asarray(weighted.weight), ids)
    np.testing.assert_allclose(reply_loss(logits, tokens, loss_mask, weighted), expected,
                               rtol=1e-5)


def test_opening_weights_leave_out_benign_replies_that_open_with_a_refusal_token():
    config = TrainConfig(refuse_opening_weight=0.5, answer_opening_weight=2.0)
    tokens = np.array([[9, 9, 3, 5], [9, 9, 6, 5], [9, 9, 9, 7]])
    loss_mask = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]], np.float32)
    refuse, weight = opening_weights("harmless", tokens, loss_mask, [3, 7], config)
    np.testing.assert_array_equal(refuse, [0, 0, 0])
    np.testing.assert_array_equal(weight, [0.0, 2.0, 0.0])  # rows 0 and 2 open with 3 and 7
    refuse, weight = opening_weights("refusal", tokens, loss_mask, [3, 7], config)
    np.testing.assert_array_equal(refuse, [1, 1, 1])
    np.testing.assert_array_equal(weight, [0.5, 0.5, 0.5])


def test_training_adds_the_opening_term_of_the_batch_rows(tmp_path, planted):
    groups = _groups(planted)
    base = TrainConfig(steps=1, per_batch=(("refusal", 2), ("harmless", 2)), seq_len=16,
                       learning_rate=1e-2, warmup_steps=1, rank=2, first_layer=2, seed=3)
    weighted = dataclasses.replace(base, refuse_opening_weight=0.5, answer_opening_weight=2.0)
    plain_loss = train_adapter(planted, groups, base, tmp_path / "plain").losses[0][1]
    term_loss = train_adapter(planted, groups, weighted, tmp_path / "term").losses[0][1]
    # step 0 starts from the identity adapter: the term is that of the base model's logits
    rows = batch_indices({name: 6 for name in groups}, dict(base.per_batch), 0, base.seed)
    examples = [groups[name][i] for name in ("refusal", "harmless") for i in rows[name]]
    batch = encode_examples(planted.chat, examples, seq_len=16, context_length=128)
    logits = forward(planted.params, batch.tokens, batch.valid, config=planted.config).logits
    starts = [int(np.argmax(row > 0)) for row in batch.loss_mask]
    ids = np.asarray(refusal_token_ids(planted.tokenizer))
    expected = _hand_opening_loss(logits, starts, np.array([1.0, 1, 0, 0]),
                                  np.array([0.5, 0.5, 2.0, 2.0]), ids)
    assert expected > 0.01
    np.testing.assert_allclose(term_loss - plain_loss, expected, rtol=1e-4)
    with pytest.raises(ValueError, match="must be >= 0"):
        train_adapter(planted, groups, dataclasses.replace(base, answer_opening_weight=-1.0),
                      tmp_path / "negative")


def test_training_takes_soft_decision_targets_and_rejects_bad_ones(tmp_path, planted):
    groups = _groups(planted)
    config = TrainConfig(steps=1, per_batch=(("refusal", 2), ("harmless", 2)), seq_len=16,
                         learning_rate=1e-2, warmup_steps=1, rank=2, first_layer=2, seed=3,
                         refuse_opening_weight=0.5, answer_opening_weight=2.0)
    hard = {"refusal": np.ones(6), "harmless": np.zeros(6)}
    soft = {"refusal": np.linspace(0.55, 0.95, 6), "harmless": np.linspace(0.02, 0.3, 6)}
    losses = {name: train_adapter(planted, groups, config, tmp_path / name,
                                  decision_targets=targets).losses[0][1]
              for name, targets in (("labels", None), ("hard", hard), ("soft", soft))}
    # step 0 starts from the identity adapter: the differences are those of the base logits
    rows = batch_indices({name: 6 for name in groups}, dict(config.per_batch), 0, config.seed)
    examples = [groups[name][i] for name in ("refusal", "harmless") for i in rows[name]]
    batch = encode_examples(planted.chat, examples, seq_len=16, context_length=128,
                            decision_tokens=config.decision_tokens,
                            decision_weight=config.decision_weight)
    logits = forward(planted.params, batch.tokens, batch.valid, config=planted.config).logits
    starts = [int(np.argmax(row > 0)) for row in batch.loss_mask]
    ids = np.asarray(refusal_token_ids(planted.tokenizer))
    # targets equal to the labels: the first reply token's cross-entropy loses its decision share
    log_refuse, log_answer = _hand_log_mass(logits, starts, ids)
    first = batch.tokens[np.arange(4), starts]
    first_weight = batch.loss_mask[np.arange(4), starts]
    decision_share = -first_weight * np.where(np.isin(first, ids), log_refuse, log_answer)
    assert np.isin(first, ids).tolist() == [True, True, False, False]  # every row is a teacher row
    np.testing.assert_allclose(losses["hard"] - losses["labels"],
                               -decision_share.sum() / batch.loss_mask[:, 1:].sum(), rtol=1e-4)
    # soft targets, each row its own: the opening term changes by its hand-computed value
    weight = np.array([0.5, 0.5, 2.0, 2.0])
    targets = np.concatenate([soft[name][rows[name]] for name in ("refusal", "harmless")])
    expected = (_hand_opening_loss(logits, starts, targets, weight, ids)
                - _hand_opening_loss(logits, starts, np.array([1.0, 1, 0, 0]), weight, ids))
    np.testing.assert_allclose(losses["soft"] - losses["hard"], expected, rtol=1e-4, atol=1e-6)
    for bad, match in (({"refusal": np.ones(5), "harmless": np.zeros(6)}, "one target per"),
                       ({"refusal": np.ones(6)}, "missing \\['harmless'\\]"),
                       ({**hard, "harmles": np.zeros(6)}, "unknown \\['harmles'\\]"),
                       ({"refusal": np.full(6, np.nan), "harmless": np.zeros(6)}, "in \\[0, 1\\]")):
        with pytest.raises(ValueError, match=match):
            train_adapter(planted, groups, config, tmp_path / "bad", decision_targets=bad)
    with pytest.raises(ValueError, match="set refuse_opening_weight and answer_opening_weight"):
        train_adapter(planted, groups, dataclasses.replace(config, answer_opening_weight=0.0),
                      tmp_path / "bad", decision_targets=hard)


def test_refusal_opening_probability_is_the_refusal_token_mass_of_the_first_reply_token(planted):
    instructions = planted_model.prompts(3, "harmful", seed=4) + ["cook rice", "plan trip"]
    params = jax.tree.map(lambda x: 1.3 * x, planted.params)  # not the model's own params
    got = refusal_opening_probabilities(planted, instructions, batch_size=2, params=params)
    ids = list(refusal_token_ids(planted.tokenizer))
    for text, p_refuse in zip(instructions, got):  # each prompt alone, unpadded
        batch = planted.chat.encode([text], context_length=128, length_bucket=1)
        logits = forward(params, batch.tokens, batch.valid, config=planted.config).logits
        probs = _softmax(np.asarray(logits[0, -1], np.float64))
        np.testing.assert_allclose(p_refuse, probs[ids].sum(), rtol=1e-4)
    with pytest.raises(ValueError, match="at least one instruction"):
        refusal_opening_probabilities(planted, [])
    with pytest.raises(ValueError, match="batch_size"):
        refusal_opening_probabilities(planted, instructions, batch_size=0)


def test_refusal_separation_matches_roc_auc_and_keeps_the_asked_refusal_rate():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    harmful = np.round(rng.uniform(0.3, 1.0, 159), 2)  # rounded: ties with the benign scores
    benign = np.round(rng.uniform(0.0, 0.6, 99), 2)
    got = refusal_separation(harmful, benign, harmful_refused=0.9)
    expected = roc_auc_score(np.r_[np.ones(159), np.zeros(99)], np.r_[harmful, benign])
    np.testing.assert_allclose(got["auroc"], expected, rtol=1e-12)
    assert got["harmful_refused"] >= 0.9
    above = np.sort(np.unique(harmful))
    higher = above[above > got["threshold"]][0]  # the next threshold refuses too few
    assert np.mean(harmful >= higher) < 0.9
    assert got["benign_refused"] == np.mean(benign >= got["threshold"])
    assert refusal_separation([0.9, 0.8], [0.1], harmful_refused=1.0) == {
        "auroc": 1.0, "threshold": 0.8, "harmful_refused": 1.0, "benign_refused": 0.0}
    assert refusal_separation(np.arange(10.0), [-1.0], harmful_refused=0.9)["threshold"] == 1.0
    with pytest.raises(ValueError, match="at least one harmful and one benign"):
        refusal_separation([], [0.1])
    with pytest.raises(ValueError, match="harmful_refused must be in"):
        refusal_separation([0.5], [0.1], harmful_refused=0.0)


def test_probe_separation_scores_held_out_rows_as_scikit_learns_standardised_probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    direction = rng.normal(size=16)
    scales = rng.uniform(0.1, 10.0, 16)  # the probe standardises the features first

    def rows(n, shift):
        return (rng.normal(size=(n, 16)) + 0.8 * shift * direction) * scales

    train_h, train_b, eval_h, eval_b = rows(120, 1), rows(150, 0), rows(80, 1), rows(60, 0)
    got = probe_separation(train_h, train_b, eval_h, eval_b, inverse_regularization=0.1)
    train = np.concatenate([train_h, train_b])
    mean, scale = train.mean(0), train.std(0) + 1e-6
    reference = LogisticRegression(C=0.1, tol=1e-10, max_iter=10_000).fit(
        (train - mean) / scale, np.r_[np.ones(120), np.zeros(150)])
    scores = reference.decision_function((np.concatenate([eval_h, eval_b]) - mean) / scale)
    expected = roc_auc_score(np.r_[np.ones(80), np.zeros(60)], scores)
    assert 0.7 < got["auroc"] < 1.0  # overlapping classes: the comparison is not trivial
    np.testing.assert_allclose(got["auroc"], expected, atol=1e-12)
    assert got == refusal_separation(scores[:80], scores[80:]) | {"threshold": got["threshold"]}
    with pytest.raises(ValueError, match="at least one harmful and one benign row"):
        probe_separation(train_h[:0], train_b, eval_h, eval_b)


def test_probe_teacher_fits_the_probe_on_the_groups_and_caches_its_logits(tmp_path, planted,
                                                                         monkeypatch):
    from refusal_jax.evaluation.activations import capture
    from refusal_jax.training import teacher
    from refusal_jax.training.evaluation import fit_probe
    groups = _groups(planted)
    path = tmp_path / "teacher.json"
    logits = teacher.cached_probe_teacher_logits(path, planted, groups, harmful_group="refusal",
                                                 layer=3, inverse_regularization=0.5)
    features = {name: capture(planted, [e.instruction for e in examples], batch_size=4,
                              length_bucket=32, name=name)[0][:, -1, 3]
                for name, examples in groups.items()}
    probe = fit_probe(features["refusal"], features["harmless"], inverse_regularization=0.5)
    for name in groups:
        np.testing.assert_allclose(logits[name], probe.logits(features[name]), atol=1e-4)
    assert logits["refusal"].min() > logits["harmless"].max()  # planted classes separate

    def no_capture(*args, **kwargs):
        raise AssertionError("the cached logits should have been read")

    monkeypatch.setattr(teacher, "capture", no_capture)
    again = teacher.cached_probe_teacher_logits(path, planted, groups, harmful_group="refusal",
                                                layer=3, inverse_regularization=0.5)
    for name in groups:  # exactly: a resumed run trains on the same targets
        np.testing.assert_array_equal(again[name], logits[name])
    with pytest.raises(AssertionError, match="should have been read"):  # another layer
        teacher.cached_probe_teacher_logits(path, planted, groups, harmful_group="refusal",
                                            layer=2, inverse_regularization=0.5)
    tuned = dataclasses.replace(planted, adapter="tuned.safetensors")  # same source, other model
    with pytest.raises(AssertionError, match="should have been read"):
        teacher.cached_probe_teacher_logits(path, tuned, groups, harmful_group="refusal",
                                            layer=3, inverse_regularization=0.5)
    targets = teacher.decision_targets({"a": np.array([0.0, 2.0])}, offset=1.0)
    np.testing.assert_allclose(targets["a"], 1 / (1 + np.exp([-1.0, -3.0])), rtol=1e-6)
    with pytest.raises(ValueError, match="must lie in"):
        teacher.probe_teacher_logits(planted, groups, harmful_group="refusal", layer=99,
                                     inverse_regularization=0.5)
    with pytest.raises(ValueError, match="needs the harmful group"):
        teacher.probe_teacher_logits(planted, {"harmless": groups["harmless"]},
                                     harmful_group="refusal", layer=1, inverse_regularization=0.5)
