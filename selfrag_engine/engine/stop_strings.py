"""Stop strings on a stream of text: what is final is let through, and the end that could still be the start
of a stop string is held back until the next text decides it.

    stops = StopStrings(["\\n\\n", "###"], include=False)
    out, hit = stops.feed(" Paris is.\\n")  # " Paris is." let through, "\\n" held
    out, hit = stops.feed("\\nNext")        # "" and hit == "\\n\\n": the text ends before the stop string
    rest = stops.flush()                   # at a finish for another reason: what was held

So the pieces let through, joined, are exactly the text of the whole answer cut at its first stop string (the
one that begins first; among those beginning at the same place, the first listed), and a stream never sends
text it later takes back. What is held is shorter than the longest stop string, so a step's work does not
grow with the answer.
"""
from __future__ import annotations

from typing import Sequence


class StopStrings:
    def __init__(self, stops: Sequence[str], include: bool = False):
        self.stops = tuple(s for s in stops if s)
        self.include = include
        self.held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Takes new text; returns (the text now final, the stop string found or None). After a stop string
        is found nothing more is to be fed."""
        if not self.stops:
            return text, None
        buf = self.held + text
        found: tuple[int, int, str] | None = None
        for order, s in enumerate(self.stops):
            at = buf.find(s)
            if at >= 0 and (found is None or (at, order) < found[:2]):
                found = (at, order, s)
        if found is not None:
            at, _, s = found
            self.held = ""
            return buf[:at + len(s)] if self.include else buf[:at], s
        keep = self._undecided(buf)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], None

    def _undecided(self, buf: str) -> int:
        """The length of the longest end of buf that is a proper beginning of a stop string."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        """The held text, let through when the answer ends for another reason."""
        held, self.held = self.held, ""
        return held
