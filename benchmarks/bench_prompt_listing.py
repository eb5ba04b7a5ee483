"""How long ``GET /v1/prompts`` takes on a large store: a first page, a later page, the whole list cold and warm.

Starts ``promcse serve --prompts DIR`` (torch backend; nothing is loaded) on a store such as the one
``bench_fleet_server.py --store-dir DIR`` writes, asks the OS to drop its page cache first when allowed (root), and
times, in order: ``?limit=100``, ``?limit=100&after=AFTER``, the whole list (every prompt's files hashed once), and
the whole list again (versions cached by folder stamp). The last line printed is JSON.

Usage: python benchmarks/bench_prompt_listing.py --store-dir DIR [--after p5000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import free_port, stop_server, wait_healthy  # noqa: E402


def drop_page_cache() -> bool:
    """Ask Linux to drop clean page-cache pages (root only); whether it did."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(url: str, path: str) -> dict[str, object]:
    began = time.perf_counter()
    response = httpx.get(url + path, timeout=600)
    response.raise_for_status()
    body = response.json()
    return {"path": path, "seconds": round(time.perf_counter() - began, 2), "prompts": len(body["data"]),
            "bytes": len(response.content), "has_more": body["has_more"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store-dir", type=Path, required=True)
    parser.add_argument("--after", default="p5000")
    args = parser.parse_args()
    dropped = drop_page_cache()
    with tempfile.TemporaryDirectory() as tmp:
        port, log = free_port(), Path(tmp) / "server.log"
        argv = [sys.executable, "-m", "promcse", "serve", "--prompts", str(args.store_dir), "--port", str(port),
                "--device", "cpu"]
        process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(process, url, time.time() + 300, log)
            paths = ["/v1/prompts?limit=100", f"/v1/prompts?limit=100&after={args.after}", "/v1/prompts",
                     "/v1/prompts"]
            results = [timed(url, path) for path in paths]
        finally:
            exit_code = stop_server(process)
    print(json.dumps({"page_cache_dropped": dropped, "requests": results, "server_exit": exit_code}))
    return 0 if exit_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
