"""Job config: YAML + dotted overrides, typed fields, validation before launch naming the field."""

import pytest

from pipeline.config import load_job_config, print_config, validate
from pipeline.config_io import ConfigError

TINY = "examples/tiny/grpo.yaml"


@pytest.fixture(scope="module", autouse=True)
def assets():
    from examples.tiny.make_assets import build

    build()


def test_tiny_config_loads_with_paths_relative_to_the_file():
    cfg = load_job_config(TINY)
    assert cfg.model.hf_config.endswith("examples/tiny/build/model")
    assert cfg.data.paths[0].endswith("examples/tiny/build/train.jsonl")
    assert validate(cfg, 1) == {"dp": 1, "prompts_per_rank": 32}


def test_dotted_overrides_are_typed():
    cfg = load_job_config(TINY, ["rollout.n_samples=4", "optimizer.lr=1e-5",
                                 'rollout.stop=["\\n"]', "algorithm.name=pods",
                                 "algorithm.downsample={rule: max_variance, keep: 2}"])
    assert cfg.rollout.n_samples == 4 and cfg.optimizer.lr == 1e-5
    assert cfg.rollout.stop == ["\n"]
    assert cfg.algorithm == {"name": "pods", "kl_coef": 0.0,
                             "downsample": {"rule": "max_variance", "keep": 2}}


@pytest.mark.parametrize("override, message", [
    ("rollout.n_sample=3", "unknown config field rollout.n_sample; did you mean rollout.n_samples"),
    ("rollout.n_samples=abc", "rollout.n_samples: expected an integer"),
    ("trainer.steps=1.5", "trainer.steps: expected an integer"),
    ("checkpoint.resume=yes please", "checkpoint.resume: expected true or false"),
    ("rollout", "expected dotted.key=value"),
])
def test_bad_fields_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_job_config(TINY, [override])


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tensor_parallel=3"], 3, "num_attention_heads=4 is not divisible by 3"),
    ([], 3, None),  # 32 prompts over DP=3
    (["rollout.prompts_per_step=30", "trainer.updates_per_step=4"], 1,
     "trainer.updates_per_step=4 does not divide the 30 prompts"),
    (["algorithm.name=pods", "algorithm.downsample={keep: 16}"], 1,
     "algorithm.downsample.keep=16 > rollout.n_samples=8"),
    (["algorithm.name=copo", "algorithm.aggregation=bogus"], 1, "algorithm: .*aggregation"),
    (["algorithm.name=grpo", "algorithm.eps_lo=0.1"], 1, "grpo has no field eps_lo"),
    (["rollout.engine=http"], 1, "rollout.engine=http needs rollout.urls"),
    (["model.hf_config=/nonexistent"], 1, "no config.json at /nonexistent"),
    (["data.paths=[]"], 1, "data.paths is empty"),
    (["model.fp8=hybrid"], 1, "model.fp8 is set but TransformerEngine"),
])
def test_validation_names_the_field(overrides, world, message):
    cfg = load_job_config(TINY, overrides)
    if message is None:
        with pytest.raises(ConfigError, match="prompts_per_step=32 is not divisible by the data-parallel size 3"):
            validate(cfg, world)
        return
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world)


def test_print_config_round_trips(tmp_path):
    cfg = load_job_config(TINY, ["trainer.steps=7"])
    out = tmp_path / "resolved.yaml"
    out.write_text(print_config(cfg))
    again = load_job_config(str(out))
    assert again == cfg


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    from pipeline.cli import main

    assert main(["train", "--config", TINY, "rollout.temprature=0.5"]) == 2
    assert "rollout.temprature" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "dapo", "gspo",
                                  "pods", "copo", "aapo", "jepo", "spro"])
def test_every_tiny_example_config_validates(name):
    cfg = load_job_config(f"examples/tiny/{name}.yaml")
    assert cfg.algorithm["name"] == name
    assert validate(cfg, 1)["dp"] == 1
    assert cfg.logging.run_dir == f"runs/tiny-{name}"


def test_base_chain_merges_sections(tmp_path):
    (tmp_path / "a.yaml").write_text("trainer: {steps: 5, seed: 3}\nrollout: {n_samples: 2}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrainer: {steps: 9}\n")
    from pipeline.config_io import load_yaml

    assert load_yaml(str(tmp_path / "b.yaml")) == {"trainer": {"steps": 9, "seed": 3},
                                                   "rollout": {"n_samples": 2}}
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_yaml(str(tmp_path / "c.yaml"))


def test_cli_passes_options_through_to_plan_and_convert(capsys):
    from pipeline.cli import main

    assert main(["plan", "--config", "examples/qwen2.5-7b/grpo.yaml", "--nodes", "1",
                 "--gpus-per-node", "8", "--gpu-mem", "80"]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["convert", "megatron-to-hf", "--ckpt", "/nonexistent", "--out", "/tmp/x"]) == 2
    assert "/nonexistent" in capsys.readouterr().err


def test_context_parallel_layouts_validate():
    # CP ranks share one replica's rows: DP = world / (TP x CP x PP).
    assert validate(load_job_config(TINY, ["parallel.context_parallel=2"]), 2)["dp"] == 1
    assert validate(load_job_config(TINY, ["parallel.context_parallel=2"]), 4)["dp"] == 2
    with pytest.raises(ConfigError, match="world size 3 is not divisible by tensor x pipeline x context"):
        validate(load_job_config(TINY, ["parallel.context_parallel=2"]), 3)


def test_virtual_pipeline_needs_pipeline_parallelism_and_layers_for_every_chunk():
    from megatron_ext.parallel import ParallelConfig

    with pytest.raises(ConfigError, match="parallel.virtual_pipeline=2 needs parallel.pipeline_parallel > 1"):
        validate(load_job_config(TINY, ["parallel.virtual_pipeline=2"]), 2)
    # The tiny model has 3 layers: PP=3 works, PP=3 x VPP=2 has no layer for two of the chunks.
    with pytest.raises(ConfigError, match=r"num_hidden_layers=3 is not divisible by 6 \(parallel.pipeline_parallel"
                                          r" x parallel.virtual_pipeline\)"):
        validate(load_job_config(TINY, ["parallel.pipeline_parallel=3", "parallel.virtual_pipeline=2"]), 3)
    assert validate(load_job_config(TINY, ["parallel.pipeline_parallel=3"]), 3)["dp"] == 1
    # One chunk per rank is plain 1F1B: megatron-core must not be told to interleave.
    assert ParallelConfig(pipeline_parallel=2, virtual_pipeline=1).model_chunks() is None
    assert ParallelConfig(pipeline_parallel=2, virtual_pipeline=2).model_chunks() == 2
