import math

import pytest

from openft.config import LoraConfig, TrainConfig
from openft.train.hparams import auto_epochs, auto_max_seq_length, lr_at, resolve_lora, resolve_train


@pytest.mark.parametrize("n,epochs", [(10, 10), (20, 5), (40, 3), (500, 3), (8_000, 3), (9_000, 2), (30_000, 1)])
def test_auto_epochs_follows_the_documented_rule(n, epochs):
    assert auto_epochs(n) == epochs


def test_auto_max_seq_length_rounds_up_and_caps():
    assert auto_max_seq_length([10, 70], 8192) == 128
    assert auto_max_seq_length([5000], 8192) == 2048
    assert auto_max_seq_length([5000], 1024) == 1024


def test_resolve_train_fills_every_auto():
    cfg = resolve_train(TrainConfig(), n_examples=160, max_len=128)
    assert cfg.epochs == 3 and cfg.batch_size == 8 and cfg.learning_rate == 5e-4
    assert cfg.eval_every == math.ceil(60 / 8) and cfg.save_every == cfg.eval_every
    assert "auto" not in [v for v in cfg.__dict__.values() if isinstance(v, str)]
    full = resolve_train(TrainConfig(method="full"), n_examples=160, max_len=128)
    assert full.learning_rate == 2e-5 and full.weight_decay == 0.01


def test_resolve_lora_defaults():
    p = resolve_lora(LoraConfig(rank=8), ["q_proj"])
    assert (p.rank, p.alpha, p.dropout, p.target_modules) == (8, 16.0, 0.0, ("q_proj",))
    with pytest.raises(ValueError):
        resolve_lora(LoraConfig(rank=0), ["q_proj"])


def test_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 100, 1.0, 0.05, "cosine") for s in range(100)]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.2) and lrs[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert lrs[-1] < 0.01
    assert lr_at(50, 100, 1.0, 0.0, "constant") == 1.0


@pytest.mark.parametrize("total,ratio", [(16, 0.05), (100, 0.05), (7, 0.1), (54, 0.0), (3, 0.5)])
@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_schedule_is_transformers_schedule(total, ratio, scheduler):
    """warmup_ratio and the schedules mean what they mean in TRL / the Trainer."""
    import math

    import torch
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_scheduler(
        scheduler if scheduler != "constant" else "constant_with_warmup",
        opt,
        num_warmup_steps=math.ceil(total * ratio),
        num_training_steps=total,
    )
    theirs = []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [lr_at(s, total, 1.0, ratio, scheduler) for s in range(total)] == pytest.approx(theirs, abs=1e-12)


def test_a_one_step_run_still_trains():
    assert lr_at(0, 1, 1.0, 0.05, "cosine") == 1.0
    assert [lr_at(s, 2, 1.0, 0.05, "cosine") for s in range(2)] == [0.0, 1.0]


def test_auto_micro_batch_tokens_bounds_memory_on_cpu():
    import torch

    from openft.train.hparams import auto_micro_batch_tokens

    assert auto_micro_batch_tokens(cuda=False) == 512
    assert auto_micro_batch_tokens(cuda=True) == 4096
    resolved = resolve_train(TrainConfig(), 100, 256)
    assert resolved.micro_batch_tokens == (4096 if torch.cuda.is_available() else 512)
    assert resolve_train(TrainConfig(micro_batch_tokens=999), 100, 256).micro_batch_tokens == 999


def _qwen_like(layers: int, hidden: int, inner: int, heads: int, kv: int) -> dict:
    return {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": inner,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
    }


def test_the_cpu_micro_batch_keeps_a_bigger_models_activations_in_budget():
    import torch

    from openft.train.hparams import activation_bytes_per_token, auto_micro_batch_tokens

    small = _qwen_like(30, 576, 1536, 9, 3)  # the 135M built-in's sizes
    qwen = _qwen_like(24, 896, 4864, 14, 2)  # Qwen2.5 0.5B
    big = _qwen_like(28, 3584, 18944, 28, 4)  # Qwen2.5 7B
    cpu = [auto_micro_batch_tokens(False, activation_bytes_per_token(c, "fp32")) for c in (small, qwen, big)]
    assert cpu == [512, 256, 128]  # shrinking with the model, a multiple of 64, never below 128
    assert auto_micro_batch_tokens(False, activation_bytes_per_token(qwen, "bf16")) == 512  # half the bytes
    assert auto_micro_batch_tokens(True, activation_bytes_per_token(big, "fp32")) == 4096
    assert activation_bytes_per_token({"text_config": qwen}, "fp32") == activation_bytes_per_token(qwen, "fp32")
    assert activation_bytes_per_token({"model_type": "unknown"}, "fp32") == 0
    resolved = resolve_train(TrainConfig(precision="fp32"), 100, 256, model_config=qwen)
    assert resolved.micro_batch_tokens == (4096 if torch.cuda.is_available() else 256)
    chosen = TrainConfig(precision="fp32", micro_batch_tokens=999)
    assert resolve_train(chosen, 100, 256, model_config=qwen).micro_batch_tokens == 999


def test_the_activation_estimate_matches_what_autograd_keeps_in_a_lora_step():
    """The estimate against the bytes autograd really saves for backward in a LoRA
    forward of a random Qwen2 decoder (transformers' default SDPA attention, fp32), per token."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from openft.train.hparams import activation_bytes_per_token
    from openft.train.lora import DEFAULT_TARGETS, LoraParams, apply_lora

    sizes = _qwen_like(2, 128, 512, 4, 2)
    config = Qwen2Config(vocab_size=256, max_position_embeddings=256, **sizes)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    apply_lora(model, LoraParams(rank=4, alpha=8.0, dropout=0.0, target_modules=tuple(DEFAULT_TARGETS["qwen2"])))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:  # weights (and views of them) are kept anyway
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    tokens = 64
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(torch.randint(0, 256, (1, tokens)))  # the decoder alone: the head runs chunked in openft
    kept = sum(seen.values()) / tokens
    estimate = activation_bytes_per_token(sizes, "fp32")
    assert 0.8 * kept <= estimate <= 1.5 * kept, (kept, estimate)
