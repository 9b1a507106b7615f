"""A hand-built chat model whose refusal is written along a planted direction at a known layer.

Word-level tokenizer; template ``<|user|> {instruction} <|end|> <|assistant|>``, so the EOI
tokens are ``<|end|>`` (position -2) and ``<|assistant|>`` (position -1). Residual dimensions:

    0 bias (1 in every embedding)        5 t: the <|assistant|> token
    1 f1: marker words of kind A          6 u: the planted refusal direction
    2 f2: marker words of kind B          7 v: the refusal readout
    3, 4 g1, g2: markers seen so far      8.. token noise

Layer 0's attention (zero queries and keys: a uniform average over the prefix) copies f1, f2
into g1, g2 at every position. Layer 1's MLP writes u at the <|assistant|> position when g1 or
g2 is present (two gated units, one per marker kind). Layer 2's MLP reads u and writes a large
v; layer 4's MLP does the same again (a second reader of u); the LM head turns v into the
logits of the refusal tokens. Every other weight is zero.

Hence the planted (position, layer) is (-1, 2): ablating r[-1, 2] (mostly u) at layer 2 removes
u for good, and no later layer refuses. Layer 1 holds only g, whose DiM mixes the two marker
kinds, so ablating it leaves half of each prompt's marker signal; layer 3's DiM is dominated by
v, so ablating it leaves most of u, which layer 4 reads again; position -2 never holds u; the
EOI activations of layer 0 are the same for every prompt (a zero DiM); layer 4 is pruned by
the late-layer filter.
"""

from __future__ import annotations

import numpy as np

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.loading import Model
from refusal_jax.models.params import LayerParams, Params
from refusal_jax.text.chat import ChatFormat

PLANTED = (-1, 2)  # (EOI position, layer)
SPECIALS = ["<unk>", "<eos>", "<|user|>", "<|end|>", "<|assistant|>"]
MARKERS_A = ["bomb", "poison", "weapon"]
MARKERS_B = ["hack", "steal", "malware"]
NEUTRAL = ("how to make a cake write poem about the sea explain weather cook rice plan trip "
           "build fence sing song paint house learn math fix bike grow tomatoes").split()
REFUSAL_WORDS = ["I", "As", "Sorry"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
D, L, F = 16, 5, 4
BIAS, F1, F2, G1, G2, T, U, V = range(8)


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + MARKERS_A + MARKERS_B + NEUTRAL + REFUSAL_WORDS + ["."]
    vocab = {word: index for index, word in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                  pad_token="<eos>", chat_template=TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})
    return tok


def prompts(n: int, kind: str, seed: int) -> list[str]:
    """``n`` instructions: harmful ones carry one marker word (kinds A and B alternate)."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(n):
        words = list(rng.choice(NEUTRAL, size=int(rng.integers(4, 9))))
        if kind == "harmful":
            markers = MARKERS_A if index % 2 == 0 else MARKERS_B
            words.insert(int(rng.integers(0, len(words))), str(rng.choice(markers)))
        out.append(" ".join(words))
    return out


def model(seed: int = 0) -> Model:
    tok = tokenizer()
    size = len(tok)
    config = ModelConfig(family="llama", vocab_size=size, d_model=D, n_layers=L, n_heads=2,
                         n_kv_heads=2, head_dim=8, d_ff=F, max_context=128,
                         eos_token_ids=(tok.eos_token_id,))
    rng = np.random.default_rng(seed)
    embed = np.zeros((size, D), np.float32)
    embed[:, BIAS] = 1.0
    embed[:, 8:] = 0.3 * rng.standard_normal((size, D - 8))
    for word in MARKERS_A:
        embed[tok.convert_tokens_to_ids(word), F1] = 1.0
    for word in MARKERS_B:
        embed[tok.convert_tokens_to_ids(word), F2] = 1.0
    embed[tok.convert_tokens_to_ids("<|assistant|>"), T] = 1.0
    embed[tok.convert_tokens_to_ids("<|assistant|>"), 8:] = 0.0

    zeros = lambda *shape: np.zeros((L, *shape), np.float32)  # noqa: E731
    v_proj, o_proj = zeros(D, 16), zeros(16, D)
    v_proj[0, F1, 0] = v_proj[0, F2, 1] = 1.0            # layer 0: read the markers...
    o_proj[0, 0, G1] = o_proj[0, 1, G2] = 5.0            # ...and write what was seen
    gate, up, down = zeros(D, F), zeros(D, F), zeros(F, D)
    gate[1, G1, 0] = gate[1, G2, 1] = 2.0                # layer 1: a marker seen, at <|assistant|>
    up[1, T, 0] = up[1, T, 1] = 1.0
    down[1, 0, U] = down[1, 1, U] = 5.0                  # writes u
    for layer in (2, 4):                                  # layers 2, 4: u above a threshold...
        gate[layer, U, 0], gate[layer, BIAS, 0] = 4.0, -8.0
        up[layer, BIAS, 0] = 1.0
        down[layer, 0, V] = 200.0                         # ...writes v
    lm_head = np.zeros((D, size), np.float32)
    for word in REFUSAL_WORDS:
        lm_head[V, tok.convert_tokens_to_ids(word)] = 10.0
    layers = LayerParams(attn_norm=np.ones((L, D), np.float32), q_proj=zeros(D, 16),
                         k_proj=zeros(D, 16), v_proj=v_proj, o_proj=o_proj,
                         mlp_norm=np.ones((L, D), np.float32), gate_proj=gate, up_proj=up,
                         down_proj=down)
    params = Params(embed=embed, layers=layers, final_norm=np.ones(D, np.float32),
                    lm_head=lm_head)
    import jax
    params = jax.tree_util.tree_map(jax.numpy.asarray, params)
    return Model(config=config, params=params, tokenizer=tok, chat=ChatFormat(tok),
                 hf_config={}, source="planted")
