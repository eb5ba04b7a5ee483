"""Peer for bench_encode.py: sentence-transformers' own ONNX int8 backend, run inside a side virtual environment.

sentence-transformers 6.2 (the main environment's) cannot take its ``[onnx]`` extra: 6.2 needs
``transformers>=5`` and every ``optimum-onnx`` on the registry (≤ 0.1.0) needs ``transformers<4.58``. pip
resolves ``sentence-transformers[onnx]`` to 5.7.0 with transformers 4.57, so the peer runs in its own
environment; this file imports nothing from promcse and only the standard library at module level::

    python3 -m venv /tmp/stonnx
    /tmp/stonnx/bin/pip install torch==2.13.0
    /tmp/stonnx/bin/pip install torch==2.13.0 "sentence-transformers[onnx]==5.7.0"   # torch again: keep that build

What it does, as the library's "Speeding up Inference" page says to: load the model with ``backend="onnx"``
(which exports it), ``save_pretrained`` it, ``export_dynamic_quantized_onnx_model(model, ISA, dir)`` for the
CPU's instruction set (``avx512_vnni``, ``avx512`` or ``avx2`` from /proc/cpuinfo; ``arm64`` on ARM), then
load ``model_kwargs={"file_name": "onnx/model_qint8_<ISA>.onnx"}`` (``model_quint8_avx2.onnx`` for avx2, whose
preset quantises the weights to uint8). The exports are made once into a cache folder under ``--work``, keyed
by the model files and the library versions. The session gets ``intra_op_num_threads`` = ``--threads`` (and
torch the same), as promcse's ONNX encoder does.

Standalone (``--repeats N``): warm up on the first 256 texts, time ``encode`` N times and print one JSON line.
With ``--serve`` (what bench_encode.py uses, so that the peer's rounds interleave with its own): after loading
it prints ``@peer {...}`` (the metadata) and then answers each stdin line ``run`` with ``@peer {"wall", "cpu"}``
for one timed encode of all the texts, ``save PATH`` by writing the last embeddings to PATH (.npy), and
``quit`` by exiting. Any failure is printed as ``@peer {"error": ...}`` before a non-zero exit.

Usage:
    /tmp/stonnx/bin/python benchmarks/peer_st_onnx.py --model DIR --texts texts.json [--batch-size 64]
        [--threads 1] [--repeats 3] [--work /tmp/promcse-st-onnx] [--isa auto] [--serve]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

MARK = "@peer "
CHECK_TEXTS = 256  # accuracy check against fp32 sentence-transformers on this many texts


def say(payload: dict[str, Any]) -> None:
    """One protocol line on stdout."""
    print(MARK + json.dumps(payload), flush=True)


def detect_isa() -> str:
    """The best quantisation preset sentence-transformers offers for this CPU (from /proc/cpuinfo flags)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm64"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    if "avx512_vnni" in flags and "avx512f" in flags:
        return "avx512_vnni"
    if "avx512f" in flags and "avx512bw" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    raise SystemExit("no AVX2 on this CPU: sentence-transformers has no dynamic int8 preset for it")


def versions() -> dict[str, str]:
    """The versions of the peer's stack."""
    out = {}
    for name in ("sentence-transformers", "transformers", "optimum-onnx", "optimum", "onnxruntime", "torch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def cache_dir(work: Path, model: Path, isa: str, stack: dict[str, str]) -> Path:
    """``work/<hash>``: the hash covers the model's file names, sizes and times and the library versions."""
    digest = hashlib.sha256(json.dumps(stack, sort_keys=True).encode() + isa.encode())
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        info = path.stat()
        digest.update(f"{path.relative_to(model)}:{info.st_size}:{info.st_mtime_ns}".encode())
    return work / digest.hexdigest()[:16]


def export(model: Path, target: Path, isa: str) -> float:
    """Copy ``model`` to ``target``, export it to ONNX fp32 and its dynamic int8 quantisation; seconds taken."""
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    start = time.perf_counter()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(model, partial, ignore=shutil.ignore_patterns("onnx", "openvino"))
    exported = SentenceTransformer(str(partial), backend="onnx", device="cpu")  # exports onnx/model.onnx
    exported.save_pretrained(str(partial))
    export_dynamic_quantized_onnx_model(exported, isa, str(partial))  # onnx/model_q[u]int8_<isa>.onnx
    partial.rename(target)
    return time.perf_counter() - start


def quantized_file(target: Path, isa: str) -> str:
    """``onnx/model_<weights dtype>_<isa>.onnx`` under ``target`` ('' if absent): the name carries the preset's
    weight type, ``qint8`` for avx512_vnni / avx512 / arm64 but ``quint8`` for avx2."""
    found = sorted((target / "onnx").glob(f"model_q*int8_{isa}.onnx")) if target.is_dir() else []
    return found[0].relative_to(target).as_posix() if found else ""


def session_options(threads: int) -> Any:
    """ONNX Runtime options as promcse's ``make_session`` sets them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def load(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """The int8 ONNX model, the fp32 torch reference, and the metadata to report."""
    import torch
    from sentence_transformers import SentenceTransformer

    if args.threads:
        torch.set_num_threads(args.threads)
    isa = detect_isa() if args.isa == "auto" else args.isa
    stack = versions()
    target = cache_dir(args.work, args.model, isa, stack)
    export_s = None
    if not quantized_file(target, isa):
        export_s = round(export(args.model, target, isa), 1)
    file_name = quantized_file(target, isa)
    if not file_name:
        raise RuntimeError(f"export_dynamic_quantized_onnx_model wrote no onnx/model_*_{isa}.onnx in {target}")
    int8 = SentenceTransformer(str(target), backend="onnx", device="cpu",
                               model_kwargs={"file_name": file_name, "provider": "CPUExecutionProvider",
                                             "session_options": session_options(args.threads)})
    reference = SentenceTransformer(str(args.model), device="cpu")
    session = getattr(getattr(int8[0], "auto_model", None), "model", None)  # optimum's InferenceSession
    intra = session.get_session_options().intra_op_num_threads if session is not None else None
    meta = {"isa": isa, "isa_detected": detect_isa(), "file": str(target / file_name),
            "file_mib": round((target / file_name).stat().st_size / 2**20, 2), "export_s": export_s,
            "cached": export_s is None, "threads": torch.get_num_threads(), "ort_intra_op_threads": intra,
            "batch_size": args.batch_size, "versions": stack}
    return int8, reference, meta


def accuracy(int8: Any, reference: Any, texts: list[str], batch_size: int) -> dict[str, float]:
    """Max |delta| and worst cosine of the int8 embeddings to fp32 sentence-transformers (first 256 texts)."""
    import numpy as np

    head = texts[:CHECK_TEXTS]
    ours = int8.encode(head, batch_size=batch_size, normalize_embeddings=True)
    ref = reference.encode(head, batch_size=batch_size, normalize_embeddings=True)
    return {"check_texts": len(head), "max_abs_diff_vs_fp32": float(np.abs(ours - ref).max()),
            "min_cosine_vs_fp32": float((ours * ref).sum(1).min())}


def timed(model: Any, texts: list[str], batch_size: int) -> tuple[float, float, Any]:
    """Wall and process-CPU seconds of one encode of all texts, and the embeddings."""
    start, start_cpu = time.perf_counter(), time.process_time()
    out = model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    return time.perf_counter() - start, time.process_time() - start_cpu, out


def serve(model: Any, texts: list[str], batch_size: int) -> None:
    """Answer ``run`` / ``save PATH`` / ``quit`` lines from stdin."""
    import numpy as np

    last = None
    for line in sys.stdin:
        command, _, rest = line.strip().partition(" ")
        if command == "run":
            wall, cpu, last = timed(model, texts, batch_size)
            say({"wall": wall, "cpu": cpu})
        elif command == "save" and last is not None:
            np.save(rest, np.asarray(last, dtype=np.float32))
            say({"saved": rest})
        elif command == "quit":
            return
        else:
            say({"error": f"unknown command {line.strip()!r}"})


def main() -> None:
    """Load (exporting once), warm up, then time standalone or serve bench_encode.py's rounds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="sentence-transformers model directory")
    parser.add_argument("--texts", type=Path, required=True, help="JSON list of texts, or one text per line")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime intra-op threads (0: default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/promcse-st-onnx"), help="export cache folder")
    parser.add_argument("--isa", default="auto", choices=["auto", "avx512_vnni", "avx512", "avx2", "arm64"])
    parser.add_argument("--serve", action="store_true", help="answer bench_encode.py's commands on stdin")
    args = parser.parse_args()
    try:
        raw = args.texts.read_text(encoding="utf-8")
        texts = json.loads(raw) if args.texts.suffix == ".json" else [t for t in raw.splitlines() if t.strip()]
        int8, reference, meta = load(args)
        meta.update(accuracy(int8, reference, texts, args.batch_size))
        del reference
        int8.encode(texts[:CHECK_TEXTS], batch_size=args.batch_size)  # warm-up
    except BaseException as err:  # noqa: BLE001 - reported to the caller, which goes on without the peer
        say({"error": f"{type(err).__name__}: {err}"})
        raise
    meta.update(texts=len(texts), texts_file=str(args.texts))
    if args.serve:
        say(meta)
        serve(int8, texts, args.batch_size)
        return
    runs = [timed(int8, texts, args.batch_size)[:2] for _ in range(args.repeats)]
    wall = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    meta.update(repeats=args.repeats, wall_s=round(wall, 3), cpu_s=round(cpu, 3),
                texts_per_s=round(len(texts) / wall, 1))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
