"""Scores a live model on lm-eval tasks built once; what the candidate evaluator calls per candidate.

    from evomerge.scoring import Scorer, TaskSpec
    scorer = Scorer([TaskSpec(name="zoo_add_search", subset=100), "zoo_reverse_search"])
    scores = scorer.score(model, tokenizer)      # {"zoo_add_search": {"acc": 0.61, "acc_norm": 0.58}, ...}
    scorer.objective(scores)                     # weighted mean of the chosen metrics, 0-1

Per call it runs only lm-eval's `evaluate` (requests, forward passes, metrics): task building, dataset
loading, the TaskManager index and the env/git bookkeeping of `simple_evaluate` happen once or never.
The numbers equal `lm_eval.simple_evaluate` on the same tasks and samples (tests/test_scoring.py checks it).
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import TaskCodeError, TaskError, first_line
from evomerge.scoring.tasks import TaskCatalog, TaskSpec, as_spec, metric_names, wants_chat_template

if TYPE_CHECKING:
    from lm_eval.api.task import Task

Scores = dict[str, dict[str, float]]
Examples = dict[str, dict[int, float]]  # {leaf task: {example index: value}}
FEWSHOT_SEED = 1234  # lm-eval's default fewshot seed: the same few-shot contexts on every call


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """lm-eval's INFO logs and progress bars off; what was written to stderr reappears if the block fails."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        logger.setLevel(level)


def task_code_frame(exc: BaseException, folders: Sequence[Path]) -> traceback.FrameSummary | None:
    """The innermost frame of `exc`'s traceback (or of an exception it was raised from) that runs a Python file
    inside `folders`: the task folders' own code, i.e. the user's. None when the exception never passed there."""
    roots = [f.resolve() for f in folders]
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            path = Path(frame.filename)
            if path.suffix == ".py" and any(path.resolve().is_relative_to(root) for root in roots):
                return frame
        exc = exc.__cause__ or exc.__context__
    return None


def _sample(row: dict[str, Any], kind: str, task) -> dict[str, Any]:
    """One logged example for a reader: the prompt, what the model did (its generation; for a loglikelihood task
    the answer's log-likelihood and whether it is the greedy one; for multiple choice the choice it ranks first),
    the reference, and the example's metrics."""
    args, resps = row["arguments"], row["filtered_resps"]
    prompt = str(args[0][0]) if args and args[0] else ""
    reference: Any = row["target"]
    if kind == "generate_until":
        response = str(resps[0]) if resps else ""
    elif kind == "multiple_choice":
        choices = task.doc_to_choice(row["doc"])
        best = max(range(len(resps)), key=lambda i: float(resps[i][0]))
        response = str(choices[best])
        reference = choices[reference] if isinstance(reference, int) and 0 <= reference < len(choices) else reference
    else:
        ll, greedy = resps[0]
        response = f"log-likelihood {float(ll):.3f} of the reference; greedy answer: {'yes' if greedy else 'no'}"
    metrics = {m: row[m] for m in row.get("metrics", []) if isinstance(row.get(m), (int, float))}
    return {"doc_id": int(row["doc_id"]), "prompt": prompt, "response": response, "reference": reference, **metrics}


def _metrics(row: dict[str, Any]) -> dict[str, float]:
    """lm-eval's 'acc,none' / 'acc_stderr,none' row -> {'acc': value} ('acc,<filter>' for other filters)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        if metric.endswith("_stderr"):
            continue
        out[metric if filt == "none" else key] = float(value)
    return out


def _answer_probability(row: dict[str, Any]) -> float | None:
    """The reference answer's probability in one logged lm-eval sample (see Scorer.score_examples)."""
    import math

    resps = row.get("filtered_resps")
    if not isinstance(resps, list) or not resps or not all(isinstance(r, (tuple, list)) and r for r in resps):
        return None
    lls = [float(r[0]) for r in resps]
    if len(lls) == 1:  # loglikelihood of the one reference answer
        return math.exp(lls[0])
    target = row.get("target")
    if not isinstance(target, int) or not 0 <= target < len(lls):
        return None
    top = max(lls)
    weights = [math.exp(x - top) for x in lls]
    return weights[target] / sum(weights)


def _rows_as_list(task: Task) -> None:
    """Hold the eval split as a list of dicts: lm-eval walks it twice per call, and an Arrow row costs ~0.1 ms."""
    split = task.get_config("test_split") or task.get_config("validation_split")
    dataset = getattr(task, "dataset", None)
    if task.get_config("process_docs") is None and split and dataset is not None and split in dataset:
        task.dataset = {**dict(dataset), split: list(dataset[split])}


LM_MAX_GEN_TOKS = 256  # HFLM's bound where a task gives none
ANSWER_MARGIN = 8  # tokens a generation may run past the longest reference answer before it is cut


def answer_tokens(task, lm) -> int | None:
    """Tokens of the longest reference answer (target delimiter included) among all of a generate_until task's
    examples, or None where a cut could change a score: a task whose filters read the generation (a chain of
    thought before the answer, a regex that extracts it) or whose targets are not text."""
    if task.OUTPUT_TYPE != "generate_until" or task.get_config("filter_list") is not None:
        return None
    delim = task.get_config("target_delimiter") or ""
    longest = 0
    for doc in task.eval_docs:
        target = task.doc_to_target(doc)
        for text in target if isinstance(target, list) else [target]:
            if not isinstance(text, str):
                return None
            longest = max(longest, len(lm.tok_encode(f"{delim}{text}")))
    return longest


GEN_BOUNDS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # lm-eval's order


def generation_bound(task, default: int) -> int:
    """The new tokens a generate_until task allows (its first bound in lm-eval's order, else `default`)."""
    kwargs = task.get_config("generation_kwargs") or {}
    return int(next((kwargs[k] for k in GEN_BOUNDS if kwargs.get(k) is not None), default))


def cap_generation(task, lm, own: int) -> None:
    """Generate at most the longest reference answer's tokens plus ANSWER_MARGIN, never more than `own` (the
    task's bound), so a candidate that never emits the stop sequence costs a few tokens, not the task's bound. An
    answer that matches a reference is no longer than that, so exact match scores it the same."""
    kwargs = task.get_config("generation_kwargs")
    longest = answer_tokens(task, lm)
    if isinstance(kwargs, dict):
        kwargs["max_gen_toks"] = own if longest is None else min(own, longest + ANSWER_MARGIN)


EVERY_METRIC = "*"  # a spec that reads no one metric (`evomerge eval` prints them all): any task's is accepted


class Scorer:
    """Builds the tasks and their seeded subsets once; `score(model, tokenizer)` evaluates a live model in place,
    on whatever device it lives on.

    An exception raised inside the task folders' own Python code (a task YAML's `!function`) becomes a
    TaskCodeError: the candidate fails, not the search. Not thread-safe: `quiet()` swaps the process's stderr
    during a call (one scorer per worker process).
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str],
        include_paths: Sequence[str | Path] = (),
        *,
        seed: int = 0,
        batch_size: int = 64,
        include_defaults: bool = False,
        answer_cap: bool = True,
    ):
        self.specs = [as_spec(t) for t in tasks]
        if not self.specs:
            raise TaskError("no tasks to score; name at least one lm-eval task (e.g. zoo_add)")
        self.seed, self.batch_size = seed, batch_size
        self.answer_cap = answer_cap  # generation cut at the longest reference answer (cap_generation)
        self.gen_bounds: dict[str, int] = {}  # generate_until leaf -> its own max_gen_toks, before any cut
        self.tasks: dict[str, Task] = {}
        self.members: dict[str, list[str]] = {}  # spec name -> leaf tasks (a tag names several)
        self.subsets: dict[str, list[int]] = {}  # leaf task -> sorted example indices
        self.chat: dict[str, bool] = {}  # leaf task -> prompts rendered through the model's chat template
        self._lm = None
        with quiet():
            catalog = TaskCatalog(include_paths, include_defaults=include_defaults)
            wrong_metrics: list[str] = []  # every task's, so a config with several is fixed in one pass
            for spec in self.specs:
                self._add(spec, catalog.build(spec.name), wrong_metrics)
        if wrong_metrics:
            raise TaskError("; ".join(wrong_metrics))
        self.code_folders = catalog.code_folders()

    def _add(self, spec: TaskSpec, built: dict[str, Task], wrong_metrics: list[str]) -> None:
        if spec.name in self.members:
            raise TaskError(f"task {spec.name} is listed twice; list each task once")
        self.members[spec.name] = list(built)
        for leaf, task in built.items():
            if leaf in self.tasks:
                raise TaskError(f"task {leaf} is listed twice (directly and through {spec.name}); list it once")
            valid = metric_names(task)
            if spec.metric != EVERY_METRIC and spec.metric not in valid:
                wrong_metrics.append(f"task {leaf} has no metric {spec.metric!r}; valid: {', '.join(valid)}")
                continue
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)  # what simple_evaluate does
            _rows_as_list(task)
            self.tasks[leaf] = task
            self.chat[leaf] = wants_chat_template(task, spec)
            if task.OUTPUT_TYPE == "generate_until":
                self.gen_bounds[leaf] = generation_bound(task, LM_MAX_GEN_TOKS)
            n = len(task.eval_docs)
            if spec.subset is not None and spec.subset > n:
                raise TaskError(f"task {leaf} has {n} examples, fewer than subset {spec.subset}; use subset <= {n}")
            if spec.subset is not None and spec.subset < n:
                # seeded per task name, so adding or reordering tasks leaves every other subset unchanged
                self.subsets[leaf] = sorted(random.Random(f"{self.seed}:{leaf}").sample(range(n), spec.subset))

    def wrap(self, model, tokenizer):
        """lm-eval's HFLM around the live model (no copy, no move: it runs where the model lives).

        Kept while the same model and tokenizer are scored, so tokenizations are reused across calls;
        the scorer therefore holds a reference to the last model it scored.
        """
        from evomerge.scoring.lm import ResidentHFLM

        if self._lm is None or self._lm.source[0] is not model or self._lm.source[1] is not tokenizer:
            self._lm = None
            self._lm = ResidentHFLM(model, tokenizer, batch_size=self.batch_size)
            if self.answer_cap:
                for leaf, own in self.gen_bounds.items():
                    cap_generation(self.tasks[leaf], self._lm, own)
        model.eval()
        return self._lm

    def score(self, model, tokenizer) -> Scores:
        """{task: {metric: value}} for the model's current weights (no response cache between calls)."""
        return self._evaluate(model, tokenizer, dict(self.subsets) or None, log_samples=False)["results"]

    def score_examples(
        self, model, tokenizer, samples: dict[str, list[int]] | None = None
    ) -> tuple[Scores, Examples, Examples]:
        """(scores, metric per example, answer probability per example) on `samples` ({leaf: example indices};
        default: each task's whole subset). The metric per example is the spec's (`acc`: 0 or 1); the answer's
        probability is exp(log-likelihood) of the reference answer (loglikelihood tasks) or the softmax share of the
        right choice (multiple choice), absent for other output types. Leaves left out of `samples` are not run."""
        chosen = samples if samples is not None else {leaf: self.indices(leaf) for leaf in self.tasks}
        out = self._evaluate(model, tokenizer, chosen, log_samples=True, leaves=list(chosen))
        metric = {leaf: spec.metric for spec in self.specs for leaf in self.members[spec.name]}
        values: Examples = {}
        probs: Examples = {}
        for leaf, rows in out["samples"].items():
            # a logged sample holds each metric under its bare name, one row per example and filter
            name, _, filt = metric[leaf].partition(",")
            rows = [r for r in rows if r.get("filter", "none") == (filt or "none")]
            values[leaf] = {int(r["doc_id"]): float(r[name]) for r in rows}
            p = {int(r["doc_id"]): _answer_probability(r) for r in rows}
            probs[leaf] = {k: v for k, v in p.items() if v is not None}
        return out["results"], values, probs

    def score_samples(self, model, tokenizer, n: int) -> tuple[Scores, list[dict[str, Any]]]:
        """(scores, the first `n` examples of each task as lm-eval logged them: task, doc_id, prompt, the model's
        response, the reference and the example's metrics), on the same subsets as `score`."""
        out = self._evaluate(model, tokenizer, dict(self.subsets) or None, log_samples=True)
        rows = []
        for leaf, logged in out["samples"].items():
            kind = self.tasks[leaf].OUTPUT_TYPE
            for row in sorted(logged, key=lambda r: int(r["doc_id"]))[:n]:
                rows.append({"task": leaf, **_sample(row, kind, self.tasks[leaf])})
        return out["results"], rows

    def indices(self, leaf: str) -> list[int]:
        """The example indices a leaf task is scored on (its seeded subset, or every example)."""
        return self.subsets.get(leaf) or list(range(len(self.tasks[leaf].eval_docs)))

    def _evaluate(self, model, tokenizer, samples, *, log_samples: bool, leaves: list[str] | None = None) -> dict:
        tasks = {leaf: self.tasks[leaf] for leaf in (leaves or self.tasks)}
        results: Scores = {}
        logged: dict[str, Any] = {}
        with quiet():
            lm = self.wrap(model, tokenizer)
            for task in self.tasks.values():
                task.set_fewshot_seed(seed=FEWSHOT_SEED)
            # lm-eval applies the chat template to every task of a call: one call per setting (usually one)
            for chat in sorted({self.chat[leaf] for leaf in tasks}):
                group = {leaf: task for leaf, task in tasks.items() if self.chat[leaf] == chat}
                if chat:
                    self._check_chat_template(tokenizer, group)
                chosen = None if samples is None else {k: v for k, v in samples.items() if k in group}
                out = self._call_evaluate(lm, group, chosen or None, log_samples, chat)
                results.update({leaf: _metrics(out["results"][leaf]) for leaf in group})
                logged.update(out.get("samples", {}))
        return {"results": {leaf: results[leaf] for leaf in tasks}, "samples": logged}

    @staticmethod
    def _check_chat_template(tokenizer, leaves: Sequence[str]) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TaskError(
                f"task {next(iter(leaves))} is scored through the model's chat template, but the model's tokenizer "
                "has none (tokenizer_config.json or chat_template.jinja); set `chat_template: false` on the task "
                "in the config, or score a model that has one"
            )

    def _call_evaluate(self, lm, tasks: dict[str, Task], samples, log_samples: bool, chat: bool) -> dict:
        from lm_eval.evaluator import evaluate

        try:
            return evaluate(
                lm=lm,
                task_dict={"tasks": tasks, "groups": {}, "group_map": {}},
                samples=samples,
                bootstrap_iters=0,
                log_samples=log_samples,
                apply_chat_template=chat,
            )
        except Exception as exc:
            where = task_code_frame(exc, self.code_folders)
            if where is None:
                raise  # lm-eval's, torch's or our own: a bug, not this candidate's failure
            raise TaskCodeError(
                f"task code {where.filename}:{where.lineno} ({where.name}) raised {type(exc).__name__}: "
                f"{first_line(exc)}; fix the task's Python code"
            ) from exc

    def objective(self, scores: Scores) -> float:
        """Weighted mean of each spec's metric (a tag's tasks averaged), on a 0-1 scale, higher is better.

        Perplexity enters as 1/perplexity: the geometric mean probability of the answer.
        """
        total = weight = 0.0
        for spec in self.specs:
            values = [self._unit(leaf, spec.metric, scores[leaf][spec.metric]) for leaf in self.members[spec.name]]
            total += spec.weight * sum(values) / len(values)
            weight += spec.weight
        return total / weight

    def leaf_values(self, scores: Scores) -> dict[str, float]:
        """{leaf task: its spec's metric on the 0-1 higher-is-better scale the objective uses}."""
        return {
            leaf: self._unit(leaf, spec.metric, scores[leaf][spec.metric])
            for spec in self.specs
            for leaf in self.members[spec.name]
        }

    def _unit(self, leaf: str, metric: str, value: float) -> float:
        base = metric.split(",", 1)[0]
        if base == "perplexity":
            return 1.0 / value
        if not self.tasks[leaf].higher_is_better().get(base, True) or not 0.0 <= value <= 1.0:
            raise TaskError(
                f"metric {metric!r} of task {leaf} is not a 0-1 higher-is-better score ({value}); "
                "choose acc, acc_norm, exact_match or perplexity"
            )
        return value
