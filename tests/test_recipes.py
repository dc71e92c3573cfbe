"""Named recipes: valid configs, entry points, the `recipe` CLI, YAML round trips, and the
size/layout of the atlas-scale recipe (parameters counted analytically, the count itself
checked against a real model).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bionemo_scale import recipes
from bionemo_scale.cli import main
from bionemo_scale.config import ScaleConfig, ScaleModelConfig, dump_yaml, load_yaml, validate_config
from bionemo_scale.errors import ScaleError

REPO = Path(__file__).resolve().parents[1]
RECIPE_DIR = REPO / "recipes"
NAMES = ["tiny_cpu", "norman_demo", "tahoe_100m_pretrain", "finetune"]


def run_cli(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# -- the recipes themselves ----------------------------------------------------------------------
def test_builtin_names() -> None:
    assert sorted(recipes.BUILTIN) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_is_a_valid_config(name: str) -> None:
    cfg = recipes.get_recipe(name)
    assert isinstance(cfg, ScaleConfig)
    assert cfg.name == name
    # Re-validating its own dump gives the same config: nothing relies on construction-time state.
    again = validate_config(ScaleConfig, cfg.model_dump(mode="json"), name)
    assert again == cfg
    assert cfg.data_parallel_size >= 1
    assert recipes.BUILTIN[name].__doc__, "the docstring is what `recipe list/show` prints"


def test_recipes_are_fresh_objects() -> None:
    a = recipes.get_recipe("tiny_cpu")
    a.trainer.max_steps = 1
    assert recipes.get_recipe("tiny_cpu").trainer.max_steps != 1


def test_unknown_recipe_lists_the_names() -> None:
    with pytest.raises(ScaleError, match=r"unknown recipe 'nope'.*tiny_cpu"):
        recipes.get_recipe("nope")


# -- entry points --------------------------------------------------------------------------------
def test_entry_points_resolve() -> None:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=recipes.ENTRY_POINT_GROUP)}
    assert set(NAMES) <= set(eps), "pyproject's [project.entry-points.'bionemo.recipes'] is not installed"
    for name in NAMES:
        ep = eps[name]
        assert ep.value == f"bionemo_scale.recipes:{name}"
        fn = ep.load()
        assert fn is recipes.BUILTIN[name]
        assert fn() == recipes.get_recipe(name)
    assert set(NAMES) <= set(recipes.registered())


# -- the CLI -------------------------------------------------------------------------------------
def test_cli_list(capsys) -> None:
    code, out, err = run_cli(capsys, ["recipe", "list"])
    assert code == 0 and err == ""
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert set(NAMES) <= set(rows)
    for name in NAMES:
        first_doc_line = recipes.BUILTIN[name].__doc__.strip().splitlines()[0]
        assert rows[name].split(None, 1)[1] == first_doc_line


def test_cli_show_prints_doc_then_yaml(capsys) -> None:
    code, out, _ = run_cli(capsys, ["recipe", "show", "tahoe_100m_pretrain"])
    assert code == 0
    doc, _, body = out.partition("\n\n")
    assert doc.startswith("Atlas-scale pretraining on Tahoe-100M")
    assert body.endswith(dump_yaml(recipes.get_recipe("tahoe_100m_pretrain")))


@pytest.mark.parametrize("name", NAMES)
def test_cli_dump_round_trips_through_config_loading(capsys, tmp_path: Path, name: str) -> None:
    code, out, err = run_cli(capsys, ["recipe", "dump", name])
    assert code == 0 and err == ""
    path = tmp_path / f"{name}.yaml"
    path.write_text(out)
    loaded = validate_config(ScaleConfig, load_yaml(path), str(path))
    assert loaded == recipes.get_recipe(name)


def test_dumped_yaml_is_what_train_config_uses(capsys, tmp_path: Path) -> None:
    """`train --config FILE` goes through the CLI's own config path: file, then --data/--split, then overrides."""
    from bionemo_scale.cli import _job_config

    _, out, _ = run_cli(capsys, ["recipe", "dump", "norman_demo"])
    path = tmp_path / "norman_demo.yaml"
    path.write_text(out)
    args = argparse.Namespace(
        config=str(path), recipe=None, data="DATA", split="split-col", overrides=["trainer.max_steps=7"]
    )
    cfg = _job_config(args)
    expected = recipes.get_recipe("norman_demo")
    assert cfg.model == expected.model and cfg.optim == expected.optim
    assert (cfg.data.path, cfg.data.split, cfg.trainer.max_steps) == ("DATA", "split-col", 7)


def test_edited_yaml_with_a_typo_is_refused(capsys, tmp_path: Path) -> None:
    _, out, _ = run_cli(capsys, ["recipe", "dump", "tiny_cpu"])
    data = yaml.safe_load(out)
    data["trainer"]["max_stepz"] = 5
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ScaleError, match=r"trainer\.max_stepz"):
        validate_config(ScaleConfig, load_yaml(path), str(path))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["recipe", "show", "nope"], "unknown recipe 'nope'"),
        (["recipe", "dump", "nope"], "unknown recipe 'nope'"),
        (["recipe", "dump"], "'recipe dump' needs a recipe name"),
    ],
)
def test_cli_errors_are_one_line_exit_2(capsys, args: list[str], needle: str) -> None:
    code, out, err = run_cli(capsys, args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bionemo-scale recipe: error: ")
    assert needle in lines[0]


# -- recipes/*.yaml in the repository ------------------------------------------------------------
def test_recipe_files_exist_for_exactly_the_recipes() -> None:
    assert sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_files_are_in_sync(capsys, name: str) -> None:
    _, out, _ = run_cli(capsys, ["recipe", "dump", name])
    assert (RECIPE_DIR / f"{name}.yaml").read_text() == out, (
        f"recipes/{name}.yaml is stale: regenerate it with `bionemo-scale recipe dump {name} > recipes/{name}.yaml`"
    )


# -- the atlas-scale recipe ----------------------------------------------------------------------
TAHOE_VOCAB = {"n_genes": 2000, "n_parts": 379, "n_contexts": 50, "n_batches": 14}  # 2,000 HVGs; 379 drugs


def scale_param_count(m: ScaleModelConfig) -> int:
    """Parameters of a ScaleModel, from its config (RMSNorm, SwiGLU, no biases, no positions).

    Transformer layer: QKV 3h² + output projection h² + SwiGLU (gate and up h·f each, down f·h)
    + two norms. Gene encoder/decoder, endpoint head, prior and control-statistics MLPs are
    in → width → out without biases. Condition tokens: embeddings (+1 for "unknown"), dose,
    time MLP (64 sinusoidal features, with biases), one type embedding per token.
    """
    h, w, f, g = m.hidden_size, m.encoder_width, m.ffn, m.n_genes

    def mlp(n_in: int, n_out: int) -> int:
        return n_in * w + w * n_out

    layer = 4 * h * h + 3 * h * f + 2 * h
    transformer = m.num_layers * layer + h  # + final norm
    tokens = 4 + int(m.use_control_stats)
    conditions = (
        (m.n_parts + 1) * h
        + h  # dose
        + (m.n_contexts + 1) * h
        + (m.n_batches + 1) * h
        + (64 * h + h)
        + (h * h + h)  # time MLP
        + tokens * h
        + m.pert_feature_dim * h
        + (mlp(g, h) if m.additive_prior else 0)
        + (mlp(2 * g, h) if m.use_control_stats else 0)
    )
    return transformer + mlp(g, h) + mlp(h, h) + mlp(h, g) + conditions


_COUNT_SCRIPT = """
import json, sys
from bionemo_scale.parallel import init_distributed
init_distributed(1, 1, seed=0)
from bionemo_scale.config import ScaleModelConfig
from bionemo_scale.model.scale_model import ScaleModel
from bionemo_scale.model.transformer_config import build_transformer_config
out = []
for fields in json.loads(sys.argv[1]):
    cfg = ScaleModelConfig(**fields)
    model = ScaleModel(build_transformer_config(cfg), cfg)
    out.append(sum(p.numel() for p in model.parameters()))
print("COUNTS", json.dumps(out))
"""


def test_param_count_formula_matches_a_real_model() -> None:
    """The analytic count equals ScaleModel's on small configs (fresh process: megatron state)."""
    base = dict(hidden_size=32, num_layers=3, num_attention_heads=4, n_genes=20, n_parts=4, n_contexts=3, n_batches=2)
    variants = [
        dict(base, ffn_hidden_size=48, encoder_hidden_size=64),
        dict(base, additive_prior=False, use_control_stats=False, pert_feature_dim=5),
        dict(base, num_layers=2),  # default widths: ffn 4h, encoder 2h
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _COUNT_SCRIPT, json.dumps(variants)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("COUNTS ")]
    real = json.loads(line.removeprefix("COUNTS "))
    assert real == [scale_param_count(ScaleModelConfig(**v)) for v in variants]


def test_tahoe_recipe_layout_and_size() -> None:
    cfg = recipes.get_recipe("tahoe_100m_pretrain")
    m, t = cfg.model, cfg.trainer
    # TP=4 within a node, PP=2: one model replica per 8-GPU node, DP across nodes.
    assert (t.tensor_model_parallel_size, t.pipeline_model_parallel_size) == (4, 2)
    assert t.devices == 8 and t.accelerator == "gpu"
    assert t.devices % (t.tensor_model_parallel_size * t.pipeline_model_parallel_size) == 0
    assert cfg.data_parallel_size == t.num_nodes
    # Transformer Engine with FP8 (hybrid: E4M3 forward, E5M2 backward), bf16 everywhere else.
    assert (m.spec, m.fp8, m.params_dtype, t.precision) == ("te", "hybrid", "bfloat16", "bf16-mixed")
    # Shapes shard evenly: heads, MLPs and gene encoder/decoder under TP=4, layers under PP=2.
    assert m.num_attention_heads % 4 == 0 and m.ffn % 4 == 0 and m.encoder_width % 4 == 0
    assert m.hidden_size // m.num_attention_heads == 128  # head dim suited to fused attention
    assert m.num_layers % 2 == 0
    # ~1B parameters with the 2,000-gene panel.
    n = scale_param_count(m.model_copy(update=TAHOE_VOCAB))
    assert 0.8e9 <= n <= 1.5e9, f"{n / 1e9:.2f}B parameters"
    # Global batch divides into micro-batches over the data-parallel ranks.
    assert cfg.global_batch_size % (cfg.data.micro_batch_size * cfg.data_parallel_size) == 0


def test_tahoe_transformer_dominates_the_count() -> None:
    """Sanity of the budget: the 24 layers, not the gene-panel MLPs, hold most parameters."""
    m = recipes.get_recipe("tahoe_100m_pretrain").model.model_copy(update=TAHOE_VOCAB)
    h, f = m.hidden_size, m.ffn
    layers = m.num_layers * (4 * h * h + 3 * h * f + 2 * h)
    assert layers / scale_param_count(m) > 0.85


def test_cpu_recipes_stay_small() -> None:
    for name in ("tiny_cpu", "finetune"):
        cfg = recipes.get_recipe(name)
        assert cfg.trainer.accelerator == "cpu" and cfg.model.spec == "local" and cfg.model.fp8 is None
        assert scale_param_count(cfg.model.model_copy(update={"n_genes": 2000})) < 2e6


def test_fp8_shapes_are_checked_when_the_config_is_made() -> None:
    # Transformer Engine's FP8 GEMMs need rows % 8 == 0 (the tokens of a set: 5 condition tokens +
    # set_size cells) and widths % 16 == 0; a wrong set size would only fail on the GPU, mid-launch
    from bionemo_scale.config import apply_overrides
    from bionemo_scale.errors import ScaleError

    tahoe = recipes.get_recipe("tahoe_100m_pretrain")
    assert tahoe.model.fp8 and (5 + tahoe.data.sampler.set_size) % 8 == 0
    fp8 = ["model.spec=te", "model.fp8=hybrid"]
    with pytest.raises(ScaleError, match=r"= 37\) to be a multiple of 8: use data.sampler.set_size=27 or 35"):
        apply_overrides(recipes.get_recipe("tiny_cpu"), fp8)  # 5 + 32 tokens
    apply_overrides(recipes.get_recipe("tiny_cpu"), [*fp8, "data.sampler.set_size=35"])
    with pytest.raises(ScaleError, match="multiples of 16"):
        apply_overrides(recipes.get_recipe("tiny_cpu"), [*fp8, "data.sampler.set_size=35", "model.ffn_hidden_size=200"])


def test_the_precision_plugin_carries_fp8() -> None:
    # MegatronStrategy copies the plugin's settings onto the model's TransformerConfig: a plugin
    # built without fp8 silently trained the FP8 recipe in plain bf16
    import tempfile

    from bionemo_scale.config import apply_overrides
    from bionemo_scale.train.engine import build_trainer

    cfg = apply_overrides(recipes.get_recipe("tiny_cpu"), ["model.spec=te", "model.fp8=hybrid",
                                                   "model.fp8_recipe=tensorwise", "data.sampler.set_size=35"])  # fmt: skip
    trainer, _, _ = build_trainer(cfg, Path(tempfile.mkdtemp()))
    dtype = trainer.strategy.precision_plugin.dtype_config
    assert (dtype.fp8, dtype.fp8_recipe) == ("hybrid", "tensorwise")
