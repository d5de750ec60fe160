"""Text side of decoding: incremental detokenisation and stop strings.

Both hold text back rather than emit something they might have to take back: a
character whose UTF-8 bytes are split across tokens (CJK, emoji) is held until
its last byte arrives, and text that could be the start of a stop string is held
until it either completes the stop string (and is cut) or cannot any more.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decode() gives for incomplete or invalid UTF-8 bytes
PROMPT_CONTEXT = 6  # prompt tokens decoded in front of the answer (see Detokenizer)


class Detokenizer:
    """Incremental decode of one choice's tokens (the approach vLLM and TGI use).

    Decoding token by token is wrong twice over: a byte-level BPE token can be
    half a character, and SentencePiece tokenizers drop a word's leading space
    when it starts the decoded text. So we decode a short window
    ids[prefix:read] (already emitted) and ids[prefix:] (window plus new tokens)
    and emit only the difference, and only when it does not end in U+FFFD. The
    window starts with the prompt's last tokens so the first answer token is
    decoded in context too."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix = 0  # start of the decode window
        self.read = len(self.ids)  # end of what has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly stable text (often "")."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # nothing new, or a character still waiting for its last bytes
        self.prefix, self.read = self.read, len(self.ids)
        # A U+FFFD before the end is a byte sequence no later token can complete
        # (a random or badly trained model can emit one): drop it rather than
        # stream a broken character.
        return after[len(before) :].replace(REPLACEMENT, "")

    def flush(self) -> str:
        """The answer ended: release what was held, minus any character left incomplete."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :].replace(REPLACEMENT, "") if len(after) > len(before) else ""


class StopMatcher:
    """Cuts the output at the first stop string; the stop string itself is never emitted."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""  # text not yet emitted: a suffix that may begin a stop string

    def push(self, text: str) -> tuple[str, bool]:
        """Add decoded text; return (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        # Everything emitted earlier was checked not to start a stop string, so a
        # match can only begin inside `buf`: hold its longest suffix that is a
        # proper prefix of some stop string, emit the rest.
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: each of the 256 bytes is written as
    one printable character in such tokenizers' vocabularies ("Ġ" is a space)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES = _byte_decoder()


def _pieces(tokenizer) -> dict[int, str]:
    """id -> vocabulary entry (cached on the tokenizer; openft's light tokenizer and
    transformers' both have get_vocab), and whether entries are byte-level ("Ġ" a space)."""
    pieces = getattr(tokenizer, "_openft_pieces", None)
    if pieces is None:
        pieces = {i: p for p, i in tokenizer.get_vocab().items()}
        tokenizer._openft_pieces = pieces
        tokenizer._openft_byte_level = any(p.startswith("Ġ") for p in pieces.values())
    return pieces


def token_bytes(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's own text and UTF-8 bytes, as OpenAI's log-probs report them. A
    byte-level BPE token can be part of a character: its bytes are exact, its text
    then shows U+FFFD where the character is incomplete."""
    piece = _pieces(tokenizer).get(int(token_id))
    if piece:
        if tokenizer._openft_byte_level and all(c in _BYTES for c in piece):
            raw = bytes(_BYTES[c] for c in piece)
            return raw.decode("utf-8", errors="replace"), list(raw)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            raw = bytes([int(piece[3:5], 16)])
            return raw.decode("utf-8", errors="replace"), list(raw)
    text = tokenizer.decode([int(token_id)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text, list(text.encode("utf-8"))
