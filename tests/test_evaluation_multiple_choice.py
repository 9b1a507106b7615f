"""Multiple-choice accuracy on small fixtures in the published MMLU / ARC / TruthfulQA layouts,
with predictions checked against transformers' logits on the same prompts."""

import json

import numpy as np
import pytest
import torch

from refusal_jax.evaluation import multiple_choice as mc
from refusal_jax.text.chat import ChatFormat
from tests.evaluation_fixtures import tiny_tokenizer
from tests.hf_reference import tiny_hf_model, to_ours

MMLU_HF = [
    {"question": "What is 2 + 3?", "subject": "elementary mathematics",
     "choices": ["4", "5", "6", "7"], "answer": 1},
    {"question": "Which is a prime?", "subject": "elementary mathematics",
     "choices": ["4", "6", "7", "9"], "answer": 2},
    {"question": "Water boils at sea level at", "subject": "physics",
     "choices": ["50 C", "80 C", "100 C", "120 C"], "answer": 2},
]
MMLU_CSV = ('"What is 10 / 2?",2,5,8,20,B\n'
            '"Half of 8 is",2,3,4,6,C\n'
            '"3 squared is",6,8,9,12,C\n')
ARC_HF = [{"id": "q1", "question": "Which gas do plants take in?",
           "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"],
                       "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
          {"id": "q2", "question": "What melts ice fastest?",
           "choices": {"text": ["salt", "sand", "paper"], "label": ["1", "2", "3"]},
           "answerKey": "1"}]
ARC_ORIGINAL = [{"id": "q3", "question": {"stem": "The sun is a", "choices": [
    {"text": "planet", "label": "A"}, {"text": "star", "label": "B"},
    {"text": "moon", "label": "C"}, {"text": "comet", "label": "D"}]}, "answerKey": "B"}]
TRUTHFUL_QA = [{"question": "Do bees dance?",
                "mc1_targets": {"choices": ["Yes, to share where food is.", "No.",
                                            "Only at night."],
                                "labels": [1, 0, 0]}}]


@pytest.fixture
def files(tmp_path):
    paths = {
        "mmlu_hf": tmp_path / "mmlu_test.json",
        "mmlu_csv": tmp_path / "elementary_mathematics_test.csv",
        "arc_hf": tmp_path / "arc_challenge.jsonl",
        "arc_original": tmp_path / "ARC-Challenge-Test.jsonl",
        "truthful_qa": tmp_path / "truthful_qa.json",
    }
    paths["mmlu_hf"].write_text(json.dumps(MMLU_HF))
    paths["mmlu_csv"].write_text(MMLU_CSV)
    paths["arc_hf"].write_text("\n".join(json.dumps(r) for r in ARC_HF) + "\n")
    paths["arc_original"].write_text("\n".join(json.dumps(r) for r in ARC_ORIGINAL))
    paths["truthful_qa"].write_text(json.dumps(TRUTHFUL_QA))
    return paths


@pytest.fixture(scope="module")
def tiny():
    model = tiny_hf_model("llama_mha")
    # merges for " A" .. " D" so that answer letters are single tokens
    tokenizer = tiny_tokenizer(" A B C D" * 300 + " Answer:" * 100)
    return model, *to_ours(model), tokenizer


def test_published_layouts_load(files):
    mmlu = mc.load_questions(files["mmlu_hf"])
    assert [(q.answer, q.subject) for q in mmlu] == [
        (1, "elementary mathematics"), (2, "elementary mathematics"), (2, "physics")]
    assert mmlu[0].choices == ("4", "5", "6", "7")
    csv_questions = mc.load_questions(files["mmlu_csv"])
    assert [q.answer for q in csv_questions] == [1, 2, 2]
    assert csv_questions[0] == mc.Question("What is 10 / 2?", ("2", "5", "8", "20"), 1,
                                           "elementary mathematics")
    arc = mc.load_questions(files["arc_hf"])
    assert [(q.answer, len(q.choices), q.subject) for q in arc] == [(1, 4, None), (0, 3, None)]
    (original,) = mc.load_questions(files["arc_original"])
    assert original.question == "The sun is a" and original.answer == 1
    (truthful,) = mc.load_questions(files["truthful_qa"])
    assert truthful.answer == 0 and len(truthful.choices) == 3


def test_prompt_format_and_shots(files):
    pool = mc.load_questions(files["mmlu_hf"]) + mc.load_questions(files["mmlu_csv"])
    question = pool[0]
    shots = mc.select_shots(question, pool, 3)
    # same subject first (never the question itself), then the rest in pool order
    assert shots == [pool[1], pool[3], pool[4]]
    assert mc.select_shots(pool[2], pool, 2) == [pool[0], pool[1]]
    assert mc.format_prompt(question, shots[:1]) == (
        "The following are multiple choice questions (with answers) about elementary "
        "mathematics.\n\n"
        "Which is a prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer: C\n\n"
        "What is 2 + 3?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:")
    arc = mc.load_questions(files["arc_hf"])
    assert mc.format_prompt(arc[1], []).startswith(
        "The following are multiple choice questions (with answers).\n\nWhat melts")
    with pytest.raises(ValueError, match="only 5 usable questions for 6-shot"):
        mc.select_shots(question, pool, 6)


def hf_predictions(model, tokenizer, texts, letters, n_choices, add_special_tokens):
    predictions = []
    for text, n in zip(texts, n_choices):
        ids = torch.tensor([tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, -1].numpy()
        predictions.append(int(np.argmax(logits[letters[:n]])))
    return np.array(predictions)


@pytest.mark.parametrize("use_chat", [False, True])
def test_predictions_match_transformers(files, tiny, use_chat):
    model, config, params, tokenizer = tiny
    chat = ChatFormat(tokenizer) if use_chat else None
    pool = mc.load_questions(files["mmlu_csv"])
    questions = (mc.load_questions(files["mmlu_hf"]) + mc.load_questions(files["arc_hf"])
                 + mc.load_questions(files["truthful_qa"]))
    result = mc.evaluate_multiple_choice(params, questions, config=config, tokenizer=tokenizer,
                                         shot_pool=pool, n_shots=2, chat=chat, batch_size=4,
                                         length_bucket=32)
    texts = [mc.format_prompt(q, mc.select_shots(q, pool, 2)) for q in questions]
    if use_chat:
        texts = chat.prompts(texts)
    letters = mc.letter_token_ids(tokenizer, 4, chat=chat)
    expected = hf_predictions(model, tokenizer, texts, letters,
                              [len(q.choices) for q in questions], not use_chat)
    np.testing.assert_array_equal(result.predictions, expected)
    np.testing.assert_array_equal(result.answers, [q.answer for q in questions])
    assert result.accuracy == np.mean(expected == result.answers) and result.n == 6
    assert all(p < len(q.choices) for p, q in zip(result.predictions, questions))


def test_sample_questions(files):
    questions = mc.load_questions(files["mmlu_hf"]) + mc.load_questions(files["mmlu_csv"])
    first = mc.sample_questions(questions, 4, seed=1)
    assert first == mc.sample_questions(questions, 4, seed=1) and len(set(map(id, first))) == 4
    assert sorted(map(id, mc.sample_questions(questions, 50))) == sorted(map(id, questions))


@pytest.mark.parametrize("name, content, message", [
    ("layout.json", '[{"prompt": "x"}]', "record 0: unrecognised record layout"),
    ("label.json", json.dumps([{**ARC_HF[0], "answerKey": "E"}]), "answer 'E' is not one of"),
    ("columns.csv", "q,a,b\n", "row 0: expected 6 columns"),
    ("truthful.json", json.dumps([{"question": "q", "mc1_targets": {
        "choices": ["a", "b"], "labels": [1, 1]}}]), "exactly one label 1"),
    ("index.json", json.dumps([{**MMLU_HF[0], "answer": 7}]), "answer index 7 outside"),
    ("object.json", "{}", "JSON list"),
    ("empty.jsonl", "\n", "holds no questions"),
    ("data.parquet", "x", "unsupported file type"),
    ("broken.json", "[", "Expecting value"),
])
def test_load_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        mc.load_questions(tmp_path / name)


def test_evaluation_errors(files, tiny):
    _, config, params, tokenizer = tiny
    questions = mc.load_questions(files["mmlu_hf"])
    with pytest.raises(FileNotFoundError, match="no dataset file"):
        mc.load_questions(files["mmlu_hf"].with_name("missing.json"))
    with pytest.raises(ValueError, match="more than the model's context of 256"):
        mc.evaluate_multiple_choice(params, questions, config=config, tokenizer=tokenizer,
                                    shot_pool=questions * 20, n_shots=40)
    with pytest.raises(ValueError, match="no questions"):
        mc.evaluate_multiple_choice(params, [], config=config, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="not one token after the prompt"):
        mc.letter_token_ids(tiny_tokenizer(), 4)  # its merges do not include " A"
