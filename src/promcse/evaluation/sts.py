"""STS evaluation as SimCSE/PromCSE report it (SentEval protocol), alignment/uniformity, and the text table.

Works with any encoder (:data:`EncodeFn`); every distinct sentence is encoded once. CxC lives in
:mod:`promcse.evaluation.cxc`, which :func:`evaluate` calls for ``cxc=``. See docs/EVALUATION.md.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from promcse.io.data import StsPairs, read_sts_tsv
from promcse.errors import PromcseError
from promcse.evaluation.cxc import CxcPairs, cxc_scores, load_cxc
from promcse.encoder.encode import unit_rows
from promcse.evaluation.scoring import EncodeFn, Lookup, spearman




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
BUNDLED_DIR = Path(__file__).parents[1] / "resources" / "data" / "sts"
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
                               f"give its folder or set {DATA_ENV}", key="data_dir")
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
    """Read extra TSV files (``tsv_files``), reported by stem (``parent/stem`` when the stem is already taken)."""
    out: list[StsPairs] = []
    for raw in paths:
        pairs, path = read_sts_tsv(raw), Path(raw)
        name = pairs.name if pairs.name not in taken else f"{path.parent.name}/{path.stem}"
        if name in taken:
            raise PromcseError(f"two evaluated files would both be reported as '{name}'; rename one", path=path)
        taken.add(name)
        out.append(StsPairs(name, pairs.sentence1, pairs.sentence2, pairs.scores))
    return out


def _score_task(files: list[StsPairs], lookup: Lookup, grouped: bool) -> dict[str, Any]:
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
    a, b = unit_rows(a), unit_rows(b)
    if len(a) == 0 or a.shape != b.shape:
        raise PromcseError(f"alignment needs two equal, non-empty sets of embeddings; got {a.shape} and {b.shape}")
    return float(np.mean(np.sum((a - b) ** 2, axis=1)))


def uniformity(x: np.ndarray, block: int = 2048) -> float:
    """Uniformity (Wang & Isola 2020): ``log mean_{i<j} exp(-2 ||f(x_i) - f(x_j)||²)`` on L2-normalised rows.

    Uses ``||u - v||² = 2 - 2 u·v``; the mean over i<j equals that over i≠j (symmetry); row blocks bound memory.
    """
    x, n = unit_rows(x), len(x)
    if n < 2:
        raise PromcseError(f"uniformity needs at least 2 embeddings; got {n}")
    total = 0.0
    for start in range(0, n, block):
        e = np.exp(-2.0 * np.clip(2.0 - 2.0 * (x[start : start + block] @ x.T), 0.0, None))
        e[np.arange(len(e)), start + np.arange(len(e))] = 0.0  # drop i == j
        total += float(e.sum())
    return math.log(total / (n * (n - 1)))


def _align_uniform(pairs: StsPairs, lookup: Lookup) -> dict[str, float]:
    """Alignment over pairs with gold > 4 and uniformity over all distinct sentences of STS-B test."""
    pos = [i for i, s in enumerate(pairs.scores) if s > POSITIVE_THRESHOLD]
    out = {"uniformity": uniformity(lookup(list(dict.fromkeys(pairs.sentence1 + pairs.sentence2))))}
    if pos:  # tiny files without positives: alignment is undefined, so omitted
        out["alignment"] = alignment(lookup([pairs.sentence1[i] for i in pos]),
                                     lookup([pairs.sentence2[i] for i in pos]))
    return out


def _score_tasks(names: list[str], sets: dict[str, list[StsPairs]], extra: list[StsPairs],
                 lookup: Lookup) -> dict[str, Any]:
    """A result's "tasks" (the selected tasks, then the extra files) and "avg" (None without a standard task)."""
    tasks = {TASKS[t].report: _score_task(sets[TASKS[t].report], lookup, TASKS[t].files is None) for t in names}
    tasks.update({f.name: _score_task([f], lookup, grouped=False) for f in extra})
    standard = [tasks[TASKS[t].report]["spearman"] for t in STANDARD_TASKS if t in names]
    return {"tasks": tasks, "avg": float(np.mean(standard)) if standard else None}


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
        cxc: A CxC file (see :func:`promcse.evaluation.cxc.load_cxc`) or loaded :class:`promcse.evaluation.cxc.CxcPairs`.
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
        raise PromcseError("nothing to evaluate: give STS tasks, tsv_files or a CxC file", key="tasks")
    root = resolve_data_dir(data_dir) if names else None
    sets = {TASKS[t].report: [read_sts_tsv(p) for p in task_files(t, root, text)] for t in names}
    extra = _extra_files(tsv_files, set(sets))
    cxc_pairs = load_cxc(cxc) if isinstance(cxc, (str, Path)) else cxc
    texts = [s for files in [*sets.values(), extra] for f in files for s in (*f.sentence1, *f.sentence2)]
    texts += cxc_pairs.sentence1 + cxc_pairs.sentence2 if cxc_pairs else []
    lookup = Lookup(encode_fn, texts, batch_texts)
    result: dict[str, Any] = {"text": text, **_score_tasks(names, sets, extra, lookup)}
    if alignment_uniformity and "stsb" in names:
        result.update(_align_uniform(sets[TASKS["stsb"].report][0], lookup))
    if cxc_pairs is not None:
        result["cxc"] = cxc_scores(lookup, cxc_pairs)
    return result


def score_split(encode_fn: EncodeFn, task: str, data_dir: str | Path | None = None) -> float:
    """Spearman ×100 of one STS task split (e.g. ``"stsb-dev"`` to choose checkpoints, ``"stsb"``), with
    alignment/uniformity off; ``data_dir`` as for :func:`evaluate`.

    Raises:
        PromcseError: Unknown task (``"all"`` is not one split), or missing data.
    """
    name = _canonical_task(task.strip().lower())
    result = evaluate(encode_fn, [name], data_dir, alignment_uniformity=False)
    return float(result["tasks"][TASKS[name].report]["spearman"])


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(result: dict[str, Any], model_name: str) -> str:
    """A fixed-width text table of an evaluation result.

    One row per task ("all" = the task's Spearman ×100, "wmean" for STS12-16, pair count), an Avg row,
    an alignment / uniformity line and a CxC line when present.

    Args:
        result: A dict returned by :func:`evaluate`.
        model_name: Name printed in the title line.

    Returns:
        The table, lines joined by newlines, without a trailing newline.
    """
    tasks: dict[str, dict[str, Any]] = result.get("tasks", {})
    width = max([len("Task"), *map(len, tasks)])
    lines = [
        f"Model: {model_name}  (text: {result.get('text', '?')}; Spearman x100)",
        f"{'Task':<{width}}  {'all':>7}  {'wmean':>7}  {'n':>6}",
        "-" * (width + 26),
    ]
    for name, row in tasks.items():
        lines.append(f"{name:<{width}}  {_fmt(row['spearman']):>7}  {_fmt(row.get('wmean')):>7}  {row['n']:>6}")
    lines.append(f"{'Avg':<{width}}  {_fmt(result.get('avg')):>7}")
    if "uniformity" in result:
        lines.append(
            "alignment / uniformity (STS-B test; lower is better): "
            f"{_fmt(result.get('alignment'), 4)} / {_fmt(result['uniformity'], 4)}"
        )
    if "cxc" in result:
        c = result["cxc"]
        lines.append(
            f"CxC: {c['bootstrap_mean']:.2f} ± {c['bootstrap_std']:.2f} (bootstrap, {c.get('rounds', '?')} rounds); "
            f"all pairs {c['spearman']:.2f} ({c['n_pairs']} pairs, {c['n_images']} images)"
        )
    return "\n".join(lines)
