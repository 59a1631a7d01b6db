import pytest

from drift import config


def test_demo_file_equals_builtin_defaults_plus_its_per_arch_tables_and_image_size():
    demo = config.load("configs/demo.toml")
    default_size = config.DataConfig().image_size
    assert demo.model.input_scale and demo.train.finetune.per_arch and demo.data.image_size != default_size
    demo.model.input_scale, demo.train.finetune.per_arch, demo.data.image_size = {}, {}, default_size
    assert demo == config.Config()


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


def test_per_arch_phase_settings_merge_and_resolve(tmp_path, rng):
    """A file's per-architecture table and --set overrides of it merge key by key; for_arch applies them to that
    architecture only, with the phase's own types; the TOML round trip keeps them."""
    import torch

    epochs = int(torch.randint(2, 9, (1,), generator=rng))
    f = tmp_path / "c.toml"
    f.write_text(f"[train.finetune]\nlr = 2e-3\n\n[train.finetune.per_arch.inception_v3]\nepochs = {epochs}\nlr = 4\n")
    cfg = config.load(str(f), ["train.finetune.per_arch.inception_v3.batch_size=9",
                               "train.transfer.per_arch.resnet18.precision=fp32"])
    inc = cfg.train.finetune.for_arch("inception_v3")
    assert (inc.epochs, inc.lr, inc.batch_size) == (epochs, 4.0, 9) and isinstance(inc.lr, float)
    assert inc.per_arch == {} and inc.schedule == cfg.train.finetune.schedule
    base = cfg.train.finetune.for_arch("densenet201")
    assert (base.epochs, base.lr, base.batch_size) == (cfg.train.finetune.epochs, 2e-3, cfg.train.finetune.batch_size)
    assert cfg.train.transfer.for_arch("resnet18").precision == "fp32"
    assert config.from_toml_text(cfg.to_toml()) == cfg


@pytest.mark.parametrize("override, fragment", [
    ("train.finetune.per_arch.vgg99.epochs=2", "vgg99"),
    ("train.finetune.per_arch.resnet18.epoch=2", "train.finetune.per_arch.resnet18.epoch"),
    ("train.finetune.per_arch.resnet18.epochs=0", "train.finetune.per_arch.resnet18"),
    ('train.finetune.per_arch.resnet18.epochs="x"', "train.finetune.per_arch.resnet18.epochs"),
    ('train.transfer.per_arch.resnet18.schedule="cyclic"', "train.transfer.per_arch.resnet18.schedule"),
    ("train.finetune.per_arch.resnet18=3", "train.finetune.per_arch.resnet18"),
    ("model.input_scale={vgg99 = 1.5}", "vgg99"),
    ("model.input_scale={resnet18 = 8}", "model.input_scale.resnet18"),
    ('model.input_scale={resnet18 = "big"}', "model.input_scale.resnet18"),
    ("model.input_scale={resnet18 = 0.1}", "model.input_scale.resnet18"),
])
def test_bad_per_arch_settings_name_the_culprit(override, fragment):
    with pytest.raises(config.ConfigError, match=fragment.replace(".", r"\.")):
        config.load(None, [override])


def test_extends_applies_the_base_file_first(tmp_path):
    (tmp_path / "base.toml").write_text(
        '[run]\nseed = 3\nout = "a"\n[data]\nn_test = 7\n[train.finetune.per_arch.resnet18]\nlr = 0.5\n')
    (tmp_path / "child.toml").write_text(
        'extends = "base.toml"\n[run]\nout = "b"\n[train.finetune.per_arch.resnet18]\nepochs = 2\n')
    cfg = config.load(tmp_path / "child.toml")
    assert (cfg.run.seed, cfg.run.out, cfg.data.n_test) == (3, "b", 7)
    assert cfg.train.finetune.per_arch == {"resnet18": {"lr": 0.5, "epochs": 2}}
    shipped = config.load("configs/baselines.toml")
    demo = config.load("configs/demo.toml")
    assert shipped.baselines.seeds == 2 and shipped.run.out != demo.run.out
    assert (shipped.train, shipped.data, shipped.attribution) == (demo.train, demo.data, demo.attribution)


def test_extends_errors_name_the_file(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(config.ConfigError, match="'extends' forms a cycle"):
        config.load(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('extends = "missing.toml"\n')
    with pytest.raises(config.ConfigError, match=r"missing.toml \(extended by .*c.toml\)"):
        config.load(tmp_path / "c.toml")


@pytest.mark.parametrize("override, message", [
    ("baselines.seeds=-1", "baselines.seeds must be an integer >= 0"),
    ('baselines.phases=["tl"]', "baselines.phases: 'tl' is not one of finetune, transfer"),
    ("baselines.randomize=[0.5, 0.25]", "baselines.randomize must be increasing"),
    ("baselines.randomize=[1.5]", r"baselines.randomize: 1.5 is not a finite number in \[0, 1\]"),
    ("baselines.replica_seeds=[4, 4]", "baselines.replica_seeds lists a seed twice"),
    ("baselines.flag_pearson=2", r"baselines.flag_normalised must be a number in \[-1, 1\], got 2"),  # earlier name
    ("baselines.flag_alpha=1.5", r"baselines.flag_alpha must be a number in \[0, 1\], got 1.5"),
    ("baselines.min_logit_spread=-1", r"baselines.min_logit_spread must be a number in \[0, inf\], got -1"),
    ("baselines.n_permutations=5", "baselines.n_permutations must be an integer >= 19"),
    ("fisher.cam_fraction=0", r"fisher.cam_fraction must be a share of the pixels in \(0, 1\], got 0"),
    ("baselines.n_images=1", "baselines.n_images must be an integer >= 2"),
])  # fmt: skip
def test_baselines_settings_are_checked(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(None, [override])


def test_earlier_key_name_reads_as_its_new_name(tmp_path):
    """``baselines.stages`` (the earlier name, still in configs stored by older archives) sets
    ``baselines.phases``; giving both is an error naming both."""
    f = tmp_path / "old.toml"
    f.write_text('[baselines]\nstages = ["transfer", "finetune"]\n')
    assert config.load(f).baselines.phases == ["transfer", "finetune"]
    f.write_text('[baselines]\nstages = ["transfer"]\nphases = ["finetune"]\n')
    with pytest.raises(config.ConfigError, match="baselines.stages.*baselines.phases"):
        config.load(f)
