import pytest

from drift import config


def test_demo_file_equals_builtin_defaults():
    assert config.load("configs/demo.toml") == config.Config()


def test_every_shipped_config_loads():
    for name in ("smoke", "paper"):
        cfg = config.load(f"configs/{name}.toml", ['data.path="/tmp/x"'] if name == "paper" else [])
        assert cfg.run.archs


def test_toml_round_trip_preserves_every_value(rng):
    import torch

    cfg = config.Config()
    cfg.run.seed = int(torch.randint(0, 10_000, (1,), generator=rng))
    cfg.train.finetune.lr = float(torch.rand(1, generator=rng)) * 1e-3
    cfg.metrics.fractions = [0.05, 0.15]
    assert config.from_toml_text(cfg.to_toml()) == cfg


def test_overrides_are_typed_and_nested():
    cfg = config.load(None, ["train.finetune.lr=1e-5", "run.device=cpu", 'run.archs=["resnet18"]', "data.n_test=7"])
    assert cfg.train.finetune.lr == 1e-5 and cfg.run.device == "cpu" and cfg.run.archs == ["resnet18"]
    assert cfg.data.n_test == 7


@pytest.mark.parametrize("override, fragment", [
    ("train.finetune.lrate=1", "train.finetune.lrate"),
    ("nosuch.key=1", "nosuch"),
    ("data.n_test=abc", "data.n_test"),
    ("run.archs=[\"vgg99\"]", "vgg99"),
    ("metrics.fractions=[0.0]", "metrics.fractions"),
    ("no_equals_sign", "key=value"),
])
def test_bad_keys_and_values_name_the_culprit(override, fragment):
    with pytest.raises(config.ConfigError, match=fragment.replace("[", r"\[")):
        config.load(None, [override])


def test_unknown_key_in_file_is_named(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train.transfer]\nepochz = 3\n")
    with pytest.raises(config.ConfigError, match="train.transfer.epochz"):
        config.load(p)


def test_science_hash_ignores_output_folder_but_not_seed():
    a, b = config.Config(), config.Config()
    b.run.out = "elsewhere"
    assert a.science_hash() == b.science_hash()
    b.run.seed = 1
    assert a.science_hash() != b.science_hash()
