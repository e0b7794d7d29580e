"""Data: text stages, packing, shards, the resumable reader, and the preprocessing pipeline run on
a real local Ray instance."""

from __future__ import annotations

import itertools
import json
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from corpus import write_corpus

from pipeline.config import DataNode, SourceNode
from pipeline.data import text as stages
from pipeline.data.reader import ShardReader
from pipeline.data.reading import read_block
from pipeline.data.shards import (
    FORMAT_VERSION,
    PAD_DOC,
    pack_documents,
    pack_pairs,
    read_manifest,
    write_json,
    write_shards,
)
from pipeline.data.sources import demo_documents, demo_pairs, load_source
from pipeline.errors import DataError

# ------------------------------------------------------------------ text stages


def test_normalize_text():
    raw = "Cafe\u0301\x07  au\tlait \r\n\r\n\r\n\n  next\u00a0line  "
    assert stages.normalize_text(raw) == "Caf\u00e9 au lait\n\nnext line"


def test_normalize_skips_the_space_regex_only_where_it_changes_nothing():
    def reference(text: str) -> str:  # every step applied, no shortcut
        text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
        text = stages._SPACES.sub(" ", stages._CONTROL.sub("", text))
        text = "\n".join(line.strip() for line in text.split("\n"))
        return stages._BLANK_LINES.sub("\n\n", text).strip()

    rng = random.Random(0)
    pieces = [" ", "  ", "\t", "\n", "\r\n", "word", "b.", "\u00a0", "\u3000", "\x07", "e\u0301"]
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 16)))
        assert stages.normalize_text(text) == reference(text), repr(text)


def test_filter_reasons():
    assert stages.filter_reason("", 1, None) == "empty"
    assert stages.filter_reason("abc", 5, None) == "too_short"
    assert stages.filter_reason("abcdef", 1, 4) == "too_long"
    assert stages.filter_reason("abcd", 2, 10) == ""


def test_split_is_a_function_of_content_only():
    docs = [f"document number {i}" for i in range(2000)]
    hashes = [stages.content_hash(d) for d in docs]
    val = {d for d, h in zip(docs, hashes, strict=True) if stages.is_validation(h, 0.1)}
    assert 120 < len(val) < 280  # about 10%
    more = docs + [f"a new document {i}" for i in range(500)]
    val_more = {d for d in more if stages.is_validation(stages.content_hash(d), 0.1)}
    assert val <= val_more and not (val_more - val) & set(docs)  # old documents stay put


# ------------------------------------------------------------------ packing


def test_packing_keeps_every_token_once_in_order_with_document_ids():
    rng = random.Random(0)
    docs = [(i, [rng.randrange(3, 500) for _ in range(rng.randrange(1, 40))]) for i in range(50)]
    eod, pad, block = 1, 2, 17
    packed = pack_documents(docs, block, eod, pad)
    tokens, ids = packed[:, 0].reshape(-1), packed[:, 1].reshape(-1)
    real = ids != PAD_DOC
    expected = np.concatenate([np.array([*toks, eod]) for _, toks in docs])
    assert np.array_equal(tokens[real], expected)  # every token once, in order
    assert (tokens[~real] == pad).all() and real[: real.sum()].all()  # padding only at the end
    # document ids change exactly after end-of-document tokens
    changes = np.nonzero(np.diff(ids[real].astype(np.int64)))[0]
    eods = np.nonzero(tokens[real] == eod)[0]
    assert np.array_equal(changes, eods[:-1])
    assert packed.shape == (-(-len(expected) // block), 2, block)


def test_blocks_are_cut_by_content_and_a_stream_is_cut_alike():
    import pyarrow as pa

    from pipeline.data.blocks import cut, row_bytes, stream_blocks

    rng = random.Random(1)
    texts = ["é" * rng.randrange(0, 60) for _ in range(300)]  # 2 UTF-8 bytes a character
    table = pa.table({"text": texts})
    sizes = row_bytes(table)
    assert sizes.tolist() == [len(t.encode()) for t in texts]
    bounds = cut(sizes, 500)
    assert bounds[0] == 0 and bounds[-1] == len(texts)
    for a, b in itertools.pairwise(bounds):  # a block closes at the row that reaches 500
        assert sizes[a : b - 1].sum() < 500
        assert sizes[a:b].sum() >= 500 or b == len(texts)
    batches = ({"text": texts[i : i + 7]} for i in range(0, len(texts), 7))
    streamed = [t.column("text").to_pylist() for t in stream_blocks(batches, 500)]
    assert streamed == [texts[a:b] for a, b in itertools.pairwise(bounds)]


def test_a_blocks_shards_pack_each_split_and_copy_of_its_kept_documents(tmp_path):
    """Pass 2 of one block: the kept documents of each split, once per copy their source's
    weight gives them, packed as `pack_documents` packs them and cut into shards named
    from (split, copy, source, block, k); the counts match the shards."""
    import pyarrow as pa

    from pipeline.data.blocks import write_block

    rng = random.Random(2)
    docs = [[rng.randrange(3, 500) for _ in range(rng.randrange(1, 60))] for _ in range(80)]
    hashes = [stages.content_hash(f"document {i}") for i in range(80)]
    encoded = pa.table(
        {
            "hash": hashes,
            "ids": pa.array(docs, pa.list_(pa.uint32())),
            "bytes": [3 * len(d) for d in docs],
        }
    )
    keep = np.array([i % 9 != 4 for i in range(80)])
    pack = {"paired": False, "block": 17, "samples_per_shard": 5, "eod": 1, "pad": 2}
    out = write_block(encoded, keep, 1000, 3, 12, 1.5, 0.2, str(tmp_path), pack)
    for split in ("train", "val"):
        rows = [
            i
            for i in range(80)
            if keep[i] and stages.is_validation(hashes[i], 0.2) == (split == "val")
        ]
        again = [i for i in rows if stages.hash_below(hashes[i], 0.5, salt=1)]
        records = [r for r in out["shards"] if r["split"] == split]
        for copy, chosen in ((0, rows), (1, again)):
            mine = [r for r in records if r["copy"] == copy]
            assert [r["file"] for r in mine] == [
                f"{split}/shard-c{copy:03d}-s003-b0000012-{k:04d}.npy" for k in range(len(mine))
            ]
            got = np.concatenate([np.load(tmp_path / r["file"]) for r in mine])
            expected = pack_documents([(1000 + i, docs[i]) for i in chosen], 17, 1, 2)
            assert np.array_equal(got, expected)
        counts = out["counts"][split]
        both = rows + again
        assert counts["documents"] == len(both) and 0 < len(again) < len(rows)
        assert counts["predicted_tokens"] == sum(len(docs[i]) + 1 for i in both)
        assert counts["bytes"] == sum(3 * len(docs[i]) for i in both)
    assert out["counts"]["tokens"] == sum(len(docs[i]) for i in range(80) if keep[i])


def test_long_documents_continue_into_the_next_block():
    packed = pack_documents([(7, list(range(3, 40)))], 10, eod=1, pad=2)
    assert packed.shape[0] == 4 and (packed[:3, 1] == 7).all()


def test_pack_pairs_truncates_and_groups_by_length():
    pairs = [(0, [5] * 9, [6] * 3), (1, [5] * 2, [6] * 8), (2, [5] * 5, [6] * 5)]
    rows = pack_pairs(pairs, max_source=6, max_target=4, eod=1, pad=2, bos=3)
    assert rows.shape == (3, 2, 11)
    # truncated lengths (source + EOD, BOS + target + EOD): (6, 5), (3, 5), (6, 5)
    assert rows[:, 1, 0].tolist() == [1, 0, 2]  # shortest first, ties in their order
    first = rows[0, 0]
    assert first[:3].tolist() == [5, 5, 1] and first[3:6].tolist() == [2, 2, 2]
    assert first[6:11].tolist() == [3, 6, 6, 6, 1]  # BOS, target cut to 3, EOD


# ------------------------------------------------------------------ shards and reader


def make_output(tmp_path: Path, n_samples: int = 23, per_shard: int = 5) -> Path:
    samples = np.arange(n_samples * 2 * 4, dtype=np.uint32).reshape(n_samples, 2, 4)
    shards = write_shards(tmp_path, "train", samples, per_shard)
    write_json(
        tmp_path / "manifest.json",
        {
            "format_version": FORMAT_VERSION,
            "splits": {"train": {"samples": n_samples, "shards": shards}},
        },
    )
    return tmp_path


def test_reader_resumes_at_the_exact_sample(tmp_path):
    out = make_output(tmp_path)
    full = ShardReader(out, seed=3)
    reference = [full.next_batch(4) for _ in range(12)]  # crosses epochs (23 samples)
    resumed = ShardReader(out, seed=3)
    for _ in range(5):
        resumed.next_batch(4)
    state = json.loads(json.dumps(resumed.state_dict()))  # survives a checkpoint
    again = ShardReader(out, seed=3)
    again.load_state_dict(state)
    for step in range(5, 12):
        assert np.array_equal(again.next_batch(4), reference[step])


def test_reader_resume_across_a_world_size_change(tmp_path):
    out = make_output(tmp_path)
    single = ShardReader(out, seed=1)
    order = [single.next_batch(6) for _ in range(6)]  # global batch 6 per step
    # steps 0-2 on 2 ranks (3 each), then steps 3-5 on 3 ranks (2 each)
    ranks = [ShardReader(out, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in range(3):
        got = [r.next_batch(3) for r in ranks]
        assert sorted(map(bytes, np.concatenate(got))) == sorted(map(bytes, order[step]))
    state = ranks[0].state_dict()
    ranks = [ShardReader(out, seed=1, rank=r, world_size=3) for r in range(3)]
    for r in ranks:
        r.load_state_dict(state)
    for step in range(3, 6):
        got = np.concatenate([r.next_batch(2) for r in ranks])
        assert sorted(map(bytes, got)) == sorted(map(bytes, order[step]))


def test_reader_rejects_corrupt_or_truncated_shards(tmp_path):
    out = make_output(tmp_path)
    shard = out / "train" / "shard-00002.npy"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"shard-00002\.npy: shard is corrupt or truncated"):
        ShardReader(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt manifest"):
        read_manifest(out)


def test_shards_are_written_atomically(tmp_path):
    make_output(tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))


# ------------------------------------------------------------------ sources


def test_demo_corpus_is_real_text_shipped_offline():
    docs = demo_documents()
    assert len(docs) > 700 and sum(map(len, docs)) > 4_000_000
    assert any("To be, or not to be" in d for d in docs)
    src, tgt = demo_pairs()[0]
    assert src and tgt and src != tgt


def test_demo_plays_are_whole_plays_their_scenes_in_order():
    scenes, plays = demo_documents(), demo_documents("plays")
    assert len(plays) == 38 and 80_000 < min(map(len, plays)) < max(map(len, plays)) < 200_000
    hamlet = next(p for p in plays if p.startswith("Hamlet"))
    at = [hamlet.index(s) for s in scenes if s in hamlet]  # every scene of it, in order
    assert len(at) > 15 and at == sorted(at)
    assert sum(map(len, plays)) - sum(map(len, scenes)) < 40 * 2_000  # titles, prologues, joins
    dataset = load_source(SourceNode(kind="demo", documents="plays"))
    assert dataset.num_rows == 38 and dataset[0]["text"] == plays[0]


def test_missing_file_and_missing_column(tmp_path):
    with pytest.raises(DataError, match=r"nothing-here/\*\.txt: no such file"):
        load_source(SourceNode(kind="files", path=str(tmp_path / "nothing-here/*.txt")))
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "a", "title": "b"}\n')
    with pytest.raises(DataError, match="no column 'text'; columns are: body, title"):
        load_source(SourceNode(kind="files", path=str(path)))
    assert load_source(SourceNode(kind="files", path=str(path), text_column="body"))[0] == {
        "text": "a"
    }


def listed(*paths: Path) -> list:
    """Local files as `source_files` lists them."""
    from pipeline.data.reading import SourceFile

    return [SourceFile(str(p), p.stat().st_size) for p in paths]


def test_the_worker_reader_checks_columns_as_the_driver_does(tmp_path):
    from pipeline.data.reading import plan_blocks

    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "a", "title": "b"}\n')
    found = listed(path)
    with pytest.raises(DataError, match="no column 'text'; columns are: body, title"):
        plan_blocks(SourceNode(kind="files", path=str(path)), found, False, 1 << 20)
    with pytest.raises(DataError, match=r"paired data needs data\.sources"):
        plan_blocks(SourceNode(kind="files", path=str(path), text_column="body"), found, True, 99)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    (block,) = plan_blocks(SourceNode(kind="files", path=str(bad)), listed(bad), False, 99)
    with pytest.raises(DataError, match=r"bad.jsonl: cannot read as json: line at byte 17"):
        read_block(block)
    csv = tmp_path / "a.csv"
    csv.write_text("text\nhello\n")  # read on the driver: a quoted field may hold a newline
    assert plan_blocks(SourceNode(kind="files", path=str(csv)), listed(csv), False, 9) is None


@pytest.mark.parametrize("limit", [1, 7, 64, 1000, 1 << 20])
def test_worker_blocks_of_json_lines_parquet_and_text_hold_every_row_once(tmp_path, limit):
    """A source's blocks, cut from file sizes and metadata alone, read back every row once
    and in order, whatever the block size: a JSON-lines range holds the lines that start
    in it; parquet blocks are runs of row groups; text blocks runs of whole files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.reading import plan_blocks

    rng = random.Random(limit)
    rows = [{"t": "é" * rng.randrange(0, 30) + f" {i}", "n": i} for i in range(120)]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" * (1 + (i % 3 == 0))
                             for i, r in enumerate(rows)))  # fmt: skip
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=9)
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, r in enumerate(rows[:40]):
        (texts / f"{i:03d}.txt").write_text(r["t"])
    for path, found, expected in (
        (jsonl, listed(jsonl), [r["t"] for r in rows]),
        (parquet, listed(parquet), [r["t"] for r in rows]),
        (texts, listed(*sorted(texts.iterdir())), [r["t"] for r in rows[:40]]),
    ):
        source = SourceNode(
            kind="files", path=str(path), text_column="text" if path == texts else "t"
        )
        plan = plan_blocks(source, found, False, limit)
        read = [t for block in plan for t in read_block(block)[0].column("text").to_pylist()]
        assert read == expected, path.name
        if limit == 1 << 20:
            assert len(plan) == 1
        elif limit == 1:  # a block a JSON line at most (a byte), a row group, a file
            assert len(plan) >= {jsonl: 120, parquet: 14, texts: 40}[path]


@pytest.mark.parametrize("chunk", [1, 2, 5, 64])
def test_ranged_line_reads_give_each_line_once_to_the_range_it_starts_in(chunk):
    """The JSON-lines block reader reads by ranges (a bucket object as a local file): for
    every cut of a file into ranges, each line comes once, from the range holding its first
    byte, with its offset, whatever the read size."""
    import io

    from pipeline.data.reading import _lines

    data = b"ab\n\ncdef\ng\n\n\nhij"  # empty lines, and no newline at the end
    starts = [0] + [i + 1 for i, c in enumerate(data) if c == ord("\n")]
    expected = [(a, data[a:b]) for a, b in zip(starts, [*starts[1:], len(data)], strict=True)]
    for cut in range(len(data) + 2):
        got = list(_lines(io.BytesIO(data), 0, cut, chunk)) + list(
            _lines(io.BytesIO(data), cut, None, chunk)
        )
        assert got == expected, cut


def test_worker_read_sources_give_the_driver_readers_tokenizer_and_counts(
    ray_local, tmp_path, monkeypatch
):
    """The same files read by workers (a block each here) or through Hugging Face
    `datasets` on the driver: the same tokenizer, counts and shards."""
    import pipeline.data.preprocess as prep
    from pipeline.data import reading

    write_corpus(tmp_path / "a", n=40)
    other = tmp_path / "b.jsonl"
    other.write_text(
        "".join(json.dumps({"text": f"text {i} " * (i % 5 + 1)}) + "\n" for i in range(90))
    )
    node = DataNode(
        sources=[
            SourceNode(kind="files", path=str(tmp_path / "a" / "*.txt")),
            SourceNode(kind="files", path=str(other), weight=1.5),
        ],
        seq_len=32,
        min_chars=5,
    )
    workers = prep.preprocess(node, tmp_path / "w", vocab_size=300, progress=lambda m: None)
    monkeypatch.setattr(reading, "plan_blocks", lambda *a, **k: None)  # all on the driver
    driver = prep.preprocess(node, tmp_path / "d", vocab_size=300, progress=lambda m: None)
    assert workers["tokenizer_sha256"] == driver["tokenizer_sha256"]
    assert workers["counts"] == driver["counts"] and workers["splits"] == driver["splits"]
    # the text no longer passes through the driver (what stays: the tokenizer, keep masks)
    text = sum(p.stat().st_size for p in (tmp_path / "a").glob("*.txt"))
    text += sum(len(json.loads(line)["text"]) for line in other.read_text().splitlines())
    assert workers["driver"]["input_bytes_out"] == 0
    assert driver["driver"]["input_bytes_out"] >= text


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"good text \xff\xfe more")
    ds = load_source(SourceNode(kind="files", path=str(tmp_path / "*.txt")))
    assert ds[0]["text"] == "good text \ufffd\ufffd more"
    from pipeline.data.sources import invalid_utf8_replaced

    assert invalid_utf8_replaced(ds) == 2


# ------------------------------------------------------------------ the pipeline on Ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipeline.runtime import stop_local_ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    stop_local_ray()


def run(ray_local, tmp_path, glob, out, parallelism, **data):
    from pipeline.data.preprocess import preprocess

    node = DataNode(
        sources=[SourceNode(kind="files", path=glob)],
        **{"seq_len": 32, "min_chars": 5, "samples_per_shard": 16, "val_fraction": 0.1, **data},
    )
    return preprocess(node, out, vocab_size=300, parallelism=parallelism, progress=lambda m: None)


def test_pipeline_is_deterministic_and_counts_what_it_drops(ray_local, tmp_path, monkeypatch):
    import pipeline.data.preprocess as prep

    monkeypatch.setattr(prep, "BLOCK_BYTES", 3000)  # many blocks, in flight on both CPUs
    glob = write_corpus(tmp_path / "corpus")
    a = run(ray_local, tmp_path, glob, tmp_path / "out1", parallelism=1)
    b = run(ray_local, tmp_path, glob, tmp_path / "out2", parallelism=2)
    assert a["driver"]["blocks"] == b["driver"]["blocks"] > 10

    def shards(manifest):
        return [
            (s["file"], s["sha256"])
            for split in manifest["splits"].values()
            for s in split["shards"]
        ]

    assert shards(a) == shards(b) and a["tokenizer_sha256"] == b["tokenizer_sha256"]
    counts = a["counts"]
    assert counts["documents_in"] == 123
    # doc0003 and dup.txt share their content; docs i and i + 100 differ in their bodies
    assert counts["dropped"] == {"empty": 1, "too_short": 1, "too_long": 0, "duplicate": 1}
    assert counts["documents_out"] == 120
    assert a["splits"]["train"]["documents"] + a["splits"]["val"]["documents"] == 120
    reader = ShardReader(tmp_path / "out1", seed=0)
    sample = reader.next_batch(2)
    assert sample.shape == (2, 2, 33)
    # a cache hit the second time
    assert run(ray_local, tmp_path, glob, tmp_path / "out1", parallelism=2)["cache_hit"]


def eod_document_ids(out: Path, split: str) -> list[int]:
    """The document id at each end-of-document token of a split, in order: one per copy."""
    manifest = read_manifest(out)
    eod = manifest["special_ids"]["eod"]
    ids: list[int] = []
    for entry in manifest["splits"][split]["shards"]:
        arr = np.load(out / entry["file"])
        ids += arr[:, 1][arr[:, 0] == eod].tolist()
    return ids


def test_sources_blend_by_weight(ray_local, tmp_path, monkeypatch):
    import pipeline.data.preprocess as prep
    from pipeline.data.preprocess import preprocess

    monkeypatch.setattr(prep, "BLOCK_BYTES", 1500)  # each source cut into several blocks

    write_corpus(tmp_path / "a", n=60)  # 63 documents: 60 kept, then empty, short, duplicate
    other = tmp_path / "b.jsonl"
    other.write_text(
        "".join(json.dumps({"text": f"another text, number {i}"}) + "\n" for i in range(200))
    )
    node = DataNode(
        sources=[
            SourceNode(kind="files", path=str(tmp_path / "a" / "*.txt"), weight=2.0),
            SourceNode(kind="files", path=str(other), weight=0.5),
        ],
        seq_len=32,
        min_chars=5,
        val_fraction=0.01,
    )
    manifest = preprocess(node, tmp_path / "out", vocab_size=300, progress=lambda m: None)
    order = eod_document_ids(tmp_path / "out", "train") + eod_document_ids(tmp_path / "out", "val")
    a_docs = sorted({d for d in order if d < 63})
    b_docs = sorted({d for d in order if d >= 63})
    assert len(a_docs) == 60 and all(order.count(d) == 2 for d in a_docs)  # two passes
    assert 70 < len(b_docs) < 130 and all(order.count(d) == 1 for d in b_docs)  # about half
    train = eod_document_ids(tmp_path / "out", "train")
    first = train[: len(train) - sum(1 for d in train if d < 63) // 2]
    assert first == sorted(first) and train[len(first) :] == [d for d in first if d < 63]
    assert manifest["splits"]["train"]["documents"] == len(train)
    # bits per byte's counts: every copy's tokens and end token, as the shards hold them,
    # and its UTF-8 bytes (a's documents twice)
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        held = sum(
            int((np.load(tmp_path / "out" / s["file"])[:, 1] != PAD_DOC).sum())
            for s in entry["shards"]
        )
        assert entry["predicted_tokens"] == held
    docs = sorted((tmp_path / "a").glob("doc*.txt"))  # ids 0-59; 60-62 dropped; b from 63
    texts = [stages.normalize_text(p.read_text()) for p in docs]
    texts += [f"another text, number {i}" for i in range(200)]
    size = sum(len(texts[d if d < 60 else d - 3].encode()) for d in order)  # each copy
    assert sum(manifest["splits"][s]["bytes"] for s in ("train", "val")) == size
    # the same data again, blended the same way
    again = preprocess(node, tmp_path / "again", vocab_size=300, progress=lambda m: None)
    assert again["splits"] == manifest["splits"]


def test_a_streamed_source_gives_the_same_shards(ray_local, tmp_path, monkeypatch):
    """A source read on the driver (csv here) is cut the same way read whole or streamed."""
    import pipeline.data.preprocess as prep

    monkeypatch.setattr(prep, "BLOCK_BYTES", 2000)  # many blocks, more than are ahead at once
    path = tmp_path / "c.csv"
    rows = [f"text number {i} " * (i % 7 + 1) for i in range(400)] + ["x"]
    path.write_text("body\n" + "".join(r + "\n" for r in rows))
    manifests = [
        prep.preprocess(
            DataNode(
                sources=[SourceNode(kind="files", path=str(path), text_column="body", streaming=s)],
                seq_len=32,
                samples_per_shard=16,
                min_chars=2,
            ),
            tmp_path / f"out-{s}",
            vocab_size=300,
            progress=lambda m: None,
        )
        for s in (False, True)
    ]
    assert manifests[0]["splits"] == manifests[1]["splits"]
    assert manifests[1]["counts"]["documents_in"] == 401
    assert manifests[1]["counts"]["dropped"]["too_short"] == 1
    assert manifests[0]["driver"]["blocks"] > 10


def test_pipeline_on_paired_demo_style_data(ray_local, tmp_path):
    from pipeline.data.preprocess import preprocess

    path = tmp_path / "pairs.jsonl"
    pairs = demo_pairs()[:300]
    path.write_text("".join(json.dumps({"src": s, "tgt": t}) + "\n" for s, t in pairs))
    node = DataNode(
        sources=[SourceNode(kind="files", path=str(path), text_column="src", target_column="tgt")],
        seq_len=32,
        max_source_len=24,
        max_target_len=24,
        samples_per_shard=64,
    )
    manifest = preprocess(
        node,
        tmp_path / "paired",
        vocab_size=400,
        paired=True,
        parallelism=2,
        progress=lambda m: None,
    )
    assert manifest["paired"] and manifest["max_source_len"] == 24
    rows = ShardReader(tmp_path / "paired", shuffle=False).next_batch(3)
    assert rows.shape == (3, 2, 49)


def test_empty_corpus_after_filtering_is_an_error(ray_local, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="empty after filtering: empty=0, too_short=1"):
        run(ray_local, tmp_path, str(tmp_path / "c" / "*.txt"), tmp_path / "o", parallelism=1)
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert not list((tmp_path / "o").iterdir())  # nothing half-written


def test_a_failed_run_leaves_the_previous_output_complete(ray_local, tmp_path):
    glob = write_corpus(tmp_path / "corpus", n=30)
    first = run(ray_local, tmp_path, glob, tmp_path / "out", parallelism=2)
    with pytest.raises(DataError, match="empty after filtering"):
        run(ray_local, tmp_path, glob, tmp_path / "out", parallelism=2, min_chars=10**6)
    assert read_manifest(tmp_path / "out")["fingerprint"] == first["fingerprint"]
    assert ShardReader(tmp_path / "out", seed=0).next_batch(2).shape == (2, 2, 33)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json",
        "tokenizer.json",
        "train",
        "val",
    ]


def test_attnpipe_run_preprocesses_logs_to_mlflow_and_then_hits_the_cache(tmp_path):
    import subprocess
    import sys

    import mlflow

    glob = write_corpus(tmp_path / "corpus", n=40)
    cmd = [
        str(Path(sys.executable).parent / "attnpipe"),
        "run",
        "jobs/preprocess-demo.yaml",
        f"storage.work_dir={tmp_path / 'work'}",
        "data.sources.0.kind=files",
        f"data.sources.0.path={glob}",
        "data.tokenizer.vocab_size=300",
        "data.seq_len=64",
        "data.min_chars=5",
    ]
    root = Path(__file__).resolve().parent.parent
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads(first.stdout)
    assert summary["cache_hit"] is False and summary["documents"] == 40
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600)
    assert second.returncode == 0 and json.loads(second.stdout)["cache_hit"] is True
    manifest = read_manifest(summary["out_dir"])
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["documents_out"] == 40
    assert run.data.metrics["tokens"] == manifest["counts"]["tokens"]
    assert run.data.params["data.seq_len"] == "64"
    dataset = run.inputs.dataset_inputs[0].dataset
    assert dataset.digest == manifest["fingerprint"][:36]


def test_attnpipe_run_refuses_an_evaluate_job_without_models():
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "attnpipe"),
            "run",
            "jobs/decoder-tiny.yaml",
            "job.kind=evaluate",
        ],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "evaluate.models: an evaluate job needs at least one model" in result.stderr
