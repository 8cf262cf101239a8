"""Alias-based mention detection: longest match, word boundaries, original offsets, filters."""

from __future__ import annotations

import pickle

import pyarrow as pa

from otmel.mention_detection import AliasFilter, AliasMatcher, build_alias_table, context_window, normalize_with_offsets


def _matcher(*aliases, **filt):
    return AliasMatcher({a: 1 for a in aliases}, AliasFilter(**filt))


def test_longest_non_overlapping_match_wins():
    m = _matcher("New York", "New York City", "York City Hall", "Paris")
    text = "From New York City Hall to Paris."
    spans = m.find(text)
    # the longest of the overlapping candidates wins: "York City Hall" (14) > "New York City" (13)
    assert [s.mention for s in spans] == ["York City Hall", "Paris"]
    assert [s.mention for s in m.find("I love New York City.")] == ["New York City"]
    assert [s.mention for s in m.find("New York, New York!")] == ["New York", "New York"]


def test_matches_respect_word_boundaries():
    m = _matcher("Paris", "ann")
    assert m.find("Parisian food in Annapolis") == []
    assert [s.mention for s in m.find("Ann went to Paris.")] == ["Ann", "Paris"]


def test_offsets_point_into_the_original_text_after_unicode_and_space_folding():
    m = _matcher("Robert Downey", "Straße Eins")
    text = "İstanbul, Ça va?  ROBERT \n\t DOWNEY met at STRASSE EINS"
    spans = m.find(text)
    assert [s.mention for s in spans] == ["ROBERT \n\t DOWNEY", "STRASSE EINS"]
    for s in spans:
        assert text[s.start:s.end] == s.mention
    norm, offsets = normalize_with_offsets("aß  B")
    assert norm == "ass b" and offsets == [0, 1, 1, 2, 4]


def test_filters_drop_short_stopword_numeric_and_ambiguous_aliases():
    m = AliasMatcher({"Al": 1, "The": 1, "2024": 1, "John Smith": 50, "Rome": 2}, AliasFilter(max_entities_per_alias=20))
    assert m.kept == 1 and m.dropped == {"short": 1, "stopword": 1, "numeric": 1, "ambiguous": 1}
    assert [s.mention for s in m.find("The year 2024: Al and John Smith in Rome")] == ["Rome"]


def test_alias_table_counts_distinct_entities_and_matcher_pickles():
    kb = pa.table({"entity_id": ["Q1", "Q2", "Q3"], "name": ["Paris", "Paris Hilton", "paris"],
                   "aliases": [["Paris", "City of Light"], None, ["Paris, Texas"]]})
    table = build_alias_table(kb)
    counts = dict(zip(table.column("alias").to_pylist(), table.column("entities").to_pylist()))
    assert counts == {"paris": 2, "city of light": 1, "paris hilton": 1, "paris, texas": 1}
    m = AliasMatcher.from_table(table)
    text = "Paris Hilton visited the City of Light, not Paris, Texas."
    again = pickle.loads(pickle.dumps(m))
    assert again.find(text) == m.find(text)
    assert [s.mention for s in m.find(text)] == ["Paris Hilton", "City of Light", "Paris, Texas"]


def test_context_window_contains_the_span_and_is_bounded():
    text = " ".join(f"word{i}" for i in range(300))
    start = text.index("word150")
    end = start + len("word150")
    w = context_window(text, start, end, chars=50)
    assert "word150" in w and len(w) <= 50 * 2 + 7
    assert not w.startswith("ord") and w.split()[0].startswith("word")
    assert context_window("short text", 0, 5) == "short text"
    assert _matcher("x" * 5).find(None) == [] and _matcher().find("anything") == []
