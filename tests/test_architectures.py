"""Real architectures (tests/archs.py: Llama, Qwen2, Mistral, Gemma, Phi-3, GPT-2, GPT-NeoX, tiny and random).

For each: `evomerge merge` gives mergekit's tensors (mergekit kernels; mergekit run in process on the same recipe);
the in-memory candidate (Materializer, what a search scores) equals the exported checkpoint reloaded by
transformers (logits); `evomerge audit` runs; a 3-trial search over the shipped spaces runs and exports. Tied
embeddings are merged once and stay tied; a search-space kind that names no tensor of the architecture exits 2.
README's architecture table is filled from these tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from archs import ARCHS, ATTN
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.export.export import export_recipe
from evomerge.merge.recipe import Recipe

MERGEKIT_ARCHS = tuple(a for a in ARCHS if a != "gpt_neox")  # mergekit 0.1.5 cannot read GPT-NeoX (see below)
TIED = ("gemma", "gpt2")
IDS = torch.tensor([[1, 14, 15, 40, 16, 42, 20, 21, 22, 2], [1, 30, 31, 32, 41, 5, 6, 7, 2, 0]])


def ties_recipe(family: dict[str, Path], arch: str) -> Recipe:
    """TIES with a per-model weight gradient, a per-kind filter in the architecture's own names, and densities."""
    attn = ATTN.get(arch, "self_attn")
    return Recipe.from_dict(
        {
            "merge_method": "ties",
            "base_model": str(family["base"]),
            "models": [
                {"model": str(family["a"]), "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
                {
                    "model": str(family["b"]),
                    "parameters": {
                        "weight": [{"filter": attn, "value": [0.9, 0.1]}, {"value": 0.5}],
                        "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}],
                    },
                },
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
        }
    )


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def mergekit_merge(recipe: Recipe, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml()))
    run_merge(config, str(out), options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return load_dir(out)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, attention_mask=(IDS != 0).long()).logits


@pytest.mark.parametrize("arch", MERGEKIT_ARCHS)
def test_merge_equals_mergekit(arch, arch_family, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_KERNELS", "mergekit")
    family = arch_family(arch)
    recipe = ties_recipe(family, arch)
    ours = load_dir(export_recipe(recipe, tmp_path / "ours"))
    theirs = mergekit_merge(recipe, tmp_path / "theirs")
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    source = load_dir(family["a"])
    assert all(not torch.equal(ours[k], source[k]) for k in source if "layers" in k or ".h." in k)  # merged, not copied


def test_mergekit_cannot_read_gpt_neox_checkpoints(arch_family, tmp_path):
    """Why the GPT-NeoX row has no mergekit parity: mergekit 0.1.5's GPT-NeoX definition requires the
    `attention.bias` buffers that transformers no longer saves. (When a mergekit release reads them, this fails:
    move gpt_neox into MERGEKIT_ARCHS.)"""
    recipe = ties_recipe(arch_family("gpt_neox"), "gpt_neox")
    with pytest.raises(RuntimeError, match="attention.bias required but not present"):
        mergekit_merge(recipe, tmp_path / "theirs")
    export_recipe(recipe, tmp_path / "ours")  # evomerge reads them by their stored names


@pytest.mark.parametrize("arch", ARCHS)
def test_in_memory_candidate_equals_reloaded_export(arch, arch_family, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.merge.materialize import Materializer

    family = arch_family(arch)
    recipe = ties_recipe(family, arch)
    mat = Materializer([family["a"], family["b"]], family["base"])
    mat.apply(recipe)
    out = export_recipe(recipe, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(mat.model)
    assert torch.equal(logits(mat.model), logits(reloaded))
    base = AutoModelForCausalLM.from_pretrained(family["base"]).eval()
    assert not torch.equal(logits(base), logits(reloaded))  # the merge changed the model


@pytest.mark.parametrize("arch", TIED)
def test_tied_embeddings_are_merged_once_and_stay_tied(arch, arch_family, tmp_path):
    from transformers import AutoModelForCausalLM

    family = arch_family(arch)
    out = export_recipe(ties_recipe(family, arch), tmp_path / "out")
    assert "lm_head.weight" not in load_dir(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_a_stored_tied_head_is_merged_as_the_embeddings_it_is_tied_to(arch_family, tmp_path):
    """Some checkpoints of tied models store the head too (a copy of the embeddings); transformers ignores it on
    load. evomerge merges the embeddings once, does not write the head, and the candidate it scores is the model
    transformers reloads, even where a filter would give the head other parameters."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from evomerge.merge.materialize import Materializer

    family = {}
    for role, src in arch_family("gemma").items():
        family[role] = tmp_path / role
        shutil.copytree(src, family[role])
        tensors = load_file(str(src / "model.safetensors"))
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, str(family[role] / "model.safetensors"), metadata={"format": "pt"})
    recipe = Recipe.from_dict(
        {
            "merge_method": "linear",
            "base_model": str(family["base"]),
            "models": [
                {
                    "model": str(family["a"]),
                    "parameters": {"weight": [{"filter": "lm_head", "value": 0.0}, {"value": 1.0}]},
                },
                {
                    "model": str(family["base"]),
                    "parameters": {"weight": [{"filter": "lm_head", "value": 1.0}, {"value": 0.5}]},
                },
            ],
        }
    )
    mat = Materializer([family["a"]], family["base"])
    mat.apply(recipe)
    out = export_recipe(recipe, tmp_path / "out")
    assert "lm_head.weight" not in load_dir(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(mat.model), logits(reloaded))
    assert mat.model.get_output_embeddings().weight is mat.model.get_input_embeddings().weight


@pytest.mark.parametrize("arch", ARCHS)
def test_audit_runs(arch, arch_family, tmp_path, capsys):
    family = arch_family(arch)
    config = tmp_path / "audit.yaml"
    config.write_text(
        yaml.safe_dump({"base_model": str(family["base"]), "models": [str(family["a"]), str(family["b"])]})
    )
    assert main(["audit", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(g["row"], g["kind"]) for g in report["groups"]}
    for layer in range(3):  # every layer's attention and MLP found under the architecture's own names
        assert {(f"layer {layer}", "self_attn"), (f"layer {layer}", "mlp")} <= rows
    assert ("embed", "all") in rows
    assert all(g["cosine"] is not None and abs(g["cosine"]) < 0.5 for g in report["groups"] if g["kind"] != "other")


SPACES = ("ties", "slerp", "dare_ties", "della", "task_arithmetic", "breadcrumbs")
FAST_SPACES = ("ties", "slerp")  # the spaces whose filters depend on tensor names (kinds, embeddings)


def search_config(family: dict[str, Path], arch: str, space: str) -> dict:
    models = [str(family["a"])] if space == "slerp" else [str(family["a"]), str(family["b"])]
    return {
        "name": f"{arch}-{space}",
        "base_model": str(family["base"]),
        "models": models,
        "method": space,
        "search_space": space,
        "tasks": {"search": [{"name": "zoo_add_search", "subset": 4}]},
        "sampler": {"name": "random"},
        "budget": {"n_trials": 4},  # the baselines, then one sampled point (whose recipe has the space's filters)
        "workers": {"count": 0},
        "refine": None,  # the architecture is what is tested here; refinement has its own tests
        "portfolio": False,
    }


def run_and_export(family: dict[str, Path], arch: str, space: str, tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(search_config(family, arch, space)))
    assert main(["search", str(config)]) == 0
    assert main(["export", f"runs/{arch}-{space}"]) == 0
    if space in ("ties", "slerp", "dare_ties"):  # kinds: the recipe filters by the architecture's own names
        from evomerge.study.storage import load_study

        study = load_study(f"{arch}-{space}", f"sqlite:///{tmp_path}/runs/{arch}-{space}/study.db")
        sampled = [t for t in study.trials if t.state.name == "COMPLETE" and "baseline" not in t.user_attrs]
        assert sampled and ATTN.get(arch, "self_attn") in sampled[-1].user_attrs["recipe"]
    Recipe.load(tmp_path / f"runs/{arch}-{space}/best/recipe.yaml")
    AutoModelForCausalLM.from_pretrained(tmp_path / f"runs/{arch}-{space}/best/model")


@pytest.mark.parametrize("space", FAST_SPACES)
@pytest.mark.parametrize("arch", ARCHS)
def test_search_runs_end_to_end(arch, space, arch_family, tmp_path, monkeypatch):
    run_and_export(arch_family(arch), arch, space, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("space", [s for s in SPACES if s not in FAST_SPACES])
@pytest.mark.parametrize("arch", ARCHS)
def test_search_runs_end_to_end_other_spaces(arch, space, arch_family, tmp_path, monkeypatch):
    run_and_export(arch_family(arch), arch, space, tmp_path, monkeypatch)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_shipped_space_lays_over_every_architecture(arch, arch_family):
    """Each shipped space's default recipe, planned over the architecture: every kind's filter selects tensors of
    that kind, and a searched kind gets its own value (not the fallback)."""
    from evomerge.candidate.space import SearchSpace, load_space_spec
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.merge.layout import Layout
    from evomerge.merge.plan import Plan

    family = arch_family(arch)
    layout = Layout.of(Checkpoint(family["base"]))
    for name in SPACES:
        spec = load_space_spec(name)
        space = SearchSpace.over(spec, family["base"])
        models = [family["a"]] if spec.max_models == 1 else [family["a"], family["b"]]
        point = {k: p.low + 0.3 * (p.high - p.low) + 0.001 * i for i, (k, p) in enumerate(space.bounds(models).items())}
        recipe = space.to_recipe(point, models, family["base"], spec.methods[0], seed=0)
        for kind in space.spec.kinds:
            flt = space.filters[kind]
            assert any(flt in n for n in layout.layer_names()), (name, kind, flt)
        if not space.spec.kinds:
            continue
        param = "weight" if "weight" in spec.parameters else "t"
        jobs = {job.name: job for job in Plan(recipe, layout=layout).jobs()}

        def value(tensor: str) -> float:
            params = jobs[tensor].params
            return params.per_input[str(models[0])][param] if param == "weight" else params.shared[param]

        # each kind's tensors in layer 0 get that kind's own searched value, different for every kind
        firsts = [next(n for n in layout.layer_names(0) if space.filters[k] in n) for k in space.spec.kinds]
        values = [value(n) for n in firsts]
        assert len(set(values)) == len(values), (name, dict(zip(firsts, values)))
        # norms, which no kind names, take the space's `rest` value (per model), in every architecture
        norms = [n for n in layout.layer_names() if "norm" in n or ".ln_" in n]
        owner = "" if param == "t" else f".{Path(models[0]).name}"
        rest = point.get(f"{param}{owner}.rest", spec.parameters[param].baseline)
        assert norms and all(value(n) == pytest.approx(rest, abs=1e-3) for n in norms), name


def test_a_kind_no_tensor_has_exits_2_naming_it_and_the_architecture(arch_family, tmp_path, monkeypatch, capsys):
    from evomerge.candidate.space import SPACES_DIR

    family = arch_family("gpt2")
    cfg = search_config(family, "gpt2", "ties")
    cfg["search_space"] = {**yaml.safe_load((SPACES_DIR / "ties.yaml").read_text()), "kinds": ["self_attn", "feed_fwd"]}
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["search", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evomerge: error: ") and "\n" not in err
    assert "kinds entry 'feed_fwd' matches no tensor of GPT2LMHeadModel" in err and "attn.c_attn.weight" in err
    assert not (tmp_path / "runs").exists()


def test_probe_regions_use_the_architectures_names(arch_family):
    from evomerge.analysis.probe import regions_of
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.merge.layout import Layout

    gpt2 = Layout.of(Checkpoint(arch_family("gpt2")["base"]))
    assert regions_of(3, gpt2) == [
        ("layer 0", "transformer.h.0."),
        ("layer 1", "transformer.h.1."),
        ("layer 2", "transformer.h.2."),
        ("attention", "attn"),
        ("MLP", "mlp"),
        ("embeddings", "wte"),
    ]  # tied: the head is the embeddings, no region of its own
    neox = Layout.of(Checkpoint(arch_family("gpt_neox")["base"]))
    assert dict(regions_of(3, neox)) == {
        "layer 0": "gpt_neox.layers.0.",
        "layer 1": "gpt_neox.layers.1.",
        "layer 2": "gpt_neox.layers.2.",
        "attention": ".attention.",
        "MLP": "mlp",
        "embeddings": "embed_in",
        "head": "embed_out",
    }


def test_a_driver_without_the_weights_lays_the_space_over_the_config(arch_family, tmp_path):
    """On a cluster the driver may hold only config.json; the space's names then come from the architecture
    transformers builds from it (on the meta device)."""
    import shutil

    from evomerge.candidate.space import SearchSpace, load_space_spec
    from evomerge.merge.layout import Layout

    folder = tmp_path / "gpt2-config-only"
    folder.mkdir()
    shutil.copy(arch_family("gpt2")["base"] / "config.json", folder)
    space = SearchSpace(load_space_spec("ties"), 3, Layout.from_config(folder))
    assert space.filters == {"self_attn": "attn", "mlp": "mlp"} and space.embed_filters == ["wte", "wpe"]
    (folder / "config.json").write_text('{"num_hidden_layers": 3}')  # no architecture: Llama's names
    assert Layout.from_config(folder) is None
