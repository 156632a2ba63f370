"""Token ids to text as they are generated: incremental detokenization and stop strings.

Decoding token by token would cut multi-byte characters and, for SentencePiece vocabularies, lose
the space a token carries; so each new token is decoded together with the ones before it and only
the text that became final is emitted (the prefix/read offsets of vLLM's incremental detokenizer).
Text that could still turn into a stop string is held back until it cannot.
"""

from __future__ import annotations

INCOMPLETE = "\ufffd"  # what a cut UTF-8 sequence decodes to


class TextStream:
    """Feed token ids with `push`; each call returns the text now safe to send and whether a stop
    string ended the completion. The concatenation of everything returned (plus `flush`) is the
    completion's text, the stop string excluded."""

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # decoded text that is final
        self.sent = 0  # characters of self.text already returned

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        if len(window) > len(prefix) and not window.endswith(INCOMPLETE):
            self.text += window[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def flush(self) -> str:
        """At the end: the held-back text and any undecodable tail, as the full decode would show it."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        if len(window) > len(prefix):
            self.text += window[len(prefix) :]
            self.prefix_offset = self.read_offset = len(self.ids)
        rest, self.sent = self.text[self.sent :], len(self.text)
        return rest

    def _release(self) -> tuple[str, bool]:
        if not self.stop:
            return self._emit(len(self.text)), False
        # A stop string may straddle what was already sent only if that part was held back: search
        # from the earliest character a stop string could start at.
        start = max(0, self.sent - max(len(s) for s in self.stop) + 1)
        found = [index for index in (self.text.find(s, start) for s in self.stop) if index >= 0]
        if found:
            end = min(found)
            self.text = self.text[:end]
            return self._emit(end), True
        held = max((_overlap(self.text, s) for s in self.stop), default=0)
        return self._emit(len(self.text) - held), False

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.sent)
        delta, self.sent = self.text[self.sent : upto], upto
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a beginning of `stop` (a stop string in the making)."""
    for length in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0


class GuardedTokenizer:
    """The tokenizer behind one lock: request handlers encode in threads while the decode worker
    decodes, and a Rust tokenizer object refuses concurrent use ("Already borrowed") when a call
    changes its padding or truncation settings."""

    def __init__(self, tokenizer):
        import threading

        self._tokenizer = tokenizer
        self._lock = threading.Lock()

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        with self._lock:
            return self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        with self._lock:
            return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict]) -> str:
        """The chat template applied, with the assistant's turn opened for generation."""
        with self._lock:
            return self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)
