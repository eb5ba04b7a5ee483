"""Two gloo processes on CPU == one process with the concatenated batch (loss and gradients).

One spawn serves every check (process start-up is the slow part): per-step equivalence for plain,
GradCache (two chunk sizes), tiled and full-mode steps with hard negatives, the number of
collectives per step, and a short ``train()`` under torchrun's environment variables (rank 0 alone
evaluates and writes; ranks stay in lockstep from different initial prompts).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from promcse.training.distributed import DistContext, effective_negatives, fit_batches, shard_rows
from test_gradcache import examples, flat_grads, make_encoder, rel_err, settings

ROWS = 8  # global batch; 4 rows per process
COUNTED = ("all_reduce", "reduce_scatter", "scatter")  # collectives whose calls a step counts
SCENARIOS: dict[str, tuple[int, tuple[str, ...]]] = {  # name -> (hard negatives per row, overrides)
    "unsup": (0, ()),
    "sup": (1, ()),
    "sup_k2": (2, ()),
    "sup_k2_tiled": (2, ("loss.tile_size=3",)),
    "sup_gc3": (1, ("train.grad_cache_chunk=3",)),
    "sup_gc5": (1, ("train.grad_cache_chunk=5",)),
    "sup_gc_tiled": (1, ("train.grad_cache_chunk=4", "loss.tile_size=3")),
    "full_gc": (1, ("train.grad_cache_chunk=4", "model.mode=full", "model.prompt_length=0")),
}


def one_step(tiny_bert: Path, negatives: int, extra: tuple[str, ...]) -> dict[str, object]:
    """Loss terms, gradients and collective counts of one train_step over rows 0..ROWS-1, dropout off.

    Counts the collectives of the backward side: ``all_reduce`` (parameter gradients) and those the
    gather's backward (``torch.distributed.nn.functional.all_gather``) issues - one ``reduce_scatter``
    on NCCL, W ``scatter`` calls on gloo (which has no reduce-scatter).
    """
    from test_gradcache import run_step

    supervised = negatives > 0
    config = settings(tiny_bert, supervised, *extra)
    encoder = make_encoder(tiny_bert, config, dropout=False)
    opt = torch.optim.SGD(encoder.trainable_parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    calls: dict[str, int] = dict.fromkeys(COUNTED, 0)
    originals = {name: getattr(dist, name) for name in COUNTED}

    def counting(name: str) -> object:
        def call(*args: object, **kwargs: object) -> object:
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in COUNTED:
        setattr(dist, name, counting(name))
    try:
        ex = examples(supervised)
        negs = tuple(n[:ROWS] for n in ex.negatives)
        if negatives == 2:  # a second block: the same negatives in another order, so each row gets a new one
            negs = (negs[0], negs[0][::-1])
        ex = type(ex)(ex.anchor[:ROWS], ex.positive and ex.positive[:ROWS], negs, "t")
        terms = run_step(encoder, config, ex, np.arange(ROWS), opt, sched)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return {"terms": terms, "grads": flat_grads(encoder), "collectives": calls}


def _worker(rank: int, world: int, init_file: str, port: int, tiny_bert: Path, data: dict[str, Path], out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: one_step(tiny_bert, sup, extra) for name, (sup, extra) in SCENARIOS.items()}
    finally:
        dist.destroy_process_group()
    torch.save(results, out / f"steps{rank}.pt")
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from promcse.training.config import load_config
    from promcse.training.train import train

    config = load_config(None, [
        f"model.backbone={tiny_bert}", "model.prompt_length=4", f"data.train_file={data['csv']}",
        f"data.eval_data_dir={data['data_dir']}", "train.batch_size=8", "train.max_steps=3", "train.eval_every=2",
        "loss.name=nt_xent_eh", "train.grad_cache_chunk=4", "train.device=cpu",
    ])
    from promcse.encoder.backbone import load_backbone
    from promcse.encoder.model import build_encoder
    from promcse.training.train import encoder_spec

    backbone, tokenizer = load_backbone(str(tiny_bert))
    torch.manual_seed(rank)  # different initial prompts: train() must broadcast rank 0's
    encoder = build_encoder(encoder_spec(config.model, backbone), backbone, tokenizer)
    result = train(config, out / f"run{rank}", show_progress=False, encoder=encoder)
    assert not dist.is_initialized()  # train() created the group, so it destroys it
    torch.save({"steps": result.steps, "history": result.history, "weights": encoder.prompt.embedding.weight.detach()},
               out / f"train{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_with_the_concatenated_batch(tiny_bert: Path, tiny_data: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), free_port(), tiny_bert, tiny_data, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"steps{r}.pt") for r in range(2)]
    for name, (sup, extra) in SCENARIOS.items():
        single = one_step(tiny_bert, sup, extra)
        for got in (r[name] for r in ranks):
            assert rel_err(got["grads"], single["grads"]) < 1e-4, name
            assert got["terms"].keys() == single["terms"].keys(), name
            for k, v in single["terms"].items():
                assert abs(got["terms"][k] - v) <= 1e-5 * max(1.0, abs(v)), (name, k)
            # ONE all-reduce of parameter gradients however many GradCache chunks the step has, plus the
            # gather's backward once: on gloo W = 2 scatters (its stand-in for one reduce-scatter)
            assert got["collectives"] == {"all_reduce": 1, "reduce_scatter": 0, "scatter": 2}, name
        assert sum(single["collectives"].values()) == 0
    # train() under torchrun's environment variables: lockstep ranks, rank 0 alone evaluates and writes
    runs = [torch.load(tmp_path / f"train{r}.pt") for r in range(2)]
    assert runs[0]["steps"] == runs[1]["steps"] == 3
    assert torch.equal(runs[0]["weights"], runs[1]["weights"])
    assert [step for step, _ in runs[0]["history"]] == [2, 3] and runs[1]["history"] == []
    assert (tmp_path / "run0" / "metrics.jsonl").is_file() and (tmp_path / "run0" / "run_config.yaml").is_file()
    assert not (tmp_path / "run1").exists()


def test_sharding_helpers() -> None:
    rows = np.arange(10)
    assert [len(b) for b in fit_batches([rows, rows[:5], rows[:1]], 4)] == [8, 4]
    assert shard_rows(np.arange(8), DistContext(rank=1, world_size=2)).tolist() == [4, 5, 6, 7]
    assert effective_negatives(512, True) == 1023 and effective_negatives(512, False) == 511
