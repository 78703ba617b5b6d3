"""The plan prices what it used to leave out: the projection's times are the time plan's, the subspace merges'
SVDs (tsv_m, iso_c, iso_cts) are in the merge and in each portfolio merge by its own method, and TSV-M's SVD cache
and refinement surrogate are in the worker's memory."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from evomerge.capacity import ModelFacts, Settings, TaskFacts
from evomerge.capacity.timing import (
    DIGEST_BYTES_S,
    SVD_CALL_S,
    SVD_EFFICIENCY,
    merge_s,
    speed_at,
    subspace_s,
    subspace_work,
    svd_flops,
    trial_time,
)

REPO = Path(__file__).resolve().parent.parent
SMALL = {  # 2 layers of a Llama with grouped key/value heads: q, o 64 x 64; k, v 32 x 64; gate, up 96 x 64
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "dtype": "bfloat16",
}
TASKS = TaskFacts(requests=20, longest=16, generates=False, refine_rows=20, refine_tokens=320, scored_tokens=320)


def _projection():
    spec = importlib.util.spec_from_file_location("projection", REPO / "bench" / "projection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_projections_seconds_are_the_time_plans():
    """bench/projection.py's per-trial seconds for 7B are `trial_time`'s for the same facts (a Llama-2-7B shape in
    bfloat16, a base and three fine-tunes, 200 x 256-token requests, a default refine block's rounds for 300
    trials, an H100 with the batch the plan sizes), part by part."""
    from evomerge.candidate.portfolio import COMMON_METHODS
    from evomerge.capacity.plan import refine_batch
    from evomerge.capacity.timing import gpu_speed
    from evomerge.config.schema import RefineConfig

    projection = _projection()
    args = argparse.Namespace(
        gpus=8, gpu_memory="80G", gpu_kind="H100", host_memory="2T", h2d=None, tflops=None, mfu=None,
        requests=200, tokens=256, trials=300, steps=None, method="task_arithmetic", portfolio=True,
    )  # fmt: skip
    row = projection.project(args)[0]
    assert row["model"] == "7B" and row["gpus_per_worker"] == 1
    config = {"model_type": "llama", "vocab_size": 32000, "dtype": "bfloat16", **projection.SHAPES["7B"]}
    model = ModelFacts.of_config(config, n_inputs=4)
    tasks = TaskFacts(
        requests=200, longest=256, generates=False, refine_rows=200, refine_tokens=200 * 256,
        scored_tokens=200 * 256, scored_lengths=(256,) * 200, largest_subset=200, refine_positions=200 * 256,
    )  # fmt: skip
    refine = RefineConfig()
    portfolio = tuple(m for m in COMMON_METHODS if m != "task_arithmetic")
    t = trial_time(
        model,
        refine_batch(model, tasks),
        gpu_speed("H100", 1, batch=row["batch"]),
        300,
        len(refine.starts(300)),
        refine.schedule(300)[0],
        portfolio=portfolio,
    )
    assert row["trial_s"] == pytest.approx(t.total)
    assert (row["merge_s"], row["eval_s"], row["refine_s"]) == pytest.approx((t.merge, t.evaluation, t.refinement))
    assert row["trials_per_hour_node"] == pytest.approx(8 * 3600 / t.total)
    assert row["portfolio_h"] * 3600 == pytest.approx(t.portfolio_s(len(portfolio), 8))


def test_the_subspace_merges_are_priced_by_their_svds():
    """A thin SVD of m x n costs 4 m n k + 8 k^3 FLOPs (k = min); Iso-C takes one per weight matrix and merge (not
    the embeddings or the head), Iso-CTS 1 + T of the matrix and two orthogonalisations, TSV-M its T per-task
    SVDs once per worker (cached) and the orthogonalisations every merge; all on one CPU thread's rate."""
    model = ModelFacts.of_config(SMALL, n_inputs=3)  # a base and two models: T = 2
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)] * 2
    assert list(model.weight_matrices) == shapes  # q, k, v, o, gate, up, down a layer; no embedding, no head
    assert svd_flops(96, 64) == 4 * 96 * 64 * 64 + 8 * 64**3
    speed = speed_at(100e9, 1)
    assert speed.svd_flops > 0 and "one CPU thread" in speed.svd_where

    assert subspace_work(model, "task_arithmetic").per_merge == 0
    iso_c = subspace_work(model, "iso_c")
    assert iso_c.per_merge == pytest.approx(sum(svd_flops(m, n) + 2 * m * n * min(m, n) for m, n in shapes))
    slower = 100e9 / speed.svd_flops * SVD_EFFICIENCY  # one thread of 180 GFLOP/s over 2 CPUs: 100 GFLOP/s
    fixed = len(shapes) * SVD_CALL_S * slower  # Iso-C: one SVD a matrix
    assert merge_s(model, speed, "iso_c") - merge_s(model, speed) == pytest.approx(
        iso_c.per_merge / speed.svd_flops + fixed
    )
    iso_cts = subspace_work(model, "iso_cts")
    assert iso_cts.per_merge > iso_c.per_merge + 2 * sum(svd_flops(m, n) for m, n in shapes)  # the sum + T residuals
    tsv = subspace_work(model, "tsv_m")
    assert tsv.once == pytest.approx(2 * sum(svd_flops(m, n) for m, n in shapes))  # every per-task SVD cached
    assert tsv.cached == tsv.wanted == sum(2 * (m * min(m, n) + min(m, n) + min(m, n) * n) * 4 for m, n in shapes)

    t = trial_time(model, TASKS, speed, 10, 0, 0, method="tsv_m", portfolio=("iso_c", "ties"))
    plain = trial_time(model, TASKS, speed, 10, 0, 0)
    assert t.setup == pytest.approx(tsv.once / speed.svd_flops + 2 * fixed)
    digests = 3 * sum(m * n for m, n in shapes) * 2 / DIGEST_BYTES_S * slower  # base + 2 models, bf16
    assert (tsv.calls, tsv.calls_once) == (2 * len(shapes), 2 * len(shapes))  # two orthogonalisations; T task SVDs
    assert t.merge - plain.merge == pytest.approx(t.subspace) and t.subspace == pytest.approx(
        tsv.per_merge / speed.svd_flops + 2 * fixed + digests
    )
    assert t.night(10, 0, 1) == pytest.approx(10 * t.total + t.setup)
    priced = dict(t.portfolio)  # each portfolio merge by its own method
    assert priced["iso_c"] - priced["ties"] == pytest.approx(subspace_s(model, speed, "iso_c")[0])
    assert priced["ties"] == pytest.approx(plain.merge + plain.evaluation + plain.overhead)


def test_past_the_cache_tsv_m_computes_its_svds_every_merge():
    """At 7B the per-task SVDs (123 GB) do not fit SVD_CACHE_BYTES: what the cache cannot keep, every merge
    computes again, and the plan says so."""
    from evomerge.merge.kernels.subspace import SVD_CACHE_BYTES

    config = {**SMALL, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}  # fmt: skip
    model = ModelFacts.of_config(config, n_inputs=4)
    tsv = subspace_work(model, "tsv_m")
    assert tsv.cached <= SVD_CACHE_BYTES < tsv.wanted
    assert tsv.per_merge > 3 * sum(svd_flops(m, n) for m, n in model.weight_matrices) * 0.9
    speed = speed_at(100e9, 1)
    lines = trial_time(model, TASKS, speed, 10, 0, 0, method="tsv_m").lines(10, 0, 1, "here")
    said = next(line for line in lines if line.startswith("plan: tsv_m's SVDs on one CPU thread"))
    assert "the rest are recomputed every trial" in said


def test_the_svd_cache_the_plan_counts_is_what_a_tsv_m_merge_keeps(tiny_zoo, tmp_path):
    """`evomerge merge` of a TSV-M recipe on the tiny zoo fills SVD_CACHE with the bytes `svd_cache_bytes` plans,
    and the header's weight matrices are the ones a Llama of the zoo's config has."""
    from evomerge.capacity.memory import svd_cache_bytes
    from evomerge.cli import main
    from evomerge.merge.kernels import subspace
    from evomerge.merge.recipe import Recipe

    model = ModelFacts.of_inputs(tiny_zoo / "base", [tiny_zoo / "add", tiny_zoo / "reverse"])
    assert sorted(model.weight_matrices) == sorted(ModelFacts.of_config(model.config).weight_matrices)
    recipe = {
        "merge_method": "tsv_m",
        "base_model": str(tiny_zoo / "base"),
        "models": [{"model": str(tiny_zoo / m), "parameters": {"weight": 1.0}} for m in ("add", "reverse")],
        "parameters": {"lambda": 1.0},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(Recipe.from_dict(recipe).to_yaml())
    subspace.SVD_CACHE.clear()
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 0
    assert subspace.SVD_CACHE.used == svd_cache_bytes(model) > 0


def test_tsv_m_grows_the_workers_memory_by_its_cache_and_surrogate():
    """Against task arithmetic, a TSV-M worker holds its SVD cache in host memory (on CPU and on a GPU worker) and,
    during refinement, the surrogate's float32 copy of every weight matrix per model (and of the base's, stored in
    bfloat16 here); a task-arithmetic search whose portfolio scores TSV-M's default merge holds the cache in one worker
    while it merges that (the next merge by another method empties it): once per node."""
    from evomerge.capacity.memory import svd_cache_bytes, tsv_m_surrogate_bytes, worker_memory

    model = ModelFacts.of_config(SMALL, n_inputs=3)
    shapes = model.weight_matrices
    cache = sum(2 * (m * min(m, n) + min(m, n) + min(m, n) * n) * 4 for m, n in shapes)
    surrogate = sum((2 + 1) * m * n * 4 for m, n in shapes)  # two models' parts and the base in float32
    assert (svd_cache_bytes(model), tsv_m_surrogate_bytes(model)) == (cache, surrogate)
    for gpus in (0, 1):
        ta = worker_memory(model, TASKS, Settings(num_gpus=gpus, refine=True), int(80e9))
        tsv = worker_memory(model, TASKS, Settings(num_gpus=gpus, refine=True, method="tsv_m"), int(80e9))
        assert (tsv.svd_cache, tsv.surrogate) == (cache, surrogate)
        if gpus:
            assert tsv.host - ta.host == cache + surrogate and tsv.per_device == ta.per_device
        else:
            assert tsv.refinement - ta.refinement == surrogate
            assert tsv.host - ta.host == cache + tsv.transient - ta.transient
        both = worker_memory(model, TASKS, Settings(num_gpus=gpus, refine=True, portfolio=("tsv_m",)), int(80e9))
        assert both.host == ta.host and both.portfolio_cache == cache and both.surrogate == 0  # once a node


def test_the_plan_prints_tsv_ms_memory_and_svds(tiny_zoo, tmp_path):
    """`evomerge audit --plan` of a TSV-M search on the tiny zoo: a line for its host memory (cache, surrogate),
    one for its SVDs per merge and once per worker, and the portfolio's subspace merges by their own method."""
    from evomerge.capacity import plan_search
    from evomerge.capacity.memory import RAY_NODE, RUNTIME_HOST
    from evomerge.config.schema import load_config

    data = {
        "name": "svd",
        "base_model": str(tiny_zoo / "base"),
        "models": [str(tiny_zoo / "add"), str(tiny_zoo / "reverse")],
        "method": "tsv_m",
        "tasks": {"search": [{"name": "zoo_add_greedy_search", "subset": 8}]},
        "budget": {"n_trials": 20},
        "refine": {"at": [0.5], "steps": 4},
        "workers": {"count": 1},
    }
    path = tmp_path / "svd.yaml"
    path.write_text(yaml.safe_dump(data))
    plan = plan_search(load_config(path))
    text = "\n".join(plan.lines())
    memory = re.search(r"plan: tsv_m in host memory: each worker's SVD cache [\d.]+ (MB|GB) .*surrogate", text)
    assert memory and plan.worker.svd_cache > 0 and plan.worker.surrogate > 0
    assert re.search(r"plan: tsv_m's SVDs on one CPU thread of this machine \(probe \d+ GFLOP/s\): ", text)
    portfolio = next(line for line in plan.lines() if line.startswith("plan: the portfolio's default merges"))
    assert "iso_c " in portfolio and "iso_cts " in portfolio and "tsv_m" not in portfolio
    assert plan.timing.setup > 0 and plan.timing.subspace > 0
    path.write_text(yaml.safe_dump({**data, "method": "task_arithmetic"}))
    other = plan_search(load_config(path))  # its portfolio scores TSV-M's default merge
    lent = other.worker.portfolio_cache
    assert lent == plan.worker.svd_cache and other.worker.svd_cache == 0
    assert other.node_bytes(1, True) == other.worker.host + other.page_cache + RAY_NODE + RUNTIME_HOST + lent
    assert "the portfolio's TSV-M SVD cache" in "\n".join(other.lines())


def test_the_surrogate_the_plan_counts_is_what_freeze_tsv_m_holds(tiny_zoo):
    """refine/differentiable.py's `freeze_tsv_m` over every tensor of the tiny zoo (float32 inputs) holds a new float32
    tensor per model for each weight matrix, and nothing for the other tensors: `tsv_m_surrogate_bytes`."""
    from evomerge.capacity.memory import tsv_m_surrogate_bytes
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.refine.differentiable import freeze_tsv_m

    folders = [tiny_zoo / n for n in ("base", "add", "reverse")]
    base, *models = (Checkpoint(f) for f in folders)
    held = 0
    for name in base.tensor_names():
        inputs = [m.get(name) for m in models]
        frozen = freeze_tsv_m(name, base.get(name), inputs, [{"rank_fraction": 1.0}] * 2, positions=[1, 2])
        fresh = [t for t in frozen.models if all(t.data_ptr() != i.data_ptr() for i in inputs)]
        held += sum(t.numel() * t.element_size() for t in fresh)
    model = ModelFacts.of_inputs(folders[0], folders[1:])
    assert model.stored_itemsize == 4 and held == tsv_m_surrogate_bytes(model) > 0
