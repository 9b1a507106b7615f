"""The reply NLL of `evaluation.fluency` against transformers (torch) on each unpadded row."""

import numpy as np
import pytest
import torch

from refusal_jax.evaluation.fluency import reply_nll
from refusal_jax.text.chat import ChatFormat
from tests.evaluation_fixtures import tiny_tokenizer
from tests.hf_reference import tiny_hf_model, to_ours

PAIRS = [("Name a colour.", "Blue is a colour of the sky and the sea."),
         ("Add two and three.", "Five."),
         ("Say nothing.", ""),
         ("Tell me about the weather today in a long sentence, please.",
          "The weather today is mild, with a light breeze and a few clouds over the hills.")]


@pytest.fixture(scope="module")
def setup():
    model = tiny_hf_model("llama_mha")
    return model, *to_ours(model), ChatFormat(tiny_tokenizer())


def _torch_reply_nll(model, chat, request: str, reply: str) -> float:
    tokenizer = chat.tokenizer
    prompt = tokenizer(chat.prompts([request]), add_special_tokens=False)["input_ids"][0]
    output = tokenizer(reply, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
    nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(prompt) - 1:]
    return float(nll.mean())


def test_reply_nll_matches_transformers(setup):
    model, config, params, chat = setup
    # Batches of 3 rows: the second batch holds one reply and two empty rows; both are padded
    # to one length (one compilation).
    got = reply_nll(params, chat, [p for p, _ in PAIRS], [r for _, r in PAIRS], config=config,
                    batch_size=3, length_bucket=128)
    for (request, reply), nll in zip(PAIRS, got):
        if reply:
            assert nll == pytest.approx(_torch_reply_nll(model, chat, request, reply), abs=1e-4)
        else:
            assert np.isnan(nll)


def test_reply_nll_needs_one_reply_per_request(setup):
    _, config, params, chat = setup
    with pytest.raises(ValueError, match="2 requests but 1 replies"):
        reply_nll(params, chat, ["a", "b"], ["x"], config=config)


def test_sets_of_replies_scored_together_match_transformers_row_by_row(setup):
    """Each prompt runs once for every set; each set's replies (different lengths, some empty)
    continue from its keys and values."""
    from refusal_jax.evaluation.fluency import reply_nll_each

    model, config, params, chat = setup
    requests = [p for p, _ in PAIRS]
    sets = [[r for _, r in PAIRS], ["Red.", "", "Nothing at all, as you asked me to.", "Rain."]]
    got = reply_nll_each(params, chat, requests, sets, config=config, batch_size=3,
                         length_bucket=8)
    for replies, nlls in zip(sets, got):
        for request, reply, nll in zip(requests, replies, nlls):
            if reply:
                assert nll == pytest.approx(_torch_reply_nll(model, chat, request, reply),
                                            abs=1e-4)
            else:
                assert np.isnan(nll)


def test_prompts_with_no_common_opening_are_scored_from_their_own_keys(setup, monkeypatch):
    """No shared prefix (a template without a common opening): each whole prompt runs as a
    row, and the replies still read its keys and values."""
    from refusal_jax.evaluation import fluency

    model, config, params, chat = setup
    monkeypatch.setattr(fluency, "shared_prefix_length", lambda token_lists, keep_last: 0)
    got = fluency.reply_nll(params, chat, [p for p, _ in PAIRS], [r for _, r in PAIRS],
                            config=config, batch_size=3, length_bucket=8)
    for (request, reply), nll in zip(PAIRS, got):
        if reply:
            assert nll == pytest.approx(_torch_reply_nll(model, chat, request, reply), abs=1e-4)
    assert fluency.reply_nll(params, chat, [], [], config=config).shape == (0,)
