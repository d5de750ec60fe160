from __future__ import annotations

from openft.eval.generate import _decode, answer_questions

QUESTIONS = [
    "What is the capital of France?",
    "hi",
    "Explain photosynthesis in a few words, please, for a child of seven.",
    "2+2?",
    "你好，今天天气怎么样？",
    "Tell me a story",
]


def test_answers_are_deterministic_ordered_and_batch_size_independent(talkative_model, tiny_tokenizer):
    a = answer_questions(talkative_model, tiny_tokenizer, QUESTIONS, max_new_tokens=8, batch_size=4)
    assert len(a) == len(QUESTIONS)
    assert all(isinstance(x, str) and x for x in a)  # the fixture model does say something
    assert len(set(a)) > 1
    assert answer_questions(talkative_model, tiny_tokenizer, QUESTIONS, max_new_tokens=8, batch_size=4) == a
    assert answer_questions(talkative_model, tiny_tokenizer, QUESTIONS, max_new_tokens=8, batch_size=1) == a
    # Order is the questions' own, whatever batching did: each answer equals the
    # answer to that question asked alone.
    assert answer_questions(talkative_model, tiny_tokenizer, QUESTIONS[2:3], max_new_tokens=8) == [a[2]]
    # No template markup leaks into answers.
    assert not any("<|im_" in x for x in a)


def test_system_prompt_changes_the_prompt_and_training_mode_is_restored(talkative_model, tiny_tokenizer):
    talkative_model.train()
    try:
        plain = answer_questions(talkative_model, tiny_tokenizer, QUESTIONS[:2], max_new_tokens=6)
        assert talkative_model.training
        other = answer_questions(talkative_model, tiny_tokenizer, QUESTIONS[:2], max_new_tokens=6, system="Be terse.")
        assert plain != other
    finally:
        talkative_model.eval()
    assert answer_questions(talkative_model, tiny_tokenizer, [], max_new_tokens=6) == []


def test_decode_cuts_at_the_first_end_token(tiny_tokenizer):
    ids = tiny_tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    pad_like = tiny_tokenizer(" junk", add_special_tokens=False)["input_ids"]
    assert _decode(tiny_tokenizer, ids + [eos] + pad_like, [eos]) == "Hello world"


def test_the_comparison_and_the_server_stop_at_the_same_tokens(tiny_model_dir, tiny_tokenizer):
    """A ChatML model whose tokenizer's eos is <|endoftext|> (as base models ship it):
    both paths stop at eos and at the template's <|im_end|>."""
    import copy

    from transformers import AutoModelForCausalLM

    from openft.eval.generate import _eos_ids
    from openft.serve.engine import Engine

    tok = copy.deepcopy(tiny_tokenizer)
    tok.eos_token = "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.generation_config.eos_token_id = tok.eos_token_id
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert "<|im_end|>" in tok.chat_template and im_end != eos
    assert set(_eos_ids(model, tok)) == set(Engine._stop_ids(model, tok)) == {eos, im_end}
    assert _eos_ids(model, tok)[0] == eos  # the eos first: it pads when there is no pad token
