"""The GGUF export: which quantisations can be written (measured), and a short
fine-tune of each supported family exported and read back: by transformers' GGUF
loader (which undoes llama.cpp's Q/K order) with the merged model's logits, and
by the gguf reader for the header, the tokenizer, the trained template and the
stop token."""

from __future__ import annotations

import pytest
import torch

from export.conftest import FAMILIES
from openft.export.gguf import ARCHS, ExportError, available_quants, check_quant, export_gguf


def test_the_quantisations_offered_are_those_that_can_be_written():
    avail = available_quants()
    assert {"f32", "f16", "bf16", "q8_0"} <= set(avail)
    with pytest.raises(ExportError, match="unknown quantisation 'q9'; available: f32, f16"):
        check_quant("q9")
    for name in ("q4_k_m", "q6_k"):  # K-quants: only where the gguf package has their code
        if name not in avail:
            with pytest.raises(ExportError, match=f"{name} needs quantisation code .* available: .*q8_0"):
                check_quant(name)


def test_unsupported_architectures_are_named():
    from openft.export.gguf import check_arch

    assert set(FAMILIES) <= set(ARCHS)
    with pytest.raises(ExportError, match="'phi3' models is not supported yet; supported: llama"):
        check_arch("phi3")


@pytest.mark.parametrize("kind", ["yarn", "dynamic"])
def test_a_rope_scaling_llama_cpp_would_compute_otherwise_is_refused(kind):
    from transformers import LlamaConfig

    from openft.export.gguf import rope_theta

    config = LlamaConfig(rope_parameters={"rope_type": kind, "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ExportError, match=f"RoPE scaling '{kind}' is not supported yet"):
        rope_theta(config)


def test_a_sentencepiece_style_vocabulary_needs_the_scores_of_its_gguf():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from openft.export.gguf import vocab_kind

    spm = models.BPE(vocab={"<unk>": 0, "▁a": 1, "<0x41>": 2}, merges=[], unk_token="<unk>", byte_fallback=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(spm))
    with pytest.raises(ExportError, match="SentencePiece-style .* only for a base converted from a GGUF.* format=hf"):
        vocab_kind(tok, {})  # a Hugging Face folder: no scores to write
    assert vocab_kind(tok, {"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": [0.0, -1.0, -2.0]}) == "spm"


def test_a_gemma3_layout_llama_cpp_would_run_otherwise_is_refused(tiny_tokenizer):
    from train.families import tiny_config

    from openft.export.gguf import write_gemma3_header

    config = tiny_config("gemma3_text", vocab_size=len(tiny_tokenizer), bos=None, eos=None, pad=None)
    assert config.layer_types == ["sliding_attention", "full_attention"]  # llama.cpp: both sliding
    with pytest.raises(ExportError, match="five sliding layers to one global") as e:
        write_gemma3_header(None, config)  # refused before anything is written
    config.rope_parameters["sliding_attention"]["rope_theta"] = 20_000.0
    config.query_pre_attn_scalar = 32  # llama.cpp: 1/sqrt(head size), 16
    with pytest.raises(ExportError) as e:
        write_gemma3_header(None, config)
    assert len(e.value.problems) == 3 and "rotary base of 10000" in str(e.value)


@pytest.mark.integration
def test_each_family_reads_back_with_the_merged_models_logits(run, tmp_path):
    from openft.models.load import load_model
    from openft.train.export import load_run

    merged = load_run(run, merged=True).model.eval()
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 11, 40, 3]])
    # quant -> largest logit difference allowed, against logits of magnitude ~4
    for quant, tol in (("f32", 1e-4), ("f16", 2e-2), ("q8_0", 0.25)):
        done = export_gguf(run, tmp_path / f"m-{quant}.gguf", quant=quant)
        assert done.path.stat().st_size == done.bytes and not done.kept_f16
        back = load_model(str(done.path)).model  # as openft reads a GGUF (Qwen3's head size kept)
        with torch.no_grad():
            diff = (back.eval()(ids).logits - merged(ids).logits).abs().max().item()
        assert diff <= tol, (quant, diff)
    sizes = {q: (tmp_path / f"m-{q}.gguf").stat().st_size for q in ("f32", "f16", "q8_0")}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]


@pytest.mark.integration
def test_the_header_holds_the_tokenizer_template_and_stop_token(run, tmp_path):
    from gguf import GGUFReader

    from openft.models.stop import stop_token_ids
    from openft.train.export import load_run

    loaded = load_run(run, merged=True)
    done = export_gguf(run, tmp_path / "m.gguf", quant="f16", name="pip")
    r = GGUFReader(str(done.path))

    def field(key):
        f = r.fields[key]
        return f.contents()

    arch = field("general.architecture")
    assert arch == ARCHS[loaded.model.config.model_type].gguf_name.lower()
    assert field("general.name") == "pip"
    assert field(f"{arch}.block_count") == loaded.model.config.num_hidden_layers
    assert field("tokenizer.ggml.model") == "gpt2"
    assert len(field("tokenizer.ggml.tokens")) == len(loaded.tokenizer)
    assert field("tokenizer.chat_template") == loaded.tokenizer.chat_template
    assert field("tokenizer.ggml.eot_token_id") in stop_token_ids(loaded.tokenizer)
    assert field("tokenizer.ggml.eos_token_id") == loaded.tokenizer.eos_token_id
    assert len(field("tokenizer.ggml.merges")) > 0
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output_norm.weight"} <= names
    assert all(t.tensor_type.name == "F32" for t in r.tensors if t.name.endswith("norm.weight"))
    assert not list(tmp_path.glob(".m.gguf*"))  # no temporary left
    with pytest.raises(FileExistsError):
        export_gguf(run, done.path, quant="f16")


LAMP_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Lamp.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.integration
def test_a_run_with_its_own_template_exports_that_template(tiny_model_dir, tmp_path):
    from gguf import GGUFReader
    from train.helpers import write_chat_jsonl

    from openft.config import JobSpec
    from openft.train.export import load_run
    from openft.train.recipe import finetune

    template = tmp_path / "lamp.jinja"
    template.write_text(LAMP_TEMPLATE)
    spec = JobSpec(model=str(tiny_model_dir), chat_template=str(template))
    spec.data.path = str(write_chat_jsonl(tmp_path / "train.jsonl", n=8))
    spec.output_dir = str(tmp_path / "run")
    spec.train.max_steps = 1
    run = finetune(spec, progress=False).run_dir
    template.unlink()  # the run's own copy is what the export takes
    loaded = load_run(run, merged=True)
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "You are Lamp." in prompt
    done = export_gguf(run, tmp_path / "m.gguf", quant="f16", loaded=loaded)
    field = GGUFReader(str(done.path)).fields["tokenizer.chat_template"]
    assert field.contents() == LAMP_TEMPLATE
