"""Per-call cost of `Scorer.score` against a plain `lm_eval.simple_evaluate` per call, on the tiny zoo.

    .venv/bin/python bench/score_overhead.py                     # builds a tiny zoo in a temp dir first
    .venv/bin/python bench/score_overhead.py --zoo /tmp/zoo      # or reuse one (evomerge.zoo.build, size="tiny")

Scores zoo_add_search and zoo_reverse_search on the same fixed 100-example subsets (800 loglikelihood
requests), --repeats times each way, and prints the median seconds per call and the share of it spent in
the model's forward passes. The naive way builds the TaskManager and tasks and loads the data on every
call, as a search that calls simple_evaluate per trial would. One torch thread (as a 1-CPU worker).
Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, help="an existing tiny zoo (default: build one in a temp dir)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from evomerge.offline import go_offline

    go_offline()
    import torch

    torch.set_num_threads(args.threads)
    from evomerge.scoring import BUILTIN_TASKS, Scorer, TaskSpec, load_model_dir, quiet

    zoo = args.zoo
    if zoo is None:
        from evomerge.zoo.build import build_zoo

        zoo = Path(tempfile.mkdtemp()) / "zoo"
        build_zoo(zoo, size="tiny", log=None)
    model, tokenizer = load_model_dir(zoo / "add")
    names = ["zoo_add_search", "zoo_reverse_search"]
    t0 = time.perf_counter()
    scorer = Scorer([TaskSpec(name=n, subset=100) for n in names])
    build_s = time.perf_counter() - t0

    forward = [0.0]
    inner = model.forward

    def timed_forward(*a, **k):
        t = time.perf_counter()
        out = inner(*a, **k)
        forward[0] += time.perf_counter() - t
        return out

    model.forward = timed_forward

    def measure(fn) -> tuple[float, float]:
        fn()  # warm-up
        runs = []
        for _ in range(args.repeats):
            forward[0] = 0.0
            t = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t, forward[0]))
        total = statistics.median(r[0] for r in runs)
        return total, statistics.median(r[1] for r in runs)

    def naive_call():
        import os

        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        cwd = os.getcwd()
        os.chdir(BUILTIN_TASKS / "zoo")
        try:
            with quiet():
                lm_eval.simple_evaluate(
                    model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=scorer.batch_size),
                    tasks=names,
                    task_manager=TaskManager(include_path=str(BUILTIN_TASKS), include_defaults=False),
                    samples=scorer.subsets,
                    bootstrap_iters=0,
                    log_samples=False,
                )
        finally:
            os.chdir(cwd)

    ours, ours_fwd = measure(lambda: scorer.score(model, tokenizer))
    plain, plain_fwd = measure(naive_call)
    print(f"tasks: {', '.join(names)} x 100 examples (800 loglikelihood requests), {args.threads} torch thread(s)")
    print(f"Scorer build (once):        {build_s:6.3f} s")
    print(f"Scorer.score per call:      {ours:6.3f} s  (forward {ours_fwd:.3f} s = {ours_fwd / ours:.0%})")
    print(f"simple_evaluate per call:   {plain:6.3f} s  (forward {plain_fwd:.3f} s = {plain_fwd / plain:.0%})")
    print(
        f"speed-up: {plain / ours:.1f}x; overhead beyond forward {ours - ours_fwd:.3f} s vs {plain - plain_fwd:.3f} s"
    )


if __name__ == "__main__":
    main()
