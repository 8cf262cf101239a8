"""Training pairs: every skipped row is counted with its reason (synth/schema/image tests: test_synth, test_schemas)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from otmel.data.synth import write_synthetic_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    report = write_synthetic_dataset(out, n_entities=200, n_mentions=1000, seed=3)
    kb = pq.read_table(out / "kb.parquet")
    mentions = pa.concat_tables([pq.read_table(out / "mentions" / f"{s}.parquet") for s in ("train", "dev", "test")])
    return out, report, kb, mentions


def test_training_pairs_count_every_skip(synth):
    from otmel.data.pairs import PairDataset

    from conftest import make_model

    _, _, kb, mentions = synth
    m = mentions.slice(0, 20)
    gold = m.column("gold_entity_id").to_pylist()
    gold[0], gold[1] = "Q_unknown", None
    text = m.column("mention").to_pylist()
    text[2] = " "
    m = m.set_column(m.schema.get_field_index("gold_entity_id"), "gold_entity_id", pa.array(gold, pa.string()))
    m = m.set_column(m.schema.get_field_index("mention"), "mention", pa.array(text, pa.string()))
    _, pre = make_model("att")
    pairs = PairDataset(m, kb, pre)
    assert len(pairs) == 17
    assert dict(pairs.skipped) == {"unknown_gold_entity_id": 1, "no_gold_entity_id": 1, "empty_mention": 1}
    batch = pairs.batch(np.arange(4))
    assert batch.mention_inputs["input_ids"].shape[0] == 4 and len(batch.entity_ids) == 4
