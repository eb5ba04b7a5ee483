"""Strict reading of a BEIR dataset folder: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.

The layout is BEIR's (and MTEB's, for a local folder):

- ``corpus.jsonl``: one object a line with ``_id`` (a non-empty string), ``text`` (a string) and optionally
  ``title`` (a string); other keys (``metadata``) are ignored. A document is embedded as
  ``(title + " " + text).strip()`` (:func:`document_text`); a document whose text is empty that way is kept (it
  counts in the corpus) but has no vector and is never retrieved.
- ``queries.jsonl``: ``_id`` and a non-empty ``text``; other keys are ignored.
- ``qrels/<split>.tsv``: a header line ``query-id<TAB>corpus-id<TAB>score``, then one judgement a line with an
  integer score (graded gains allowed; 0 and below are not relevant).

Every id must be unique, every qrels id must name a query and a document, and each (query, document) pair is
judged once. Anything else stops with a :class:`promcse.errors.PromcseError` naming the file and line. Only the
queries that have judgements in the split are kept (BEIR's loader does the same): the others are not scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promcse.errors import PromcseError
from promcse.io.files import sha256_file
from promcse.io.jsonl import decoded_lines, iter_jsonl

CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
QRELS_DIR = "qrels"
QRELS_HEADER = ("query-id", "corpus-id", "score")
TEXT_RULE = "(title + ' ' + text).strip(); empty documents are never retrieved"


def document_text(title: str, text: str) -> str:
    """The text a document is embedded as: ``(title + " " + text).strip()`` (BEIR's and MTEB's rule)."""
    return (title + " " + text).strip()


@dataclass(frozen=True)
class BeirData:
    """One split of a BEIR dataset, read and checked.

    Attributes:
        name: The folder's name (``scifact``).
        split: The qrels split (``test``).
        folder: The dataset folder.
        doc_ids: Every document id, in corpus order.
        doc_texts: Each document's embedded text (:func:`document_text`; ``""`` for an empty document).
        query_ids: The ids of the queries that have judgements, in the order of ``queries.jsonl``.
        query_texts: Their texts.
        qrels: ``{query id: {document id: score}}`` of the split.
        corpus_sha256: The sha256 of ``corpus.jsonl`` (part of the embedding cache's key).
    """

    name: str
    split: str
    folder: Path
    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    corpus_sha256: str

    @property
    def empty_documents(self) -> int:
        """How many documents have no text (never retrieved)."""
        return sum(not text for text in self.doc_texts)


def _string(obj: dict[str, Any], key: str, path: Path, line: int, required: bool = True) -> str:
    """``obj[key]`` as a string (missing and optional: ``""``)."""
    if key not in obj:
        if required:
            raise PromcseError(f"missing field '{key}'", path=path, line=line, key=key)
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise PromcseError(f"'{key}' must be a string, got {type(value).__name__}", path=path, line=line, key=key)
    return value


def _new_id(obj: dict[str, Any], path: Path, line: int, seen: dict[str, int]) -> str:
    """The line's ``_id``: a non-empty string not seen on an earlier line."""
    doc_id = _string(obj, "_id", path, line)
    if not doc_id:
        raise PromcseError("'_id' is empty", path=path, line=line, key="_id")
    if doc_id in seen:
        raise PromcseError(f"duplicate _id '{doc_id}' (first on line {seen[doc_id]})", path=path, line=line, key="_id")
    seen[doc_id] = line
    return doc_id


def read_corpus(path: str | Path) -> tuple[list[str], list[str]]:
    """(ids, embedded texts) of a ``corpus.jsonl``, in file order; empty texts kept as ``""``.

    Raises:
        PromcseError: A missing file, a broken line, a missing or non-string field, an empty or duplicate id.
    """
    path, seen = Path(path), {}
    ids: list[str] = []
    texts: list[str] = []
    for line, obj in iter_jsonl(path):
        ids.append(_new_id(obj, path, line, seen))
        texts.append(document_text(_string(obj, "title", path, line, required=False), _string(obj, "text", path, line)))
    if not ids:
        raise PromcseError("the corpus holds no documents", path=path)
    return ids, texts


def read_queries(path: str | Path) -> dict[str, tuple[str, int]]:
    """``{query id: (text, line)}`` of a ``queries.jsonl``, in file order.

    Raises:
        PromcseError: A missing file, a broken line, a missing, non-string or empty text, an empty or duplicate id.
    """
    path, seen = Path(path), {}
    out: dict[str, tuple[str, int]] = {}
    for line, obj in iter_jsonl(path):
        query_id = _new_id(obj, path, line, seen)
        text = _string(obj, "text", path, line)
        if not text.strip():
            raise PromcseError(f"query '{query_id}' has an empty text", path=path, line=line, key="text")
        out[query_id] = (text, line)
    return out


def _qrels_row(fields: list[str], path: Path, line: int) -> tuple[str, str, int]:
    """One judgement: (query id, document id, integer score)."""
    if len(fields) != 3 or not fields[0] or not fields[1]:
        raise PromcseError(f"expected 3 tab-separated fields (query-id, corpus-id, score), got {len(fields)}"
                           if len(fields) != 3 else "empty query-id or corpus-id", path=path, line=line)
    try:
        score = int(fields[2].strip())
    except ValueError:
        raise PromcseError(f"score must be an integer, got {fields[2]!r}", path=path, line=line,
                           column="score") from None
    return fields[0], fields[1], score


def read_qrels(path: str | Path, query_ids: set[str] | dict[str, Any],
               doc_ids: set[str] | dict[str, Any]) -> dict[str, dict[str, int]]:
    """``{query id: {document id: score}}`` of a qrels TSV, every id checked against the queries and the corpus.

    Raises:
        PromcseError: A missing file or header, a row without 3 fields, a non-integer score, an unknown id, or a
            (query, document) pair judged twice.
    """
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    header = False
    for line, text in decoded_lines(path):
        if not text.strip():
            continue
        fields = text.split("\t")
        if not header:
            if tuple(f.strip() for f in fields) != QRELS_HEADER:
                raise PromcseError(f"expected the header {'<TAB>'.join(QRELS_HEADER)}", path=path, line=line)
            header = True
            continue
        query_id, doc_id, score = _qrels_row(fields, path, line)
        for value, known, what in ((query_id, query_ids, "query"), (doc_id, doc_ids, "document")):
            if value not in known:
                raise PromcseError(f"unknown {what} id '{value}'", path=path, line=line)
        if doc_id in qrels.setdefault(query_id, {}):
            raise PromcseError(f"query '{query_id}' and document '{doc_id}' are judged twice", path=path, line=line)
        qrels[query_id][doc_id] = score
    if not qrels:
        raise PromcseError("holds no judgements", path=path)
    return qrels


def qrels_path(folder: str | Path, split: str) -> Path:
    """``<folder>/qrels/<split>.tsv``.

    Raises:
        PromcseError: No such split (the splits there are named).
    """
    qrels_dir = Path(folder) / QRELS_DIR
    path = qrels_dir / f"{split}.tsv"
    if not split or "/" in split or not path.is_file():
        have = sorted(p.stem for p in qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []
        raise PromcseError(f"no qrels for split '{split}' (splits here: {', '.join(have) or 'none'})", path=path)
    return path


def read_beir(folder: str | Path, split: str = "test") -> BeirData:
    """Read and check one split of a BEIR dataset folder (see the module docstring).

    Raises:
        PromcseError: A missing folder or file, or any bad row (naming file and line).
    """
    root = Path(folder)
    if not root.is_dir():
        raise PromcseError("BEIR dataset folder not found", path=root)
    qrels_file = qrels_path(root, split)
    doc_ids, doc_texts = read_corpus(root / CORPUS_FILE)
    queries = read_queries(root / QUERIES_FILE)
    qrels = read_qrels(qrels_file, queries, dict.fromkeys(doc_ids))
    judged = [q for q in queries if q in qrels]
    return BeirData(name=root.resolve().name, split=split, folder=root, doc_ids=doc_ids, doc_texts=doc_texts,
                    query_ids=judged, query_texts=[queries[q][0] for q in judged], qrels=qrels,
                    corpus_sha256=sha256_file(root / CORPUS_FILE))
