"""RULER-HotpotQA generation, the TFDS builders (no TensorFlow) and MemAgent rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memagent_jax.data import hotpotqa as hq
from memagent_jax.data import memagent_rows as mr
from memagent_jax.data import tfds_builders as tb

HOTPOT = Path(__file__).parent / "data" / "hotpot_dev_distractor_60.json"
ITEMS = json.loads(HOTPOT.read_text(encoding="utf-8"))
BY_ID = {it["_id"]: it for it in ITEMS}
_DOC = re.compile(r"(?:^|\n\n)Document (\d+):\n")


def n_tokens(text: str) -> int:
    """Word-level token count: words and punctuation marks."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def split_docs(context: str) -> tuple[list[int], list[str]]:
    """Document numbers and texts of a rendered context."""
    parts = _DOC.split(context)
    assert parts[0] == ""  # the context starts with "Document 1:"
    return [int(n) for n in parts[1::2]], parts[2::2]


def own_paragraphs(item: dict) -> list[str]:
    return [hq.render_paragraph(t, s) for t, s in item["context"]]


def gold_paragraphs(item: dict) -> list[str]:
    titles = {t for t, _ in item["supporting_facts"]}
    return [hq.render_paragraph(t, s) for t, s in item["context"] if t in titles]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[int, list[dict]]:
    data_dir = tmp_path_factory.mktemp("tfds")
    out = {}
    for n in (20, 40):
        path = tb.build_dataset("ruler_hotpotqa", f"n{n}", data_dir, path=str(HOTPOT))
        assert Path(path, tb.POOL_FILE).exists()
        assert any(p.name.endswith("array_record-00000-of-00001") for p in Path(path).iterdir())
        src = tb.load_dataset("ruler_hotpotqa", f"n{n}", data_dir)
        out[n] = [src[i] for i in range(len(src))]
    return out


def test_pool_paragraph_rendering():
    pool, own = hq.build_pool(ITEMS)
    title, sents = ITEMS[0]["context"][0]
    assert sents[1].startswith(" ")  # HotpotQA sentences carry their leading space
    assert pool[own[0][0]] == f"{title}\n{sents[0]}{sents[1]}" + "".join(sents[2:])
    assert len(pool) == len(set(pool)) > 500


@pytest.mark.parametrize("n", [20, 40])
def test_tfds_ruler_hotpotqa_samples(built, n):
    samples = built[n]
    assert [s["id"] for s in samples] == [it["_id"] for it in ITEMS]
    pool = set(hq.build_pool(ITEMS)[0])
    for s in samples:
        item = BY_ID[s["id"]]
        assert s["question"] == item["question"] and s["answers"] == [item["answer"]]
        assert s["num_docs"] == n
        numbers, docs = split_docs(s["context"])
        assert numbers == list(range(1, n + 1))
        assert len(docs) == n and len(set(docs)) == n  # pool is big enough: no repeats
        assert set(gold_paragraphs(item)) <= set(docs) and len(gold_paragraphs(item)) == 2
        assert set(own_paragraphs(item)) <= set(docs)
        assert set(docs) <= pool


def test_tfds_matches_direct_generation_and_seeds(built):
    direct = hq.generate(HOTPOT, 20, seed=0)
    assert [direct[i] for i in range(len(direct))] == built[20]
    again = hq.generate(str(HOTPOT), 20, seed=0)
    assert again[5] == direct[5]
    other = hq.generate(HOTPOT, 20, seed=1)
    differ = sum(other[i]["context"] != direct[i]["context"] for i in range(len(direct)))
    assert differ == len(direct)
    assert all(other[i]["answers"] == direct[i]["answers"] for i in range(len(direct)))


def test_token_length_grows_linearly(built):
    mean = {n: sum(n_tokens(s["context"]) for s in built[n]) / len(built[n]) for n in built}
    ratio = mean[40] / mean[20]
    assert 1.7 < ratio < 2.3, mean


def test_any_n_config_and_reuse_warning(tmp_path):
    path = tb.build_dataset("ruler_hotpotqa", "n200_q2", tmp_path, path=str(HOTPOT))
    assert path.endswith("n200_q2/1.0.0")
    src = tb.load_dataset("ruler_hotpotqa", "n200_q2", tmp_path)
    assert len(src) == 2
    _, docs = split_docs(src[1]["context"])
    assert len(docs) == 200 == len(set(docs))
    # 800 documents > the 592-paragraph pool of the slice: warn and reuse paragraphs evenly.
    with pytest.warns(UserWarning, match="with replacement"):
        tb.build_dataset("ruler_hotpotqa", "n800_q1", tmp_path, path=str(HOTPOT))
    s = tb.load_dataset("ruler_hotpotqa", "n800_q1", tmp_path)[0]
    numbers, docs = split_docs(s["context"])
    assert numbers == list(range(1, 801))
    assert set(gold_paragraphs(BY_ID[s["id"]])) <= set(docs)
    pool = hq.build_pool(ITEMS)[0]
    assert set(docs) == set(pool)  # every pool paragraph used (tiling), some twice
    assert max(docs.count(d) for d in set(docs)) == 2


def test_filter_fn_and_record_indices():
    pool, records = hq.make_records(ITEMS, 30, seed=3, filter_fn=lambda q: q["type"] == "bridge")
    assert len(records) == sum(it["type"] == "bridge" for it in ITEMS) < len(ITEMS)
    r = records[0]
    assert len(r["doc_indices"]) == 30 and all(0 <= j < len(pool) for j in r["doc_indices"])
    assert hq.render_sample(r, pool)["context"] == hq.render_context(r["doc_indices"], pool)
    with pytest.raises(ValueError, match="num_docs=5"):
        hq.make_records(ITEMS, 5)


def test_bad_hotpotqa_format(tmp_path):
    bad = [{k: v for k, v in ITEMS[0].items() if k != "supporting_facts"}]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))
    msg = "no key 'supporting_facts'.*distractor format"
    with pytest.raises(hq.HotpotqaFormatError, match=msg):
        hq.load_hotpotqa(p)
    with pytest.raises(hq.HotpotqaFormatError, match="supporting_facts"):
        tb.build_dataset("ruler_hotpotqa", "n20", tmp_path / "d", path=str(p))
    p.write_text(json.dumps({"data": []}))
    with pytest.raises(hq.HotpotqaFormatError, match="top level is dict"):
        hq.load_hotpotqa(p)
    with pytest.raises(FileNotFoundError, match="not prepared"):
        tb.load_dataset("ruler_hotpotqa", "n50", tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown dataset"):
        tb.build_dataset("squad", None, tmp_path)


@pytest.mark.parametrize("suffix", ["parquet", "jsonl"])
def test_memagent_rows_round_trip(tmp_path, suffix):
    samples = [hq.generate(HOTPOT, 12, seed=0, max_questions=3)[i] for i in range(3)]
    path = mr.write_rows(samples, tmp_path / f"rows.{suffix}")
    if suffix == "parquet":
        row = pq.read_table(path).to_pylist()[1]
    else:
        row = json.loads(Path(path).read_text().splitlines()[1])
    assert row["data_source"] == "hotpotqa"
    assert row["prompt"] == [{"role": "user", "content": samples[1]["question"]}]
    assert row["reward_model"] == {"ground_truth": samples[1]["answers"], "style": "rule"}
    assert row["extra_info"] == {"index": 1, "question": samples[1]["question"], "num_docs": 12}
    back = mr.read_rows(path)
    assert [dict(s, id=str(i)) for i, s in enumerate(samples)] == back
    tb.build_dataset("memagent_rows", f"mine_{suffix}", tmp_path / "tfds", path=path)
    src = tb.load_dataset("memagent_rows", f"mine_{suffix}", tmp_path / "tfds")
    assert [src[i] for i in range(len(src))] == back


def test_memagent_rows_missing_column(tmp_path):
    path = tmp_path / "bad.parquet"
    rows = [{"data_source": "hotpotqa", "reward_model": {"ground_truth": ["x"]}}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(mr.RowFormatError, match="no column 'context'"):
        mr.read_rows(path)
    jl = tmp_path / "bad.jsonl"
    jl.write_text(json.dumps({"context": "c", "reward_model": {"ground_truth": ["x"]}}) + "\n")
    with pytest.raises(mr.RowFormatError, match="extra_info.question"):
        mr.read_rows(jl)
