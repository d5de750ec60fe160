from openft.data.types import Example, Message
from openft.train.tokenize import IGNORE, encode


def _trained_text(tok, enc):
    return tok.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE])


def test_mask_covers_exactly_the_assistant_turns_in_a_multi_turn_chat(tiny_tokenizer):
    ex = Example(
        messages=[
            Message("system", "Be brief."),
            Message("user", "Hi there"),
            Message("assistant", "Hello! I am Pip."),
            Message("user", "And in Chinese?"),
            Message("assistant", "你好，我是 Pip 🙂"),
        ]
    )
    enc = encode(tiny_tokenizer, ex, 4096)
    # Exactly the two assistant contents, each with its end-of-turn token, nothing else.
    assert _trained_text(tiny_tokenizer, enc) == "Hello! I am Pip.<|im_end|>你好，我是 Pip 🙂<|im_end|>"
    # Labels equal input ids where trained (no shift here: the loss shifts).
    assert all(lab in (IGNORE, i) for i, lab in zip(enc.input_ids, enc.labels))
    # The prompt part (system + user turns + generation prompts) is never trained.
    first_trained = next(k for k, lab in enumerate(enc.labels) if lab != IGNORE)
    assert "Hi there" in tiny_tokenizer.decode(enc.input_ids[:first_trained])


def test_train_on_prompt_trains_everything(tiny_tokenizer):
    ex = Example(messages=[Message("user", "Hi"), Message("assistant", "Yo")])
    enc = encode(tiny_tokenizer, ex, 4096, train_on_prompt=True)
    assert enc.n_trained == len(enc)


def test_plain_text_trains_all_tokens_and_ends_with_eos(tiny_tokenizer):
    enc = encode(tiny_tokenizer, Example(text="Once upon a time."), 4096)
    assert enc.n_trained == len(enc)
    assert enc.input_ids[-1] == tiny_tokenizer.eos_token_id


def test_truncation_is_reported(tiny_tokenizer):
    ex = Example(messages=[Message("user", "word " * 50), Message("assistant", "ok")])
    enc = encode(tiny_tokenizer, ex, 16)
    assert enc.truncated and len(enc) == 16
    assert enc.n_trained == 0  # the answer was cut off entirely
