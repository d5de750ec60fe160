"""Direct preference optimisation (DPO), as TRL's `DPOTrainer` computes its sigmoid loss.

For a pair (prompt x, preferred y_c, rejected y_r) and the log-probability of each
answer summed over its tokens, under the trained policy (pi) and the frozen
reference (ref):

    loss = -logsigmoid(beta * ((pi(y_c|x) - ref(y_c|x)) - (pi(y_r|x) - ref(y_r|x))))

The rewards are beta * (pi - ref) of each side; the margin their difference; the
preference accuracy the share of pairs whose preferred answer has the higher
reward. With `rpo_alpha` the preferred answer's mean token NLL is added (RPO, as
Together's `rpo_alpha`). The reference is the model before training: with LoRA the
same model with its adapters switched off (no second copy in memory); for full
fine-tuning its log-probabilities are computed once, before the first step, and
kept in the run folder for a resume. Both answers of a group of pairs run through
one forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from openft.data.types import Example, Message
from openft.train.batching import collate
from openft.train.lora import adapters_disabled
from openft.train.loss import decoder_and_head, head_loss
from openft.train.tokenize import IGNORE, Encoded, chat_messages, labelled, masked_spans

AUTO_BETA = 0.1  # TRL's and OpenAI's default


@dataclass
class PairEncoded:
    """One pair as token ids: both sides carry the prompt, only the answer is labelled."""

    chosen: Encoded
    rejected: Encoded
    index: int  # its place in its set (train or valid): the key of its reference log-probs

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def n_trained(self) -> int:
        return self.chosen.n_trained + self.rejected.n_trained

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


def encode_side(tokenizer, prompt: list[Message], answer: list[Message], tools, max_length: int) -> Encoded:
    """prompt + answer rendered by the chat template; only the answer's assistant
    turns are labelled (an earlier assistant turn of the prompt is context)."""
    text, spans = masked_spans(tokenizer, chat_messages(prompt + answer), tools)
    n_answer = sum(m.role == "assistant" for m in answer)
    return labelled(tokenizer, text, spans[len(spans) - n_answer :], max_length)


def encode_pair(tokenizer, example: Example, max_length: int, index: int) -> PairEncoded:
    prompt = example.prompt
    chosen = example.messages[len(prompt) :]
    return PairEncoded(
        encode_side(tokenizer, prompt, chosen, example.tools, max_length),
        encode_side(tokenizer, prompt, example.rejected, example.tools, max_length),
        index,
    )


def encode_pairs(tokenizer, examples: list[Example], max_length: int) -> list[PairEncoded]:
    return [encode_pair(tokenizer, e, max_length, i) for i, e in enumerate(examples)]


def groups(pairs: list[PairEncoded], token_budget: int) -> list[list[PairEncoded]]:
    """Pairs cut into groups whose forward (both sides, padded to the longest) stays
    within `token_budget` positions; a lone longer pair still goes."""
    out: list[list[PairEncoded]] = []
    cur: list[PairEncoded] = []
    width = 0
    for p in sorted(pairs, key=lambda p: max(len(p.chosen), len(p.rejected))):
        w = max(width, len(p.chosen), len(p.rejected))
        if cur and 2 * (len(cur) + 1) * w > token_budget:
            out.append(cur)
            cur, w = [], max(len(p.chosen), len(p.rejected))
        cur.append(p)
        width = w
    if cur:
        out.append(cur)
    return out


@dataclass
class SideLogps:
    """Per sequence of one forward (the chosen sides of a group, then the rejected)."""

    logps: torch.Tensor  # (2k,) summed log-probability of each answer (graph attached when training)
    n_tokens: list[int]  # answer tokens of each
    n_correct: list[int]  # of those, argmax hits


def sequence_logps(model: torch.nn.Module, group: list[PairEncoded], pad_id: int) -> SideLogps:
    """Both answers of every pair in one forward; each answer's log-probability is
    its summed token log-probs, the head run only on answer positions."""
    decoder, head = decoder_and_head(model)
    mb = collate([p.chosen for p in group] + [p.rejected for p in group], pad_id)
    device = next(head.parameters()).device
    ids, mask, labels = mb.input_ids.to(device), mb.attention_mask.to(device), mb.labels.to(device)
    hidden = decoder(input_ids=ids, attention_mask=None if bool(mask.all()) else mask, use_cache=False)
    hidden = hidden.last_hidden_state[:, :-1]  # position t predicts token t+1
    target = labels[:, 1:]
    logps, n_tokens, n_correct = [], [], []
    head_trains = getattr(head, "weight", None) is not None and head.weight.requires_grad  # not a LoRA head
    for b in range(target.shape[0]):
        sel = target[b] != IGNORE
        rows, y = hidden[b][sel], target[b][sel]
        if head_trains:  # full fine-tuning: the head's gradient is per sequence, so plain autograd
            logits = head(rows).float()
            logp = -F.cross_entropy(logits, y, reduction="sum")
            correct = int((logits.argmax(-1) == y).sum())
        else:  # the chunked head (no (N, V) logits kept), one sequence's answer at a time
            ce, correct = head_loss(head, rows, y)
            logp = -ce
        logps.append(logp)
        n_tokens.append(int(y.numel()))
        n_correct.append(correct)
    return SideLogps(torch.stack(logps), n_tokens, n_correct)


@dataclass
class PairTerms:
    losses: torch.Tensor  # (k,) per pair, graph attached when training
    chosen_rewards: torch.Tensor  # (k,) beta * (pi - ref), detached
    rejected_rewards: torch.Tensor


def dpo_terms(
    pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float
) -> PairTerms:
    """TRL's sigmoid loss (label smoothing 0) from summed answer log-probs."""
    logits = (pi_c - ref_c) - (pi_r - ref_r)
    return PairTerms(
        -F.logsigmoid(beta * logits),
        (beta * (pi_c - ref_c)).detach(),
        (beta * (pi_r - ref_r)).detach(),
    )


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module, pairs: list[PairEncoded], pad_id: int, token_budget: int, autocast, lora: bool
) -> torch.Tensor:
    """(n, 2): each pair's chosen and rejected log-probability under the reference:
    the model with its adapters off (LoRA) or as it is now (full, before training)."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    was = model.training
    model.eval()
    try:
        with adapters_disabled(model, lora):
            for g in groups(pairs, token_budget):
                with autocast():
                    s = sequence_logps(model, g, pad_id)
                k = len(g)
                for j, p in enumerate(g):
                    out[p.index, 0], out[p.index, 1] = float(s.logps[j]), float(s.logps[k + j])
    finally:
        model.train(was)
    return out


@dataclass
class PairStats:
    """Sums over the pairs of a step or a validation pass."""

    pairs: int = 0
    loss: float = 0.0
    chosen_reward: float = 0.0
    rejected_reward: float = 0.0
    correct_pairs: int = 0  # preferred answer rewarded higher
    answer_tokens: int = 0  # both sides
    chosen_tokens: int = 0
    chosen_correct: int = 0  # argmax hits on the preferred answers

    def add(self, terms: PairTerms, s: SideLogps, losses: torch.Tensor) -> None:
        k = terms.chosen_rewards.numel()
        self.pairs += k
        self.loss += float(losses.detach().sum())
        self.chosen_reward += float(terms.chosen_rewards.sum())
        self.rejected_reward += float(terms.rejected_rewards.sum())
        self.correct_pairs += int((terms.chosen_rewards > terms.rejected_rewards).sum())
        self.answer_tokens += sum(s.n_tokens)
        self.chosen_tokens += sum(s.n_tokens[:k])
        self.chosen_correct += sum(s.n_correct[:k])

    def metrics(self, prefix: str) -> dict:
        n = max(1, self.pairs)
        c, r = self.chosen_reward / n, self.rejected_reward / n
        return {
            f"{prefix}_loss": self.loss / n,
            f"{prefix}_mean_token_accuracy": self.chosen_correct / max(1, self.chosen_tokens),
            f"{prefix}_chosen_reward": c,
            f"{prefix}_rejected_reward": r,
            f"{prefix}_reward_margin": c - r,
            f"{prefix}_reward_accuracy": self.correct_pairs / n,
        }


def pair_losses(
    model: torch.nn.Module,
    group: list[PairEncoded],
    refs: torch.Tensor,
    pad_id: int,
    beta: float,
    rpo_alpha: float,
) -> tuple[torch.Tensor, PairTerms, SideLogps]:
    """Per-pair training losses of one group (DPO, plus RPO's NLL term)."""
    s = sequence_logps(model, group, pad_id)
    k = len(group)
    ref = refs[[p.index for p in group]].to(s.logps.device, s.logps.dtype)
    terms = dpo_terms(s.logps[:k], s.logps[k:], ref[:, 0], ref[:, 1], beta)
    losses = terms.losses
    if rpo_alpha:
        n = torch.tensor(s.n_tokens[:k], dtype=s.logps.dtype, device=s.logps.device).clamp(min=1)
        losses = losses + rpo_alpha * (-s.logps[:k] / n)
    return losses, terms, s


def evaluate_pairs(
    model: torch.nn.Module, pairs: list[PairEncoded], refs: torch.Tensor, pad_id: int, token_budget: int, autocast, cfg
) -> dict:
    """Validation metrics (`valid_*`) over `pairs`, without gradients."""
    stats = PairStats()
    was = model.training
    model.eval()
    with torch.no_grad():
        for g in groups(pairs, token_budget):
            with autocast():
                losses, terms, s = pair_losses(model, g, refs, pad_id, cfg.beta, cfg.rpo_alpha)
            stats.add(terms, s, losses)
    model.train(was)
    return stats.metrics("valid")


@torch.no_grad()
def preference_accuracy(model: torch.nn.Module, pairs: list[PairEncoded], pad_id: int, token_budget: int) -> float:
    """The share of pairs whose preferred answer the model itself finds likelier, by
    mean log-probability per answer token (so a longer answer is not penalised for
    its length): about 0.5 for a model indifferent to the preference."""
    hits = 0
    was = model.training
    model.eval()
    for g in groups(pairs, token_budget):
        s = sequence_logps(model, g, pad_id)
        k = len(g)
        mean = s.logps / torch.tensor(s.n_tokens, dtype=s.logps.dtype, device=s.logps.device).clamp(min=1)
        hits += int((mean[:k] > mean[k:]).sum())
    model.train(was)
    return hits / max(1, len(pairs))
