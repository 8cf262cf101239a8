"""Alias-based mention detection: longest match, word boundaries, original offsets, filters, pickling."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pytest

from otmel.linking.mention_detection import (AliasFilter, AliasMatcher, Span, build_alias_table, context_window, normalize,
                                     normalize_with_offsets)


def _matcher(*aliases: str, **filt) -> AliasMatcher:
    return AliasMatcher({a: 1 for a in aliases}, AliasFilter(**filt))


def _mentions(matcher: AliasMatcher, text: str) -> list[str]:
    spans = matcher.find(text)
    for s in spans:
        assert text[s.start:s.end] == s.mention
    return [s.mention for s in spans]


def test_longest_match_wins_and_matches_do_not_overlap():
    m = _matcher("New York", "New York City", "York City Hall", "City Hall", "Paris")
    assert _mentions(m, "I love New York City.") == ["New York City"]
    assert _mentions(m, "New York, New York!") == ["New York", "New York"]
    # greedy from the left: "New York City" is taken first, so the overlapping "York City Hall" is
    # skipped and no shorter leftover ("City Hall" overlaps too) sneaks in
    assert _mentions(m, "From New York City Hall to Paris.") == ["New York City", "Paris"]
    assert _mentions(m, "From York City Hall to Paris.") == ["York City Hall", "Paris"]
    spans = m.find("Paris Paris")
    assert spans == [Span("Paris", 0, 5), Span("Paris", 6, 11)]


def test_matches_respect_word_boundaries():
    m = _matcher("Paris", "Ann", "York")
    assert m.find("Parisian food in Annapolis, Yorkshire and NewYork") == []
    assert _mentions(m, "Ann went to Paris.") == ["Ann", "Paris"]
    assert _mentions(m, "(Paris)-Ann/York") == ["Paris", "Ann", "York"]
    assert _mentions(m, "Paris2024 xParis Paris") == ["Paris"]  # letters and digits glue, only the last stands alone
    # a combining mark belongs to the letter before it: "stanbul" is not a word inside "İstanbul"
    assert _matcher("stanbul").find("İstanbul") == []


def test_case_and_unicode_insensitive_match_returns_original_text_and_offsets():
    m = _matcher("Robert Downey", "Straße Eins", "Café")
    text = "İstanbul, Ça va? Groß! \u00a0ROBERT \n\t  DOWNEY met at STRASSE EINS for café"
    spans = m.find(text)
    assert [s.mention for s in spans] == ["ROBERT \n\t  DOWNEY", "STRASSE EINS", "café"]
    for s in spans:
        assert text[s.start:s.end] == s.mention
    assert spans[0].start == text.index("ROBERT") and spans[0].end == text.index(" met")
    # a decomposed é (e + U+0301) matches the precomposed alias, and the span keeps the accent
    decomposed = "Un cafe\u0301 noir"
    assert _mentions(m, decomposed) == ["cafe\u0301"]
    # the alias itself may carry case, ß and odd spacing
    assert _mentions(_matcher("  NEW\tyork  "), "in new york") == ["new york"]


def test_normalize_with_offsets_maps_every_char_back():
    norm, offsets = normalize_with_offsets("  aß  B\n")
    assert norm == "ass b" and offsets == [2, 3, 3, 4, 6]
    norm, offsets = normalize_with_offsets("İx")
    assert norm == "i\u0307x" and offsets == [0, 0, 1]
    assert normalize("ＡＢＣ  Ⅻ") == "abc xii"  # NFKC: fullwidth letters, roman numeral
    assert normalize_with_offsets("") == ("", []) and normalize("   ") == "" and normalize(None) == ""
    for text in ("  New\tYORK\x1c city \r\n", "a\x0b\x0cb", "Straße  X"):  # ASCII fast path == general path
        assert normalize(text) == normalize_with_offsets(text)[0]


def test_filters_drop_and_count_short_stopword_numeric_and_ambiguous_aliases():
    m = AliasMatcher({"Al": 1, "The": 1, "Will": 3, "2024": 1, "1-800": 1, "John Smith": 21, "Rome": 20,
                      "rome": 2}, AliasFilter(max_entities_per_alias=20))
    assert m.kept == 1 and m.aliases == ("rome",)  # 'Rome' and 'rome' are one alias
    assert m.dropped == {"short": 1, "stopword": 2, "numeric": 2, "ambiguous": 1}
    assert _mentions(m, "The year 2024: Al, Will and John Smith in Rome, call 1-800") == ["Rome"]
    loose = AliasMatcher({"Al": 1, "The": 1, "2024": 1}, AliasFilter(min_length=1, stopwords=frozenset(),
                                                                      drop_numeric=False))
    assert loose.kept == 3 and sum(loose.dropped.values()) == 0
    assert _mentions(loose, "The 2024 Al") == ["The", "2024", "Al"]
    custom = AliasMatcher({"Apple": 1, "Pear": 1}, AliasFilter(stopwords=frozenset({"APPLE"})))
    assert custom.aliases == ("pear",) and custom.dropped["stopword"] == 1


def test_build_alias_table_counts_distinct_entities():
    kb = pa.table({
        "entity_id": ["Q1", "Q2", "Q3", "Q4", None],
        "name": ["Paris", "Paris Hilton", "paris", None, "Paris"],
        "aliases": pa.array([["Paris", "City of Light", "PARIS "], None, ["Paris, Texas", ""], ["City  of light"],
                             ["Paris"]], pa.list_(pa.string())),
    })
    table = build_alias_table(kb)
    assert table.schema == pa.schema([("alias", pa.string()), ("entities", pa.int32())])
    assert table.column("alias").to_pylist() == ["city of light", "paris", "paris hilton", "paris, texas"]
    assert table.column("entities").to_pylist() == [2, 2, 1, 1]  # Q1 counted once for its name and aliases
    empty = build_alias_table(kb.slice(0, 0))
    assert empty.num_rows == 0 and empty.schema == table.schema


def test_matcher_from_table_pickles_to_the_same_results():
    kb = pa.table({"entity_id": [f"Q{i}" for i in range(30)], "name": ["Smith"] * 30,
                   "aliases": [["Paris Hilton", "City of Light"]] + [None] * 29})
    m = AliasMatcher.from_table(build_alias_table(kb))
    assert m.dropped["ambiguous"] == 1  # "smith" is shared by 30 entities
    text = "Paris Hilton, Smith, visited the CITY OF LIGHT."
    again = pickle.loads(pickle.dumps(m))
    assert again.find(text) == m.find(text) == [Span("Paris Hilton", 0, 12), Span("CITY OF LIGHT", 33, 46)]
    assert again.kept == m.kept and again.dropped == m.dropped
    nothing = pickle.loads(pickle.dumps(_matcher()))
    assert nothing.kept == 0 and nothing.find("anything at all") == []


def test_find_on_empty_or_missing_text():
    m = _matcher("Paris")
    assert m.find(None) == [] and m.find("") == [] and m.find("   \n") == []


@pytest.mark.parametrize("chars", [0, 5, 30, 50])
def test_context_window_contains_the_span_and_is_bounded(chars):
    text = " ".join(f"word{i}" for i in range(300))
    start = text.index("word150")
    end = start + len("word150")
    w = context_window(text, start, end, chars=chars)
    assert "word150" in w
    assert len(w) <= (end - start) + 2 * (chars + 20)
    assert w == w.strip()
    words = w.split()
    assert all(word.startswith("word") and word[4:].isdigit() for word in words)  # no word cut in half
    if chars >= 30:
        assert len(w) >= (end - start) + 2 * (chars - 20)


def test_context_window_edges():
    assert context_window("short text", 0, 5) == "short text"
    text = "x" * 100 + " Paris " + "y" * 100  # no whitespace near the edges: a hard cut
    start = text.index("Paris")
    w = context_window(text, start, start + 5, chars=30)
    assert w == text[start - 30:start + 5 + 30].strip() and "Paris" in w
    assert context_window("Paris", 0, 5, chars=200) == "Paris"
