"""``promcse adapt``: a query prompt for one domain, from relevance labels or from the corpus alone.

Both recipes train a query-side prompt (:mod:`promcse.training.query_side`) against the frozen backbone's
vectors of the corpus, and save a role pair (:mod:`promcse.models.roles`) whose document role is the frozen
backbone: documents already indexed with the backbone stay valid.

* **Labelled** (:func:`adapt_labelled`): a BEIR folder's judged queries of one split; the best epoch by nDCG@10
  on a dev split (the folder's own, or a fixed share of the training queries carved off by a hash of their ids).
* **Corpus only** (:func:`adapt_corpus`): no labels; pseudo-queries made from the documents themselves, each
  paired with the document it came from (:func:`pseudo_queries`); a fixed number of epochs.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from promcse.encoder.backbone import load_backbone
from promcse.encoder.model import SentenceEncoder, build_encoder, default_spec
from promcse.errors import PromcseError
from promcse.evaluation.beir import CORPUS_FILE, BeirData, read_beir, read_corpus
from promcse.evaluation.retrieval import CorpusVectors, encoder_corpus_vectors
from promcse.io.corpus_files import iter_corpus
from promcse.io.files import sha256_file
from promcse.io.jsonl import iter_jsonl
from promcse.models.checkpoint import save_checkpoint
from promcse.models.roles import save_roles
from promcse.training.query_side import (QueryRows, QueryTuneConfig, QueryTuneResult, fit_queries, labelled_rows,
                                         query_encoder, relevant_rows, retrieval_dev_scorer)

SIGNALS: tuple[str, ...] = ("sentence", "title", "auto")
MIN_WORDS = 5  # a pseudo-query sentence shorter than this is a fragment ("Methods.")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


@dataclass
class AdaptSetup:
    """Where the documents come from and how they are encoded.

    Attributes:
        backbone: The frozen backbone (``minilm``, a path or a hub name).
        document_max_length: Token limit the documents are (or were, in the index) encoded with.
        cache: The embedding cache (True: the default folder; a path; False: none).
        show_progress: Progress bars.
    """

    backbone: str = "minilm"
    document_max_length: int = 256
    cache: bool | str | Path = True
    show_progress: bool = True


def carve_dev(data: BeirData, fraction: float) -> tuple[BeirData, BeirData]:
    """Split ``data``'s judged queries into (train, dev) by a hash of each query id (stable across runs).

    Raises:
        PromcseError: A fraction outside (0, 1), or a split that leaves either side empty.
    """
    if not 0 < fraction < 1:
        raise PromcseError(f"must be between 0 and 1, got {fraction}", key="dev_fraction")
    dev_ids = {q for q in data.query_ids if _unit_hash(q) < fraction}
    parts = []
    for name, keep in ((f"{data.split}-train", False), (f"{data.split}-dev", True)):
        ids = [q for q in data.query_ids if (q in dev_ids) == keep]
        if not ids:
            raise PromcseError(f"a dev share of {fraction} leaves no query in {name}", key="dev_fraction")
        texts = dict(zip(data.query_ids, data.query_texts))
        parts.append(replace(data, split=name, query_ids=ids, query_texts=[texts[q] for q in ids],
                             qrels={q: data.qrels[q] for q in ids}))
    return parts[0], parts[1]


def _unit_hash(text: str) -> float:
    return int(hashlib.sha256(f"promcse-dev:{text}".encode()).hexdigest()[:8], 16) / 2**32


def read_documents(path: str | Path) -> BeirData:
    """A corpus as a query-less :class:`BeirData`: a BEIR folder or ``corpus.jsonl``, or any corpus file or folder
    :func:`promcse.io.corpus_files.iter_corpus` reads (``.txt`` one document a line, ``.jsonl`` with ``text``...)."""
    source = Path(path)
    beir = source / CORPUS_FILE if source.is_dir() and (source / CORPUS_FILE).is_file() else None
    if beir is None and source.name == CORPUS_FILE:
        beir = source
    if beir is not None:
        ids, texts = read_corpus(beir)
        digest = sha256_file(beir)
    else:
        rows = list(iter_corpus(source))
        ids, texts = [str(rid) for rid, _ in rows], [text.strip() for _, text in rows]
        digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    if not any(texts):
        raise PromcseError("the corpus has no document with text", path=source)
    return BeirData(name=(beir.parent if beir else source).resolve().name, split="corpus", folder=source,
                    doc_ids=ids, doc_texts=texts, query_ids=[], query_texts=[], qrels={}, corpus_sha256=digest)


def _titles(data: BeirData) -> list[str]:
    """Each document's title (BEIR ``corpus.jsonl`` only; "" otherwise)."""
    path = data.folder / CORPUS_FILE if data.folder.is_dir() else data.folder
    if path.name != CORPUS_FILE:
        return [""] * len(data.doc_ids)
    titles = [obj.get("title") for _, obj in iter_jsonl(path)]
    return [t.strip() if isinstance(t, str) else "" for t in titles]


def _sentences(text: str) -> list[str]:
    return [s for s in SENTENCE_END.split(text) if len(s.split()) >= MIN_WORDS]


def pseudo_queries(data: BeirData, corpus: CorpusVectors, signal: str = "auto", seed: int = 0) -> QueryRows:
    """One pseudo-query per document with text, relevant to that document alone.

    ``sentence``: a random sentence of the document (inverse cloze, the sentence left in, as the index holds the
    whole document); ``title``: its title (BEIR corpora); ``auto``: the title where there is one and a sentence
    otherwise, alternating between them document by document where both exist.
    """
    if signal not in SIGNALS:
        raise PromcseError(f"unknown signal {signal!r}; choose from {', '.join(SIGNALS)}", key="signal")
    titles, rng = _titles(data), np.random.default_rng(seed)
    texts, relevant = [], []
    for row, position in enumerate(corpus.rows):
        title, sentences = titles[position], _sentences(data.doc_texts[position].removeprefix(titles[position]))
        use_title = bool(title) and (signal == "title" or (signal == "auto" and (not sentences or row % 2 == 0)))
        if use_title:
            texts.append(title)
        elif sentences and signal != "title":
            texts.append(sentences[int(rng.integers(len(sentences)))])
        else:
            continue
        relevant.append([row])
    if len(texts) < 2:
        raise PromcseError(f"signal {signal!r} found fewer than 2 pseudo-queries in the corpus", path=data.folder)
    return QueryRows(texts, relevant)


def frozen_encoder(setup: AdaptSetup) -> SentenceEncoder:
    """The document side: the frozen backbone with mean pooling (what ``promcse.load(backbone)`` gives)."""
    backbone, tokenizer = load_backbone(setup.backbone)
    return build_encoder(default_spec(setup.backbone, backbone), backbone, tokenizer).eval()


def frozen_corpus(data: BeirData, setup: AdaptSetup, encoder: SentenceEncoder | None = None) -> CorpusVectors:
    """The frozen backbone's vectors of the corpus (cached as an evaluation with the same limit caches them);
    ``encoder``: the frozen encoder when the caller already holds one."""
    return encoder_corpus_vectors(encoder or frozen_encoder(setup), data, setup.document_max_length,
                                  cache=setup.cache, show_progress=setup.show_progress)


def mined_negatives(corpus: CorpusVectors, query_vectors: np.ndarray, relevant: list[list[int]],
                    k: int) -> list[list[int]]:
    """Each query's ``k`` best-ranked corpus rows (by the given unit query vectors) among those not judged
    relevant to it (the false-negative filter: a relevant document is never a negative)."""
    out = []
    for vector, skip in zip(query_vectors, relevant):
        ranked = np.argsort(-(corpus.vectors @ vector), kind="stable")[: k + len(skip)]
        out.append([int(r) for r in ranked if int(r) not in set(skip)][:k])
    return out


def write_labelled_pairs(folder: str | Path, output: str | Path, split: str = "train", negatives: int = 1,
                         setup: AdaptSetup | None = None, data: BeirData | None = None) -> int:
    """A training file (JSON Lines: ``sent0`` query, ``sent1`` relevant document, ``hard_neg``/``hard_neg_1..k``
    mined by the frozen backbone) from a BEIR split's judgements (or ``data``, e.g. a carved part), for
    ``promcse train``: a prompt for both roles, documents re-encoded.

    Returns:
        The number of rows written (one per relevant pair).
    """
    setup = setup or AdaptSetup()
    data = data or read_beir(folder, split)
    frozen = frozen_encoder(setup)  # loaded once: it encodes the corpus (on a cache miss) and the queries
    corpus = frozen_corpus(data, setup, frozen)
    vectors = frozen.encode(data.query_texts, batch_size=128, show_progress=False, max_length=64,
                           normalize=True)
    relevant = relevant_rows(data, corpus)
    mined = mined_negatives(corpus, np.asarray(vectors), relevant, negatives)
    names = ["hard_neg"] if negatives == 1 else [f"hard_neg_{i + 1}" for i in range(negatives)]
    lines = []
    for text, rows, negs in zip(data.query_texts, relevant, mined):
        hard = {name: data.doc_texts[corpus.rows[r]] for name, r in zip(names, negs)}
        lines += [json.dumps({"sent0": text, "sent1": data.doc_texts[corpus.rows[r]], **hard}) for r in rows]
    if not lines:
        raise PromcseError(f"no query of split {data.split!r} has a relevant document with text", path=data.folder)
    Path(output).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def save_query_prompt(encoder: SentenceEncoder, output: str | Path, meta: dict[str, Any]) -> Path:
    """Save a trained query prompt as a role pair (query: the prompt; document: the frozen backbone)."""
    with tempfile.TemporaryDirectory(prefix="promcse-adapt-") as tmp:
        save_checkpoint(encoder, Path(tmp) / "query", {"adapt": meta})
        return save_roles(output, query=Path(tmp) / "query")


def _meta(recipe: str, source: str, config: QueryTuneConfig, setup: AdaptSetup, result: QueryTuneResult,
          **extra: Any) -> dict[str, Any]:
    return {"recipe": recipe, "source": source, "config": asdict(config), "backbone": setup.backbone,
            "document_max_length": setup.document_max_length, "best_dev": result.best_dev,
            "best_epoch": result.best_epoch, "history": result.history, "seconds": round(result.seconds, 1),
            **extra}


def adapt_labelled(folder: str | Path, output: str | Path | None, split: str = "train", dev_split: str | None = None,
                   dev_fraction: float = 0.2, config: QueryTuneConfig | None = None,
                   setup: AdaptSetup | None = None) -> tuple[SentenceEncoder, QueryTuneResult]:
    """Train a query prompt on ``split``'s judgements of a BEIR folder; select on ``dev_split`` (or, without one,
    on ``dev_fraction`` of the training queries); save the role pair to ``output`` (None: do not save)."""
    config, setup = config or QueryTuneConfig(), setup or AdaptSetup()
    config.check()
    train_data = read_beir(folder, split)
    if dev_split:
        dev_data = read_beir(folder, dev_split)
    else:
        train_data, dev_data = carve_dev(train_data, dev_fraction)
    corpus = frozen_corpus(train_data, setup)
    encoder = query_encoder(setup.backbone, config)
    scorer = retrieval_dev_scorer(dev_data, corpus, max_length=config.max_length)
    result = fit_queries(encoder, labelled_rows(train_data, corpus), corpus, config, scorer, setup.show_progress)
    if output is not None:
        save_query_prompt(encoder, output, _meta("labelled", str(folder), config, setup, result,
                                                 train_split=train_data.split, dev_split=dev_data.split))
    return encoder, result


def adapt_corpus(path: str | Path, output: str | Path | None, signal: str = "auto",
                 config: QueryTuneConfig | None = None, setup: AdaptSetup | None = None,
                 dev: tuple[str | Path, str] | None = None) -> tuple[SentenceEncoder, QueryTuneResult]:
    """Train a query prompt from the corpus alone (:func:`pseudo_queries`); ``dev`` = (BEIR folder, split) only
    to watch a dev score per epoch (the last epoch is kept either way: there are no labels to select with)."""
    config, setup = config or QueryTuneConfig(epochs=3, patience=0), setup or AdaptSetup()
    config.check()
    data = read_documents(path)
    corpus = frozen_corpus(data, setup)
    rows = pseudo_queries(data, corpus, signal, config.seed)
    encoder = query_encoder(setup.backbone, config)
    result = fit_queries(encoder, rows, corpus, config, None, setup.show_progress)
    if dev is not None:
        dev_data = read_beir(*dev)
        result.best_dev = retrieval_dev_scorer(dev_data, corpus, max_length=config.max_length)(encoder.eval())
    if output is not None:
        save_query_prompt(encoder, output, _meta("corpus", str(path), config, setup, result, signal=signal,
                                                 pseudo_queries=len(rows)))
    return encoder, result

