"""Crisscrossed Captions (CxC) STS as PromCSE reports it: reading the pairs, and the reference's bootstrap.

The bootstrap draws exactly what SentEval's ``CocoCXCEval`` in the PromCSE repository draws
(``SentEval/senteval/sts.py``). :func:`promcse.evaluation.sts.evaluate` calls into this module for ``cxc=``.
See docs/EVALUATION.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from promcse.io.data import read_table, read_text
from promcse.errors import PromcseError
from promcse.evaluation.scoring import EncodeFn, Lookup, spearman

ROUNDS = 1000  # the reference's B
SEED = 123  # the reference's np.random.seed(123)
SPLIT = "test"  # the reference draws the captions JSON's images with split == "test"


@dataclass(frozen=True)
class CxcPairs:
    """CxC caption pairs, gold scores (0-5), and each pair's group: the COCO image of caption1
    (``grouped_by="image"``), else the caption1 id (``"caption1"``) or text (``"sentence1"``).

    ``images`` is the bootstrap's image list in draw order: the captions JSON's ``images`` entries (those of
    the split, when the entries carry a ``split``), in file order; None: the groups in order of first
    appearance (no JSON, or a JSON without an ``images`` list).
    """

    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]
    groups: list[str]
    grouped_by: str
    source: str
    images: tuple[str, ...] | None = None

    @property
    def image_order(self) -> str:
        """Where the draw order comes from: ``"json"`` or ``"first appearance"``."""
        return "first appearance" if self.images is None else "json"


_CAPTION_ID = re.compile(r"^(?:.*:)?(\d+)$")  # "COCO_val2014:sentid:N" or plain N
Captions = dict[int, tuple[str, str]]  # caption id -> (caption text, image id)


def _image_id(entry: dict[str, Any]) -> str:
    """An ``images`` entry's COCO image id: ``id`` (COCO layout) or ``cocoid`` (Karpathy's dataset_coco.json)."""
    return str(entry["id"] if "id" in entry else entry["cocoid"])


def _parse_captions(data: Any, split: str) -> tuple[Captions, tuple[str, ...] | None]:
    """Captions (``annotations[*]``, else Karpathy's ``images[*].sentences[*]``), whitespace collapsed as in
    PromCSE's CSV, and the image list (entries of ``split`` when they carry one; None without ``images``)."""
    entries = data.get("images") or []
    if "annotations" in data:
        caps = {int(a["id"]): (" ".join(str(a["caption"]).split()), str(a["image_id"])) for a in data["annotations"]}
    else:
        caps = {int(s["sentid"]): (" ".join(str(s["raw"]).split()), _image_id(e)) for e in entries
                for s in e["sentences"]}
    if any("split" in e for e in entries):
        entries = [e for e in entries if e.get("split") == split]
        if not entries:
            raise ValueError(f"no images entry has split {split!r}")
    return caps, (tuple(_image_id(e) for e in entries) if entries else None)


def _read_captions(path: Path, captions: str | Path | None, split: str) -> tuple[Captions, tuple[str, ...] | None]:
    """The COCO captions JSON (``captions``, else ``captions_val5k.json``, ``captions*.json`` or
    ``dataset_coco*.json`` beside ``path``) as :func:`_parse_captions`; ({}, None) when there is none."""
    beside = {*path.parent.glob("captions*.json"), *path.parent.glob("dataset_coco*.json")}
    found = [Path(captions)] if captions else sorted(beside, key=lambda q: (q.name != "captions_val5k.json", q.name))
    if not found:
        return {}, None
    try:  # json.JSONDecodeError is a ValueError
        caps, images = _parse_captions(json.loads(read_text(found[0])), split)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        message = ("not COCO caption JSON (need annotations[*].id, image_id, caption, or Karpathy's "
                   f"images[*].cocoid, sentences[*].sentid, raw): {err!r}")
        raise PromcseError(message, path=found[0], key="annotations") from None
    if images is not None and len(set(images)) != len(images):
        raise PromcseError("the images list names an image twice", path=found[0], key="images")
    return caps, images


def _caption(path: Path, line: int, column: str, value: str, caps: Captions) -> tuple[str, str]:
    """(text, image id) of a caption id."""
    match = _CAPTION_ID.match(value.strip())
    if match is None or int(match.group(1)) not in caps:
        what = "not a COCO caption id" if match is None else "caption id not found in the captions JSON"
        raise PromcseError(f"{what}: {value!r}", path=path, line=line, column=column)
    return caps[int(match.group(1))]


def _columns(path: Path, header: list[str]) -> tuple[str, str, str, str]:
    """(sentence1 column, sentence2 column, score column, caption1-id column); "" where the layout has none."""
    cols = set(header)
    id_col = next((c for c in ("caption1", "caption1_id") if c in cols), "")
    if {"sentence1", "sentence2", "score"} <= cols:
        return "sentence1", "sentence2", "score", id_col
    if {"caption1", "caption2", "agg_score"} <= cols:
        return ("sent1", "sent2", "agg_score", id_col) if {"sent1", "sent2"} <= cols else ("", "", "agg_score", id_col)
    found = ", ".join(header) or "none"
    raise PromcseError(f"need columns sentence1,sentence2,score or caption1,caption2,agg_score; found {found}",
                       path=path, line=1)


def _score(path: Path, line: int, column: str, value: str) -> float | None:
    """A gold score; None for an empty field (no gold: dropped, as for STS)."""
    if not value.strip():
        return None
    try:
        score = float(value)
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        raise PromcseError(f"score is not a finite number: {value!r}", path=path, line=line, column=column)
    return score


def _check_images(path: Path, images: tuple[str, ...], groups: list[str], lines: list[int]) -> None:
    """Every pair's image is in the image list, and every listed image has a pair (the reference draws each)."""
    listed = set(images)
    for group, line in zip(groups, lines):
        if group not in listed:
            raise PromcseError(f"caption1 is from image {group}, which the captions JSON's image list lacks "
                               "(wrong split?)", path=path, line=line, column="caption1")
    empty = listed.difference(groups)
    if empty:
        raise PromcseError(f"{len(empty)} image(s) of the captions JSON have no scored pair, e.g. {min(empty)}; "
                           "the bootstrap draws every listed image", path=path)


def load_cxc(path: str | Path, captions: str | Path | None = None, split: str = SPLIT) -> CxcPairs:
    """Read CxC STS pairs: the official ``caption1,caption2,agg_score,...`` CSV (ids ``COCO_val2014:sentid:N``;
    text and image from the captions JSON: ``captions``, else one beside the file, see :func:`_read_captions`),
    PromCSE's CSV (the same plus ``sent1,sent2``), or a TSV ``sentence1, sentence2, score`` (+ ``caption1`` or
    ``caption1_id``). Pairs are grouped by caption1's image when the JSON is there, else by the caption1 id
    (or sentence1). The JSON's ``images`` list (entries with ``split == split`` when they carry a split) is the
    bootstrap's image order; without one, images are taken in order of first appearance.

    Raises:
        PromcseError: Missing columns or JSON, unknown caption ids, bad scores, < 3 pairs, pairs outside the
            JSON's image list or listed images without pairs (file, line named).
    """
    p = Path(path)
    header, rows = read_table(p)
    t1, t2, score_col, id_col = _columns(p, header)
    caps, images = _read_captions(p, captions, split) if id_col else ({}, None)
    if not t1 and not caps:
        raise PromcseError("captions are given by id only: put captions_val5k.json beside the file or pass it", path=p)
    out: tuple[list[Any], ...] = ([], [], [], [], [])
    for line, row in rows:
        score = _score(p, line, score_col, row[score_col])
        if score is None:
            continue
        image = _caption(p, line, id_col, row[id_col], caps)[1] if caps else ""
        out[0].append(row[t1] if t1 else _caption(p, line, "caption1", row["caption1"], caps)[0])
        out[1].append(row[t2] if t2 else _caption(p, line, "caption2", row["caption2"], caps)[0])
        out[2].append(score)
        out[3].append(image or (row[id_col].strip() if id_col else out[0][-1]))
        out[4].append(line)
    if len(out[2]) < 3:
        raise PromcseError(f"only {len(out[2])} scored pair(s); at least 3 are needed", path=p)
    if images is not None:
        _check_images(p, images, out[3], out[4])
    grouped_by = "image" if caps else ("caption1" if id_col else "sentence1")
    return CxcPairs(out[0], out[1], out[2], out[3], grouped_by, str(p), images)


def bootstrap_indices(groups: Sequence[str], rounds: int = ROUNDS, seed: int = SEED,
                      images: Sequence[str] | None = None) -> np.ndarray:
    """Pair indices per bootstrap round, shape ``(rounds, n_images // 2)``, drawn as the PromCSE reference does.

    ``images`` is the draw order (None: the groups in order of first appearance); an image's pairs are the
    indices with its group, in order. The reference seeds once, ``np.random.seed(seed)``, then per round draws
    ``sample = np.random.choice(range(n_images), size=n_images // 2)`` and, for each ``i`` of ``sample`` in
    turn, ``np.random.choice(len(pairs_of[i]), size=1)[0]``.
    """
    order = list(dict.fromkeys(groups)) if images is None else list(images)
    members: dict[str, list[int]] = {key: [] for key in order}
    for i, group in enumerate(groups):
        if group not in members:
            raise PromcseError(f"pair {i} belongs to {group!r}, which is not among the bootstrap's images")
        members[group].append(i)
    k = len(order) // 2
    if k < 2:
        raise PromcseError(f"the CxC bootstrap needs at least 4 images (groups); got {len(order)}")
    if any(not m for m in members.values()):
        raise PromcseError("every image the CxC bootstrap draws from needs at least one pair")
    counts = np.array([len(members[key]) for key in order], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))
    flat = np.array([i for key in order for i in members[key]], dtype=np.int64)
    # A private RandomState(seed) gives the same stream as seeding the legacy global one, without touching
    # global state. rng.randint(0, counts[sample]) draws element by element, each exactly as one
    # choice(count, size=1)[0] (same bounded draw; count 1 consumes nothing), so a round is the reference's
    # call sequence; tests/test_cxc.py checks the indices against the reference's loop.
    rng = np.random.RandomState(seed)
    idx = np.empty((rounds, k), dtype=np.int64)
    for r in range(rounds):
        sample = rng.choice(range(len(order)), size=k)
        idx[r] = flat[offsets[sample] + rng.randint(0, counts[sample])]
    return idx


def rowwise_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman ×100 of each row of x against the same row of y: Pearson of average ranks."""
    rx, ry = (r - r.mean(axis=1, keepdims=True) for r in (stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * np.sum(rx * ry, axis=1) / np.sqrt(np.sum(rx * rx, axis=1) * np.sum(ry * ry, axis=1))


def cxc_scores(encode_fn: EncodeFn, pairs: CxcPairs, rounds: int = ROUNDS, seed: int = SEED) -> dict[str, Any]:
    """CxC as PromCSE reports it: Spearman ×100 over all pairs, and the bootstrap mean ± std (``np.std``,
    ddof=0) over ``rounds`` rounds of half the images drawn with replacement, one random pair each
    (:func:`bootstrap_indices`)."""
    lookup = Lookup(encode_fn, pairs.sentence1 + pairs.sentence2)
    sims = lookup.cosines(pairs.sentence1, pairs.sentence2)
    gold = np.asarray(pairs.scores, dtype=np.float64)
    idx = bootstrap_indices(pairs.groups, rounds, seed, pairs.images)
    rho = rowwise_spearman(sims[idx], gold[idx])
    return {"spearman": spearman(sims, gold), "bootstrap_mean": float(np.mean(rho)),
            "bootstrap_std": float(np.std(rho)), "n_pairs": len(gold), "n_images": len(set(pairs.groups)),
            "grouped_by": pairs.grouped_by, "image_order": pairs.image_order, "rounds": rounds, "seed": seed}
