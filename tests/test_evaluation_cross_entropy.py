"""Cross-entropy of our runtime against transformers' causal-LM loss on tiny random models, and
the corpora (built-in text, .txt, Alpaca-style JSON) it is computed on."""

import json

import numpy as np
import pytest
import torch

from refusal_jax.evaluation import cross_entropy as ce
from refusal_jax.interventions import activation_addition
from refusal_jax.text.chat import ChatFormat
from tests.evaluation_fixtures import tiny_tokenizer
from tests.hf_reference import ragged_batch, tiny_hf_model, to_ours


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama():
    model = tiny_hf_model("llama_mha")
    return model, *to_ours(model)


def transformers_loss(model, corpus: ce.ScoredTokens) -> float:
    """transformers' own loss: labels -100 everywhere but at the target tokens."""
    mask = torch.tensor(corpus.valid, dtype=torch.long)
    labels = torch.tensor(np.where(corpus.targets, corpus.tokens, -100), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(corpus.tokens, dtype=torch.long), attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0), labels=labels)
    return float(out.loss)


@pytest.mark.parametrize("family", ["llama_mha", "gemma2_gqa_softcap_sliding"])
def test_matches_transformers_loss_on_ragged_rows(family):
    model = tiny_hf_model(family)
    config, params = to_ours(model)
    tokens, valid = ragged_batch((14, 9, 5, 12, 3))
    targets = valid.copy()
    targets[:, 0] = False
    targets[np.arange(len(tokens)), np.argmax(valid, axis=1)] = False  # each row's first token
    targets[1, -3:] = False  # a row scored only on part of its tokens
    corpus = ce.ScoredTokens(tokens=tokens, valid=valid, targets=targets, name="random")
    expected = transformers_loss(model, corpus)
    for batch_size in (2, 5):  # the last batch of 2 is padded with empty rows
        got = ce.cross_entropy(params, corpus, config=config, batch_size=batch_size,
                               length_bucket=4)
        assert got.n_tokens == targets.sum()
        assert abs(got.nats - expected) < 1e-4, (got.nats, expected)
        assert got.perplexity == pytest.approx(np.exp(expected), rel=1e-4)


def test_builtin_text_is_plain_prose():
    text = ce.builtin_text()
    assert len(text.split()) > 500 and text.count("\n\n") >= 4
    assert text.isascii()


def test_text_windows_cover_the_stream(tokenizer):
    text = ce.builtin_text()
    corpus = ce.text_corpus(tokenizer, text, window=64, name="sample")
    stream = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    rows = [corpus.tokens[i][corpus.valid[i]] for i in range(len(corpus.tokens))]
    assert all(len(row) <= 64 and row[0] == bos for row in rows)
    assert np.concatenate([row[1:] for row in rows]).tolist() == stream
    assert corpus.n_targets == len(stream)  # every token but each window's BOS
    assert corpus.name == "sample"
    assert ce.builtin_corpus(tokenizer, window=64).name == ce.BUILTIN_CORPUS_NAME


def test_instruction_rows_score_only_the_output(tokenizer):
    chat = ChatFormat(tokenizer)
    pairs = [{"instruction": "Name a fruit.", "output": "An apple."},
             {"instruction": "Add the numbers.", "input": "2 and 3", "output": "They make 5."}]
    corpus = ce.instruction_corpus(chat, pairs, max_length=128)
    for row, pair in enumerate(pairs):
        assert tokenizer.decode(corpus.tokens[row][corpus.targets[row]]) == pair["output"]
        prompt = tokenizer.decode(corpus.tokens[row][corpus.valid[row] & ~corpus.targets[row]])
        assert prompt.endswith("<|end|><|assistant|>")
    assert "Add the numbers.\n\n2 and 3" in tokenizer.decode(corpus.tokens[1][corpus.valid[1]])
    cut = ce.instruction_corpus(chat, pairs[:1], max_length=16)
    assert cut.valid.sum() == 16 and cut.n_targets == 2


def test_corpus_cross_entropy_matches_transformers(tokenizer, llama):
    model, config, params = llama
    chat = ChatFormat(tokenizer)
    for corpus in (ce.builtin_corpus(tokenizer, window=96),
                   ce.instruction_corpus(chat, [
                       {"instruction": "Describe the river.", "output": "It runs past the mill."},
                       {"instruction": "Why do bees dance?", "output": "To point to flowers."},
                       {"instruction": "Bake bread.", "output": "Mix, rest, knead and bake."}])):
        got = ce.cross_entropy(params, corpus, config=config, batch_size=4, length_bucket=32)
        assert abs(got.nats - transformers_loss(model, corpus)) < 1e-4


def test_interventions_are_arguments_not_recompiles(tokenizer, llama):
    _, config, params = llama
    corpus = ce.text_corpus(tokenizer, ce.builtin_text()[:600], window=48)
    base = ce.cross_entropy(params, corpus, config=config, batch_size=8, length_bucket=48)
    compiles = ce._nll_sum._cache_size()
    values = []
    for coeff in (1.0, 3.0, 6.0):
        edit = activation_addition(np.eye(config.d_model)[0], coeff, n_layers=config.n_layers,
                                   layers=1)
        values.append(ce.cross_entropy(params, corpus, config=config, intervention=edit,
                                       batch_size=8, length_bucket=48).nats)
    assert ce._nll_sum._cache_size() == compiles + 1  # one program for the intervened model
    assert len(set(values)) == 3 and all(v != base.nats for v in values)


def test_load_corpus_files(tmp_path, tokenizer):
    chat = ChatFormat(tokenizer)
    (tmp_path / "prose.txt").write_text("The mill stands by the river. " * 20)
    pairs = [{"instruction": "Say hi.", "output": "Hi there."}]
    (tmp_path / "alpaca_sample.json").write_text(json.dumps(pairs))
    text = ce.load_corpus(tmp_path / "prose.txt", chat=chat, window=32)
    assert text.name == "prose" and text.tokens.shape[1] <= 32
    instructions = ce.load_corpus(tmp_path / "alpaca_sample.json", chat=chat)
    assert instructions.name == "alpaca_sample"
    assert tokenizer.decode(instructions.tokens[0][instructions.targets[0]]) == "Hi there."


@pytest.mark.parametrize("name, content, error, message", [
    ("missing.txt", None, FileNotFoundError, "no corpus file"),
    ("empty.txt", "  \n", ValueError, "is empty"),
    ("table.csv", "a,b", ValueError, "unsupported corpus file"),
    ("broken.json", "[{", ValueError, "not valid JSON"),
    ("object.json", '{"instruction": "x"}', ValueError, "JSON list"),
    ("no_output.json", '[{"instruction": "x"}]', ValueError, "entry 0 lacks .*'output'"),
    ("strings.json", '["x"]', ValueError, "entry 0 is a str"),
    ("empty.json", "[]", ValueError, "non-empty list"),
])
def test_load_corpus_errors(tmp_path, tokenizer, name, content, error, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(error, match=message):
        ce.load_corpus(tmp_path / name, chat=ChatFormat(tokenizer))


def test_argument_errors(tokenizer, llama):
    _, config, params = llama
    with pytest.raises(ValueError, match="window must be an int of at least 3"):
        ce.text_corpus(tokenizer, "some text", window=2)
    with pytest.raises(ValueError, match="no room for the output"):
        ce.instruction_corpus(ChatFormat(tokenizer), [{"instruction": "Say hi.", "output": "Hi"}],
                              max_length=4)
    corpus = ce.text_corpus(tokenizer, "The mill stands by the river.", window=16)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ce.cross_entropy(params, corpus, config=config, batch_size=0)
    long = ce.text_corpus(tokenizer, ce.builtin_text(), window=config.max_context + 8)
    with pytest.raises(ValueError, match="more than the model's context"):
        ce.cross_entropy(params, long, config=config)
    tokens, valid = ragged_batch((4, 2))
    with pytest.raises(ValueError, match=r"targets\[:, 0\] must be False"):
        ce.ScoredTokens(tokens=tokens, valid=valid, targets=np.ones_like(valid), name="x")
    with pytest.raises(ValueError, match="targets must lie on valid"):
        ce.ScoredTokens(tokens=tokens, valid=valid, targets=np.pad(~valid[:, 1:], ((0, 0), (1, 0))),
                        name="x")
    with pytest.raises(ValueError, match="no token to score"):
        ce.ScoredTokens(tokens=tokens, valid=valid, targets=np.zeros_like(valid), name="x")
