"""The machine flags of `evomerge audit --plan` say what they plan for: a GPU size needs its unit, the flags need
--plan, the host memory taken from this machine is labelled so, a config that leaves the given GPUs idle says so,
and CPUs are the given machine's (never this one's)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import yaml


def plan_config(tmp: Path, zoo: Path, **workers) -> Path:
    data = {
        "name": "flags",
        "base_model": str(zoo / "base"),
        "models": [str(zoo / "add"), str(zoo / "reverse")],
        "method": "task_arithmetic",
        "tasks": {"search": [{"name": "zoo_add_search", "subset": 8}]},
        "budget": {"n_trials": 4},
        "refine": None,
        "workers": {"count": 1, **workers},
    }
    path = tmp / "flags.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*argv: str) -> tuple[int, str, str]:
    from evomerge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_a_gpu_size_without_its_unit_is_refused_naming_the_unit(tiny_zoo, tmp_path):
    code, _, err = cli("audit", str(plan_config(tmp_path, tiny_zoo)), "--plan", "--gpus", "8x80")
    assert code == 2 and err.count("\n") == 1, err
    assert "--gpus: '8x80' gives no unit" in err and "write 8x80G" in err
    assert "refine" not in err  # not read as 80 bytes per GPU, whose refusal named refine


@pytest.mark.parametrize("flags", [["--gpus", "8x80G"], ["--host-memory", "1T"], ["--nodes", "2"], ["--cpus", "8"]])
def test_machine_flags_without_plan_are_refused(tiny_zoo, tmp_path, flags):
    code, out, err = cli("audit", str(plan_config(tmp_path, tiny_zoo)), *flags)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{flags[0]} describes the machine of a resource plan" in err and "add --plan" in err
    assert out == ""  # nothing audited in silence


def test_host_memory_left_out_is_labelled_as_this_machines(tiny_zoo, tmp_path):
    code, out, _ = cli("audit", str(plan_config(tmp_path, tiny_zoo, num_gpus=1)), "--plan", "--gpus", "8x80G")
    assert code == 0, out
    node = next(line for line in out.splitlines() if "needs" in line and "host memory" in line)
    assert "with this machine's free host memory: --host-memory sets it" in node
    code, out, _ = cli(
        "audit", str(plan_config(tmp_path, tiny_zoo, num_gpus=1)), "--plan", "--gpus", "8x80G", "--host-memory", "1T"
    )
    assert code == 0 and "this machine's" not in out and "1000.0 GB of 1000.0 GB available" in out


def test_num_gpus_zero_with_given_gpus_says_they_stay_idle(tiny_zoo, tmp_path):
    code, out, _ = cli("audit", str(plan_config(tmp_path, tiny_zoo)), "--plan", "--gpus", "8x80G")
    assert code == 0, out
    assert "plan: warning: workers.num_gpus is 0: the workers run on CPU and leave the 8 GPU(s)" in out
    assert "set workers.num_gpus: 1" in out


def test_cpus_are_the_given_machines(tiny_zoo, tmp_path):
    """8 workers x 2 CPUs on a given machine of 4 CPUs do not fit, whatever this machine has; with no --cpus the
    plan checks no CPU count and says it was not given."""
    import os

    config = str(plan_config(tmp_path, tiny_zoo, count=8, num_cpus=2))
    code, out, err = cli("audit", config, "--plan", "--gpus", "0", "--host-memory", "1T", "--cpus", "4")
    assert code == 2 and err.count("\n") == 1, err
    assert "8 workers x 2 CPUs (workers.num_cpus) need 16 CPUs, but the machine given on the command line has 4" in err
    assert "4 CPUs" in out
    code, out, err = cli("audit", config, "--plan", "--gpus", "0", "--host-memory", "1T", "--cpus", "16")
    assert code == 0, err
    code, out, err = cli("audit", config, "--plan", "--gpus", "0", "--host-memory", "1T")
    assert code == 0, err
    assert "CPUs not given (--cpus)" in out
    assert f", {len(os.sched_getaffinity(0))} CPUs," not in out


def test_a_7b_night_is_planned_from_its_config_json_alone():
    """The shipped 7B-on-8-GPUs config, its models nowhere on this machine: memory and time from config.json."""
    from evomerge.capacity.timing import GPUS

    repo = Path(__file__).resolve().parent.parent
    code, out, err = cli(
        "audit",
        str(repo / "configs" / "7b-8gpus.yaml"),
        "--plan",
        "--model-config",
        str(repo / "configs" / "llama-2-7b.config.json"),
        "--gpus",
        "8x80G",
        "--host-memory",
        "1T",
        "--cpus",
        "96",
        "--gpu-kind",
        "A100",
    )
    assert code == 0, err
    assert "plan: inputs 4 x 13.5 GB (base + 3 models, 6.74B parameters)" in out
    timing = next(line for line in out.splitlines() if line.startswith("plan: time per trial on 1 x A100"))
    parts = dict(re.findall(r"(merge|evaluation|refinement|overhead) ([\d.]+) s", timing))
    total = float(re.search(r"= ([\d.]+) s", timing).group(1))
    assert set(parts) == {"merge", "evaluation", "refinement", "overhead"}
    assert abs(sum(map(float, parts.values())) - total) < 0.05 * total
    assert f"{GPUS['A100'][0] / 1e12:.0f} TFLOP/s" in timing
    night = next(line for line in out.splitlines() if "trials per hour with 8 worker(s)" in line)
    assert "300 trials" in night and "ends ~" in night
    # at 7B the subspace default merges' CPU SVDs take hours: the default portfolio leaves them out, saying so, and
    # the night is the trials' (minutes)
    left = next(line for line in out.splitlines() if line.startswith("plan: the portfolio leaves out"))
    assert "tsv_m, iso_c, iso_cts" in left and " h on one CPU thread" in left
    assert re.search(r"take ~\d+ min", night) and "portfolio merges" in night


def test_a_portfolio_list_keeps_the_subspace_merges_it_names_with_a_warning(tmp_path):
    """`portfolio: [ties, tsv_m]` scores those two default merges whatever they cost: the plan keeps TSV-M's hours in
    the night and warns; a method with no default merge is refused naming the choices."""
    repo = Path(__file__).resolve().parent.parent
    cfg = yaml.safe_load((repo / "configs" / "7b-8gpus.yaml").read_text())
    cfg["portfolio"] = ["ties", "tsv_m"]
    path = tmp_path / "7b.yaml"
    path.write_text(yaml.safe_dump(cfg))
    flags = ["--plan", "--model-config", str(repo / "configs" / "llama-2-7b.config.json"), "--gpus", "8x80G"]
    code, out, err = cli("audit", str(path), *flags, "--host-memory", "1T", "--cpus", "96", "--gpu-kind", "A100")
    assert code == 0, err
    assert "plan: the portfolio leaves out" not in out
    assert re.search(r"300 trials and 1 portfolio merge take ~1\d\.\d h", out), out  # ties is the study's method
    assert "plan: warning: the portfolio's default merges (tsv_m:" in out
    cfg["portfolio"] = ["ties", "slerpy"]
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = cli("audit", str(path), *flags)
    assert code == 2 and "portfolio" in err and "'slerpy' has no default merge" in err and "tsv_m" in err


def test_the_time_plan_follows_its_quantities():
    """Twice the tokens scored, twice the forward time; a merge streams the inputs and the resident model and pays
    a fixed cost per tensor; a refinement round's cost is shared by the budget's trials; requests are padded in
    batches as lm-eval runs them."""
    from evomerge.capacity import ModelFacts, TaskFacts
    from evomerge.capacity.timing import (
        REFINE_TENSOR_S,
        REQUEST_S,
        TENSOR_S,
        forward_flops,
        gpu_speed,
        padded_tokens,
        trial_time,
    )

    model = ModelFacts.of_config({"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816,
                                  "num_hidden_layers": 16, "num_attention_heads": 16, "vocab_size": 32000,
                                  "dtype": "bfloat16"}, n_inputs=3)  # fmt: skip
    speed = gpu_speed("H100", 1)
    tasks = TaskFacts(
        requests=100, longest=20, generates=False, refine_rows=100, refine_tokens=2000, scored_tokens=2000
    )
    double = TaskFacts(**{**tasks.__dict__, "scored_tokens": 4000})
    one, two = trial_time(model, tasks, speed, 100, 0, 0), trial_time(model, double, speed, 100, 0, 0)
    forward = 2000 * forward_flops(model) / speed.flops
    assert one.evaluation == pytest.approx(forward + 100 * REQUEST_S)
    assert two.evaluation - one.evaluation == pytest.approx(forward)
    streamed = (sum(model.input_bytes) + model.resident_bytes) / speed.merge_bytes_s
    assert model.tensors == 16 * 9 + 3  # a Llama's, from its config alone
    assert one.merge == pytest.approx(streamed + model.tensors * TENSOR_S)
    refined = trial_time(model, tasks, speed, 100, rounds=4, steps=60)
    step = 3 * forward + one.merge + model.tensors * REFINE_TENSOR_S
    assert refined.refinement * 100 == pytest.approx(4 * 60 * step)
    assert trial_time(model, tasks, speed, 200, rounds=4, steps=60).refinement == pytest.approx(refined.refinement / 2)
    assert padded_tokens((5, 9, 7, 3), batch=2) == 9 * 2 + 5 * 2  # longest first, each batch padded to its longest


def test_the_time_plan_prices_the_refinement_batch_the_workers_train_on(tiny_zoo, tmp_path):
    """A refinement step trains on `refine.examples` per task where set, else on the workers' rule at this size
    (footprint.examples_per_task): the plan's refinement batch shrinks with it, the rest of the trial does not."""
    from evomerge.capacity.plan import plan_search, refined_tasks
    from evomerge.config.schema import load_config
    from evomerge.refine.footprint import MIN_REFINE_EXAMPLES, examples_per_task

    def plan_of(**refine):
        data = yaml.safe_load(plan_config(tmp_path, tiny_zoo).read_text())
        data["refine"] = {"at": [0.5], "steps": 4, **refine}
        path = tmp_path / "refined.yaml"
        path.write_text(yaml.safe_dump(data))
        cfg = load_config(path)
        plan = plan_search(cfg)
        return plan, refined_tasks(plan, cfg)

    plan, whole = plan_of()
    assert whole.refine_tokens == plan.tasks.refine_tokens  # a tiny model: every search example, as the workers do
    assert whole.largest_subset == 8 and whole.refine_positions > 0
    _, two = plan_of(examples=2)
    assert two.refine_tokens == round(plan.tasks.refine_tokens * 2 / 8)
    # the workers' rule: a step's parameters x positions past the budget trains on fewer examples, never below the floor
    assert examples_per_task(10**6, 1000, largest=100) is None
    assert examples_per_task(10**7, 10**4, largest=100) == 50  # half the parameter-positions fit: half the examples
    assert examples_per_task(10**9, 10**4, largest=100) == MIN_REFINE_EXAMPLES


def test_the_gpus_page_plan_commands_run_as_written():
    """docs/gpus.md's `audit --plan` block, each line as a user types it, from the repository's root."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    text = (repo / "docs" / "gpus.md").read_text()
    block = re.search(r"```bash\n(evomerge audit configs/7b-8gpus.yaml.*?)```", text, re.S).group(1)
    for line in block.strip().splitlines():
        command = line.replace("evomerge ", f"{sys.executable} -m evomerge ", 1)
        done = subprocess.run(command, shell=True, cwd=repo, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (line, done.stderr)
        assert "plan: time per trial" in done.stdout or "workers.num_gpus" in done.stderr + done.stdout, line
