"""Bad data and models are refused or handled as documented: malformed JSONL (file:line), prompts
longer than the context (overlong_prompts), a tokenizer without a chat template, stop tokens from
the generation config and the chat template, and per-task answer extraction."""

import json
import logging

import pytest

from divrl import demos, tasks
from divrl.config import build_config
from divrl.evaluation import sample_eval
from divrl.models import ModelLoadError, default_tokenizer_dir, load_model, load_tokenizer, stop_token_ids
from divrl.rollout import sample
from divrl.runlog import read_metrics
from divrl.tasks import ANSWER_INSTRUCTION, TaskError, build_task, encode_prompt, fit_to_context
from divrl.trainer import Trainer

GOOD = json.dumps({"prompt": "What is 1+1?", "answer": "2"}).encode()


def _jsonl(tmp_path, *lines: bytes) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


# ----- malformed JSONL ------------------------------------------------------------------------


def test_non_utf8_line_is_refused_naming_file_line_and_byte(tmp_path):
    path = _jsonl(tmp_path, GOOD, GOOD, b'{"prompt": "caf\xe9", "answer": "1"}')
    with pytest.raises(TaskError, match=r"bad.jsonl:3: not UTF-8 \(byte 0xe9 at byte 15 of the line\)"):
        build_task(build_config(None, [f"task={path}"]))
    with pytest.raises(demos.DemoError, match=r"bad\.jsonl:3: not UTF-8"):  # the same reader
        demos.read(path)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = _jsonl(tmp_path, b"\xef\xbb\xbf" + GOOD, GOOD)
    assert [e.prompt for e in tasks.read_jsonl(path)] == ["What is 1+1?"] * 2


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "p", "answer": ""},
        {"prompt": "p", "answer": "  "},
        {"prompt": "p", "answer": None},
        {"prompt": "p", "answer": True},
        {"prompt": "p", "answer": ["1"]},
    ],
)
def test_empty_or_non_scalar_answer_is_refused_naming_file_and_line(tmp_path, row):
    path = _jsonl(tmp_path, GOOD, GOOD, json.dumps(row).encode())
    with pytest.raises(TaskError, match=r"bad\.jsonl:3: 'answer' must be a non-empty string or a number"):
        build_task(build_config(None, [f"task={path}"]))


def test_empty_prompt_is_refused_naming_file_and_line(tmp_path):
    path = _jsonl(tmp_path, GOOD, json.dumps({"prompt": " ", "answer": "1"}).encode())
    with pytest.raises(TaskError, match=r"bad\.jsonl:2: 'prompt' must be a non-empty string"):
        build_task(build_config(None, [f"task={path}"]))


# ----- prompts longer than the context --------------------------------------------------------

LONG = "word " * 300  # ~300 tokens: over a 128-token context less 16 new tokens


def _long_task(tmp_path, policy: str):
    rows = [
        json.dumps({"prompt": f"Q{i}: {LONG if i == 3 else ''}say {i}", "answer": str(i)}).encode() for i in range(6)
    ]
    cfg = build_config(
        None, [f"task={_jsonl(tmp_path, *rows)}", "eval_size=2", "max_new_tokens=16", f"overlong_prompts={policy}"]
    )
    return build_task(cfg), cfg


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_tokenizer_dir())


def test_overlong_prompt_rejected_naming_it_and_the_lengths(tmp_path, tokenizer):
    task, cfg = _long_task(tmp_path, "reject")
    ((split, index),) = [
        (split, i)
        for split, examples in (("training", task.train), ("held-out", task.eval))
        for i, e in enumerate(examples)
        if LONG in e.prompt
    ]
    with pytest.raises(
        TaskError,
        match=rf"longer than the 112 tokens the context leaves \(max_position_embeddings "
        rf"128 − max_new_tokens 16\); the first, {split} prompt {index} \(\d+ tokens\)",
    ):
        fit_to_context(task, tokenizer, cfg, 128)


def test_overlong_prompt_skipped_and_counted(tmp_path, tokenizer):
    task, cfg = _long_task(tmp_path, "skip")
    logged = []
    assert fit_to_context(task, tokenizer, cfg, 128, logged.append) == 1
    assert len(task.train) + len(task.eval) == 5 and not any(LONG in e.prompt for e in task.train + task.eval)
    assert "skipped" in logged[0]


def test_overlong_prompt_truncated_to_its_tail_and_counted(tmp_path, tokenizer):
    task, cfg = _long_task(tmp_path, "truncate")
    assert fit_to_context(task, tokenizer, cfg, 128, lambda _: None) == 1
    cut = next(e for e in task.train + task.eval if e.answer == "3")
    assert len(encode_prompt(tokenizer, cut.prompt, None)) <= 112 and cut.prompt.endswith("word say 3")
    assert not cut.prompt.startswith("Q3")  # the head went, the question at the end stayed


def test_trainer_counts_overlong_prompts_in_its_log_and_metrics(tmp_path, say_task, one_thread):
    """The tiny model's 512 positions less 8 new tokens: one 1000-word prompt is truncated."""
    overrides = say_task(["x " * 1000, *range(5)], "always")
    common = [
        "model=tiny",
        "steps=1",
        "prompts_per_step=1",
        "group_size=2",
        "micro_batch_size=2",
        "max_new_tokens=8",
        "eval_size=2",
        "eval_samples=1",
        "monitor_kl=false",
        "checkpoint_every=1",
        *overrides,
    ]
    with pytest.raises(TaskError, match="Set overlong_prompts to 'truncate' or 'skip'"):
        Trainer(build_config(None, [*common, f"output_dir={tmp_path / 'rejected'}"]), log=lambda _: None)
    logged = []
    Trainer(
        build_config(None, [*common, "overlong_prompts=truncate", f"output_dir={tmp_path / 'run'}"]), log=logged.append
    ).run()
    assert any(line.startswith("overlong prompts: ") and "truncated" in line for line in logged)
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["overlong_prompts"] == 1


# ----- a tokenizer without a chat template ----------------------------------------------------


def test_plain_text_fallback_is_documented_format_and_warned_once(monkeypatch, caplog):
    plain = load_tokenizer(default_tokenizer_dir())
    plain.chat_template = None
    monkeypatch.setattr(tasks, "_PLAIN_TEXT_TOKENIZERS", set())
    with caplog.at_level(logging.WARNING, logger="divrl.tasks"):
        ids = encode_prompt(plain, "What is 2+2?", "Be brief.")
        assert encode_prompt(plain, "Again", None) == plain("Again")["input_ids"]
    assert ids == plain("Be brief.\n\nWhat is 2+2?")["input_ids"]
    assert [r.getMessage() for r in caplog.records if "no chat template" in r.getMessage()] == [
        f"tokenizer '{plain.name_or_path}' has no chat template: prompts are sent as plain text "
        f"(system_prompt, a blank line, the prompt)"
    ]


# ----- stop tokens ----------------------------------------------------------------------------


def test_a_model_directory_without_tokenizer_files_is_refused_naming_it(tiny, tmp_path):
    """transformers raises ValueError (not OSError) for a directory saved without its tokenizer."""
    tiny[0].save_pretrained(tmp_path / "weights_only")
    with pytest.raises(ModelLoadError, match=f"could not load model directory '{tmp_path / 'weights_only'}'"):
        load_model(str(tmp_path / "weights_only"))


def test_chat_turn_end_stops_even_when_eos_differs():
    tok = load_tokenizer(default_tokenizer_dir())
    tok.eos_token = tok.pad_token = "<|endoftext|>"  # id 0; the ChatML turn end <|im_end|> is id 2
    assert stop_token_ids(tok) == [0, 2]


def test_generation_config_eos_stops_sampling(tiny, monkeypatch, one_thread):
    """A model whose generation config ends turns at a token other than the tokenizer's eos:
    sampling (the evaluation's, as the trainer's) stops there instead of running to max_new_tokens."""
    model, tok = tiny
    prompt = encode_prompt(tok, "Say hi", None)
    greedy = sample(
        model,
        [prompt],
        group_size=1,
        max_new_tokens=6,
        stop_token_ids=stop_token_ids(tok),
        pad_token_id=tok.pad_token_id,
        temperature=0,
    ).completion_ids[0]
    assert len(greedy) == 6 and greedy[0] not in stop_token_ids(tok)
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, greedy[0]])
    assert greedy[0] in stop_token_ids(tok, model)

    class OnePrompt(tasks.Task):
        name, eval = "one", [tasks.Example("Say hi", "hi")]

        def score(self, completion, example):
            return 0.0

    rows = sample_eval(model, tok, OnePrompt(), n=1, temperature=0, top_p=1.0, max_new_tokens=6, seed=0)
    assert rows[0]["completion_ids"] == [greedy[0]] and rows[0]["finished"]


# ----- per-task answer extraction -------------------------------------------------------------

FAMILIES = {  # reasoning-gym name: numeric answers
    "chain_sum": True,
    "basic_arithmetic": True,
    "letter_counting": True,
    "leg_counting": True,
    "number_sorting": False,
    "word_sorting": False,
    "spell_backward": False,
    "word_ladder": False,
    "sentence_reordering": False,
    "caesar_cipher": False,
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_answer_in_the_asked_format_scores_full_with_reasoning_gyms_own_verifier(name):
    task = build_task(build_config(None, [f"task={name}", "task_params={}", "train_size=16", "eval_size=4"]))
    assert task.numeric == FAMILIES[name]
    for example in task.eval:
        question = example.entry["question"]
        assert example.prompt == (question if task.numeric else f"{question.rstrip()}\n\n{ANSWER_INSTRUCTION}")
        completion = f"Let me work it out step by step.\n<answer>{example.answer}</answer>"
        assert task.score(completion, example) == 1.0
        if task.numeric:  # numeric tasks keep the last-number fallback
            assert task.score(f"So the answer is {example.answer}.", example) == 1.0


def test_a_list_answer_is_not_cut_to_its_last_number():
    task = build_task(build_config(None, ["task=number_sorting", "task_params={}", "train_size=8", "eval_size=2"]))
    assert task.final_answer("Sorted: 1, 2, 3") == "Sorted: 1, 2, 3"
    assert task.final_answer("Sorted: <answer>['1', '2', '3']</answer>") == "['1', '2', '3']"
    chain = build_task(build_config(None, ["train_size=8", "eval_size=2"]))
    assert chain.final_answer("Sorted: 1, 2, 3") == "3"


def test_jsonl_exact_task_with_list_answers_matches_the_whole_list(tmp_path):
    rows = [json.dumps({"prompt": f"Sort {i}, 2, 1", "answer": f"1, 2, {i}"}).encode() for i in range(3, 9)]
    task = build_task(build_config(None, [f"task={_jsonl(tmp_path, *rows)}", "eval_size=2"]))
    example = task.train[0]
    assert not task.numeric
    assert task.score(example.answer, example) == 1.0
    assert task.score(f"<answer>{example.answer}</answer>", example) == 1.0
    assert task.score(example.answer.rpartition(", ")[2], example) == 0.0
