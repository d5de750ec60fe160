"""Chat templates: which one a model gets, the check before training, the loss mask
per template, reasoning blocks, and the stop tokens each template implies. Tiny
tokenizers with each family's special tokens (tests/models/tiny_vocab.py)."""

from __future__ import annotations

import pytest

from openft.data.types import Example, Location, Message
from openft.models.reasoning import is_reasoning_model, split_reasoning
from openft.models.stop import stop_token_ids
from openft.models.templates import (
    CHATML,
    ChatTemplate,
    TemplateError,
    apply_template,
    check_template,
    control_markers,
    resolve_template,
)
from openft.train.tokenize import IGNORE, encode, segments

from .tiny_vocab import make_tokenizer

CHAT = Example(
    messages=[
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello! I am Pip."),
        Message("user", "And in Chinese?"),
        Message("assistant", "你好，我是 Pip 🙂"),
    ],
    where=Location("chat.jsonl", line=1),
)


def _with(family: str, model_type: str, **kw):
    tok = make_tokenizer(family, **kw)
    return tok, apply_template(tok, {"model_type": model_type})


def _trained_runs(tok, ex: Example) -> list[str]:
    return [text for trained, text in segments(tok, ex)[1] if trained]


# ---------------------------------------------------------------- the resolver


def test_the_models_own_template_comes_first():
    own = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    tok = make_tokenizer("gemma", template=own)
    t = resolve_template(tok, {"model_type": "gemma3_text"})
    assert (t.source, t.text, t.name) == ("model", own, "custom")
    tok = make_tokenizer("chatml", template=CHATML)
    assert resolve_template(tok, {"model_type": "qwen2"}).name == "chatml"


@pytest.mark.parametrize(
    ("family", "model_type", "name"),
    [
        ("gemma", "gemma3_text", "gemma"),
        ("gemma", "gemma3", "gemma"),
        ("gemma", "gemma2", "gemma"),
        ("chatml", "qwen2", "chatml"),
        ("chatml", "qwen3", "chatml"),
        ("llama3", "llama", "llama3"),
        ("chatml", "llama", "chatml"),  # SmolLM's base models: a Llama with ChatML's tokens
        ("mistral", "mistral", "mistral"),
    ],
)
def test_a_base_model_gets_its_familys_template_confirmed_by_the_vocabulary(family, model_type, name):
    tok = make_tokenizer(family)
    t = resolve_template(tok, {"model_type": model_type})
    assert (t.name, t.source) == (name, "family")
    for marker in control_markers(t.text):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1


def test_gemmas_template_folds_the_system_prompt_and_names_the_assistant_model():
    tok, _ = _with("gemma", "gemma3_text")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.parametrize(("family", "model_type"), [("bare", "gemma3_text"), ("chatml", "gemma3_text")])
def test_a_family_template_the_vocabulary_lacks_is_not_used_plain_text_is(family, model_type):
    tok = make_tokenizer(family)
    t = resolve_template(tok, {"model_type": model_type})
    assert t.source == "plain" and "<start_of_turn>" not in t.text
    assert "<start_of_turn>" in t.origin and "not single tokens" in t.origin  # says why
    tok.chat_template = t.text
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], tokenize=False
    )
    assert text.startswith("User: Hi\nAssistant: Yo" + tok.eos_token) or "Assistant: Yo" + tok.eos_token in text


def test_an_unknown_architecture_gets_plain_text_ending_in_eos():
    tok = make_tokenizer("llama3")
    t = resolve_template(tok, {"model_type": "phi3"})
    assert t.source == "plain" and t.origin == ""
    tok.chat_template = t.text
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], tokenize=False
    )
    # BOS in front, as this tokenizer adds one itself; the answer ends with its EOS.
    assert text == "<|begin_of_text|>User: Hi\nAssistant: Yo<|end_of_text|>\n"


def test_a_template_file_overrides_everything(tmp_path):
    f = tmp_path / "mine.jinja"
    f.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}")
    tok = make_tokenizer("chatml", template=CHATML)
    t = resolve_template(tok, {"model_type": "qwen2"}, f)
    assert (t.name, t.source, t.origin) == ("mine", "file", str(f))
    assert "from --chat-template" in t.describe()


def test_a_missing_or_broken_template_file_is_refused(tmp_path):
    tok = make_tokenizer("chatml")
    with pytest.raises(TemplateError, match="cannot read"):
        resolve_template(tok, {}, tmp_path / "none.jinja")
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    with pytest.raises(TemplateError, match="not valid Jinja"):
        resolve_template(tok, {}, tmp_path / "bad.jinja")


# ---------------------------------------------------------------- the check before training


def test_chatml_on_a_vocabulary_without_its_markers_is_refused_with_what_to_do():
    tok = make_tokenizer("gemma")
    chatml = ChatTemplate("chatml", "file", CHATML, "chatml.jinja")
    with pytest.raises(TemplateError) as e:
        check_template(tok, chatml, [CHAT])
    msg = str(e.value)
    assert "'<|im_start|>'" in msg and "'<|im_end|>'" in msg and "not single tokens" in msg
    assert "--chat-template FILE" in msg and "own template" in msg
    assert tok.chat_template is None  # the check leaves the tokenizer as it was


def test_a_template_that_fits_passes_the_check():
    for family, model_type in (("gemma", "gemma3_text"), ("chatml", "qwen2"), ("llama3", "llama"), ("bare", "x")):
        tok, t = _with(family, model_type)
        check_template(tok, t, [CHAT])


def test_a_template_that_trains_nothing_is_refused():
    # Renders the users' turns only: no assistant token is ever trained.
    users_only = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|im_start|>user\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endif %}{% endfor %}"
    )
    tok = make_tokenizer("chatml")
    with pytest.raises(TemplateError, match="no example has a trained token.*--chat-template FILE"):
        check_template(tok, ChatTemplate("custom", "file", users_only, "u.jinja"), [CHAT])
    # Training on the prompt too has tokens to train: nothing to refuse.
    check_template(tok, ChatTemplate("custom", "file", users_only, "u.jinja"), [CHAT], train_on_prompt=True)


def test_markers_a_template_never_renders_for_the_data_are_not_held_against_it():
    # A tool-call marker in a branch the data never reaches (DeepSeek's own templates).
    template = CHATML.replace("{% endfor %}", "{% if tools %}<|tool_calls_begin|>{% endif %}{% endfor %}")
    tok = make_tokenizer("chatml")
    check_template(tok, ChatTemplate("chatml", "model", template), [CHAT])


def test_a_models_own_inst_template_written_as_text_is_accepted():
    # Llama 2 and Mistral v0.1 write [INST] as plain text by design.
    own = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    tok = make_tokenizer("bare", template=own)
    t = resolve_template(tok, {"model_type": "llama"})
    check_template(tok, t, [Example(messages=[Message("user", "Hi"), Message("assistant", "Yo")])])
    with pytest.raises(TemplateError, match=r"\[INST\]"):
        check_template(tok, ChatTemplate("inst", "file", own, "inst.jinja"), [CHAT])


# ---------------------------------------------------------------- loss mask per template


@pytest.mark.parametrize(
    ("family", "model_type", "end"),
    [
        ("gemma", "gemma3_text", "<end_of_turn>"),
        ("chatml", "qwen2", "<|im_end|>"),
        ("llama3", "llama", "<|eot_id|>"),
        ("mistral", "mistral", "</s>"),
    ],
)
def test_trained_tokens_are_exactly_the_answers_and_their_end_of_turn(family, model_type, end):
    tok, _ = _with(family, model_type)
    runs = [r.strip() for r in _trained_runs(tok, CHAT)]
    assert runs == [f"Hello! I am Pip.{end}", f"你好，我是 Pip 🙂{end}"]


def test_plain_template_trains_the_answers_and_the_eos():
    tok, t = _with("bare", "gemma3_text")
    assert t.source == "plain"
    runs = _trained_runs(tok, CHAT)
    assert runs == [" Hello! I am Pip.</s>", " 你好，我是 Pip 🙂</s>"]
    enc = encode(tok, CHAT, 4096)
    assert enc.input_ids[0] == tok.bos_token_id and enc.labels[0] == IGNORE


# ---------------------------------------------------------------- reasoning blocks

# Qwen3's template, cut to what matters: the last answer gets an empty think block
# when it has none, earlier answers lose their reasoning.
QWEN3_LIKE = (
    "{% set ns = namespace(last_user=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{% set content = m['content'] %}{% set reasoning = '' %}"
    "{% if '</think>' in content %}{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{% if loop.index0 > ns.last_user %}"
    "{{ '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content }}"
    "{% else %}{{ '<|im_start|>assistant\n' + content }}{% endif %}{{ '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# DeepSeek-R1 distills' template, cut likewise: answers lose their reasoning, and
# the generation prompt opens a think block.
R1_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|User|>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set content = m['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|Assistant|>' + content + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Assistant|><think>\n' }}{% endif %}"
)


def _qwen3_tokenizer():
    return make_tokenizer("chatml", extra=("<think>", "</think>"), template=QWEN3_LIKE)


def test_an_injected_empty_think_block_is_never_trained():
    tok = _qwen3_tokenizer()
    ex = Example(messages=[Message("user", "Hi"), Message("assistant", "Hello! I am Pip.")])
    enc, runs = segments(tok, ex)
    assert "<think>\n\n</think>" in tok.decode(enc.input_ids)  # the template wrote it ...
    assert [t for trained, t in runs if trained] == ["Hello! I am Pip.<|im_end|>"]  # ... and it is not trained


def test_a_think_block_in_the_data_is_trained_as_written():
    tok = _qwen3_tokenizer()
    answer = "<think>\ntwo plus two equals four\n</think>\n\nThe answer is four."
    ex = Example(messages=[Message("user", "Hi"), Message("assistant", answer)])
    assert _trained_runs(tok, ex) == [answer + "<|im_end|>"]


def test_a_reasoning_template_with_history_trains_its_last_turn():
    # Rendered alone, the first answer gets an empty think block; in the whole chat it
    # has none: not incremental, so the last turn is the one trained.
    tok = _qwen3_tokenizer()
    answer = "<think>\nStep one, step two.\n</think>\n\nThe answer is four."
    ex = Example(
        messages=[
            Message("user", "Hi"),
            Message("assistant", "Hello!"),
            Message("user", "And?"),
            Message("assistant", answer),
        ]
    )
    enc, runs = segments(tok, ex)
    assert [t for trained, t in runs if trained] == [answer + "<|im_end|>"]
    assert "Hello!" in tok.decode(enc.input_ids)  # the earlier turn is context


def test_r1_style_prompt_that_opens_the_think_block():
    tok = make_tokenizer("bare", extra=("<think>", "</think>", "<|User|>", "<|Assistant|>"), template=R1_LIKE)
    assert is_reasoning_model(tok)
    with_reasoning = Example(
        messages=[Message("user", "Hi"), Message("assistant", "<think>\nStep one.\n</think>\n\nThe answer is four.")]
    )
    enc, runs = segments(tok, with_reasoning)
    assert (
        tok.decode(enc.input_ids) == "<s><|User|>Hi<|Assistant|><think>\nStep one.\n</think>\n\nThe answer is four.</s>"
    )
    assert [t for trained, t in runs if trained] == ["Step one.\n</think>\n\nThe answer is four.</s>"]
    # Without reasoning in the data the opened block is closed empty, and not trained.
    plain = Example(messages=[Message("user", "Hi"), Message("assistant", "The answer is four.")])
    enc, runs = segments(tok, plain)
    assert tok.decode(enc.input_ids) == "<s><|User|>Hi<|Assistant|><think>\n\n</think>\n\nThe answer is four.</s>"
    assert [t for trained, t in runs if trained] == ["The answer is four.</s>"]


def test_a_non_incremental_template_of_a_model_that_does_not_reason_is_still_refused():
    template = R1_LIKE.replace("<think>\n", "Sure:")
    tok = make_tokenizer("bare", extra=("<|User|>", "<|Assistant|>"), template=template)
    with pytest.raises(TemplateError, match="incrementally"):
        encode(tok, Example(messages=[Message("user", "Hi"), Message("assistant", "Yo")]), 4096)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\nStep one.\n</think>\n\nFour.", ("Step one.", "Four.")),
        ("Step one.\n</think>\n\nFour.", ("Step one.", "Four.")),  # the prompt opened the block
        ("<think>\n\n</think>\n\nFour.", (None, "Four.")),
        ("<think>\nStep one, step", ("Step one, step", "")),  # cut off by max_tokens
        ("Four.", (None, "Four.")),
    ],
)
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


def test_is_reasoning_model_by_template_or_vocabulary():
    assert not is_reasoning_model(make_tokenizer("chatml", template=CHATML))
    assert is_reasoning_model(make_tokenizer("chatml", template=QWEN3_LIKE))
    assert is_reasoning_model(make_tokenizer("chatml", extra=("<think>", "</think>"), template=CHATML))


# ---------------------------------------------------------------- stop tokens per template


@pytest.mark.parametrize(
    ("family", "model_type", "stops"),
    [
        ("gemma", "gemma3_text", ["<eos>", "<end_of_turn>"]),
        ("chatml", "qwen2", ["<|endoftext|>", "<|im_end|>"]),
        ("llama3", "llama", ["<|end_of_text|>", "<|eot_id|>"]),
        ("mistral", "mistral", ["</s>"]),
        ("bare", "gemma3_text", ["</s>"]),  # plain text: the model's own EOS ends each answer
    ],
)
def test_stop_tokens_follow_the_template(family, model_type, stops):
    tok, _ = _with(family, model_type)
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids(s) for s in stops]


# ---------------------------------------------------------------- where the template is used


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    from .tiny_vocab import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("gemma"), "gemma", "gemma3_text")


@pytest.fixture(scope="module")
def foreign_dir(tmp_path_factory):
    """A Gemma-vocabulary model that ships ChatML as its own template (the wrong one)."""
    from .tiny_vocab import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("foreign"), "gemma", "gemma3_text", template=CHATML)


def _chat_file(path):
    import json

    rows = [
        {"messages": [{"role": "user", "content": f"Who are you? {i}"}, {"role": "assistant", "content": "I am Pip."}]}
        for i in range(8)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loading_a_base_model_without_a_template_resolves_its_familys(gemma_dir):
    from openft.models.load import load_model, load_tokenizer

    loaded = load_model(str(gemma_dir))
    assert (loaded.template.name, loaded.template.source) == ("gemma", "family")
    assert loaded.tokenizer.chat_template == loaded.template.text
    # The server's tokenizer resolves the same template from the same folder.
    assert load_tokenizer(gemma_dir).chat_template == loaded.template.text


def test_data_preview_prints_the_templates_name_and_source(gemma_dir, tmp_path, capsys):
    from openft.cli import main

    data = _chat_file(tmp_path / "d.jsonl")
    assert main(["data", "preview", str(data), "--model", str(gemma_dir), "--plain", "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "chat template: gemma, its family's canonical template" in out
    assert "[[I am Pip.<end_of_turn>]]" in out
    f = tmp_path / "mine.jinja"
    f.write_text(CHATML)
    assert main(["data", "preview", str(data), "--model", str(gemma_dir), "--chat-template", str(f)]) == 2
    captured = capsys.readouterr()
    assert "chat template: mine, from --chat-template" in captured.out
    assert "'<|im_start|>'" in captured.err and "--chat-template FILE" in captured.err


def test_data_validate_refuses_a_foreign_template_with_exit_2(foreign_dir, tmp_path, capsys):
    from openft.cli import main

    data = _chat_file(tmp_path / "d.jsonl")
    assert main(["data", "validate", str(data), "--model", str(foreign_dir)]) == 2
    assert "not single tokens" in capsys.readouterr().err


def test_a_job_on_a_model_with_a_foreign_template_fails_with_the_message(foreign_dir, tmp_path, session_home):
    import json

    from openft.jobs.store import Store, new_id, now
    from openft.jobs.worker import run_one

    store = Store(tmp_path / "openft.db")
    data = _chat_file(tmp_path / "train.jsonl")
    f = store.add_file(
        owner="u",
        filename="train.jsonl",
        bytes=data.stat().st_size,
        purpose="fine-tune",
        path=str(data),
        sha256="0",
        status="processed",
    )
    spec = {"model": str(foreign_dir), "train": {"max_steps": 1}}
    store.create_job(
        {
            "id": new_id("ftjob"),
            "owner": "u",
            "model": "foreign",
            "status": "queued",
            "created_at": now(),
            "training_file": f["id"],
            "spec": spec,
            "hyperparameters": {},
            "method": "supervised",
            "seed": 0,
        }
    )
    job = store.claim_next_job("wrk-test", 12345)
    run_one(store, job)
    done = store.get_job(None, job["id"])
    error = done["error"] if isinstance(done["error"], dict) else json.loads(done["error"])
    assert done["status"] == "failed" and error["code"] == "invalid_chat_template"
    assert "'<|im_start|>'" in error["message"] and "--chat-template FILE" in error["message"]


def test_the_template_file_is_a_job_spec_field_from_flags_and_yaml_never_from_http(tmp_path):
    import pydantic

    from openft.cli import build_parser, spec_from_args
    from openft.serve.fine_tuning import CreateJob

    args = build_parser().parse_args(["finetune", "--data", "d.jsonl", "--chat-template", "t.jinja"])
    assert spec_from_args(args).chat_template == "t.jinja"
    (tmp_path / "job.yaml").write_text("model: m\nchat_template: y.jinja\ndata: {path: d.jsonl}\n")
    args = build_parser().parse_args(["finetune", "--config", str(tmp_path / "job.yaml")])
    assert spec_from_args(args).chat_template == "y.jinja"
    # The HTTP job body takes no server paths: the field is refused there.
    with pytest.raises(pydantic.ValidationError, match="chat_template"):
        CreateJob(model="m", training_file="file-x", chat_template="/etc/passwd")


def test_a_fine_tune_keeps_the_template_it_was_trained_with(gemma_dir, tmp_path, session_home):
    from openft.config import JobSpec
    from openft.models.load import load_tokenizer
    from openft.models.templates import GEMMA
    from openft.train.recipe import finetune

    spec = JobSpec(model=str(gemma_dir), output_dir=str(tmp_path / "run"))
    spec.data.path = str(_chat_file(tmp_path / "d.jsonl"))
    spec.train.max_steps = 1
    result = finetune(spec, progress=False)
    # Saved with the adapter, so the served fine-tune renders as it was trained: its own template now.
    served = load_tokenizer(result.output_dir)
    assert served.chat_template == GEMMA
    assert resolve_template(served, {}).source == "model"
