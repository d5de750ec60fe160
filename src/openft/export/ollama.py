"""A fine-tuned model for Ollama: the GGUF file and a Modelfile whose TEMPLATE (Go
text/template syntax) renders the prompt the training template renders, with the
model's stop tokens as `PARAMETER stop` lines.

Jinja cannot be translated into Go templates in general, so the template is
derived by example: the training template is rendered on probe conversations with
placeholder contents, which gives each role's text before and after its content,
the default system block (SmolLM2's template adds one when the chat has none) and
the generation prompt. The Go template writes exactly those pieces. Before it is
written, the pieces are checked to rebuild the Jinja rendering of multi-turn chats
with and without a system prompt; a template that depends on more than the role
(Llama 2's system folded into the first user turn, say) is refused with the
conversation it got wrong, rather than exported to answer badly.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from openft.export import ExportRefused

ROLES = ("system", "user", "assistant")


class TemplateNotPortable(ExportRefused):
    """A chat template whose rendering the role-by-role Go template cannot reproduce."""


@dataclass(frozen=True)
class Pieces:
    default: str  # written before the first message when it is not a system one
    before: dict[str, str]  # role -> text before its content
    after: dict[str, str]  # role -> text after its content
    generation: str  # the assistant's turn opened for the answer
    trims: bool = False  # the template strips each message's content (Go's templates have no trim)

    def render(self, messages: list[dict]) -> str:
        """What the Go template renders (the same rule, in Python)."""
        out = "" if messages and messages[0]["role"] == "system" else self.default
        for m in messages:
            out += self.before[m["role"]] + m["content"] + self.after[m["role"]]
        return out + self.generation


def _between(text: str, start: int, marker: str) -> tuple[str, int]:
    at = text.find(marker, start)
    if at < 0:
        raise TemplateNotPortable(f"the template drops or changes a message's content ({marker!r} not in its output)")
    return text[start:at], at + len(marker)


def derive(render) -> Pieces:
    """The pieces of a template from `render(messages, generation_prompt) -> str`."""
    a, b, c, s = "QZXA1", "QZXB2", "QZXC3", "QZXS4"
    one = render([{"role": "user", "content": a}], False)
    two = render([{"role": "user", "content": a}, {"role": "assistant", "content": b}], False)
    three_msgs = [{"role": "user", "content": a}, {"role": "assistant", "content": b}, {"role": "user", "content": c}]
    three = render(three_msgs, False)
    lead, end_a = _between(one, 0, a)
    user_after = one[end_a:]
    asst_before, end_b = _between(two, len(one), b)
    asst_after = two[end_b:]
    user_before, _ = _between(three, len(two), c)
    if not lead.endswith(user_before) or not two.startswith(one) or not three.startswith(two):
        raise TemplateNotPortable("a turn's text depends on the turns after it")
    sys_text = render([{"role": "system", "content": s}, {"role": "user", "content": a}], False)
    sys_before, end_s = _between(sys_text, 0, s)
    rest, _ = _between(sys_text, end_s, a)
    if not rest.endswith(user_before):
        raise TemplateNotPortable("the system prompt is not a turn of its own")
    generation = render([{"role": "user", "content": a}], True)
    if not generation.startswith(one):
        raise TemplateNotPortable("the generation prompt changes the turns before it")
    padded = render([{"role": "user", "content": f" {a}\n"}], False)
    return Pieces(
        trims=f" {a}\n" not in padded,
        default=lead[: len(lead) - len(user_before)],
        before={"system": sys_before, "user": user_before, "assistant": asst_before},
        after={"system": rest[: len(rest) - len(user_before)], "user": user_after, "assistant": asst_after},
        generation=generation[len(one) :],
    )


PROBES = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You are Pip."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "Pip, the lamp helper."},
        {"role": "user", "content": "And the warranty?"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"},
    ],
]


def check(pieces: Pieces, render, chats: list[list[dict]] = PROBES) -> None:
    for messages in chats:
        if pieces.trims:  # compared on contents the trim leaves alone; the export notes the rest
            messages = [{**m, "content": m["content"].strip()} for m in messages]
        want, got = render(messages, True), pieces.render(messages)
        if want != got:
            raise TemplateNotPortable(
                f"on {json.dumps(messages)} the training template renders {want!r}, a role-by-role template {got!r}"
            )


def without_bos(p: Pieces, bos: str | None) -> tuple[Pieces, bool]:
    """The pieces without the BOS the template writes first (Llama 3's
    `<|begin_of_text|>`), and whether there was one. Ollama tokenises the rendered
    prompt adding the GGUF's BOS itself, so a template that writes one too would
    give the model two. A BOS that also opens every turn (SmolLM2's is `<|im_start|>`)
    is the template's own marker and stays."""
    if not bos or not (p.default.startswith(bos) and p.before["system"].startswith(bos)) or bos in p.before["user"]:
        return p, False
    before = {**p.before, "system": p.before["system"][len(bos) :]}
    return replace(p, default=p.default[len(bos) :], before=before), True


def go_string(text: str) -> str:
    """A Go interpreted string literal (JSON's escapes are Go's, but for U+2028/9, kept as is)."""
    return json.dumps(text, ensure_ascii=False)


def go_template(p: Pieces) -> str:
    """Every piece printed as a string constant, so no literal text meets Go's whitespace trimming."""
    branches = "".join(
        f"{'if' if i == 0 else 'else if'} eq $m.Role {go_string(r)} }}}}{{{{ {go_string(p.before[r])} }}}}"
        f"{{{{ $m.Content }}}}{{{{ {go_string(p.after[r])} }}}}{{{{ "
        for i, r in enumerate(ROLES)
    )
    default = (
        f"{{{{ if and (eq $i 0) (ne $m.Role {go_string('system')}) }}}}{{{{ {go_string(p.default)} }}}}{{{{ end }}}}"
    )
    return f"{{{{ range $i, $m := .Messages }}}}{default}{{{{ {branches}end }}}}{{{{ end }}}}{{{{ {go_string(p.generation)} }}}}"


def modelfile(gguf_name: str, template: str, stops: list[str]) -> str:
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {go_string(s)}" for s in stops]
    return "\n".join(lines) + "\n"


@dataclass
class OllamaExport:
    out: Path
    gguf: Path
    modelfile: Path
    command: str
    notes: list[str]


def export_ollama(
    run_dir: str | Path, out: str | Path, *, quant: str = "q8_0", name: str | None = None, loaded=None
) -> OllamaExport:
    """`out/` with `model.gguf` and `Modelfile`; the template is checked before the GGUF is written."""
    from openft.export.gguf import export_gguf
    from openft.models.stop import stop_token_ids
    from openft.train.export import check_source, default_name, load_run

    run_dir, out = Path(run_dir), Path(out)
    check_source(run_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    loaded = loaded or load_run(run_dir, merged=True)  # loaded once: its tokenizer is checked, then its weights written
    tok = loaded.tokenizer

    def render(messages, generation):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    pieces = derive(render)
    check(pieces, render)
    pieces, bos = without_bos(pieces, tok.bos_token)
    stops = [tok.convert_ids_to_tokens(i) for i in stop_token_ids(tok)]
    out.mkdir(parents=True, exist_ok=True)
    # Where the template wrote the BOS, the GGUF has Ollama add it (once) instead.
    gguf = export_gguf(
        run_dir, out / "model.gguf", quant=quant, name=name, loaded=loaded, add_bos=True if bos else None
    )
    gguf = gguf.path
    mf = out / "Modelfile"
    mf.write_text(modelfile(gguf.name, go_template(pieces), stops))
    name = name or default_name(run_dir).lower()
    notes = []
    if pieces.trims:
        notes.append(
            "the training template trims each message; Ollama's template cannot, so a message "
            "with leading or trailing whitespace keeps it there"
        )
    return OllamaExport(out, gguf, mf, shlex.join(["ollama", "create", name, "-f", str(mf.resolve())]), notes)
