"""Base models by name over HTTP, through a real `openft serve` with two owners and
the official `openai` client: a server path is just an unknown name (the same 404
whatever is on disk), a GET converts and downloads nothing, a model the operator
registers with `openft models add` can be trained on and chatted with, a full
fine-tune is served, and an owner deletes its own model (and only its own)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from openft.models.registry import BUILTINS, builtin_gguf_path

from .conftest import TINY, Server, jsonl, wait_for
from .test_api_fuzz import create_key

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "src" / "openft" / "examples"
TERMINAL = ("succeeded", "failed", "cancelled")
CHAT = [{"role": "user", "content": "Who are you?"}]


def _rows(n=12):
    return [json.loads(x) for x in (EXAMPLES / "lumen_train.jsonl").read_text().splitlines()[:n]]


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "openft.cli", *args],
        env={**os.environ, "OPENFT_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def srv(tmp_path_factory, session_home, tiny_model_dir):
    # A home of its own, without the session's converted-model cache: whatever appears
    # under models/ was converted or downloaded by this server.
    home = tmp_path_factory.mktemp("models-home")
    keys = {"A": create_key(home, "A"), "B": create_key(home, "B")}
    tmp = tmp_path_factory.mktemp("models-tmp")  # the server's TMPDIR: export's temp folders land here
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp))
        s = Server(home, models={TINY: tiny_model_dir}).start()
    s.keys, s.tmp = keys, tmp
    yield s
    s.stop()


@pytest.fixture(scope="module")
def train_file(srv):
    return {
        who: srv.client(key).files.create(file=("t.jsonl", jsonl(_rows())), purpose="fine-tune").id
        for who, key in srv.keys.items()
    }


def _job(c, model: str, file_id: str, **extra):
    job = c.fine_tuning.jobs.create(model=model, training_file=file_id, extra_body={"max_steps": 2, **extra})
    done = wait_for(lambda: (j := c.fine_tuning.jobs.retrieve(job.id)).status in TERMINAL and j, timeout=400)
    assert done.status == "succeeded", done.error
    return done


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def _error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def test_a_server_path_is_an_unknown_name_whatever_is_there(srv, train_file, tiny_model_dir, tmp_path):
    """A folder without config.json, a file, a missing path, a real model folder given
    by path, and a nonsense name: one answer (404, model_not_found, param model, the
    same message but for the name) on every route that takes a model."""
    (tmp_path / "no-config").mkdir()
    (tmp_path / "a-file.txt").write_text("x")
    names = {
        "dir without config.json": str(tmp_path / "no-config"),
        "existing file": str(tmp_path / "a-file.txt"),
        "missing path": str(tmp_path / "nothing-here"),
        "a real model folder by path": str(tiny_model_dir),
        "nonsense": "no-such-model-anywhere",
    }
    fid, h = train_file["A"], {"Authorization": f"Bearer {srv.keys['A']}"}
    jobs_before = [j.id for j in srv.client(srv.keys["A"]).fine_tuning.jobs.list().data]
    answers = {}
    for what, name in names.items():
        for method, path, body, params in (
            ("POST", "/v1/fine_tuning/jobs", {"model": name, "training_file": fid}, None),
            ("POST", "/v1/fine_tuning/estimate", {"model": name, "training_file": fid}, None),
            ("GET", f"/v1/files/{fid}/stats", None, {"model": name}),
            ("GET", f"/v1/files/{fid}/preview", None, {"model": name}),
            ("POST", "/v1/chat/completions", {"model": name, "messages": CHAT, "max_tokens": 2}, None),
        ):
            r = httpx.request(method, srv.url + path, json=body, params=params, headers=h, timeout=120)
            assert r.status_code == 404, (what, path, r.status_code, r.text[:300])
            err = _error(r)
            answers[(what, path)] = (err["type"], err["param"], err["code"], err["message"].replace(name, "NAME"))
    assert len(set(answers.values())) == 1, answers
    assert next(iter(answers.values()))[1:3] == ("model", "model_not_found")
    assert [j.id for j in srv.client(srv.keys["A"]).fine_tuning.jobs.list().data] == jobs_before  # no job created


def test_stats_with_a_hub_id_downloads_nothing(srv, train_file):
    before = _tree(srv.home / "models")
    h = {"Authorization": f"Bearer {srv.keys['A']}"}
    for route in ("stats", "preview"):
        r = httpx.get(
            f"{srv.url}/v1/files/{train_file['A']}/{route}",
            params={"model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            headers=h,
            timeout=120,
        )
        assert r.status_code == 404, r.text
        assert _error(r)["code"] == "model_not_found"
    assert _tree(srv.home / "models") == before


def test_a_get_never_converts_a_gguf_base(srv, train_file):
    """A registered GGUF that was never converted: stats and preview answer 409
    model_not_ready at once, and nothing appears under OPENFT_HOME/models."""
    gguf = builtin_gguf_path(BUILTINS["smollm2-135m-instruct"])
    added = _cli(srv.home, "models", "add", str(gguf), "--name", "smol-gguf")
    assert added.returncode == 0, added.stderr
    try:
        before = _tree(srv.home / "models")
        h = {"Authorization": f"Bearer {srv.keys['A']}"}
        for route in ("stats", "preview"):
            r = httpx.get(
                f"{srv.url}/v1/files/{train_file['A']}/{route}", params={"model": "smol-gguf"}, headers=h, timeout=120
            )
            assert r.status_code == 409, r.text
            err = _error(r)
            assert (err["param"], err["code"]) == ("model", "model_not_ready"), err
        assert _tree(srv.home / "models") == before
        listed = {m.id: m for m in srv.client(srv.keys["B"]).models.list().data}
        assert listed["smol-gguf"].owned_by == "openft"  # a base model: every owner sees it
    finally:
        assert _cli(srv.home, "models", "remove", "smol-gguf").returncode == 0


def test_a_registered_model_is_trained_on_and_served_by_name(srv, train_file, tiny_model_dir, tmp_path):
    """`openft models add` on the running server's home, then a job on that name and a
    chat with it (a base given by name is served, not only trained on)."""
    copy = (tmp_path / "my-base").resolve()
    shutil.copytree(tiny_model_dir, copy)
    added = _cli(srv.home, "models", "add", str(copy), "--name", "my-base")
    assert added.returncode == 0, added.stderr
    listed = _cli(srv.home, "models", "list")
    assert "my-base" in listed.stdout and str(copy) in listed.stdout
    a = srv.client(srv.keys["A"])
    assert "my-base" in {m.id for m in a.models.list().data}
    reply = a.chat.completions.create(model="my-base", messages=CHAT, max_tokens=4)
    assert reply.model == "my-base" and reply.usage.completion_tokens >= 1
    done = _job(a, "my-base", train_file["A"])
    assert done.model == "my-base" and done.fine_tuned_model.startswith("ft:my-base:")
    lineage = a.models.retrieve(done.fine_tuned_model).model_extra["lineage"]
    assert lineage["base_model"] == "my-base" and Path(lineage["base_model_path"]) == copy
    tuned = a.chat.completions.create(model=done.fine_tuned_model, messages=CHAT, max_tokens=4)
    assert tuned.usage.completion_tokens >= 1
    # a base model is the operator's: no caller deletes it
    with pytest.raises(openai.PermissionDeniedError):
        a.models.delete("my-base")
    # removed by the operator, the name is unknown like any other
    assert _cli(srv.home, "models", "remove", "my-base").returncode == 0
    with pytest.raises(openai.NotFoundError) as e:
        a.chat.completions.create(model="my-base", messages=CHAT, max_tokens=4)
    assert e.value.body["code"] == "model_not_found"


def test_a_full_fine_tune_is_served(srv, train_file):
    a = srv.client(srv.keys["A"])
    done = _job(a, TINY, train_file["A"], full_finetune=True)
    assert done.model_extra["training_method"] == "full"
    reply = a.chat.completions.create(model=done.fine_tuned_model, messages=CHAT, max_tokens=4)
    assert reply.model == done.fine_tuned_model and reply.usage.completion_tokens >= 1
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_an_owner_deletes_its_own_model_and_only_its_own(srv, train_file):
    a, b = srv.client(srv.keys["A"]), srv.client(srv.keys["B"])
    done = _job(a, TINY, train_file["A"])
    name = done.fine_tuned_model
    ckpt = a.fine_tuning.jobs.checkpoints.list(done.id).data[0].fine_tuned_model_checkpoint
    assert a.chat.completions.create(model=name, messages=CHAT, max_tokens=2).usage.completion_tokens >= 1
    run = srv.home / "runs" / done.id
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    # another owner gets the answer of a model that does not exist, and changes nothing
    with pytest.raises(openai.NotFoundError) as e:
        b.models.delete(name)
    assert e.value.body["code"] == "model_not_found"
    assert name in {m.id for m in a.models.list().data} and run.exists()
    deleted = a.models.delete(name)
    assert deleted.deleted and deleted.id == name
    assert not run.exists()  # weights, checkpoints and lineage are gone from disk
    for gone in (name, ckpt):
        with pytest.raises(openai.NotFoundError) as e:
            a.chat.completions.create(model=gone, messages=CHAT, max_tokens=2)
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert not {name, ckpt} & {m.id for m in a.models.list().data}
    with pytest.raises(openai.NotFoundError):
        a.models.delete(name)


def test_export_that_fails_leaves_no_temp_folder(srv, train_file):
    """A merged export whose base has gone from the server: a clear 409, and the temp
    folder it was building in is removed (it leaked before)."""
    a = srv.client(srv.keys["A"])
    done = _job(a, TINY, train_file["A"])
    lineage_file = srv.home / "runs" / done.id / "lineage.json"
    lineage = json.loads(lineage_file.read_text())
    lineage["base_model_path"] = str(srv.home / "gone-base")
    lineage_file.write_text(json.dumps(lineage))
    before = set(srv.tmp.iterdir())
    r = httpx.get(
        f"{srv.url}/v1/models/{done.fine_tuned_model}/export",
        params={"what": "merged"},
        headers={"Authorization": f"Bearer {srv.keys['A']}"},
        timeout=300,
    )
    assert r.status_code == 409, r.text
    err = _error(r)
    assert err["code"] == "base_model_missing" and str(srv.home) not in err["message"]
    assert set(srv.tmp.iterdir()) == before


def test_a_second_round_on_an_own_checkpoint(srv, train_file):
    """An owner's LoRA checkpoint is a base model name for that owner (merged once by the
    worker), and for nobody else."""
    a, b = srv.client(srv.keys["A"]), srv.client(srv.keys["B"])
    first = _job(a, TINY, train_file["A"])
    ckpt = a.fine_tuning.jobs.checkpoints.list(first.id).data[0].fine_tuned_model_checkpoint
    with pytest.raises(openai.NotFoundError) as e:
        b.fine_tuning.jobs.create(model=ckpt, training_file=train_file["B"])
    assert e.value.body["code"] == "model_not_found"
    second = _job(a, ckpt, train_file["A"])
    assert second.model == ckpt
    lineage = a.models.retrieve(second.fine_tuned_model).model_extra["lineage"]
    assert Path(lineage["base_model_path"]).name.startswith(f"merged-{first.id}-step-")
    reply = a.chat.completions.create(model=second.fine_tuned_model, messages=CHAT, max_tokens=4)
    assert reply.usage.completion_tokens >= 1


@pytest.fixture(scope="module")
def tuned(srv, train_file):
    """One LoRA fine-tune of owner A, and its first checkpoint, for the export tests."""
    a = srv.client(srv.keys["A"])
    done = _job(a, TINY, train_file["A"])
    ckpt = a.fine_tuning.jobs.checkpoints.list(done.id).data[0].fine_tuned_model_checkpoint
    return {"model": done.fine_tuned_model, "checkpoint": ckpt}


def _export(srv, model: str, **params) -> httpx.Response:
    """GET .../export, and the server's temp folder holds nothing new afterwards."""
    before = set(srv.tmp.iterdir())
    r = httpx.get(
        f"{srv.url}/v1/models/{model}/export",
        params=params,
        headers={"Authorization": f"Bearer {srv.keys['A']}"},
        timeout=300,
    )
    # The background task removes the folder once the body is sent: give it a moment.
    wait_for(lambda: set(srv.tmp.iterdir()) == before, timeout=10, every=0.1)
    return r


def _gguf_fields(content: bytes, tmp_path: Path) -> dict:
    from gguf import GGUFReader

    (tmp_path / "x.gguf").write_bytes(content)
    r = GGUFReader(str(tmp_path / "x.gguf"))
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _zip_names(r: httpx.Response) -> set[str]:
    import io
    import zipfile

    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"] == "application/zip"
    return set(zipfile.ZipFile(io.BytesIO(r.content)).namelist())


def test_export_as_gguf_and_gguf_lora_sends_the_file(srv, tuned, tmp_path):
    r = _export(srv, tuned["model"], format="gguf", quant="q8_0")
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"].endswith('-q8_0.gguf"') and r.content[:4] == b"GGUF"
    fields = _gguf_fields(r.content, tmp_path)
    assert fields["general.architecture"] == "llama" and fields["tokenizer.chat_template"]
    assert fields["general.name"] == tuned["model"]
    lora = _export(srv, tuned["model"], format="gguf-lora")  # f16 unless asked
    assert lora.status_code == 200, lora.text[:500]
    assert lora.headers["content-disposition"].endswith('-lora-f16.gguf"')
    assert _gguf_fields(lora.content, tmp_path)["general.type"] == "adapter"


def test_export_for_vllm_and_ollama_is_a_zip(srv, tuned):
    vllm = _zip_names(_export(srv, tuned["model"], format="vllm"))
    assert {"adapter_config.json", "adapter_model.safetensors", "vllm-serve.sh"} <= vllm
    ollama = _export(srv, tuned["model"], format="ollama")
    assert ollama.headers["content-disposition"].endswith('-ollama-q8_0.zip"')  # Ollama's default quantisation
    assert {"Modelfile", "model.gguf"} <= _zip_names(ollama)


def test_a_checkpoint_exports_in_every_format_too(srv, tuned, tmp_path):
    r = _export(srv, tuned["checkpoint"], format="gguf-lora")
    assert r.status_code == 200, r.text[:500]
    assert _gguf_fields(r.content, tmp_path)["general.type"] == "adapter"
    # as its adapter: the two adapter files, not the optimizer state beside them
    assert _zip_names(_export(srv, tuned["checkpoint"])) == {"adapter_config.json", "adapter_model.safetensors"}


def test_export_refusals_name_what_is_offered(srv, tuned):
    from openft.export.gguf import available_quants

    r = _export(srv, tuned["model"], format="gguf", quant="q4_k_m")
    assert r.status_code == 400, r.text[:500]
    err = _error(r)
    assert (err["code"], err["param"]) == ("export_refused", "quant")
    assert "q4_k_m" in err["message"] and all(q in err["message"] for q in available_quants())
    r = _export(srv, tuned["model"], format="gguf-lora", quant="q8_0")  # LoRA rows are too short to block-quantise
    assert r.status_code == 400 and _error(r)["code"] == "export_refused"
    r = _export(srv, tuned["model"], format="bogus")
    assert r.status_code == 400, r.text[:500]
    err = _error(r)
    assert (err["code"], err["param"]) == ("invalid_value", "format") and "gguf-lora" in err["message"]
    r = _export(srv, tuned["model"], format="adapter", quant="q8_0")  # no quantisation to apply
    assert r.status_code == 400 and _error(r)["param"] == "quant"


def test_model_details_say_what_it_exports_as(srv, tuned, train_file):
    from openft.export.gguf import available_quants

    a = srv.client(srv.keys["A"])
    lora = a.models.retrieve(tuned["model"]).model_extra["exports"]
    assert lora["formats"] == ["hf", "adapter", "vllm", "gguf", "gguf-lora", "ollama"]
    assert lora["quants"] == {"gguf": list(available_quants()), "ollama": list(available_quants()),
                              "gguf-lora": ["f32", "f16", "bf16"]}  # fmt: skip
    assert lora["default_quant"] == {"gguf": "f16", "gguf-lora": "f16", "ollama": "q8_0"}
    assert a.models.retrieve(tuned["checkpoint"]).model_extra["exports"] == lora
    full = _job(a, TINY, train_file["A"], full_finetune=True).fine_tuned_model
    offered = a.models.retrieve(full).model_extra["exports"]
    assert offered["formats"] == ["hf", "vllm", "gguf", "ollama"] and "gguf-lora" not in offered["quants"]
