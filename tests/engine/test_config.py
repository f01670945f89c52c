"""One config object per action: the CLI's options, defaults and help come from it."""

from __future__ import annotations

import argparse

import pytest

from napari_scrollseg import cli
from napari_scrollseg.engine.config import ExportConfig, PredictConfig, TrainConfig, options
from napari_scrollseg.engine.errors import ScrollsegError


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize(("command", "config"), [("export", ExportConfig), ("train", TrainConfig)])
def test_export_and_train_cli_options_come_from_their_configs(command, config) -> None:
    actions = {a.dest: a for a in _subparser(command)._actions}
    for opt in options(config):
        action = actions[opt.name]
        assert opt.flag in action.option_strings
        assert action.help == opt.help
        assert opt.help
        assert action.required == opt.required
        if not opt.required:
            assert action.default == opt.default


def test_train_and_export_configs_validate() -> None:
    assert TrainConfig(folds="all", plans_overrides='{"n_stages": 3}').plans_overrides == {
        "n_stages": 3
    }
    with pytest.raises(ScrollsegError, match="--plans-overrides is not valid JSON"):
        TrainConfig(plans_overrides="{n_stages: 3")
    with pytest.raises(ScrollsegError, match="epochs must be at least 1"):
        TrainConfig(epochs=0)
    ok = {"classes": "air,papyrus,ink", "out_dir": "raw", "dataset_id": 3, "name": "A"}
    assert ExportConfig(**ok, margin=[4]).margin == 4
    assert ExportConfig(**ok).classes.names() == ["air", "papyrus", "ink"]
    with pytest.raises(ScrollsegError, match=r"dataset ID must be an integer 1\.\.999"):
        ExportConfig(**{**ok, "dataset_id": 1000})
    with pytest.raises(ScrollsegError, match="one value or three"):
        ExportConfig(**ok, margin=[1, 2])


def test_predict_cli_options_come_from_predict_config() -> None:
    p = _subparser("predict")
    actions = {a.dest: a for a in p._actions}
    opts = options(PredictConfig)
    assert len(opts) == 16
    for opt in opts:
        action = actions[opt.name]
        assert opt.flag in action.option_strings
        assert action.help == opt.help
        assert opt.help  # every option says what it does
        assert action.default == opt.default == getattr(PredictConfig(), opt.name)
        if opt.choices:
            assert tuple(action.choices) == opt.choices
    args = p.parse_args(["m", "v", "o"])
    assert cli._config_from(args, PredictConfig) == PredictConfig()
    args = p.parse_args(["m", "v", "o", "--chunk", "8,16,16", "--no-mirror", "--threads", "2"])
    args.folds = "0,all"
    config = cli._config_from(args, PredictConfig)
    assert (config.chunks, config.mirror, config.num_workers) == ((8, 16, 16), False, 2)
    assert config.folds == (0, "all")


def test_bad_values_are_one_clear_error(capsys: pytest.CaptureFixture) -> None:
    for changes, match in [
        ({"step": 0}, r"step must be in \(0, 1\]"),
        ({"batch_size": 0}, "batch size must be at least 1"),
        ({"folds": "0,x"}, "neither a number nor 'all'"),
        ({"chunk": (8, 8)}, "one positive size or 3"),
        ({"prob_reduction": "median"}, "unknown prob_reduction 'median'"),
    ]:
        with pytest.raises(ScrollsegError, match=match):
            PredictConfig(**changes)
    with pytest.raises(ScrollsegError, match="superchunk"):
        PredictConfig().replace(superchunk=0)
    # on the command line: one error line, exit 2, before anything is opened
    assert cli.main(["predict", "m", "v", "o", "--step", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: step must be in (0, 1], got 1.5"]
    with pytest.raises(SystemExit):  # argparse's own message, as before
        cli.main(["predict", "m", "v", "o", "--batch-size", "0"])
    assert "must be a positive integer, got 0" in capsys.readouterr().err


def test_provenance_is_what_the_config_changes() -> None:
    base = PredictConfig().provenance(model="m")
    assert base == {
        "model": "m",
        "checkpoint": "checkpoint_final.pth",
        "step": 0.5,
        "tta": "mirror",
        "half": "auto",
        "chunk": [128, 128, 128],
        "superchunk": None,
    }
    # options that do not change the answer or the layout are not hashed
    assert PredictConfig(num_workers=1, batch_size=2, overwrite=True).provenance(model="m") == base
    assert PredictConfig(mirror=False, chunk=64).provenance(model="m") != base
