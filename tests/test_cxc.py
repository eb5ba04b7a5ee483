"""Tests of promcse.evaluation.cxc: the CxC layouts, and the bootstrap against the PromCSE reference's draw (CocoCXCEval)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr
from test_sts import WORDS, CountingEncoder, data_dir, fake_encode, pair_cosines, write_tsv  # noqa: F401

from promcse.evaluation import cxc, sts
from promcse.io.data import read_table
from promcse.errors import PromcseError

SHARED = Path("/work/shared/data/eval/cxc")
SID = "COCO_val2014:sentid:{}".format


def write_cxc(folder: Path, n_images: int = 12, seed: int = 5) -> dict[str, Path]:
    """Write the same synthetic CxC pairs as official CSV + COCO JSON (images listed in a shuffled order),
    PromCSE CSV and TSV, rows shuffled, plus a Karpathy-style JSON (test images + unrated train images)."""
    rng = np.random.RandomState(seed)
    annotations, captions = [], {}
    for image in range(n_images):
        for c in range(4):
            ann_id = 1000 + image * 10 + c
            text = " ".join(rng.choice(WORDS, 6)) + (",  with commas" if c == 0 else "")
            annotations.append({"id": ann_id, "image_id": 500 + image, "caption": text + " \n"})
            captions[ann_id] = " ".join(text.split())
    pairs = []
    for image in range(n_images):
        for _ in range(1 + image % 3):  # 1-3 pairs per image
            c1 = 1000 + image * 10 + int(rng.randint(4))
            c2 = 1000 + int(rng.randint(n_images)) * 10 + int(rng.randint(4))
            pairs.append((c1, c2, round(float(rng.uniform(0, 5)), 2)))
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    images = [{"id": 500 + int(i), "file_name": f"{500 + i}.jpg"} for i in rng.permutation(n_images)]
    folder.mkdir(parents=True, exist_ok=True)
    coco = {"images": images, "annotations": annotations}
    (folder / "captions_val5k.json").write_text(json.dumps(coco), encoding="utf-8")
    karpathy = [{"split": "train", "cocoid": 9, "sentences": [{"sentid": 9, "raw": "unrated"}]}]
    for entry in images:
        sentences = [{"sentid": a["id"], "raw": a["caption"]} for a in annotations if a["image_id"] == entry["id"]]
        karpathy += [{"split": "test", "cocoid": entry["id"], "sentences": sentences},
                     {"split": "train", "cocoid": entry["id"] + 1000, "sentences": []}]
    (folder / "karpathy.json").write_text(json.dumps({"images": karpathy}), encoding="utf-8")
    with (folder / "official.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["caption1", "caption2", "agg_score", "sampling_method"])
        w.writerows([SID(a), SID(b), s, "c2c_isim"] for a, b, s in pairs)
    with (folder / "promcse.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["caption1", "caption2", "agg_score", "sampling_method", "sent1", "sent2"])
        w.writerows([SID(a), SID(b), s, "c2c_isim", captions[a], captions[b]] for a, b, s in pairs)
    write_tsv(folder / "pairs.tsv", [(captions[a], captions[b], s, "x", SID(a), SID(b)) for a, b, s in pairs],
              header="sentence1\tsentence2\tscore\tsampling_method\tcaption1_id\tcaption2_id")
    return {"official": folder / "official.csv", "promcse": folder / "promcse.csv", "tsv": folder / "pairs.tsv"}


def json_image_order(path: Path) -> tuple[str, ...]:
    return tuple(str(e["id"]) for e in json.loads(path.read_text(encoding="utf-8"))["images"])


def test_cxc_formats_agree(tmp_path: Path) -> None:
    paths = write_cxc(tmp_path / "cxc")
    loaded = [cxc.load_cxc(p) for p in paths.values()]
    order = json_image_order(tmp_path / "cxc" / "captions_val5k.json")
    for other in loaded:
        assert (other.sentence1, other.sentence2, other.scores, other.groups, other.images) == (
            loaded[0].sentence1, loaded[0].sentence2, loaded[0].scores, loaded[0].groups, order)
    assert loaded[0].grouped_by == "image" and loaded[0].image_order == "json" and len(set(loaded[0].groups)) == 12
    assert list(dict.fromkeys(loaded[0].groups)) != list(order) != sorted(order)  # the three orders differ here
    assert all(s == " ".join(s.split()) for s in loaded[0].sentence1 + loaded[0].sentence2)  # JSON text collapsed
    # Karpathy's layout: captions under images[*].sentences, the test split's images in file order
    karpathy = cxc.load_cxc(paths["official"], captions=tmp_path / "cxc" / "karpathy.json")
    assert (karpathy.sentence1, karpathy.groups, karpathy.images) == (loaded[0].sentence1, loaded[0].groups, order)
    # without the JSON: official form fails, the others group by caption1 id in order of first appearance
    (tmp_path / "cxc" / "captions_val5k.json").rename(tmp_path / "elsewhere.json")
    (tmp_path / "cxc" / "karpathy.json").unlink()
    with pytest.raises(PromcseError, match="captions_val5k.json"):
        cxc.load_cxc(paths["official"])
    assert cxc.load_cxc(paths["official"], captions=tmp_path / "elsewhere.json").groups == loaded[0].groups
    fallback = cxc.load_cxc(paths["promcse"])
    assert fallback.grouped_by == "caption1" and fallback.sentence1 == loaded[0].sentence1
    assert fallback.images is None and fallback.image_order == "first appearance"


def test_cxc_bad_inputs(tmp_path: Path) -> None:
    paths = write_cxc(tmp_path / "cxc")
    text = paths["official"].read_text(encoding="utf-8").splitlines()
    text[2] = text[2].replace("COCO_val2014:sentid:", "COCO_val2014:sentid:9")
    paths["official"].write_text("\n".join(text) + "\n", encoding="utf-8")
    with pytest.raises(PromcseError, match="not found in the captions JSON") as info:
        cxc.load_cxc(paths["official"])
    assert info.value.line == 3
    bad = write_tsv(tmp_path / "bad.tsv", [("a", "b", "1", "c:1"), ("c", "d", "x", "c:2"), ("e", "f", "2", "c:3")],
                    header="sentence1\tsentence2\tscore\tcaption1")
    with pytest.raises(PromcseError, match="finite number") as info:
        cxc.load_cxc(bad)
    assert (info.value.line, info.value.column) == (3, "score")
    with pytest.raises(PromcseError, match="need columns"):
        cxc.load_cxc(write_tsv(tmp_path / "cols.tsv", [("a", "b")], header="text\tother"))


def test_cxc_image_list_errors(tmp_path: Path) -> None:
    paths = write_cxc(tmp_path / "cxc")
    karpathy = tmp_path / "cxc" / "karpathy.json"
    with pytest.raises(PromcseError, match="image list lacks .*wrong split") as info:
        cxc.load_cxc(paths["official"], captions=karpathy, split="train")  # pairs are from test images
    assert info.value.line == 2
    with pytest.raises(PromcseError, match="no images entry has split 'val'"):
        cxc.load_cxc(paths["official"], captions=karpathy, split="val")
    coco_path = tmp_path / "cxc" / "captions_val5k.json"
    coco = json.loads(coco_path.read_text(encoding="utf-8"))
    coco["images"].append({"id": 77})
    coco_path.write_text(json.dumps(coco), encoding="utf-8")
    with pytest.raises(PromcseError, match="1 image.* no scored pair, e.g. 77"):
        cxc.load_cxc(paths["tsv"])
    coco["images"][-1] = coco["images"][0]
    coco_path.write_text(json.dumps(coco), encoding="utf-8")
    with pytest.raises(PromcseError, match="names an image twice"):
        cxc.load_cxc(paths["promcse"])
    with pytest.raises(PromcseError, match="at least 4 images"):
        cxc.bootstrap_indices(["a", "b", "a", "c"])
    with pytest.raises(PromcseError, match="not among"):
        cxc.bootstrap_indices(["a", "b", "c", "d", "e"], images=["a", "b", "c", "d"])
    with pytest.raises(PromcseError, match="at least one pair"):
        cxc.bootstrap_indices(["a", "b", "c", "d"], images=["a", "b", "c", "d", "e"])


def reference_bootstrap(path: Path, images: tuple[str, ...], rounds: int) -> tuple[list[list[int]], list[float]]:
    """The reference's loop, written from its description: global np.random.seed(123), then per round
    ``np.random.choice(range(n_images), size=n_images // 2)`` and per drawn image
    ``np.random.choice(len(cxc_scores), size=1)[0]`` over that image's (caption1, caption2) pairs in file order;
    gold and the model's cosine joined on (caption1, caption2) as the reference's merge does. The cosines are
    the model's own (sts.Lookup), as the reference takes them from its batcher: recomputing them another way
    would move near-zero ties by 1e-17 and reorder ranks."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    caps = {a["id"]: a for a in json.loads((path.parent / "captions_val5k.json").read_text())["annotations"]}
    cid = [(r["caption1"], r["caption2"]) for r in rows]
    s1, s2 = [r["sent1"] for r in rows], [r["sent2"] for r in rows]
    sims = dict(zip(cid, sts.Lookup(fake_encode, s1 + s2).cosines(s1, s2)))
    gold = {key: float(r["agg_score"]) for key, r in zip(cid, rows)}
    row_of = {key: i for i, key in enumerate(cid)}
    pairs_of: dict[str, list[tuple[str, str]]] = {image: [] for image in images}
    for key in cid:
        pairs_of[str(caps[int(key[0].split(":")[-1])]["image_id"])].append(key)
    saved = np.random.get_state()
    np.random.seed(123)
    drawn, rho = [], []
    for _ in range(rounds):
        sample = np.random.choice(range(len(images)), size=len(images) // 2)
        chosen = []
        for i in sample:
            cxc_scores = pairs_of[images[i]]
            idx = np.random.choice(len(cxc_scores), size=1)[0]
            chosen.append(cxc_scores[idx])
        drawn.append([row_of[key] for key in chosen])
        rho.append(100 * spearmanr([gold[k] for k in chosen], [sims[k] for k in chosen])[0])
    np.random.set_state(saved)
    return drawn, rho


def test_bootstrap_is_the_reference_draw(tmp_path: Path) -> None:
    paths = write_cxc(tmp_path / "cxc", n_images=17)
    pairs = cxc.load_cxc(paths["promcse"])
    drawn, rho = reference_bootstrap(paths["promcse"], pairs.images, rounds=40)
    assert cxc.bootstrap_indices(pairs.groups, 40, 123, pairs.images).tolist() == drawn
    state = np.random.get_state()
    got = cxc.cxc_scores(fake_encode, pairs, rounds=40)
    assert all(np.array_equal(a, b) for a, b in zip(state, np.random.get_state()))  # global RNG untouched
    assert got["bootstrap_mean"] == pytest.approx(np.mean(rho), abs=1e-12)
    assert got["bootstrap_std"] == pytest.approx(np.std(rho), abs=1e-12)
    sims = sts.Lookup(fake_encode, pairs.sentence1 + pairs.sentence2).cosines(pairs.sentence1, pairs.sentence2)
    assert sims == pytest.approx(pair_cosines(pairs.sentence1, pairs.sentence2), abs=1e-12)
    assert got["spearman"] == pytest.approx(100 * spearmanr(sims, pairs.scores)[0], abs=1e-12)
    assert (got["n_pairs"], got["n_images"], got["image_order"], got["rounds"], got["seed"]) == (
        len(pairs.scores), 17, "json", 40, 123)
    assert got == cxc.cxc_scores(fake_encode, pairs, rounds=40)
    assert cxc.cxc_scores(fake_encode, pairs, rounds=40, seed=1) != got
    # without an image list the order of first appearance is drawn from
    first = cxc.bootstrap_indices(pairs.groups, 5)
    assert first.tolist() == cxc.bootstrap_indices(pairs.groups, 5, images=list(dict.fromkeys(pairs.groups))).tolist()


def test_evaluate_with_cxc_encodes_once(tmp_path: Path, data_dir: Path) -> None:  # noqa: F811
    paths = write_cxc(tmp_path / "cxc")
    enc = CountingEncoder()
    result = sts.evaluate(enc, "stsb", data_dir=data_dir, cxc=paths["tsv"])
    assert len(enc.calls) == 1
    assert result["cxc"] == cxc.cxc_scores(fake_encode, cxc.load_cxc(paths["tsv"]))
    assert "CxC:" in sts.format_table(result, "fake")
    assert sts.evaluate(fake_encode, "", cxc=cxc.load_cxc(paths["tsv"]))["cxc"] == result["cxc"]


def test_read_table_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text('a,b\n1,"x\n\n2,3\n', encoding="utf-8")
    with pytest.raises(PromcseError, match="malformed row"):
        read_table(path)
    path.write_text("a,b\n1,2\n\n3\n", encoding="utf-8")
    with pytest.raises(PromcseError, match="1 fields, but the header has 2") as info:
        read_table(path)
    assert info.value.line == 4
    path.write_text(" a ,b\r\n1,\"x,y\"\r\n", encoding="utf-8")
    assert read_table(path) == (["a", "b"], [(2, {"a": "1", "b": "x,y"})])
    tsv = write_tsv(tmp_path / "t.tsv", [('"q', "2")], header="a\tb")
    assert read_table(tsv) == (["a", "b"], [(2, {"a": '"q', "b": "2"})])


@pytest.mark.skipif(not (SHARED / "captions_val5k.json").is_file(), reason="shared CxC validation data not here")
def test_shared_validation_files_agree() -> None:
    loaded = [cxc.load_cxc(SHARED / name) for name in ("sts_val.csv", "cxc-sts-val.csv", "cxc_sts_val.tsv")]
    order = json_image_order(SHARED / "captions_val5k.json")
    for pairs in loaded:
        assert (len(pairs.scores), pairs.images, pairs.grouped_by) == (44009, order, "image")
        assert (pairs.sentence1, pairs.sentence2, pairs.groups) == (
            loaded[0].sentence1, loaded[0].sentence2, loaded[0].groups)
