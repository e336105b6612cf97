"""Generated token ids to text deltas: incremental detokenisation and stop strings.

Shared by both engines; it sees token ids and a decode function, never a model or a request.
"""

from __future__ import annotations

from collections.abc import Callable


class StopMatcher:
    """Finds the first stop string in text that arrives in pieces, in time linear in the text.

    One Knuth-Morris-Pratt automaton per stop string: each character is looked at once per
    stop (plus amortised fall-backs), however long the stops are. Scanning the whole text, or
    every prefix of a stop, for every token cost O(text) or O(stop) per token: four 200k-char
    stops took seconds of scheduler CPU per request. The failure tables are built lazily, only
    as far as a stop has matched, so a long stop that never matches costs nothing up front
    (building them eagerly would cost O(stop length) on the event loop, in `Engine.start`).
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.state = [0] * len(stops)  # per stop: longest suffix so far that is its prefix
        self.fail: list[list[int]] = [[0] for _ in stops]  # KMP failure table, built lazily
        self.fed = 0  # characters seen

    @property
    def hold(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop: what
        must be held back, since the next characters may complete that stop."""
        return max(self.state, default=0)

    def feed(self, chars: str) -> int | None:
        """Advance over `chars`; the position (in the whole text) where the first stop to
        complete starts, or None. On a tie, the longer stop (it starts earlier) wins."""
        for offset, char in enumerate(chars):
            found: int | None = None
            for index, stop in enumerate(self.stops):
                q = self._advance(index, stop, self.state[index], char)
                if q == len(stop):
                    start = self.fed + offset + 1 - q
                    found = start if found is None else min(found, start)
                    q = self.fail[index][q - 1]
                self.state[index] = q
            if found is not None:
                self.fed += offset + 1
                return found
        self.fed += len(chars)
        return None

    def _advance(self, index: int, stop: str, q: int, char: str) -> int:
        fail = self.fail[index]
        while q and stop[q] != char:
            q = fail[q - 1]
        if stop[q] == char:
            q += 1
            self._extend(index, stop, q)
        return q

    def _extend(self, index: int, stop: str, upto: int) -> None:
        """Compute the failure table for the first `upto` characters of `stop`; each entry
        once, in amortised constant time (the usual prefix function, run incrementally)."""
        fail = self.fail[index]
        while len(fail) < upto:
            i = len(fail)
            k = fail[i - 1]
            while k and stop[i] != stop[k]:
                k = fail[k - 1]
            fail.append(k + 1 if stop[i] == stop[k] else k)


class TextAssembler:
    """Turns generated token ids into text deltas, holding back what is not yet final.

    Byte-level BPE may split a character across tokens: a trailing U+FFFD means "wait for the
    next token". Anything that could still be the start of a stop sequence is held back until
    it is not.

    Text is decoded incrementally: each token decodes only a short window of ids, from the
    previous boundary on, and appends what that window adds to its already settled part
    (decoding all ids for every token costs O(n) per token: ~0.1 ms per sequence at 1000
    tokens). Keeping one settled chunk of context in the window is what makes the difference
    right for decoders that treat the first token specially (SentencePiece's leading space).
    Stop strings are matched by a `StopMatcher` over the new characters only.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]) -> None:
        self.decode, self.stop = decode, stop
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[: self.read]
        self.prefix = 0  # ids[prefix:read] decode to the end of `text`: the window's context
        self.read = 0
        self.sent = 0  # characters of the decoded text already emitted
        self.matcher = StopMatcher(stop)
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self._advance(final=False)
        if text is None:
            return ""
        at = self.matcher.feed(text[self.matcher.fed :])
        if at is not None:
            self.stopped = True
            return self._emit(text, at)
        return self._emit(text, len(text) - self.matcher.hold)

    def _advance(self, final: bool) -> str | None:
        """All text so far, or None while the last token ends inside a character."""
        window = self.decode(self.ids[self.prefix :])
        if window.endswith("\ufffd") and not final:
            return None
        settled = self.decode(self.ids[self.prefix : self.read])
        if window.startswith(settled):
            self.text += window[len(settled) :]
        else:  # the new ids changed how the context decodes: decode everything once
            self.text = self.decode(self.ids)
            self._rescan()
        self.prefix, self.read = self.read, len(self.ids)
        return self.text

    def _rescan(self) -> None:
        """The text was rewritten: match stops afresh from the last characters that could
        still begin one that ends in unsent text (rare: only when the context decodes
        differently once more ids follow it)."""
        longest = max(map(len, self.stop), default=0)
        self.matcher = StopMatcher(self.stop)
        self.matcher.fed = max(0, self.sent - longest + 1)

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self._advance(final=True) if self.read < len(self.ids) else self.text
        return self._emit(text or "", len(text or ""))

    def _emit(self, text: str, upto: int) -> str:
        """The characters of `text` from the last emitted one up to `upto` (only those are
        copied: slicing the whole text per token would be quadratic)."""
        delta = text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta
