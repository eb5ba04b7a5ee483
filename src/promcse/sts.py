"""STS evaluation as SimCSE/PromCSE report it (SentEval protocol), alignment/uniformity, and CxC.

Works with any encoder (:data:`EncodeFn`); every distinct sentence is encoded once. See docs/EVALUATION.md.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from promcse.data import StsPairs, read_sts_tsv, read_text
from promcse.errors import PromcseError
from promcse.plots import format_table  # noqa: F401  (re-exported; text and figure reports live in plots)

EncodeFn = Callable[[list[str]], np.ndarray]  # texts -> (len(texts), dim), e.g. SentenceTransformer.encode


@dataclass(frozen=True)
class TaskSpec:
    """A task's folder under ``<data_dir>/tsv/<text>/``, report name, and sub-file stems (None: all, sorted)."""

    folder: str
    report: str
    files: tuple[str, ...] | None


TASKS: dict[str, TaskSpec] = {
    "sts12": TaskSpec("STS12", "STS12", None),
    "sts13": TaskSpec("STS13", "STS13", None),
    "sts14": TaskSpec("STS14", "STS14", None),
    "sts15": TaskSpec("STS15", "STS15", None),
    "sts16": TaskSpec("STS16", "STS16", None),
    "stsb": TaskSpec("STSBenchmark", "STSBenchmark", ("test",)),
    "sickr": TaskSpec("SICK", "SICK-R", ("test",)),
    "stsb-dev": TaskSpec("STSBenchmark", "STSBenchmark-dev", ("dev",)),
}
STANDARD_TASKS: tuple[str, ...] = ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr")
ALIASES: dict[str, str] = {"sts-b": "stsb", "stsbenchmark": "stsb", "sick-r": "sickr", "sick": "sickr"}
TEXT_VARIANTS: tuple[str, ...] = ("original", "senteval")
DATA_ENV = "PROMCSE_DATA_DIR"
BUNDLED_DIR = Path(__file__).parent / "resources" / "data" / "sts"
POSITIVE_THRESHOLD = 4.0  # SimCSE: STS-B pairs with gold > 4 are the positives for alignment


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """Turn ``"all"`` (the 7 test tasks), ``"sts12,stsb,..."`` or a list into :data:`TASKS` keys, deduplicated.

    Raises:
        PromcseError: An unknown task (with a "did you mean") or no task at all.
    """
    out: list[str] = []
    for raw in spec.split(",") if isinstance(spec, str) else spec:
        name = raw.strip().lower()
        names = STANDARD_TASKS if name == "all" else [_canonical_task(name)] if name else []
        out += [n for n in names if n not in out]
    if not out:
        raise PromcseError(f"no STS task given; use 'all' or a comma-separated list of: {', '.join(TASKS)}")
    return out


def _canonical_task(name: str) -> str:
    name = ALIASES.get(name, name)
    if name in TASKS:
        return name
    hint = "".join(f" (did you mean '{c}'?)" for c in difflib.get_close_matches(name, [*TASKS, *ALIASES, "all"], n=1))
    raise PromcseError(f"unknown STS task '{name}'{hint}; valid tasks: all, {', '.join(TASKS)}")


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The STS data directory: the argument, else ``$PROMCSE_DATA_DIR``, else None (bundled STS-B only).

    Raises:
        PromcseError: The chosen directory does not exist.
    """
    given, source = (data_dir, "argument") if data_dir not in (None, "") else (os.environ.get(DATA_ENV), DATA_ENV)
    if given and not Path(given).expanduser().is_dir():
        raise PromcseError(f"STS data directory not found (given by {source})", path=given)
    return Path(given).expanduser() if given else None


def task_files(task: str, data_dir: Path | None, text: str = "original") -> list[Path]:
    """Paths of the files a task reads: ``<data_dir>/tsv/<text>/<folder>/<sub>.tsv`` or the bundled STS-B.

    Raises:
        PromcseError: Data not bundled and no data dir, or a missing folder or sub-file (the path is named).
    """
    spec = TASKS[_canonical_task(task)]
    if data_dir is None:
        if spec.files is None or spec.folder != "STSBenchmark" or text != "original":
            need = f"task '{task}'" + (f" with text '{text}'" if text != "original" else "")
            raise PromcseError(f"{need} needs the STS data (only original STS-B is bundled): "
                               f"pass --data-dir or set {DATA_ENV}")
        return [BUNDLED_DIR / f"{stem}.tsv" for stem in spec.files]
    folder = data_dir / "tsv" / text / spec.folder
    if not folder.is_dir():
        raise PromcseError(f"folder of task '{task}' not found (layout: <data_dir>/tsv/{text}/<TASK>)", path=folder)
    files = sorted(folder.glob("*.tsv")) if spec.files is None else [folder / f"{s}.tsv" for s in spec.files]
    for path in files or [folder / "*.tsv"]:
        if not path.is_file():
            raise PromcseError(f"sub-file of task '{task}' not found", path=path)
    return files


def _extra_files(paths: Sequence[str | Path], taken: set[str]) -> list[StsPairs]:
    """Read ``--tsv`` files, reported by stem (``parent/stem`` when the stem is already taken)."""
    out: list[StsPairs] = []
    for raw in paths:
        pairs, path = read_sts_tsv(raw), Path(raw)
        name = pairs.name if pairs.name not in taken else f"{path.parent.name}/{path.stem}"
        if name in taken:
            raise PromcseError(f"two evaluated files would both be reported as '{name}'; rename one", path=path)
        taken.add(name)
        out.append(StsPairs(name, pairs.sentence1, pairs.sentence2, pairs.scores))
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class _Lookup:
    """Unit embeddings of distinct texts, by text: one ``encode_fn`` call (or chunks of ``batch_texts``)."""

    def __init__(self, encode_fn: EncodeFn, texts: list[str], batch_texts: int | None = None) -> None:
        self.unique = list(dict.fromkeys(texts))
        self.index = {t: i for i, t in enumerate(self.unique)}
        step = batch_texts or max(len(self.unique), 1)
        chunks = [np.asarray(encode_fn(self.unique[i : i + step])) for i in range(0, len(self.unique), step)]
        emb = np.concatenate(chunks)
        if emb.ndim != 2 or emb.shape[0] != len(self.unique) or not np.all(np.isfinite(emb)):
            raise PromcseError(f"encoder returned {emb.shape} for {len(self.unique)} texts; want (n, dim), finite")
        self.emb = _unit(emb)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.emb[np.fromiter((self.index[t] for t in texts), dtype=np.int64, count=len(texts))]

    def cosines(self, s1: list[str], s2: list[str]) -> np.ndarray:
        return np.sum(self(s1) * self(s2), axis=1)


def spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    """Spearman correlation ×100 (NaN, with scipy's warning, when either side is constant)."""
    return float(stats.spearmanr(pred, gold).statistic * 100.0)


def _score_task(files: list[StsPairs], lookup: _Lookup, grouped: bool) -> dict[str, Any]:
    """One task's numbers: "spearman" over all files concatenated, plus "wmean"/"subsets" when grouped."""
    sims = [lookup.cosines(f.sentence1, f.sentence2) for f in files]
    golds = [np.asarray(f.scores, dtype=np.float64) for f in files]
    out: dict[str, Any] = {"spearman": spearman(np.concatenate(sims), np.concatenate(golds))}
    if grouped:
        subsets = {f.name: spearman(s, g) for f, s, g in zip(files, sims, golds)}
        out["wmean"] = float(np.average(list(subsets.values()), weights=[len(f) for f in files]))
        out["subsets"] = subsets
    out["n"] = sum(len(f) for f in files)
    return out


def alignment(a: np.ndarray, b: np.ndarray) -> float:
    """Alignment (Wang & Isola 2020): mean ``||f(x) - f(y)||²`` over positive pairs (rows of a, b; L2-normalised)."""
    a, b = _unit(a), _unit(b)
    if len(a) == 0 or a.shape != b.shape:
        raise PromcseError(f"alignment needs two equal, non-empty sets of embeddings; got {a.shape} and {b.shape}")
    return float(np.mean(np.sum((a - b) ** 2, axis=1)))


def uniformity(x: np.ndarray, block: int = 2048) -> float:
    """Uniformity (Wang & Isola 2020): ``log mean_{i<j} exp(-2 ||f(x_i) - f(x_j)||²)`` on L2-normalised rows.

    Uses ``||u - v||² = 2 - 2 u·v``; the mean over i<j equals that over i≠j (symmetry); row blocks bound memory.
    """
    x, n = _unit(x), len(x)
    if n < 2:
        raise PromcseError(f"uniformity needs at least 2 embeddings; got {n}")
    total = 0.0
    for start in range(0, n, block):
        e = np.exp(-2.0 * np.clip(2.0 - 2.0 * (x[start : start + block] @ x.T), 0.0, None))
        e[np.arange(len(e)), start + np.arange(len(e))] = 0.0  # drop i == j
        total += float(e.sum())
    return math.log(total / (n * (n - 1)))


def _align_uniform(pairs: StsPairs, lookup: _Lookup) -> dict[str, float]:
    """Alignment over pairs with gold > 4 and uniformity over all distinct sentences of STS-B test."""
    pos = [i for i, s in enumerate(pairs.scores) if s > POSITIVE_THRESHOLD]
    out = {"uniformity": uniformity(lookup(list(dict.fromkeys(pairs.sentence1 + pairs.sentence2))))}
    if pos:  # tiny files without positives: alignment is undefined, so omitted
        out["alignment"] = alignment(lookup([pairs.sentence1[i] for i in pos]),
                                     lookup([pairs.sentence2[i] for i in pos]))
    return out


def evaluate(
    encode_fn: EncodeFn,
    tasks: str | Sequence[str] = "all",
    data_dir: str | Path | None = None,
    text: str = "original",
    tsv_files: Sequence[str | Path] = (),
    cxc: str | Path | CxcPairs | None = None,
    alignment_uniformity: bool = True,
    batch_texts: int | None = None,
) -> dict[str, Any]:
    """Evaluate an encoder on STS tasks, extra STS files and optionally CxC.

    Args:
        encode_fn: Texts -> embeddings; called once on all distinct sentences (or in ``batch_texts`` chunks).
        tasks: ``"all"``, ``"sts12,stsb"``, a list of names, or empty (only ``tsv_files``/``cxc``).
        data_dir: Root holding ``tsv/<text>/<TASK>/*.tsv``; None: ``$PROMCSE_DATA_DIR``, else bundled STS-B.
        text: ``"original"`` (untokenised) or ``"senteval"`` (as SentEval feeds it).
        tsv_files: Extra ``sentence1<TAB>sentence2<TAB>score`` files, reported by file stem.
        cxc: A CxC file (see :func:`load_cxc`) or loaded :class:`CxcPairs`.
        alignment_uniformity: Add "alignment"/"uniformity" (only when "stsb" is among the tasks).
        batch_texts: At most this many texts per ``encode_fn`` call; None: one call.

    Returns:
        ``{"text", "tasks": {name: {"spearman", ["wmean", "subsets"], "n"}}, "avg", ["alignment",
        "uniformity"], ["cxc"]}``; ``avg`` is None when no standard task was selected.

    Raises:
        PromcseError: Unknown task or text variant, missing data, or a malformed file.
    """
    if text not in TEXT_VARIANTS:
        raise PromcseError(f"unknown text variant '{text}'; use one of: {', '.join(TEXT_VARIANTS)}")
    names = parse_tasks(tasks) if tasks else []
    if not names and not tsv_files and cxc is None:
        raise PromcseError("nothing to evaluate: give STS tasks, --tsv files or a CxC file")
    root = resolve_data_dir(data_dir) if names else None
    sets = {TASKS[t].report: [read_sts_tsv(p) for p in task_files(t, root, text)] for t in names}
    extra = _extra_files(tsv_files, set(sets))
    cxc_pairs = load_cxc(cxc) if isinstance(cxc, (str, Path)) else cxc
    texts = [s for files in [*sets.values(), extra] for f in files for s in (*f.sentence1, *f.sentence2)]
    texts += cxc_pairs.sentence1 + cxc_pairs.sentence2 if cxc_pairs else []
    lookup = _Lookup(encode_fn, texts, batch_texts)
    result: dict[str, Any] = {"text": text, "tasks": {}}
    for t in names:
        result["tasks"][TASKS[t].report] = _score_task(sets[TASKS[t].report], lookup, TASKS[t].files is None)
    for f in extra:
        result["tasks"][f.name] = _score_task([f], lookup, grouped=False)
    standard = [result["tasks"][TASKS[t].report]["spearman"] for t in STANDARD_TASKS if t in names]
    result["avg"] = float(np.mean(standard)) if standard else None
    if alignment_uniformity and "stsb" in names:
        result.update(_align_uniform(sets[TASKS["stsb"].report][0], lookup))
    if cxc_pairs is not None:
        result["cxc"] = cxc_scores(lookup, cxc_pairs)
    return result


@dataclass(frozen=True)
class CxcPairs:
    """CxC caption pairs, gold scores (0-5), and each pair's group: the COCO image of caption1
    (``grouped_by="image"``), else the caption1 id (``"caption1"``) or text (``"sentence1"``)."""

    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]
    groups: list[str]
    grouped_by: str
    source: str


_CAPTION_ID = re.compile(r"^(?:.*:)?(\d+)$")  # "COCO_val2014:sentid:N" or plain N
Captions = dict[int, tuple[str, str]]  # annotation id -> (caption text, image id)


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Rows of a quoted CSV (``.csv``) or an unquoted TSV (otherwise) as (line, {column: value})."""
    tsv = path.suffix.lower() != ".csv"
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL, strict=True)
    try:
        records = [(reader.line_num, fields) for fields in reader if fields]
    except csv.Error as err:
        raise PromcseError(f"malformed row: {err}", path=path, line=reader.line_num) from None
    header = [h.strip() for h in records[0][1]] if records else []
    for line, fields in records[1:]:
        if len(fields) != len(header):
            raise PromcseError(f"{len(fields)} fields, but the header has {len(header)}", path=path, line=line)
    return header, [(line, dict(zip(header, fields))) for line, fields in records[1:]]


def _read_captions(path: Path, captions: str | Path | None) -> Captions | None:
    """COCO captions (``captions``, else ``captions_val5k.json``/``captions*.json`` beside ``path``), whitespace
    collapsed as in PromCSE's CSV; None when there is no such file."""
    found = [Path(captions)] if captions else sorted(path.parent.glob("captions*.json"),
                                                     key=lambda q: q.name != "captions_val5k.json")
    if not found:
        return None
    try:  # json.JSONDecodeError is a ValueError
        annotations = json.loads(read_text(found[0]))["annotations"]
        return {int(a["id"]): (" ".join(str(a["caption"]).split()), str(a["image_id"])) for a in annotations}
    except (KeyError, TypeError, ValueError) as err:
        message = f"not COCO caption JSON (need annotations[*].id, image_id, caption): {err!r}"
        raise PromcseError(message, path=found[0], key="annotations") from None


def _caption(path: Path, line: int, column: str, value: str, caps: Captions | None) -> tuple[str, str]:
    """(text, image id) of a caption id."""
    match = _CAPTION_ID.match(value.strip())
    if match is None or caps is None or int(match.group(1)) not in caps:
        what = "not a COCO caption id" if match is None else "caption id not found in the captions JSON"
        raise PromcseError(f"{what}: {value!r}", path=path, line=line, column=column)
    return caps[int(match.group(1))]


def load_cxc(path: str | Path, captions: str | Path | None = None) -> CxcPairs:
    """Read CxC STS pairs: the official ``caption1,caption2,agg_score,...`` CSV (ids ``COCO_val2014:sentid:N``;
    text and image from the COCO captions JSON: ``captions``, else ``captions_val5k.json``/``captions*.json``
    beside the file), PromCSE's CSV (the same plus ``sent1,sent2``), or a TSV ``sentence1, sentence2, score``
    (+ ``caption1``/``caption1_id``). Pairs are grouped by caption1's image when the JSON is there, else by
    the caption1 id (or sentence1).

    Raises:
        PromcseError: Missing columns or JSON, unknown caption ids, bad scores, < 3 pairs (file, line named).
    """
    p = Path(path)
    header, rows = _read_table(p)
    cols = set(header)
    if {"sentence1", "sentence2", "score"} <= cols:
        t1, t2, score_col = "sentence1", "sentence2", "score"
    elif {"caption1", "caption2", "agg_score"} <= cols:
        t1, t2, score_col = ("sent1", "sent2", "agg_score") if {"sent1", "sent2"} <= cols else ("", "", "agg_score")
    else:
        found = ", ".join(header) or "none"
        raise PromcseError(f"need columns sentence1,sentence2,score or caption1,caption2,agg_score; found {found}",
                           path=p, line=1)
    id_col = next((c for c in ("caption1", "caption1_id") if c in cols), "")
    caps = _read_captions(p, captions) if id_col else None
    if not t1 and caps is None:
        raise PromcseError("captions are given by id only: put captions_val5k.json beside the file or pass it", path=p)
    out: tuple[list[Any], ...] = ([], [], [], [])
    for line, row in rows:
        if not row[score_col].strip():
            continue  # no gold: dropped, as for STS
        try:
            score = float(row[score_col])
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise PromcseError(f"score is not a finite number: {row[score_col]!r}", path=p, line=line, column=score_col)
        image = _caption(p, line, id_col, row[id_col], caps)[1] if caps is not None else ""
        out[0].append(row[t1] if t1 else _caption(p, line, "caption1", row["caption1"], caps)[0])
        out[1].append(row[t2] if t2 else _caption(p, line, "caption2", row["caption2"], caps)[0])
        out[2].append(score)
        out[3].append(image or (row[id_col].strip() if id_col else out[0][-1]))
    if len(out[2]) < 3:
        raise PromcseError(f"only {len(out[2])} scored pair(s); at least 3 are needed", path=p)
    grouped_by = "image" if caps is not None else ("caption1" if id_col else "sentence1")
    return CxcPairs(out[0], out[1], out[2], out[3], grouped_by, str(p))


def bootstrap_indices(groups: Sequence[str], rounds: int = 1000, seed: int = 123) -> np.ndarray:
    """Pair indices per bootstrap round, shape ``(rounds, k = n_images // 2)``. Images sorted by key, pairs in
    file order; with ``rng = RandomState(seed)``, each round draws ``img = rng.randint(0, n_images, k)`` then
    ``u = rng.random_sample(k)`` and takes pair ``floor(u * count[img])`` of each drawn image."""
    keys, inverse = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(keys))
    offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))
    k = len(keys) // 2
    if k < 2:
        raise PromcseError(f"the CxC bootstrap needs at least 4 images (groups); got {len(keys)}")
    rng = np.random.RandomState(seed)
    idx = np.empty((rounds, k), dtype=np.int64)
    for r in range(rounds):
        img = rng.randint(0, len(keys), size=k)
        idx[r] = order[offsets[img] + (rng.random_sample(k) * counts[img]).astype(np.int64)]
    return idx


def rowwise_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman ×100 of each row of x against the same row of y: Pearson of average ranks."""
    rx, ry = (r - r.mean(axis=1, keepdims=True) for r in (stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * np.sum(rx * ry, axis=1) / np.sqrt(np.sum(rx * rx, axis=1) * np.sum(ry * ry, axis=1))


def cxc_scores(encode_fn: EncodeFn, pairs: CxcPairs, rounds: int = 1000, seed: int = 123) -> dict[str, Any]:
    """CxC as PromCSE reports it: Spearman ×100 over all pairs, and the bootstrap mean ± std (ddof=0) over
    ``rounds`` rounds of half the images drawn with replacement, one random pair each (:func:`bootstrap_indices`)."""
    lookup = _Lookup(encode_fn, pairs.sentence1 + pairs.sentence2)
    sims = lookup.cosines(pairs.sentence1, pairs.sentence2)
    gold = np.asarray(pairs.scores, dtype=np.float64)
    rho = rowwise_spearman(*(v[bootstrap_indices(pairs.groups, rounds, seed)] for v in (sims, gold)))
    return {"spearman": spearman(sims, gold), "bootstrap_mean": float(np.mean(rho)),
            "bootstrap_std": float(np.std(rho)), "n_pairs": len(gold), "n_images": len(set(pairs.groups)),
            "grouped_by": pairs.grouped_by, "rounds": rounds, "seed": seed}
