"""Encode throughput: promcse vs sentence-transformers on all-MiniLM-L6-v2, same texts and batch size.

Both encoders run on the same backbone weights (the bundled ``minilm``), fp32, the same device, in one
process, both L2-normalising (the model's sentence-transformers pipeline ends in Normalize); each is timed
on the same texts ``--repeats`` times, the runs interleaved, and the median is reported. The texts are a
seeded sample (``--sample 0``: all) of the 37,700 sentences of the 7 STS test sets under
``<data>/tsv/original``. The last line printed is the JSON headline.

With onnxruntime installed (``pip install -e .[onnx]``; ``--no-onnx`` skips it) it also times promcse's ONNX
exports of the same model, fp32 and int8 (dynamic quantisation), on the same texts, batch size and thread
count (ONNX Runtime gets ``intra_op_num_threads`` = torch's thread count), against sentence-transformers fp32;
and a graph holding ``--prompts`` (8) *random* deep prompts (N(0, 0.02), ``--prompt-length`` 16, unshifted)
fed a random prompt per text, against the one-prompt graph of the first of those prompts. It prints the
ratios, the accuracy (max |delta| of fp32 and the worst cosine of int8, both to sentence-transformers) and
the graph file sizes. The exports go to a temporary directory, removed at the end.

With ``--st-onnx-python PY`` (a side virtual environment's python with ``sentence-transformers[onnx]``; the
main environment's sentence-transformers 6.2 cannot take that extra, see benchmarks/peer_st_onnx.py) it also
times sentence-transformers' own ONNX int8 backend on the same model: ``backend="onnx"`` and
``export_dynamic_quantized_onnx_model`` for this CPU's instruction set, exported once into ``--st-onnx-work``.
The peer runs as a subprocess that stays up for the whole run, so its rounds interleave with the others and
its time is measured inside it (wall and that process's CPU time), on the same texts, batch size and
threads (torch and ONNX Runtime intra-op). The JSON gets ``st_onnx_int8_speedup`` (promcse ONNX int8
texts/s over the peer's), the CPU-time ratio, the peer's worst cosine to sentence-transformers fp32 over
all the texts (the same measure as ``onnx_int8_min_cosine``), and its ISA, file and versions. If the peer
cannot run, the run goes on and the JSON says why (``st_onnx_unavailable``).

Usage:
    python benchmarks/bench_encode.py [--data-dir DIR] [--sample 2000] [--batch-size 64] [--repeats 3]
        [--threads N] [--with-prototype] [--no-onnx] [--prompts 8] [--prompt-length 16]
        [--st-onnx-python /tmp/stonnx/bin/python] [--st-onnx-work /tmp/promcse-st-onnx]

The data directory defaults to ``$PROMCSE_DATA_DIR``, then ``../shared/data/eval``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from st_onnx_driver import ST_ONNX, Measured, StOnnxPeer

TEST_FILES = ("STS12/*.tsv", "STS13/*.tsv", "STS14/*.tsv", "STS15/*.tsv", "STS16/*.tsv", "STSBenchmark/test.tsv",
              "SICK/test.tsv")  # the 7-task STS suite: 18,850 pairs, 37,700 sentences


def sts_sentences(data_dir: Path) -> list[str]:
    """Both sentences of every pair of the 7 STS test sets under ``<data_dir>/tsv/original`` (tab-split)."""
    texts: list[str] = []
    root = data_dir / "tsv" / "original"
    for path in sorted(p for pattern in TEST_FILES for p in root.glob(pattern)):
        for line in path.read_text(encoding="utf-8").splitlines()[1:]:
            fields = line.split("\t")
            if len(fields) >= 2:
                texts.extend(f for f in fields[:2] if f.strip())
    if not texts:
        raise SystemExit(f"no STS sentences under {data_dir}/tsv/original")
    return texts


def default_data_dir() -> Path:
    """``$PROMCSE_DATA_DIR`` or the shared data folder next to the repository."""
    env = os.environ.get("PROMCSE_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"


def encode_token_sorted(encoder: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """Prototype of a faster ``encode``: tokenize once, sort by *token* length, pad each batch itself.

    Written when ``promcse`` and sentence-transformers both sorted by character length, which leaves ~40%
    padding on the STS suite at batch 64; sorting by token length leaves <1% (``promcse`` has done so since, in
    :func:`promcse.encoder.encode.token_length_order`). Same model call, same numbers.
    """
    pad_id = encoder.tokenizer.pad_token_id or 0
    tokens = encoder.tokenizer(texts, truncation=True, max_length=encoder.max_length)
    order = np.argsort([-len(ids) for ids in tokens["input_ids"]], kind="stable")
    out = torch.empty(len(texts), encoder.dim)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            batch = {}
            for key in tokens.keys():
                seqs = [torch.tensor(tokens[key][i]) for i in rows]
                fill = pad_id if key == "input_ids" else 0
                batch[key] = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=fill)
            out[torch.as_tensor(rows)] = torch.nn.functional.normalize(encoder(batch).float(), dim=-1)
    return out.numpy()


def interleaved(fns: dict[str, Callable[[], Any]],
                repeats: int) -> tuple[dict[str, float], dict[str, float], dict[str, np.ndarray]]:
    """Median wall and process-CPU seconds per function over ``repeats`` rounds; each round runs every function
    once, in turn, so that load from other processes affects all of them alike (CPU time is the fairer
    measure on a shared machine: it counts only this process's work). A function that returns ``Measured``
    ran elsewhere: its own timings are taken."""
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    outputs: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            result = fn()
            if isinstance(result, Measured):
                wall[name].append(result.wall)
                cpu[name].append(result.cpu)
                continue
            outputs[name] = np.asarray(result)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return ({n: statistics.median(t) for n, t in wall.items()}, {n: statistics.median(t) for n, t in cpu.items()},
            outputs)


def random_prompt_encoders(base: Any, count: int, length: int) -> list[Any]:
    """``count`` encoders sharing ``base``'s backbone, each with a fresh random prompt (no head, mean pooling)."""
    from promcse.encoder.model import EncoderSpec, build_encoder
    from promcse.encoder.prompt import PromptSpec

    shape = base.spec.shape
    torch.manual_seed(0)
    spec = EncoderSpec(base.spec.backbone, shape, mode="prompt", pooler="avg", head="none",
                       prompt=PromptSpec.for_backbone(shape, length, shift_positions=False))
    return [build_encoder(spec, base.backbone, base.tokenizer).eval() for _ in range(count)]


def onnx_exports(ours: Any, root: Path, prompts: int, length: int, threads: int) -> dict[str, Any]:
    """Export fp32, int8, a one-prompt and a ``prompts``-prompt graph into ``root``; open each (timed)."""
    from promcse.models.onnx_graph import export_encoders
    from promcse.models.onnx_runtime import OnnxEncoder

    prompted = random_prompt_encoders(ours, prompts, length)
    names = [f"random-{k}" for k in range(prompts)]
    jobs = {"fp32": ([ours], ["minilm"], "none"), "int8": ([ours], ["minilm"], "int8"),
            "one_prompt": (prompted[:1], names[:1], "none"), "multi_prompt": (prompted, names, "none")}
    opened: dict[str, Any] = {}
    for key, (encoders, labels, quantize) in jobs.items():
        start = time.perf_counter()
        out = export_encoders(encoders, labels, root / key, quantize=quantize)
        opened[key] = OnnxEncoder(out, threads=threads)
        size = (out / opened[key].meta["file"]).stat().st_size / 2**20
        print(f"export {key:<12} {time.perf_counter() - start:6.1f}s  graph {size:7.1f} MiB ({len(encoders)} prompt(s))")
    return opened


ONNX_FP32, ONNX_INT8, ONE_PROMPT = "promcse onnx fp32", "promcse onnx int8", "onnx 1-prompt graph"


def onnx_fns(graphs: dict[str, Any], texts: list[str], bs: int) -> dict[str, Callable[[], np.ndarray]]:
    """The ONNX runs to time with the others; the multi-prompt graph gets a random prompt per text."""
    names = graphs["multi_prompt"].names
    mixed = [names[i] for i in np.random.default_rng(0).integers(0, len(names), len(texts))]
    for graph in graphs.values():
        graph.encode(texts[:256], batch_size=bs)  # warm-up
    return {ONNX_FP32: lambda: graphs["fp32"].encode(texts, batch_size=bs),
            ONNX_INT8: lambda: graphs["int8"].encode(texts, batch_size=bs),
            ONE_PROMPT: lambda: graphs["one_prompt"].encode(texts, batch_size=bs),
            f"onnx {len(names)}-prompt graph (mixed)": lambda: graphs["multi_prompt"].encode(
                texts, batch_size=bs, prompt=mixed)}


def onnx_headline(graphs: dict[str, Any], wall: dict[str, float], cpu: dict[str, float],
                  outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Ratios (wall and CPU time) to sentence-transformers and of the multi- to the one-prompt graph, accuracy
    to sentence-transformers, and the graph file sizes."""
    peer, reference = "sentence-transformers", outputs["sentence-transformers"]
    multi = f"onnx {len(graphs['multi_prompt'].names)}-prompt graph (mixed)"
    sizes = {key: round((g.directory / g.meta["file"]).stat().st_size / 2**20, 2) for key, g in graphs.items()}
    result = {"onnx_fp32_speedup": round(wall[peer] / wall[ONNX_FP32], 3),
              "onnx_int8_speedup": round(wall[peer] / wall[ONNX_INT8], 3),
              "onnx_fp32_cpu_time_speedup": round(cpu[peer] / cpu[ONNX_FP32], 3),
              "onnx_int8_cpu_time_speedup": round(cpu[peer] / cpu[ONNX_INT8], 3),
              "onnx_fp32_max_abs_diff": float(np.abs(outputs[ONNX_FP32] - reference).max()),
              "onnx_int8_min_cosine": float((outputs[ONNX_INT8] * reference).sum(1).min()),
              "multi_prompt_vs_one_prompt": round(wall[ONE_PROMPT] / wall[multi], 3),
              "multi_prompt_vs_one_prompt_cpu": round(cpu[ONE_PROMPT] / cpu[multi], 3),
              "onnx_file_mib": sizes, "onnx_prompts": len(graphs["multi_prompt"].names)}
    return result


def onnx_summary(result: dict[str, Any]) -> str:
    """The ONNX ratios in one line."""
    return (f"vs sentence-transformers fp32 (wall / CPU time): onnx fp32 {result['onnx_fp32_speedup']}x / "
            f"{result['onnx_fp32_cpu_time_speedup']}x, onnx int8 {result['onnx_int8_speedup']}x / "
            f"{result['onnx_int8_cpu_time_speedup']}x (worst cosine {result['onnx_int8_min_cosine']:.4f}); "
            f"{result['onnx_prompts']}-prompt graph (mixed) vs 1-prompt graph: "
            f"{result['multi_prompt_vs_one_prompt']}x / {result['multi_prompt_vs_one_prompt_cpu']}x; "
            f"graph MiB {result['onnx_file_mib']}")


def onnx_skipped(args: argparse.Namespace) -> str | None:
    """Why the ONNX measurements are skipped, or None."""
    if args.no_onnx:
        return "--no-onnx"
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime not installed: ONNX measurements skipped (pip install -e .[onnx])"
    if args.device != "cpu":
        return f"ONNX measurements run on the CPU only: skipped for --device {args.device}"
    return None


def onnx_graphs(args: argparse.Namespace, ours: Any, root: Path) -> dict[str, Any]:
    """The ONNX exports to time, or {} with ``--no-onnx`` or without onnxruntime (said so)."""
    skipped = onnx_skipped(args)
    if skipped is not None:
        if not args.no_onnx:
            print(skipped)
        return {}
    return onnx_exports(ours, root, args.prompts, args.prompt_length, torch.get_num_threads())


def start_st_onnx(args: argparse.Namespace, texts: list[str], root: Path) -> StOnnxPeer | None:
    """The side-venv peer, started (it loads while promcse exports), or None without ``--st-onnx-python``."""
    if not args.st_onnx_python:
        return None
    from promcse.encoder.backbone import minilm_path

    peer = StOnnxPeer(args.st_onnx_python, minilm_path(), texts, args.batch_size, torch.get_num_threads(),
                      args.st_onnx_work, root, args.st_onnx_timeout)
    skipped = onnx_skipped(args)
    if skipped is None:
        peer.start()
    else:
        peer.reason = f"promcse's ONNX int8 is not measured ({skipped})"
    return peer


def st_onnx_headline(peer: StOnnxPeer, measured: bool, wall: dict[str, float], cpu: dict[str, float],
                     outputs: dict[str, np.ndarray], root: Path) -> dict[str, Any]:
    """promcse ONNX int8 vs the peer: texts/s and CPU-time ratios, the peer's accuracy, ISA, file, versions; or
    ``st_onnx_unavailable`` with the reason."""
    if not measured and peer.reason is None:
        peer.reason = "promcse's ONNX int8 was not measured"
    vectors = peer.embeddings(root / "peer.npy") if peer.reason is None else None
    if peer.reason is not None or vectors is None:
        return {"st_onnx_int8_speedup": None, "st_onnx_unavailable": peer.reason}
    meta = peer.meta
    return {"st_onnx_int8_speedup": round(wall[ST_ONNX] / wall[ONNX_INT8], 3),
            "st_onnx_int8_cpu_time_speedup": round(cpu[ST_ONNX] / cpu[ONNX_INT8], 3),
            "st_onnx_int8_min_cosine": float((vectors * outputs["sentence-transformers"]).sum(1).min()),
            "st_onnx_int8_max_abs_diff_vs_own_fp32": meta.get("max_abs_diff_vs_fp32"),
            "st_onnx": {key: meta.get(key) for key in ("isa", "file", "file_mib", "export_s", "threads",
                                                       "ort_intra_op_threads", "versions")}}


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with tsv/original/<TASK>/*.tsv")
    parser.add_argument("--sample", type=int, default=2000, help="sentences to encode (0: all 37,700)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 gives stable numbers on a busy machine")
    parser.add_argument("--with-prototype", action="store_true", help="also time the token-sorted prototype")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime measurements")
    parser.add_argument("--prompts", type=int, default=8, help="random prompts in the multi-prompt graph")
    parser.add_argument("--prompt-length", type=int, default=16, help="length of each random prompt")
    parser.add_argument("--st-onnx-python", default=None,
                        help="python of a side venv with sentence-transformers[onnx]: also time its ONNX int8")
    parser.add_argument("--st-onnx-work", type=Path, default=Path("/tmp/promcse-st-onnx"),
                        help="cache folder for the peer's ONNX exports (made once)")
    parser.add_argument("--st-onnx-timeout", type=float, default=1800,
                        help="seconds to wait for the peer's start (export included) and for each of its runs")
    return parser.parse_args()


def load_inputs(args: argparse.Namespace) -> tuple[list[str], Any, Any]:
    """(texts, promcse encoder, sentence-transformers model): the sampled STS texts and both encoders."""
    from sentence_transformers import SentenceTransformer

    import promcse
    from promcse.encoder.backbone import minilm_path

    texts = sts_sentences(args.data_dir or default_data_dir())
    if args.sample and args.sample < len(texts):
        texts = random.Random(0).sample(texts, args.sample)
    ours = promcse.load("minilm", device=args.device)
    peer = SentenceTransformer(str(minilm_path()), device=args.device)  # Transformer + mean Pooling + Normalize
    return texts, ours, peer


def torch_fns(ours: Any, peer: Any, texts: list[str], bs: int,
              with_prototype: bool) -> dict[str, Callable[[], Any]]:
    """The PyTorch runs to time: promcse, sentence-transformers and (optionally) the token-sorted prototype."""
    fns: dict[str, Callable[[], Any]] = {
        "promcse": lambda: ours.encode(texts, batch_size=bs, normalize=True),
        "sentence-transformers": lambda: peer.encode(texts, batch_size=bs, normalize_embeddings=True),
    }
    if with_prototype:
        fns["promcse token-sorted prototype"] = lambda: encode_token_sorted(ours, texts, bs)
    return fns


def warm_up(ours: Any, peer: Any, texts: list[str], bs: int) -> None:
    """One untimed call of each PyTorch encoder (first-call allocations, lazy inits)."""
    warm = texts[:256]
    ours.encode(warm, batch_size=bs)
    peer.encode(warm, batch_size=bs)


def measure_all(args: argparse.Namespace, ours: Any, fns: dict[str, Callable[[], Any]], texts: list[str]
                ) -> tuple[dict[str, float], dict[str, float], dict[str, np.ndarray], dict[str, Any]]:
    """Export the ONNX graphs and start the side-venv peer (where asked), time every run interleaved;
    (median wall s, median CPU s, outputs, ONNX results)."""
    bs = args.batch_size
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        st_onnx = start_st_onnx(args, texts, Path(tmp))
        try:
            graphs = onnx_graphs(args, ours, Path(tmp))
            if graphs:
                fns.update(onnx_fns(graphs, texts, bs))
            if st_onnx is not None and graphs and st_onnx.ready():
                fns[ST_ONNX] = st_onnx.run
            seconds, cpu, outputs = interleaved(fns, args.repeats)
            onnx_results = onnx_headline(graphs, seconds, cpu, outputs) if graphs else {}
            if st_onnx is not None:
                onnx_results.update(st_onnx_headline(st_onnx, bool(graphs), seconds, cpu, outputs, Path(tmp)))
                if st_onnx.reason is not None:
                    seconds.pop(ST_ONNX, None)
        finally:
            if st_onnx is not None:
                st_onnx.close()
    return seconds, cpu, outputs, onnx_results


def print_timings(args: argparse.Namespace, texts: list[str], seconds: dict[str, float],
                  cpu: dict[str, float]) -> None:
    """The run's settings, then texts/s, median wall and CPU seconds per run."""
    print(f"texts={len(texts)} batch_size={args.batch_size} device={args.device} threads={torch.get_num_threads()} "
          f"load average={os.getloadavg()[0]:.1f}")
    for name, sec in seconds.items():
        print(f"{name:<32} {len(texts) / sec:8.1f} sentences/s (median of {args.repeats}: {sec:.2f}s wall, "
              f"{cpu[name]:.2f}s CPU)")


def print_onnx(onnx_results: dict[str, Any]) -> None:
    """The ONNX ratios and the side-venv peer's comparison (or why it is unavailable), where measured."""
    if "onnx_fp32_speedup" in onnx_results:
        print(onnx_summary(onnx_results))
    if onnx_results.get("st_onnx_int8_speedup") is not None:
        st = onnx_results["st_onnx"]
        print(f"promcse onnx int8 vs {ST_ONNX} ({st['isa']}, {st['file_mib']} MiB, sentence-transformers "
              f"{st['versions']['sentence-transformers']} in a side venv; wall / CPU time): "
              f"{onnx_results['st_onnx_int8_speedup']}x / {onnx_results['st_onnx_int8_cpu_time_speedup']}x "
              f"(its worst cosine {onnx_results['st_onnx_int8_min_cosine']:.4f})")
    elif "st_onnx_unavailable" in onnx_results:
        print(f"{ST_ONNX}: unavailable: {onnx_results['st_onnx_unavailable']}")


def headline_of(args: argparse.Namespace, texts: list[str], seconds: dict[str, float], cpu: dict[str, float],
                outputs: dict[str, np.ndarray], onnx_results: dict[str, Any]) -> dict[str, Any]:
    """The JSON headline: promcse (and the prototype) vs sentence-transformers, then the ONNX results."""
    reference = outputs["sentence-transformers"]
    headline: dict[str, Any] = {
        "speedup_vs_sentence_transformers": round(seconds["sentence-transformers"] / seconds["promcse"], 3),
        "max_abs_diff": float(np.abs(outputs["promcse"] - reference).max()),
        "cpu_time_speedup": round(cpu["sentence-transformers"] / cpu["promcse"], 3),
        "texts": len(texts), "batch_size": args.batch_size, "repeats": args.repeats}
    if args.with_prototype:
        proto = "promcse token-sorted prototype"
        headline["prototype_speedup"] = round(seconds["sentence-transformers"] / seconds[proto], 3)
        headline["prototype_cpu_time_speedup"] = round(cpu["sentence-transformers"] / cpu[proto], 3)
        headline["prototype_max_abs_diff"] = float(np.abs(outputs[proto] - reference).max())
    headline.update(onnx_results)
    return headline


def main() -> None:
    """Run the comparison and print per-library numbers, then the JSON headline."""
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    texts, ours, peer = load_inputs(args)
    fns = torch_fns(ours, peer, texts, args.batch_size, args.with_prototype)
    warm_up(ours, peer, texts, args.batch_size)
    seconds, cpu, outputs, onnx_results = measure_all(args, ours, fns, texts)
    print_timings(args, texts, seconds, cpu)
    print_onnx(onnx_results)
    print(json.dumps(headline_of(args, texts, seconds, cpu, outputs, onnx_results)))

if __name__ == "__main__":
    main()
