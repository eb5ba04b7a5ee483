"""Model cards of promcse model folders: the Hub's ``README.md``, its metadata built and checked by
``huggingface_hub`` (``ModelCardData``, ``EvalResult``).

The metadata says what the Hub lists a model by: ``library_name: promcse``, ``pipeline_tag: sentence-similarity``,
:data:`TAGS`, ``base_model`` (the backbone's Hub id; ``minilm`` is ``sentence-transformers/all-MiniLM-L6-v2``; a
local path gives none), ``license`` (given, else the backbone's when :data:`KNOWN_LICENSES` knows it, else unset),
``datasets`` (given) and a ``model-index`` of evaluation results. Those come from a results file in the promcse
shapes, given or found as ``results.json`` in the folder:

- ``promcse eval --json`` output: STS ``tasks`` (``{name: {"spearman": x}}``), ``cxc`` (``{"spearman": x}``) and
  ``retrieval`` (``{"<name>:<split>": {"dataset", "split", "metrics": {"ndcg@10": x, ...}}}``);
- the shipped retrieval record (``{"dataset": "<name>:<split>", "<split>": {"ndcg@10": x, ...}}``).

STS results become ``sentence-similarity`` / ``spearman`` entries, retrieval results ``retrieval`` / ``ndcg_at_10``
(and ``mrr_at_10``, ``recall_at_100``, ``map_at_100``) entries, on the MTEB dataset ids where known. Values are on
promcse's scale (×100), rounded to 4 decimals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promcse.errors import PromcseError

CARD_FILE = "README.md"
RESULTS_FILE = "results.json"
LIBRARY = "promcse"
PIPELINE = "sentence-similarity"
TAGS = ["promcse", "sentence-similarity", "feature-extraction", "prompt-tuning"]
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
KNOWN_LICENSES = {MINILM_HUB_ID: "apache-2.0"}
MAX_RESULTS_BYTES = 256 * 2**20
# promcse STS task name -> (Hub dataset id, split)
STS_DATASETS = {
    "STS12": ("mteb/sts12-sts", "test"), "STS13": ("mteb/sts13-sts", "test"), "STS14": ("mteb/sts14-sts", "test"),
    "STS15": ("mteb/sts15-sts", "test"), "STS16": ("mteb/sts16-sts", "test"),
    "STSBenchmark": ("mteb/stsbenchmark-sts", "test"), "STSBenchmark-dev": ("mteb/stsbenchmark-sts", "validation"),
    "SICK-R": ("SICK-R", "test"),  # SICK's test split (4,927 pairs): not mteb/sickr-sts, which holds all of SICK
}
RETRIEVAL_DATASETS = {name: f"mteb/{name}" for name in (
    "scifact", "nfcorpus", "fiqa", "arguana", "scidocs", "trec-covid", "quora", "nq", "hotpotqa", "msmarco",
    "fever", "climate-fever", "dbpedia-entity", "webis-touche2020")}
RETRIEVAL_METRICS = {"ndcg@10": "ndcg_at_10", "mrr@10": "mrr_at_10", "recall@100": "recall_at_100",
                     "map@100": "map_at_100"}


@dataclass(frozen=True)
class CardFacts:
    """What a model folder says about itself, for its card.

    Attributes:
        kind: ``checkpoint``, ``roles`` or ``peft``.
        backbone: The backbone as recorded (a Hub id, ``minilm`` or a local path).
        mode: ``prompt``, ``frozen`` or ``full``.
        pooler: The pooler's name.
        prompt_length: Prompt positions (0 without a prompt).
        roles: For a role pair, ``role: what it is`` lines.
    """

    kind: str
    backbone: str
    mode: str
    pooler: str
    prompt_length: int
    roles: tuple[str, ...] = ()


def _checkpoint_facts(directory: Path, kind: str = "checkpoint") -> CardFacts:
    from promcse.models.checkpoint import read_spec

    spec = read_spec(directory)
    return CardFacts(kind, spec.backbone, spec.mode, spec.pooler, spec.prompt.length if spec.prompt else 0)


def folder_facts(directory: str | Path) -> CardFacts:
    """The card's facts of a promcse checkpoint, role pair or PEFT prefix adapter folder (read, nothing loaded).

    Raises:
        PromcseError: The folder is none of these, or its files are bad (naming the file and key).
    """
    from promcse.models.checkpoint import is_checkpoint
    from promcse.models.peft_adapter import is_peft_adapter, read_adapter_config
    from promcse.models.roles import is_role_pair, read_roles

    folder = Path(directory)
    if is_checkpoint(folder):
        return _checkpoint_facts(folder)
    if is_role_pair(folder):
        refs = read_roles(folder)
        first = _checkpoint_facts(next(ref for ref in refs.values() if ref is not None), "roles")
        roles = tuple(f"{role}: {'the frozen backbone' if ref is None else f'checkpoint `{ref.name}`'}"
                      for role, ref in refs.items())
        return CardFacts("roles", first.backbone, first.mode, first.pooler, first.prompt_length, roles)
    if is_peft_adapter(folder):
        facts = read_adapter_config(folder)
        return CardFacts("peft", str(facts["base_model"]), "prompt", "avg", int(facts["length"]))
    raise PromcseError("not a promcse model folder: expected a checkpoint (config.json), a role pair (roles.json) "
                       "or a PEFT prefix adapter (adapter_config.json)", path=folder)


def base_model_id(backbone: str) -> str | None:
    """The Hub id of a recorded backbone: ``minilm``'s, a Hub name as is, None for a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if backbone == "minilm":
        return MINILM_HUB_ID
    if Path(backbone).exists() or Path(backbone).is_absolute() or backbone.startswith((".", "~")):
        return None
    try:
        validate_repo_id(backbone)
    except HFValidationError:
        return None
    return backbone


def read_results(path: str | Path) -> Any:
    """A results file (``promcse eval --json`` output or a shipped ``results.json``), parsed strictly."""
    from promcse.io.jsonl import parse_json
    from promcse.io.schema import read_regular_file

    raw = read_regular_file(path, MAX_RESULTS_BYTES)
    try:
        return parse_json(raw.decode("utf-8"), path)
    except UnicodeDecodeError as err:
        raise PromcseError(f"not valid UTF-8: {err.reason} at byte {err.start}", path=path) from None


def _number(value: Any, key: str, where: str | None) -> float:
    """``value`` as a finite number, rounded to 4 decimals; anything else stops, naming the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PromcseError(f"expected a finite number, got {str(value)[:40]}", path=where, key=key)
    return round(float(value), 4)


def _object(value: Any, key: str, where: str | None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PromcseError(f"expected an object, got {type(value).__name__}", path=where, key=key)
    return value


def _sts_entry(name: str, value: float) -> Any:
    """One STS (or CxC) score as a ``sentence-similarity`` / ``spearman`` entry."""
    from huggingface_hub import EvalResult

    dataset, split = STS_DATASETS.get(name, (name, "validation" if name == "CxC" else None))
    return EvalResult(task_type="sentence-similarity", task_name="Semantic Textual Similarity", dataset_type=dataset,
                      dataset_name=name, dataset_split=split, metric_type="spearman",
                      metric_name="Spearman (cosine) x100", metric_value=value)


def _sts_results(results: dict[str, Any], where: str | None) -> list[Any]:
    """``tasks`` and ``cxc`` as ``sentence-similarity`` entries."""
    found: list[Any] = []
    for name, task in _object(results.get("tasks", {}), "tasks", where).items():
        key = f"tasks.{name}"
        found.append(_sts_entry(str(name), _number(_object(task, key, where).get("spearman"), f"{key}.spearman",
                                                   where)))
    if "cxc" in results:
        found.append(_sts_entry("CxC", _number(_object(results["cxc"], "cxc", where).get("spearman"),
                                               "cxc.spearman", where)))
    return found


def _retrieval_entries(name: str, split: str, metrics: dict[str, Any], key: str,
                       where: str | None) -> list[Any]:
    """One dataset's retrieval metrics as ``retrieval`` entries (only the metrics promcse reports)."""
    from huggingface_hub import EvalResult

    return [EvalResult(task_type="retrieval", task_name="Retrieval", dataset_type=RETRIEVAL_DATASETS.get(name, name),
                       dataset_name=name, dataset_split=split, metric_type=hub_metric, metric_name=f"{metric} x100",
                       metric_value=_number(metrics[metric], f"{key}.{metric}", where))
            for metric, hub_metric in RETRIEVAL_METRICS.items() if metric in metrics]


def _retrieval_results(results: dict[str, Any], where: str | None) -> list[Any]:
    """``retrieval`` of ``promcse eval --json``, or the shipped record (``dataset`` ``name:split`` + ``<split>``)."""
    found: list[Any] = []
    for label, result in _object(results.get("retrieval", {}), "retrieval", where).items():
        result = _object(result, f"retrieval.{label}", where)
        name, _, split = str(label).partition(":")
        name, split = str(result.get("dataset", name)), str(result.get("split", split or "test"))
        metrics = _object(result.get("metrics"), f"retrieval.{label}.metrics", where)
        found += _retrieval_entries(name, split, metrics, f"retrieval.{label}.metrics", where)
    shipped = results.get("dataset")
    if isinstance(shipped, str) and ":" in shipped:
        name, _, split = shipped.partition(":")
        found += _retrieval_entries(name, split, _object(results.get(split), split, where), split, where)
    return found


def eval_results(results: Any, path: str | Path | None = None) -> list[Any]:
    """The ``huggingface_hub.EvalResult`` entries of one model's results (see the module docstring).

    Args:
        results: Parsed results of one model.
        path: The file they were read from, for messages.

    Raises:
        PromcseError: Results of several models, or a value that is not a finite number, naming the key.
    """
    where = None if path is None else str(path)
    if isinstance(results, list):
        raise PromcseError(f"holds the results of {len(results)} models; give one model's results", path=where,
                           key=None if where else "eval_results")
    results = _object(results, "eval_results", where)
    return _sts_results(results, where) + _retrieval_results(results, where)


def card_data(facts: CardFacts, model_name: str, results: list[Any], license: str | None = None,
              datasets: list[str] | None = None) -> Any:
    """The card's ``huggingface_hub.ModelCardData`` (checked by it: ``model-index`` needs ``model_name``)."""
    from huggingface_hub import ModelCardData

    base = base_model_id(facts.backbone)
    return ModelCardData(library_name=LIBRARY, pipeline_tag=PIPELINE, tags=list(TAGS), base_model=base,
                         license=license or KNOWN_LICENSES.get(base or ""), datasets=list(datasets) if datasets else None,
                         model_name=model_name, eval_results=results or None)


def _usage(facts: CardFacts, repo_id: str | None) -> list[str]:
    ref = repo_id or "PATH/TO/THIS/FOLDER"
    calls = (['queries = model.encode_query(["what plays music?"])',
              'documents = model.encode_document(["A man is playing a guitar."])'] if facts.kind == "roles"
             else ['vectors = model.encode(["A man is playing a guitar.", "Someone plays music."])'])
    return ["## Usage", "", "```python", "import promcse", "", f'model = promcse.load("{ref}")', *calls, "```", ""]


def _evaluation(results: list[Any]) -> list[str]:
    if not results:
        return ["## Evaluation", "", "No evaluation results were given.", ""]
    rows = [f"| {r.task_type} | {r.dataset_name} | {r.dataset_split or ''} | {r.metric_type} | {r.metric_value:.2f} |"
            for r in results]
    return ["## Evaluation", "", "| task | dataset | split | metric | value |", "|---|---|---|---|---|", *rows, "",
            "Scores are x100, as `promcse eval` reports them (Spearman of cosine similarities for STS).", ""]


def card_body(facts: CardFacts, model_name: str, results: list[Any], repo_id: str | None = None) -> str:
    """The markdown under the metadata: what the model is, how to load it, its evaluation."""
    base = base_model_id(facts.backbone)
    tuned = "fine-tuned" if facts.mode == "full" else "frozen"
    lines = [f"# {model_name}", "",
             f"A promcse sentence encoder ({facts.kind}): backbone `{facts.backbone}` "
             f"({tuned}), deep prompt of {facts.prompt_length} positions, `{facts.pooler}` pooling.", ""]
    lines += [f"- {role}" for role in facts.roles] + ([""] if facts.roles else [])
    if base is None:
        lines += [f"The backbone is recorded as the local path `{facts.backbone}`: this model loads only where that "
                  "path exists. Record a Hub name for the backbone to share it.", ""]
    return "\n".join([*lines, *_usage(facts, repo_id), *_evaluation(results)])


def build_card(directory: str | Path, *, repo_id: str | None = None, license: str | None = None,
               datasets: list[str] | None = None, results: Any = None) -> Any:
    """The ``huggingface_hub.ModelCard`` of a promcse model folder.

    Args:
        directory: A checkpoint, role pair or PEFT prefix adapter folder.
        repo_id: The Hub id it is (or will be) published as; names the model and its usage snippet.
        license: A Hub license id (default: the backbone's when known, else none).
        datasets: Hub ids of the training data.
        results: One model's parsed results (default: the folder's ``results.json``, if any).

    Raises:
        PromcseError: Not a model folder, or malformed results (naming the key).
    """
    from huggingface_hub import ModelCard

    folder = Path(directory)
    facts = folder_facts(folder)
    where: Path | None = None
    if results is None and (folder / RESULTS_FILE).is_file():
        where = folder / RESULTS_FILE
        results = read_results(where)
    entries = [] if results is None else eval_results(results, where)
    name = repo_id.split("/")[-1] if repo_id else (folder.resolve().name or "promcse-model")
    data = card_data(facts, name, entries, license, datasets)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(facts, name, entries, repo_id)}")


def write_card(directory: str | Path, **options: Any) -> Path:
    """Write :func:`build_card`'s card to ``directory/README.md`` (atomically); returns its path."""
    from promcse.io.files import atomic_write_text

    path = Path(directory) / CARD_FILE
    atomic_write_text(path, str(build_card(directory, **options)))
    return path
