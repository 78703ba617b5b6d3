"""Scores one checkpoint folder as it is on disk (`evomerge eval`): load it offline (safetensors only, no remote
code unless asked), then Scorer. Candidates of a merge are scored by `evomerge.candidate.evaluator` instead, in
memory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evomerge.errors import ModelError, first_line
from evomerge.io.checkpoint import TOKENIZER_FILES, Checkpoint
from evomerge.scoring.scorer import Scorer, Scores
from evomerge.scoring.tasks import TaskSpec


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ModelError(f"model directory {model_dir} does not exist; pass a Hugging Face checkpoint folder")
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir} has no config.json; pass a Hugging Face checkpoint folder")
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(
            f"{model_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES[:2])}); "
            f"save one there with tokenizer.save_pretrained('{model_dir}')"
        )
    if not any(model_dir.glob("*.safetensors")):
        raise ModelError(f"{model_dir} has no *.safetensors weights; evomerge loads no pickle checkpoints")
    Checkpoint(model_dir)  # headers and sizes checked: a corrupt or truncated file is a ModelError, not a traceback


def load_model_dir(model_dir: Path | str, *, device: str = "cpu", trust_remote_code: bool = False):
    """(model, tokenizer) from a local HF folder, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.offline import go_offline
    from evomerge.scoring.scorer import quiet

    go_offline()
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    try:
        with quiet():  # no "Loading weights" bars
            tokenizer = AutoTokenizer.from_pretrained(
                str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code
            )
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir),
                local_files_only=True,
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
                dtype="auto",
            )
    except (OSError, ValueError) as exc:
        hint = "" if trust_remote_code else " (a model with custom code needs --trust-remote-code)"
        raise ModelError(f"cannot load {model_dir}: {first_line(exc)}{hint}") from exc
    return model.to(device).eval(), tokenizer


def evaluate_model_dir(
    model_dir: Path | str,
    tasks: Sequence[TaskSpec | str],
    include_paths: Sequence[str | Path] = (),
    *,
    trust_remote_code: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
    include_defaults: bool = False,
) -> Scores:
    """{task: {metric: value}} of the checkpoint in `model_dir` (tasks are checked before the model loads)."""
    scorer, model, tokenizer = _loaded(
        model_dir, tasks, include_paths, trust_remote_code, seed, batch_size, device, include_defaults
    )
    return scorer.score(model, tokenizer)


def sample_model_dir(
    model_dir: Path | str,
    tasks: Sequence[TaskSpec | str],
    n: int,
    include_paths: Sequence[str | Path] = (),
    *,
    trust_remote_code: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
    include_defaults: bool = False,
) -> tuple[Scores, list[dict]]:
    """`evaluate_model_dir`'s scores and the first `n` examples of each task as scored (`Scorer.score_samples`)."""
    scorer, model, tokenizer = _loaded(
        model_dir, tasks, include_paths, trust_remote_code, seed, batch_size, device, include_defaults
    )
    return scorer.score_samples(model, tokenizer, n)


def _loaded(model_dir, tasks, include_paths, trust_remote_code, seed, batch_size, device, include_defaults):
    """The tasks' Scorer (built and checked first) and the checkpoint loaded."""
    check_model_dir(Path(model_dir))
    scorer = Scorer(tasks, include_paths, seed=seed, batch_size=batch_size, include_defaults=include_defaults)
    model, tokenizer = load_model_dir(model_dir, device=device, trust_remote_code=trust_remote_code)
    return scorer, model, tokenizer
