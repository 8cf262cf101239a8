"""Mention detection by KB name/alias matching, for posts that carry no mention spans.

The KB's names and aliases are normalised (NFKC, casefold, whitespace runs collapsed) and put
in an Aho-Corasick automaton (``pyahocorasick``). A post's text is normalised the same way,
with a map from every normalised character back to its original offset, so the spans found
are offsets into the ORIGINAL text. Matches must start and end on word boundaries; among
overlapping matches the longest wins (leftmost first), so "New York City" beats "New York".

Filters keep the alias set useful and small (:class:`AliasFilter`): aliases shorter than a
minimum, stopwords and very common words, aliases made only of digits/punctuation, and
aliases shared by too many entities (too ambiguous to be worth a mention) are dropped and
counted by reason.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import pyarrow as pa

log = logging.getLogger(__name__)

#: common English function words and very frequent words: never a mention on their own
DEFAULT_STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between
both but by can could did do does doing down during each even ever every few for from further get got had has
have having he her here hers herself him himself his how however i if in into is it its itself just like make
made many may me might more most much must my myself never new no nor not now of off often on once one only or
other our ours ourselves out over own same say said see she should since so some still such than that the their
theirs them themselves then there these they this those through to today too under until up upon us very was we
well were what when where which while who whom why will with would yes yet you your yours yourself yourselves
first last year years time day days people world news man men woman women good great best big small old young
""".split())


@dataclass(frozen=True)
class Span:
    """A mention found in a text: ``text[start:end] == mention`` (end exclusive)."""

    mention: str
    start: int
    end: int


def normalize_with_offsets(text: str) -> tuple[str, list[int]]:
    """NFKC + casefold per character, whitespace runs collapsed to one space, ends stripped.

    Returns (normalised text, offsets) where ``offsets[i]`` is the index in ``text`` of the
    character that produced normalised character ``i`` (a character that expands, e.g.
    'ß' -> 'ss', maps all its output to the same original index).
    """
    out: list[str] = []
    offsets: list[int] = []
    pending_space = -1  # original index of the whitespace run waiting to be written
    for i, ch in enumerate(text):
        if ch.isspace():
            if pending_space < 0:
                pending_space = i
            continue
        if pending_space >= 0 and out:
            out.append(" ")
            offsets.append(pending_space)
        pending_space = -1
        for c in unicodedata.normalize("NFKC", ch).casefold():
            if c.isspace():  # NFKC can produce spaces (e.g. from compatibility chars)
                continue
            out.append(c)
            offsets.append(i)
    return "".join(out), offsets


def normalize(text: str) -> str:
    return normalize_with_offsets(text or "")[0]


@dataclass(frozen=True)
class AliasFilter:
    """Which aliases are worth matching."""

    min_length: int = 3  # normalised aliases shorter than this are dropped
    max_entities_per_alias: int = 20  # aliases shared by more KB entities are too ambiguous
    stopwords: frozenset = field(default=DEFAULT_STOPWORDS)  # an alias that IS one is dropped
    drop_numeric: bool = True  # aliases of only digits/punctuation/spaces are dropped

    def reason_to_drop(self, alias: str, entities: int) -> str | None:
        if len(alias) < self.min_length:
            return "short"
        if alias in self.stopwords:
            return "stopword"
        if self.drop_numeric and not any(c.isalpha() for c in alias):
            return "numeric"
        if entities > self.max_entities_per_alias:
            return "ambiguous"
        return None


def build_alias_table(kb: pa.Table) -> pa.Table:
    """KB (``entity_id``, ``name``, ``aliases``) -> (``alias`` normalised, ``entities``: how many
    distinct entities have it as name or alias), sorted by alias."""
    names = kb.column("name").to_pylist()
    extra = kb.column("aliases").to_pylist() if "aliases" in kb.column_names else [None] * len(names)
    ids = kb.column("entity_id").to_pylist()
    holders: dict[str, set] = {}
    for eid, name, aliases in zip(ids, names, extra):
        for a in [name, *(aliases or [])]:
            n = normalize(a or "")
            if n:
                holders.setdefault(n, set()).add(eid)
    keys = sorted(holders)
    return pa.table({"alias": pa.array(keys, pa.string()),
                     "entities": pa.array([len(holders[k]) for k in keys], pa.int32())})


def _is_word_char(c: str) -> bool:
    return c.isalnum()


class AliasMatcher:
    """Aho-Corasick matching of normalised aliases in texts (picklable: Ray ships it)."""

    def __init__(self, alias_counts: Mapping[str, int], filt: AliasFilter = AliasFilter()):
        self.filter = filt
        self.dropped: dict[str, int] = {}
        kept = []
        for alias, entities in alias_counts.items():
            alias = normalize(alias)
            if not alias:
                continue
            reason = filt.reason_to_drop(alias, int(entities))
            if reason:
                self.dropped[reason] = self.dropped.get(reason, 0) + 1
            else:
                kept.append(alias)
        self.aliases = sorted(set(kept))
        self._automaton = self._build(self.aliases)

    @property
    def kept(self) -> int:
        return len(self.aliases)

    @staticmethod
    def _build(aliases: Iterable[str]):
        import ahocorasick

        automaton = ahocorasick.Automaton()
        n = 0
        for alias in aliases:
            automaton.add_word(alias, len(alias))
            n += 1
        if n:
            automaton.make_automaton()
        return automaton if n else None

    @classmethod
    def from_table(cls, table: pa.Table, filt: AliasFilter = AliasFilter()) -> "AliasMatcher":
        """From :func:`build_alias_table` output (``alias``, ``entities``)."""
        return cls(dict(zip(table.column("alias").to_pylist(), table.column("entities").to_pylist())), filt)

    def __getstate__(self) -> dict:
        return {"filter": self.filter, "dropped": self.dropped, "aliases": self.aliases}

    def __setstate__(self, state: dict) -> None:
        self.filter, self.dropped, self.aliases = state["filter"], state["dropped"], state["aliases"]
        self._automaton = self._build(self.aliases)

    def find(self, text: str | None) -> list[Span]:
        """Longest non-overlapping word-bounded matches, as spans of the ORIGINAL text."""
        if not text or self._automaton is None:
            return []
        norm, offsets = normalize_with_offsets(text)
        found = []  # (start, end) in the normalised text, end exclusive
        for last, length in self._automaton.iter(norm):
            start, end = last - length + 1, last + 1
            if start > 0 and _is_word_char(norm[start - 1]) and _is_word_char(norm[start]):
                continue
            if end < len(norm) and _is_word_char(norm[end]) and _is_word_char(norm[end - 1]):
                continue
            found.append((start, end))
        # longest first (ties: leftmost); a match overlapping one already taken is dropped
        spans: list[tuple[int, int]] = []
        for start, end in sorted(found, key=lambda se: (-(se[1] - se[0]), se[0])):
            if any(start < e and s < end for s, e in spans):
                continue
            spans.append((start, end))
        out = []
        for start, end in sorted(spans):
            o_start = offsets[start]
            o_end = offsets[end - 1] + 1
            out.append(Span(text[o_start:o_end], o_start, o_end))
        return out


def context_window(text: str, start: int, end: int, chars: int = 200) -> str:
    """Up to ``chars`` characters either side of ``text[start:end]``, not cutting words in half
    (snapped to whitespace within 20 characters), stripped."""
    lo = max(0, start - chars)
    hi = min(len(text), end + chars)
    if lo > 0:
        space = text.find(" ", lo, min(start, lo + 20))
        if space >= 0:
            lo = space + 1
    if hi < len(text):
        space = text.rfind(" ", max(end, hi - 20), hi)
        if space >= 0:
            hi = space
    return text[lo:hi].strip()
