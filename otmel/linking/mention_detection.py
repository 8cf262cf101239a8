"""Mention detection by matching a knowledge base's names and aliases in raw post text.

The KB's names and aliases are normalised (:func:`normalize`: NFKC, casefold, whitespace runs
collapsed to one space, ends stripped) and put into an Aho-Corasick automaton
(``pyahocorasick``). A post is normalised the same way while keeping, for every normalised
character, the offset of the original character that produced it, so the spans found are
offsets into the ORIGINAL text (``text[span.start:span.end] == span.mention``).

A match counts only on word boundaries (the characters just outside it are not part of a
word), and overlapping matches are resolved greedily from the left, longest first at equal
start, so "New York City" beats "New York".

:class:`AliasFilter` keeps the alias set useful: aliases that are too short, stopwords or very
common words, made only of digits/punctuation, or shared by too many entities (too ambiguous
to be worth a mention) are dropped and counted by reason in :attr:`AliasMatcher.dropped`.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import pyarrow as pa

log = logging.getLogger(__name__)

#: common English function words and very frequent words: never a mention on their own
DEFAULT_STOPWORDS: frozenset[str] = frozenset("""
a about above after again against all also am an and any are as at back be because been before being below
between both but by can could did do does doing down during each even ever every few first for from further
get go going good got great had has have having he her here hers herself him himself his how i if in into is
it its itself just last like made make many may me might more most much must my myself never new next no nor
not now of off oh ok on once one only or other our ours ourselves out over own really right said same say see
she should since so some still such than that the their theirs them themselves then there these they this
those three through to today too two under until up upon us very was way we well were what when where which
while who whom why will with would yes yet you your yours yourself yourselves
""".split())

#: the reasons an alias is dropped, the keys of :attr:`AliasMatcher.dropped`
DROP_REASONS: tuple[str, ...] = ("short", "stopword", "numeric", "ambiguous")


@dataclass(frozen=True)
class Span:
    """A mention found in a text; ``text[start:end] == mention`` (end exclusive)."""

    mention: str
    start: int
    end: int


# ---------------------------------------------------------------------------- normalisation
def _is_mark(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "M"


def _is_word_char(ch: str) -> bool:
    """Part of a word: a letter or digit, or a combining mark (which belongs to the letter before it)."""
    return ch.isalnum() or _is_mark(ch)


def _fold(unit: str) -> str:
    """NFKC + casefold of one base character with its combining marks (NFKC again after the
    casefold, which can produce decomposed text, so folding is idempotent)."""
    if unit.isascii():
        return unit.lower()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", unit).casefold())


def _normalize(text: str) -> tuple[str, list[int], list[int]]:
    """(normalised, starts, ends): normalised char ``i`` comes from ``text[starts[i]:ends[i]]``.

    The unit folded at a time is one character plus the combining marks that follow it, so a
    decomposed 'e' + U+0301 folds like the precomposed 'é'; every output char of a unit maps to
    the unit's whole original range ('ß' -> 'ss': both 's' map to the 'ß').
    """
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    pending: tuple[int, int] | None = None  # original range of a whitespace run not written yet
    ascii_only = text.isascii()
    n = len(text)
    i = 0
    while i < n:
        j = i + 1
        if not ascii_only:
            while j < n and _is_mark(text[j]):
                j += 1
        for ch in _fold(text[i:j]):
            if ch.isspace():  # real whitespace, or a space produced by NFKC (e.g. from U+00A8)
                if pending is None:
                    pending = (i, j)
                continue
            if pending is not None:
                if out:  # leading whitespace is dropped
                    out.append(" ")
                    starts.append(pending[0])
                    ends.append(pending[1])
                pending = None
            out.append(ch)
            starts.append(i)
            ends.append(j)
        i = j
    return "".join(out), starts, ends


def normalize_with_offsets(text: str) -> tuple[str, list[int]]:
    """Normalise ``text`` for matching and map it back to the original.

    NFKC + casefold per character (a character together with the combining marks that follow
    it), runs of whitespace collapsed to one space, leading/trailing whitespace dropped.

    Parameters
    ----------
    text
        The original text.

    Returns
    -------
    tuple[str, list[int]]
        ``(normalized, offsets)`` where ``offsets[i]`` is the index in ``text`` of the original
        character that produced ``normalized[i]`` (a character whose folding is longer, e.g.
        'ß' -> 'ss', maps all its output characters to the same index; a collapsed whitespace
        run maps to its first character).
    """
    norm, starts, _ = _normalize(text or "")
    return norm, starts


def normalize(text: str) -> str:
    """The normalised form of ``text`` (see :func:`normalize_with_offsets`); ``None`` -> ''."""
    if not text:
        return ""
    if text.isascii():  # fast path, same result: str.split() splits on exactly the str.isspace() chars
        return " ".join(text.lower().split())
    return _normalize(text)[0]


# ---------------------------------------------------------------------------- alias table and filter
@dataclass(frozen=True)
class AliasFilter:
    """Which aliases are worth matching.

    Attributes
    ----------
    min_length
        A normalised alias shorter than this (in characters) is dropped.
    max_entities_per_alias
        An alias shared by more KB entities than this is too ambiguous and dropped.
    stopwords
        An alias that IS one of these (after normalisation) is dropped.
    drop_numeric
        Drop aliases made only of digits, punctuation, symbols and spaces (no letter).
    """

    min_length: int = 3
    max_entities_per_alias: int = 20
    stopwords: frozenset[str] = DEFAULT_STOPWORDS
    drop_numeric: bool = True


def build_alias_table(kb: pa.Table) -> pa.Table:
    """How many distinct entities carry each normalised name/alias.

    Parameters
    ----------
    kb
        A KB table with columns ``entity_id`` (string), ``name`` (string) and optionally
        ``aliases`` (list<string>, nullable). Null/empty names and aliases, and rows without an
        ``entity_id``, are skipped.

    Returns
    -------
    pyarrow.Table
        Columns ``alias`` (string, normalised) and ``entities`` (int32, the number of DISTINCT
        entities having that alias as name or alias), sorted by alias.
    """
    ids = kb.column("entity_id").to_pylist()
    names = kb.column("name").to_pylist()
    extra = kb.column("aliases").to_pylist() if "aliases" in kb.column_names else [None] * kb.num_rows
    holders: dict[str, set[Any]] = {}
    for eid, name, aliases in zip(ids, names, extra):
        if eid is None:
            continue
        for alias in [name, *(aliases or [])]:
            key = normalize(alias) if alias else ""
            if key:
                holders.setdefault(key, set()).add(eid)
    keys = sorted(holders)
    return pa.table({"alias": pa.array(keys, pa.string()),
                     "entities": pa.array([len(holders[k]) for k in keys], pa.int32())})


# ---------------------------------------------------------------------------- matching
class AliasMatcher:
    """Aho-Corasick matching of normalised KB aliases in raw texts.

    Picklable (Ray ships it to workers): only the kept aliases travel, the automaton is rebuilt
    on unpickling.

    Parameters
    ----------
    alias_counts
        Alias -> number of distinct entities carrying it (e.g. :func:`build_alias_table`).
        Aliases are normalised again; keys that normalise alike are merged (keeping the largest
        count) and counted once in ``dropped``.
    filt
        Which aliases to keep.

    Attributes
    ----------
    kept : int
        Number of aliases kept.
    dropped : dict[str, int]
        Number of dropped aliases per reason: ``short``, ``stopword``, ``numeric``, ``ambiguous``.
    """

    def __init__(self, alias_counts: Mapping[str, int], filt: AliasFilter = AliasFilter()) -> None:
        self.filter = filt
        counts: dict[str, int] = {}
        for alias, entities in alias_counts.items():
            key = normalize(alias) if alias else ""
            if key:
                counts[key] = max(counts.get(key, 0), int(entities))
        stopwords = {normalize(w) for w in filt.stopwords}
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        kept = []
        for alias, entities in counts.items():
            reason = self._reason_to_drop(alias, entities, stopwords)
            if reason is None:
                kept.append(alias)
            else:
                self.dropped[reason] += 1
        self._aliases: tuple[str, ...] = tuple(sorted(kept))
        self._automaton = self._build(self._aliases)
        log.debug("alias matcher: %d aliases kept, dropped %s", self.kept, self.dropped)

    def _reason_to_drop(self, alias: str, entities: int, stopwords: set[str]) -> str | None:
        if len(alias) < self.filter.min_length:
            return "short"
        if alias in stopwords:
            return "stopword"
        if self.filter.drop_numeric and not any(ch.isalpha() for ch in alias):
            return "numeric"
        if entities > self.filter.max_entities_per_alias:
            return "ambiguous"
        return None

    @staticmethod
    def _build(aliases: Iterable[str]) -> Any:
        """An automaton whose value for each alias is its length (None when there is none)."""
        import ahocorasick

        automaton = ahocorasick.Automaton()
        for alias in aliases:
            automaton.add_word(alias, len(alias))
        if len(automaton) == 0:
            return None
        automaton.make_automaton()
        return automaton

    @classmethod
    def from_table(cls, table: pa.Table, filt: AliasFilter = AliasFilter()) -> "AliasMatcher":
        """From a :func:`build_alias_table` table (columns ``alias``, ``entities``)."""
        return cls(dict(zip(table.column("alias").to_pylist(), table.column("entities").to_pylist())), filt)

    @property
    def kept(self) -> int:
        return len(self._aliases)

    @property
    def aliases(self) -> tuple[str, ...]:
        """The kept (normalised) aliases, sorted."""
        return self._aliases

    def __getstate__(self) -> dict[str, Any]:
        return {"filter": self.filter, "dropped": dict(self.dropped), "aliases": self._aliases}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.filter = state["filter"]
        self.dropped = state["dropped"]
        self._aliases = tuple(state["aliases"])
        self._automaton = self._build(self._aliases)

    def find(self, text: str | None) -> list[Span]:
        """The alias mentions in ``text``, as spans of the ORIGINAL text.

        Matches are found in the normalised text and must start and end on word boundaries
        (the character before the start and the one after the end is not part of a word, or
        is the string edge). Overlaps are resolved greedily left to right: at each start the
        longest match is taken, and a match overlapping one already chosen is skipped.

        Parameters
        ----------
        text
            The raw text; None or empty gives no span.

        Returns
        -------
        list[Span]
            Non-overlapping spans sorted by start, with ``text[start:end] == mention``.
        """
        if not text or self._automaton is None:
            return []
        norm, starts, ends = _normalize(text)
        candidates = []
        for last, length in self._automaton.iter(norm):
            start, end = last - length + 1, last + 1
            if start > 0 and _is_word_char(norm[start - 1]):
                continue
            if end < len(norm) and _is_word_char(norm[end]):
                continue
            candidates.append((start, end))
        candidates.sort(key=lambda se: (se[0], -se[1]))
        spans: list[Span] = []
        chosen_end = 0  # in the normalised text
        for start, end in candidates:
            if start < chosen_end:
                continue
            chosen_end = end
            o_start, o_end = starts[start], ends[end - 1]
            if spans and o_start < spans[-1].end:  # two matches inside one expanded character
                continue
            spans.append(Span(text[o_start:o_end], o_start, o_end))
        return spans


# ---------------------------------------------------------------------------- context
_SNAP = 20  # how far a window edge may move to reach whitespace


def _snap(text: str, pos: int, lo: int, hi: int) -> int:
    """``pos`` moved to the nearest word edge within ``_SNAP`` chars, staying in [lo, hi]."""
    if pos <= 0 or pos >= len(text) or text[pos - 1].isspace() or text[pos].isspace():
        return pos  # not inside a word
    for d in range(1, _SNAP + 1):
        for cand in (pos - d, pos + d):
            if lo <= cand <= hi and 0 <= cand <= len(text) and (
                    cand in (0, len(text)) or text[cand - 1].isspace() or text[cand].isspace()):
                return cand
    return pos


def context_window(text: str, start: int, end: int, chars: int = 200) -> str:
    """The text around ``text[start:end]``.

    Up to ``chars`` characters before ``start`` and after ``end``; each edge is moved (outwards
    or inwards, whichever is nearer) to a whitespace within 20 characters so no word is cut in
    half, never into the span itself. The result is stripped, always contains the span, and is
    at most ``end - start + 2 * (chars + 20)`` characters long.

    Parameters
    ----------
    text
        The whole text.
    start, end
        The span (end exclusive); clamped to the text.
    chars
        Context wanted on each side.
    """
    start = max(0, min(start, len(text)))
    end = max(start, min(end, len(text)))
    lo = max(0, start - max(chars, 0))
    hi = min(len(text), end + max(chars, 0))
    if lo < start:
        lo = _snap(text, lo, 0, start)
    if hi > end:
        hi = _snap(text, hi, end, len(text))
    return text[lo:hi].strip()
