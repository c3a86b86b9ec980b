"""Episode sampler (HSNet protocol) and manifest, on the synthetic lists of
samples/fewshot-mini and on hand-made COCO-20i pickles."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from text2mask.errors import DatasetError, InputError
from text2mask.fewshot.episodes import (
    BENCHMARKS, make_manifest, read_lists, read_manifest, test_episodes as sample_test_episodes, write_manifest,
)
from text2mask.runs import select

REPO = Path(__file__).resolve().parent.parent
VOC = REPO / "samples" / "voc-mini" / "VOC2012"
LISTS = REPO / "samples" / "fewshot-mini" / "pascal5i"
PASCAL, COCO = BENCHMARKS["pascal5i"], BENCHMARKS["coco20i"]


def test_fold_class_lists():
    assert [PASCAL.test_classes(f) for f in range(4)] == [tuple(range(5 * f + 1, 5 * f + 6)) for f in range(4)]
    assert PASCAL.train_classes(1) == (1, 2, 3, 4, 5, *range(11, 21))
    # COCO-20i interleaved: 0-based class c is tested in fold c mod 4
    assert COCO.test_classes(0) == tuple(range(1, 81, 4)) and COCO.test_classes(3) == tuple(range(4, 81, 4))
    for f in range(4):
        assert len(COCO.test_classes(f)) == 20 and len(COCO.train_classes(f)) == 60
        assert set(COCO.test_classes(f)) | set(COCO.train_classes(f)) == set(range(1, 81))
    assert sorted(c for f in range(4) for c in COCO.test_classes(f)) == list(range(1, 81))
    with pytest.raises(DatasetError, match="unknown fold 4"):
        PASCAL.test_classes(4)


def _hsnet_pascal(pairs, shots, count):
    """HSNet's DatasetPASCAL.sample_episode over idx = 0..count-1, with the global NumPy
    generator seeded with 0 (an independent transcription of the protocol)."""
    classwise = {}
    for name, c in pairs:
        classwise.setdefault(c, []).append(name)
    np.random.seed(0)
    out = []
    for idx in range(count):
        query, c = pairs[idx % len(pairs)]
        sup = []
        while True:
            s = np.random.choice(classwise[c], 1, replace=False)[0]
            if query != s:
                sup.append(s)
            if len(sup) == shots:
                break
        out.append((c, query, tuple(sup)))
    return out


@pytest.mark.parametrize("fold, shots", [(1, 1), (2, 5)])
def test_pascal_episodes_follow_hsnet_and_never_use_the_query(fold, shots):
    lists = read_lists(PASCAL, LISTS, "val", fold)
    eps = sample_test_episodes(PASCAL, lists, fold, shots, count=40)
    assert [(e.cls, e.query, e.supports) for e in eps] == _hsnet_pascal(list(lists.pairs), shots, 40)
    for e in eps:
        assert e.query not in e.supports and len(e.supports) == shots
        assert e.cls in PASCAL.test_classes(fold)
    # queries walk the list in order
    assert [e.query for e in eps[:5]] == [n for n, _ in lists.pairs]


def _coco_lists(tmp_path, fold):
    table = {c - 1: [f"val2014/COCO_val2014_{c:04d}{i:08d}.jpg" for i in range(2 + c % 3)]
             for c in COCO.test_classes(fold)}
    (tmp_path / "val").mkdir(exist_ok=True)
    with open(tmp_path / "val" / f"fold{fold}.pkl", "wb") as f:
        pickle.dump(table, f)
    return table


def test_coco_episodes_class_then_query_then_supports(tmp_path):
    table = _coco_lists(tmp_path, 2)
    lists = read_lists(COCO, tmp_path, "val", 2)
    eps = sample_test_episodes(COCO, lists, 2, 2, count=30)
    np.random.seed(0)
    class_ids = [c - 1 for c in COCO.test_classes(2)]
    for e in eps:
        c = np.random.choice(class_ids, 1, replace=False)[0]
        q = np.random.choice(table[c], 1, replace=False)[0]
        sup = []
        while len(sup) < 2:
            s = np.random.choice(table[c], 1, replace=False)[0]
            if s != q:
                sup.append(s)
        assert (e.cls, e.query, list(e.supports)) == (c + 1, q, sup)


def test_episodes_are_deterministic():
    lists = read_lists(PASCAL, LISTS, "val", 2)
    a = sample_test_episodes(PASCAL, lists, 2, 3, count=25)
    b = sample_test_episodes(PASCAL, lists, 2, 3, count=25)
    assert a == b
    assert sample_test_episodes(PASCAL, lists, 2, 3, count=25, seed=1) != a


def test_manifest_round_trip(tmp_path):
    m = make_manifest(PASCAL, VOC, LISTS, fold=1, shots=2, count=12)
    assert m.protocol["standard"] is False and m.protocol["test_classes"] == [6, 7, 8, 9, 10]
    path = tmp_path / "episodes.jsonl"
    write_manifest(path, m)
    back = read_manifest(path)
    assert back == m
    lines = path.read_text().splitlines()
    assert len(lines) == 13 and json.loads(lines[1]) == {"id": "0000", "class": 8, "query": "2007_000549",
                                                        "supports": ["2007_001825", "2007_001825"]}


def test_shard_split_partitions_the_episodes(tmp_path):
    m = make_manifest(PASCAL, VOC, LISTS, fold=2, shots=1, count=50)
    shards = [select(m.episodes, None, (i, 3)) for i in range(3)]
    ids = [e.id for s in shards for e in s]
    assert sorted(ids) == sorted(e.id for e in m.episodes) and len(set(ids)) == 50
    assert all(shards)


def test_missing_lists_are_named(tmp_path):
    with pytest.raises(DatasetError, match=r"missing list file\(s\) .*val/fold0.txt.*does not ship"):
        make_manifest(PASCAL, VOC, tmp_path, fold=0, shots=1)
    with pytest.raises(DatasetError, match=r"fold0.pkl"):
        read_lists(COCO, tmp_path, "val", 0)


def test_bad_lists_and_manifests(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "fold0.txt").write_text("2007_000032__01\n2007_000033__01\n2007_000129__02\n")
    with pytest.raises(DatasetError, match="class 2 has 1 distinct image"):
        make_manifest(PASCAL, VOC, tmp_path, fold=0, shots=1)
    (tmp_path / "val" / "fold0.txt").write_text("2007_000032__08\n")
    with pytest.raises(DatasetError, match=r"classes \[8\] are not test classes of fold 0"):
        make_manifest(PASCAL, VOC, tmp_path, fold=0, shots=1)
    (tmp_path / "val" / "fold0.txt").write_text("2007_000032-1\n")
    with pytest.raises(DatasetError, match="fold0.txt:1: expected"):
        make_manifest(PASCAL, VOC, tmp_path, fold=0, shots=1)
    with pytest.raises(DatasetError, match="list is empty"):
        make_manifest(PASCAL, VOC, LISTS, fold=3, shots=1)
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"id": "0"}\n')
    with pytest.raises(InputError, match="protocol header"):
        read_manifest(bad)
    with pytest.raises(InputError, match="not found"):
        read_manifest(tmp_path / "none.jsonl")


def test_missing_image_named(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "fold0.txt").write_text("2007_000032__01\n2009_999999__01\n")
    with pytest.raises(DatasetError, match="2009_999999.jpg"):
        make_manifest(PASCAL, VOC, tmp_path, fold=0, shots=1)
