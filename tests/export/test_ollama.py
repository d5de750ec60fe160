"""The Ollama export: a Go template derived from the training template by example,
rendered by Go's own text/template (as Ollama renders it) on multi-turn chats with
and without a system prompt and compared with the training template's rendering;
templates it cannot reproduce are refused; a real run exports a GGUF and a
Modelfile with the stop tokens."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from openft.export.ollama import PROBES, TemplateNotPortable, check, derive, export_ollama, go_template
from openft.models.templates import CHATML, GEMMA, LLAMA3, MISTRAL

GO_MAIN = Path(__file__).with_name("gorender") / "main.go"
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PORTABLE = {"smollm2": SMOLLM2, "chatml": CHATML, "llama3": LLAMA3}
CHATS = [
    *PROBES,
    [{"role": "system", "content": "Réponds en français. {{ not a template }}"}, {"role": "user", "content": "你好\n"}],
]


def jinja(template: str):
    t = ImmutableSandboxedEnvironment().from_string(template)
    return lambda messages, generation: t.render(
        messages=messages, add_generation_prompt=generation, bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def gorender(tmp_path_factory):
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (.ci/run installs golang-go)")
    out = tmp_path_factory.mktemp("gorender") / "gorender"
    env = {"HOME": str(out.parent), "GOCACHE": str(out.parent / "cache"), "GOPATH": str(out.parent / "gopath"),
           "PATH": "/usr/bin:/bin:/usr/local/bin", "GO111MODULE": "off"}  # fmt: skip
    subprocess.run(["go", "build", "-o", str(out), str(GO_MAIN)], check=True, env=env, timeout=300)

    def render(template: str, messages: list[dict]) -> str:
        r = subprocess.run([str(out)], input=json.dumps({"template": template, "messages": messages}),
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stdout

    return render


@pytest.mark.parametrize("name", sorted(PORTABLE))
def test_go_renders_what_the_training_template_renders(name, gorender):
    render = jinja(PORTABLE[name])
    pieces = derive(render)
    check(pieces, render)
    template = go_template(pieces)
    assert pieces.trims == (name == "llama3")  # Llama 3's template trims contents
    for messages in CHATS if not pieces.trims else CHATS[:-1]:  # the last has a trailing newline
        assert gorender(template, messages) == render(messages, True), (name, messages)


@pytest.mark.parametrize("template, why", [(MISTRAL, "system prompt"), (GEMMA, "system prompt")])
def test_templates_that_fold_the_system_prompt_into_a_turn_are_refused(template, why):
    with pytest.raises(TemplateNotPortable, match=why):
        render = jinja(template)
        check(derive(render), render)


@pytest.mark.integration
def test_a_run_exports_a_gguf_and_a_modelfile(tiny_model_dir, tmp_path, gorender):
    from train.helpers import write_chat_jsonl

    from openft.config import JobSpec
    from openft.train.export import load_run
    from openft.train.recipe import finetune

    spec = JobSpec(model=str(tiny_model_dir), output_dir=str(tmp_path / "run"))
    spec.data.path = str(write_chat_jsonl(tmp_path / "train.jsonl", n=8))
    spec.train.max_steps = 1
    run = finetune(spec, progress=False).run_dir
    done = export_ollama(run, tmp_path / "ollama", quant="q8_0", name="pip")
    assert done.gguf.stat().st_size > 0 and done.command.startswith("ollama create pip -f ")
    text = done.modelfile.read_text()
    assert text.startswith("FROM ./model.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    tok = load_run(run).tokenizer
    for messages in CHATS:
        assert gorender(template, messages) == tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def test_a_bos_the_template_writes_is_left_to_ollama():
    """Llama 3's template writes <|begin_of_text|>; Ollama adds the GGUF's BOS itself,
    so the Go template leaves it out and the GGUF asks for one (one BOS, not two)."""
    from openft.export.ollama import without_bos

    render = jinja(LLAMA3)
    pieces, had = without_bos(derive(render), "<s>")
    assert had
    for messages in PROBES:
        want = render(messages, True)
        assert want.startswith("<s>") and pieces.render(messages) == want.removeprefix("<s>")
    chatml = derive(jinja(CHATML))
    assert without_bos(chatml, "<s>") == (chatml, False)
    smollm2 = derive(jinja(SMOLLM2))  # its bos_token is <|im_start|>, which opens every turn: it stays
    assert without_bos(smollm2, "<|im_start|>") == (smollm2, False)
