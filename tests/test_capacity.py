"""The resource plan (evomerge/capacity): its facts equal what the workers build, and a search that cannot fit is
refused before any model loads, with one line naming the setting to change."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.capacity import ModelFacts, Settings, TaskFacts, evaluate_plan, given_devices, plan_search
from evomerge.config.schema import parse_config

REPO = Path(__file__).resolve().parent.parent
LLAMA_0_25B = {  # 0.25B parameters: 0.5 GB in bfloat16
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
}


def sparse_llama(folder: Path, config: dict, tokenizer_from: Path) -> int:
    """A Llama checkpoint whose safetensors header describes every tensor of `config` in bfloat16 over a sparse
    file (no disk used, every weight zero): the plan reads headers only. Returns the weight bytes."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + f"self_attn.{x}_proj.weight": [h, h] for x in "qkvo"}
        shapes |= {
            p + "mlp.gate_proj.weight": [i, h],
            p + "mlp.up_proj.weight": [i, h],
            p + "mlp.down_proj.weight": [h, i],
        }
        shapes |= {p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h]}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    folder.mkdir(parents=True)
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(8 + len(blob) + offset)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).is_file():
            (folder / name).write_bytes((tokenizer_from / name).read_bytes())
    return offset


@pytest.fixture(scope="module")
def half_gb_models(tiny_zoo, tmp_path_factory) -> Path:
    """A base and three fine-tunes of 0.5 GB each (sparse files)."""
    root = tmp_path_factory.mktemp("sparse")
    for name in ("base", "a", "b", "c"):
        sparse_llama(root / name, LLAMA_0_25B, tiny_zoo / "base")
    return root


def config_for(root: Path, tmp: Path, **workers) -> Path:
    data = {
        "name": "big",
        "base_model": str(root / "base"),
        "models": [str(root / m) for m in ("a", "b", "c")],
        "method": "task_arithmetic",
        "tasks": {"search": [{"name": "zoo_add_greedy_search", "subset": 20}]},
        "budget": {"n_trials": 4},
        "refine": None,
        "workers": workers,
    }
    path = tmp / "big.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def evomerge(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evomerge", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=600,
    )


def test_facts_are_what_the_worker_builds(tiny_zoo):
    """The plan's parameter count, resident bytes and inputs are the resident model's and the files'."""
    from evomerge.merge.materialize import Materializer

    facts = ModelFacts.of_inputs(tiny_zoo / "base", [tiny_zoo / "add", tiny_zoo / "reverse"])
    mat = Materializer([tiny_zoo / "add", tiny_zoo / "reverse"], tiny_zoo / "base")
    params = {id(p): p for p in mat.model.parameters()}.values()
    assert facts.params == sum(p.numel() for p in params)
    assert facts.resident_bytes == sum(p.numel() * p.element_size() for p in params)
    assert facts.input_bytes == tuple(
        (tiny_zoo / m / "model.safetensors").stat().st_size - _header(tiny_zoo / m) for m in ("add", "reverse", "base")
    )
    assert facts.layers == 4 and facts.vocab == mat.model.config.vocab_size


def _header(folder: Path) -> int:
    with open(folder / "model.safetensors", "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


def test_task_facts_count_lm_eval_requests(tiny_zoo):
    """One loglikelihood request per example of the subset; the longest is at least its context and answer."""
    from evomerge.scoring import Scorer, TaskSpec

    scorer = Scorer(
        [TaskSpec(name="zoo_add_greedy_search", subset=20), TaskSpec(name="zoo_reverse_greedy_search", subset=10)]
    )
    tasks = TaskFacts.of_scorer(scorer, tiny_zoo / "base")
    assert tasks.requests == 30 and tasks.refine_rows == 30 and not tasks.generates
    task = scorer.tasks["zoo_add_greedy_search"]
    doc = task.eval_docs[scorer.indices("zoo_add_greedy_search")[0]]
    assert tasks.longest >= len(doc["prompt"]) + len(doc["target"]) - 4  # a token per character; <eos> is one


def test_sixty_workers_of_a_half_gb_model_do_not_fit_24_gb(half_gb_models, tmp_path):
    cfg = parse_config(yaml.safe_load(config_for(half_gb_models, tmp_path, count=60).read_text()), source="big.yaml")
    plan = plan_search(cfg, devices=given_devices("24G", "0"))
    assert plan.model.resident_bytes == pytest.approx(0.5e9, rel=0.1)
    assert plan.problems and plan.problems[0].startswith("workers.count: 60 workers"), plan.problems
    assert "at most" in plan.problems[0]
    fits = plan_search(
        cfg.model_copy(update={"workers": cfg.workers.model_copy(update={"count": 4})}),
        devices=given_devices("24G", "0"),
    )
    assert not fits.problems, fits.problems
    # the CLI: one line, exit 2, naming the setting
    done = evomerge("audit", "big.yaml", "--plan", "--host-memory", "24G", "--gpus", "0", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("evomerge: error: big.yaml: workers.count: 60")
    assert "plan: inputs 4 x" in done.stdout and "does NOT fit" in done.stdout


def test_search_refuses_before_any_worker_starts(half_gb_models, tmp_path):
    """More workers than this machine's memory holds (computed from it, so the test holds on any machine): the
    search exits 2 after printing the plan, before Ray starts or runs/ is written."""
    from evomerge.capacity import local_devices

    available = local_devices().nodes[0].host_available
    count = int(available / 0.5e9) + 10  # the resident models alone exceed the memory
    config_for(half_gb_models, tmp_path, count=count)
    done = evomerge("search", "big.yaml", "--no-progress", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and f"workers.count: {count} workers" in done.stderr
    assert "plan: each worker on cpu" in done.stdout
    assert "starting" not in done.stdout and not (tmp_path / "runs").exists()


def test_num_gpus_without_a_gpu_is_refused(half_gb_models, tmp_path):
    config_for(half_gb_models, tmp_path, count=1, num_gpus=1)
    done = evomerge("search", "big.yaml", "--no-progress", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "workers.num_gpus: 1 GPU(s) per worker" in done.stderr
    assert "set workers.num_gpus: 0" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_70b_worker_is_sent_to_more_gpus():
    """On an 8 x 80 GB node, a 70B bfloat16 model does not fit one GPU: the plan names workers.num_gpus and the
    fewest GPUs that hold it; with them it fits."""
    config = {**LLAMA_0_25B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8}  # fmt: skip
    model = ModelFacts.of_config(config, n_inputs=4)
    tasks = TaskFacts(requests=200, longest=64, generates=False, refine_rows=200, refine_tokens=200 * 64)
    node = given_devices("2T", "8x80G")
    one = evaluate_plan(model, tasks, Settings(count=1, num_gpus=1, refine=False), node)
    assert one.problems and one.problems[0].startswith("workers.num_gpus: the resident model (138"), one.problems
    k = int(one.problems[0].split("set workers.num_gpus: ")[1].split()[0])
    assert 2 <= k <= 4
    fits = evaluate_plan(model, tasks, Settings(count=8 // k, num_gpus=k, refine=False), node)
    assert not fits.problems, fits.problems
    assert len(fits.worker.per_device) == k and max(fits.worker.per_device) <= 80e9 * 0.92


def test_the_plan_splits_a_70b_model_as_accelerate_does():
    """A meta-device plan test: accelerate's balanced map of a 70B Llama over 4 slots keeps decoder layers whole,
    uses every slot, and the plan's per-GPU share is within 10% of the fullest slot."""
    import torch
    from transformers import LlamaConfig

    from evomerge.merge.placement import meta_model, shard_map, slot_bytes

    config = {**LLAMA_0_25B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8}  # fmt: skip
    model = meta_model(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}), torch.bfloat16)
    device_map = shard_map(model, 4, int(80e9))
    assert set(device_map.values()) == {0, 1, 2, 3}
    assert all(k.count(".") <= 2 for k in device_map)  # whole layers (model.layers.N), never their parts
    sizes = slot_bytes(model, device_map, 4)
    assert sum(sizes) == 2 * sum(p.numel() for p in model.parameters())
    facts = ModelFacts.of_config(config, n_inputs=4)
    tasks = TaskFacts(requests=1, longest=1, generates=False, refine_rows=1, refine_tokens=1)
    from evomerge.capacity.memory import CUDA_CONTEXT, worker_memory

    share = worker_memory(facts, tasks, Settings(num_gpus=4, refine=False), int(80e9)).per_device
    transient = max(worker_memory(facts, tasks, Settings(num_gpus=4, refine=False), int(80e9)).evaluation, 0)
    assert max(share) - CUDA_CONTEXT - transient == pytest.approx(max(sizes), rel=0.1)


@pytest.mark.parametrize(
    "workers, expect",
    [({"num_gpus": 1.5}, "whole GPUs"), ({"batch_size": 0}, "at least 1"), ({"batch_size": "big"}, "batch_size")],
)
def test_worker_settings_are_validated(tiny_zoo, workers, expect):
    from evomerge.errors import ConfigError

    data = {
        "name": "x",
        "base_model": str(tiny_zoo / "base"),
        "models": [str(tiny_zoo / "add")],
        "method": "task_arithmetic",
        "tasks": {"search": [{"name": "zoo_add_search"}]},
        "workers": workers,
    }
    with pytest.raises(ConfigError, match=expect):
        parse_config(data, source="x.yaml")


def test_generation_tasks_are_planned_with_their_max_gen_toks(tiny_zoo, tmp_path):
    """A generate_until search task: the plan's longest request is its context plus the task's own max_gen_toks
    (what lm-eval generates up to), and a multiple-choice task counts one request per choice."""
    from evomerge.resources import EVAL_TASKS
    from evomerge.scoring import Scorer, TaskSpec

    data = EVAL_TASKS / "zoo" / "data" / "add_search.jsonl"
    (tmp_path / "gen_add.yaml").write_text(
        "task: gen_add\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\ndoc_to_text: prompt\ndoc_to_target: answer\n"
        "output_type: generate_until\ngeneration_kwargs:\n  until: ['<eos>']\n  max_gen_toks: 7\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    gen = Scorer([TaskSpec(name="gen_add", metric="exact_match", subset=10)], [tmp_path])
    facts = TaskFacts.of_scorer(gen, tiny_zoo / "base")
    prompts = [gen.tasks["gen_add"].eval_docs[i]["prompt"] for i in gen.indices("gen_add")]
    assert facts.generates and facts.requests == 10
    assert facts.longest == max(len(p) for p in prompts) + 7  # a token per character, then max_gen_toks
    choice = TaskFacts.of_scorer(Scorer([TaskSpec(name="zoo_add_search", subset=10)]), tiny_zoo / "base")
    assert choice.requests == 40 and not choice.generates  # four choices each


def test_the_plan_counts_a_chat_template_tasks_prompts_as_the_template_renders_them(tiny_zoo, tmp_path):
    """A task scored through the model's chat template runs longer prompts (the template's turns around each one):
    the plan's tokens are the rendered prompt's, as the workers score it."""
    import json
    import shutil

    from evomerge.scoring.scorer import Scorer
    from evomerge.scoring.tasks import TaskSpec

    tok = tmp_path / "tok"
    shutil.copytree(tiny_zoo / "base", tok, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<bos>{{ m['content'] }}<eos>{% endfor %}<bos><bos>"
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    spec = {"name": "zoo_add_search", "subset": 10}
    plain = TaskFacts.of_scorer(Scorer([TaskSpec(**spec)]), tok)
    chat = TaskFacts.of_scorer(Scorer([TaskSpec(**spec, chat_template=True)]), tok)
    assert chat.requests == plain.requests
    assert chat.scored_tokens == plain.scored_tokens + 4 * plain.requests  # 4 template tokens per request
    assert chat.longest == plain.longest + 4


def test_choices_that_differ_only_in_their_last_token_are_planned_as_one_forward(tiny_zoo, tmp_path):
    """lm-eval scores the choices of a context that share all but their last token with one forward (its logits
    cache): two one-token choices cost one run of context + 1 tokens, two requests."""
    from evomerge.resources import EVAL_TASKS
    from evomerge.scoring import Scorer, TaskSpec

    data = EVAL_TASKS / "zoo" / "data" / "add_search.jsonl"
    (tmp_path / "bit.yaml").write_text(
        "task: bit\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\ndoc_to_text: prompt\ndoc_to_target: 0\n"
        "output_type: multiple_choice\ndoc_to_choice: ['0', '1']\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    scorer = Scorer([TaskSpec(name="bit", subset=10)], [tmp_path])
    facts = TaskFacts.of_scorer(scorer, tiny_zoo / "base")
    prompts = [scorer.tasks["bit"].eval_docs[i]["prompt"] for i in scorer.indices("bit")]
    assert facts.requests == 20 and len(facts.scored_lengths) == 10
    assert facts.scored_tokens == sum(len(p) + 2 for p in prompts)  # a token a character, the delimiter and choice


def test_a_pool_refuses_gpus_ray_does_not_have(tiny_zoo, monkeypatch):
    """Any pool (the search's, the guard's, the report's) checks the GPUs Ray reports before it starts an actor,
    which would otherwise wait for one forever."""
    from evomerge.errors import ConfigError
    from evomerge.run.pool import WorkerPool

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    data = {
        "name": "x",
        "base_model": str(tiny_zoo / "base"),
        "models": [str(tiny_zoo / "add")],
        "method": "task_arithmetic",
        "tasks": {"search": [{"name": "zoo_add_search", "subset": 4}]},
        "workers": {"count": 1, "num_gpus": 1},
    }
    with pytest.raises(ConfigError, match=r"workers.num_gpus: 1 worker\(s\) x 1 GPU\(s\), but Ray finds no GPU"):
        WorkerPool(parse_config(data, source="x.yaml"))
    import ray

    assert not ray.is_initialized()  # the pool shut down the Ray it started


def test_per_row_ties_rounds_add_their_host_memory_to_the_plan():
    """A TIES search whose budget runs per-row rounds (refine.arms rows, distill) holds one tensor's TIES over
    row-scaled task vectors in float32 in host memory: on CPU in the worker's transient, on GPU beside its runtime."""
    from evomerge.capacity.memory import row_ties_bytes, worker_memory

    model = ModelFacts.of_config({**LLAMA_0_25B}, n_inputs=4)
    tasks = TaskFacts(requests=200, longest=64, generates=False, refine_rows=200, refine_tokens=200 * 64)
    rows = row_ties_bytes(model)
    assert rows == (6 * 3 + 6) * model.largest * 4
    for gpus in (0, 1):
        plain = worker_memory(model, tasks, Settings(num_gpus=gpus, method="ties"), int(80e9))
        ties = worker_memory(model, tasks, Settings(num_gpus=gpus, method="ties", row_ties=True), int(80e9))
        if gpus:
            assert ties.host - plain.host == rows and ties.per_device == plain.per_device
        else:
            assert ties.refinement - plain.refinement == rows
            assert ties.host - plain.host == max(ties.transient, 0) - plain.transient


def test_the_plan_counts_per_row_ties_rounds_only_where_the_budget_runs_them(tiny_zoo, tmp_path):
    data = {
        "name": "p",
        "base_model": str(tiny_zoo / "base"),
        "models": [str(tiny_zoo / "add"), str(tiny_zoo / "reverse")],
        "method": "ties",
        "tasks": {"search": [{"name": "zoo_add_greedy_search", "subset": 8}]},
        "workers": {"count": 1},
    }
    row_ties = {n: plan_search(parse_config({**data, "budget": {"n_trials": n}})).settings.row_ties for n in (50, 100)}
    assert row_ties == {50: False, 100: True}
    assert not plan_search(
        parse_config({**data, "method": "task_arithmetic", "budget": {"n_trials": 100}})
    ).settings.row_ties


def test_a_batch_of_one_tasks_requests_runs_their_shared_prefix_once():
    """The time plan counts what scoring/lm.py runs: a batch's common prefix once, when the batch is one task's and
    the prefix is at least SHARED_PREFIX_MIN tokens; lm-eval's batches are longest first, padded to their longest."""
    from evomerge.capacity.timing import padded_tokens
    from evomerge.scoring.prefix import SHARED_PREFIX_MIN

    p = SHARED_PREFIX_MIN + 12
    lengths = (50, 48, 47, 40)
    assert padded_tokens(lengths, 2) == 2 * 50 + 2 * 47
    one_task = ((0, p),) * 4
    assert padded_tokens(lengths, 2, one_task) == (2 * 50 - p) + (2 * 47 - p)
    mixed = ((0, p), (0, p), (1, p), (0, p))  # the second batch (47: task 1, 40: task 0) runs whole
    assert padded_tokens(lengths, 2, mixed) == (2 * 50 - p) + 2 * 47
    short = ((0, SHARED_PREFIX_MIN - 1),) * 4
    assert padded_tokens(lengths, 2, short) == 2 * 50 + 2 * 47
