"""Merge cost per trial of the subspace methods (tsv_m, iso_c, iso_cts) against task arithmetic's, side by side.

    .venv/bin/python bench/subspace_cost.py                  # SmolLM2-135M's shapes and the tiny zoo's (~5 min loaded)
    .venv/bin/python bench/subspace_cost.py --layers 2       # time 2 decoder layers instead of 1 (then x 30 / 2)
    .venv/bin/python bench/subspace_cost.py --models tiny    # the tiny zoo's shapes only (seconds)

Random float32 matrices of each model's shapes (a base and two fine-tunes: base + noise), merged tensor by tensor by
`merge_tensor`, the path `evomerge merge` and a search's workers run (inside `kernel_threads`: one thread per op, as
every evomerge kernel runs). A trial merges every tensor once: the decoder layers' tensors are timed for `--layers`
of them and scaled to the model's depth; the embeddings (tied: one 49152 x 576 matrix at SmolLM2) and the final norm
are timed once. Printed per method: seconds per trial and the ratio to task arithmetic's, measured in this run.

- tsv_m (first trial): a worker's first merge, the per-task SVDs computed (and kept in the cache);
- tsv_m (later trials): at other weights and rank fractions, the SVDs from the cache: what every later trial costs;
- the cache's size (float32 U, S, V^T of every task matrix), and what one SVD of the embeddings would cost (they
  merge by the weighted mean instead; merge/kernels/subspace.py says why);
- beside each, the resource plan's figure for the same work (evomerge/capacity/timing.py `subspace_s`: the SVDs'
  and products' FLOPs at SVD_EFFICIENCY of one thread's matrix-product probe, read in this run) against what this
  run measured over task arithmetic, and the plan's cache bytes (`svd_cache_bytes`) against the cache's own count.

SmolLM2-135M: 30 layers, hidden 576, intermediate 1536, vocab 49152, 9 query heads and 3 key/value heads of 64
(q, o: 576 x 576; k, v: 192 x 576; gate, up: 1536 x 576; down: 576 x 1536), tied embeddings. The tiny zoo
(`evomerge zoo build --size tiny`): 4 layers, hidden 32, intermediate 64, vocab 45, 2 heads, untied head.
Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass

METHODS = ("task_arithmetic", "tsv_m", "iso_c", "iso_cts")


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_width: int  # key/value heads x head size
    tied: bool

    def layer_tensors(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        h, m, kv = self.hidden, self.intermediate, self.kv_width
        p = f"model.layers.{i}."
        return [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (m, h)),
            (p + "mlp.up_proj.weight", (m, h)),
            (p + "mlp.down_proj.weight", (h, m)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]

    def facts(self):
        """The plan's facts of these shapes: a base and two models, the weight matrices timed here."""
        from evomerge.capacity import ModelFacts

        matrices = tuple(s for i in range(self.layers) for _, s in self.layer_tensors(i) if len(s) == 2)
        config = {"model_type": "llama", "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                  "num_hidden_layers": self.layers, "num_attention_heads": max(1, self.hidden // 64),
                  "vocab_size": self.vocab, "tie_word_embeddings": self.tied}  # fmt: skip
        return ModelFacts.of_config(config, n_inputs=3, matrix_shapes=matrices)

    def outside_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        out = [("model.embed_tokens.weight", (self.vocab, self.hidden)), ("model.norm.weight", (self.hidden,))]
        return out if self.tied else [*out, ("lm_head.weight", (self.vocab, self.hidden))]


SHAPES = {
    "smollm2": Shape("SmolLM2-135M", 30, 576, 1536, 49152, 192, tied=True),
    "tiny": Shape("tiny zoo", 4, 32, 64, 45, 32, tied=False),
}


def _inputs(shape: tuple[int, ...], seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g) * 0.02
    return [base, base + torch.randn(*shape, generator=g) * 1e-3, base + torch.randn(*shape, generator=g) * 1e-3]


def _params(method: str, name: str, trial: int):
    from evomerge.merge.plan import TensorParams

    weights = (0.7, 1.1) if trial == 0 else (0.9, 0.6)  # a later trial: other weights, other rank fractions
    per = {"base": {}}
    for key, w, f in (("a", weights[0], 0.5 + 0.2 * trial), ("b", weights[1], 0.5)):
        per[key] = {"weight": w}
        if method == "tsv_m":
            per[key]["rank_fraction"] = f
    shared = {"lambda": 1.0}
    if method == "task_arithmetic":
        shared.update(normalize=False, int8_mask=False, rescale=False)
        for key in ("a", "b"):
            per[key]["density"] = 1.0
    if method == "iso_cts":
        shared["common_fraction"] = 0.8
    return TensorParams(name, 0.0, shared, per)


def _time(method: str, tensors: list[tuple[str, tuple[int, ...]]], trial: int) -> float:
    from evomerge.merge.kernels.chunks import kernel_threads
    from evomerge.merge.materialize import merge_tensor
    from evomerge.merge.methods import get_method

    total = 0.0
    for i, (name, shape) in enumerate(tensors):
        inputs = _inputs(shape, seed=i)
        params = _params(method, name, trial)
        with kernel_threads():
            start = time.perf_counter()
            merge_tensor(get_method(method), params, inputs, ["base", "a", "b"], "base")
            total += time.perf_counter() - start
    return total


def _embedding_svd(shape: Shape) -> float:
    import torch

    from evomerge.merge.kernels.chunks import kernel_threads

    a = torch.randn(shape.vocab, shape.hidden)
    with kernel_threads():
        start = time.perf_counter()
        torch.linalg.svd(a, full_matrices=False)
        return time.perf_counter() - start


def _planned(shape: Shape) -> dict:
    """The resource plan's seconds of each method's SVD work a trial (capacity/timing.py), at this run's probe."""
    from evomerge.capacity.timing import matmul_flops, speed_at, subspace_s

    model, speed = shape.facts(), speed_at(matmul_flops(1), 1)
    out: dict = {"rate": speed.svd_flops, "where": speed.svd_where}
    for method in ("iso_c", "iso_cts"):
        out[method] = subspace_s(model, speed, method)[0]
    per, once = subspace_s(model, speed, "tsv_m")
    out["tsv_m (first trial)"], out["tsv_m (later trials)"] = per + once, per
    return out


def run(shape: Shape, layers: int) -> None:
    from evomerge.merge.kernels.subspace import SVD_CACHE

    measured = min(layers, shape.layers)
    inside = [t for i in range(measured) for t in shape.layer_tensors(i)]
    scale = shape.layers / measured
    print(f"\n{shape.name}: {shape.layers} layers ({measured} timed, x {scale:g}), 2 models, float32, one thread")
    for method in METHODS:  # imports and first-call set-up out of the timings
        _time(method, [("model.layers.0.mlp.up_proj.weight", (8, 4)), ("model.norm.weight", (4,))], 0)
    rows = []
    SVD_CACHE.clear()
    for label, method, trial in (
        ("task_arithmetic", "task_arithmetic", 0),
        ("tsv_m (first trial)", "tsv_m", 0),
        ("tsv_m (later trials)", "tsv_m", 1),
        ("iso_c", "iso_c", 0),
        ("iso_cts", "iso_cts", 0),
    ):
        seconds = _time(method, inside, trial) * scale + _time(method, shape.outside_tensors(), trial)
        rows.append((label, seconds))
        if label == "tsv_m (later trials)":
            cache = SVD_CACHE.used * scale
    ta = rows[0][1]
    planned = _planned(shape)
    print(f"  {'method':<22} {'s / trial':>10} {'x task_arithmetic':>18} {'over TA: measured':>18} {'plan':>8}")
    for label, seconds in rows:
        plan = f"{planned[label]:>8.3f}" if label in planned else f"{'':>8}"
        print(f"  {label:<22} {seconds:>10.3f} {seconds / ta:>18.1f} {seconds - ta:>18.3f} {plan}")
    from evomerge.capacity.memory import svd_cache_bytes

    plan_cache = svd_cache_bytes(shape.facts())
    print(f"  tsv_m's SVD cache: {cache / 2**20:.1f} MiB per worker (2 models); the plan: {plan_cache / 2**20:.1f} MiB")
    print(f"  the plan's SVD rate: {planned['rate'] / 1e9:.1f} GFLOP/s ({planned['where']})")
    if shape.vocab * shape.hidden > 1 << 20:
        print(f"  one SVD of the {shape.vocab} x {shape.hidden} embeddings: {_embedding_svd(shape):.2f} s (not taken)")


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=1, help="decoder layers timed (then scaled to the depth)")
    parser.add_argument("--models", default="smollm2,tiny", help="comma-separated: " + ", ".join(SHAPES))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    for key in args.models.split(","):
        run(SHAPES[key.strip()], args.layers)


if __name__ == "__main__":
    main()
