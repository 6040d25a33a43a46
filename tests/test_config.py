import glob
import os

import pytest

from distributed_mtml.config import flatten, load_config
from distributed_mtml.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_articles_model(tmp_path):
    cfg = load_config(_write(tmp_path, "suite: {generator: seed-example}\n"))
    assert cfg.model.trunk.widths == [100, 50] and cfg.model.trunk.activation == "relu"
    assert cfg.scaling.num_workers == 2 and cfg.aggregation.method == "mean"


def test_set_overrides_merge_before_validation(tmp_path):
    path = _write(tmp_path, "suite: {generator: seed-example}\ntraining: {lr: 0.1}\n")
    cfg = load_config(path, ["training.lr=0.01", "model.trunk.widths=[8, 4]", "scaling.num_workers=1"])
    assert cfg.training.lr == 0.01 and cfg.model.trunk.widths == [8, 4] and cfg.scaling.num_workers == 1


def test_unknown_keys_and_bad_values_name_the_file_and_key(tmp_path):
    path = _write(tmp_path, "suite: {generator: seed-example}\ntraining: {lr: -1, epoch: 3}\n")
    with pytest.raises(InputError) as err:
        load_config(path)
    assert f"{path}: unknown key 'training.epoch'" in err.value.problems
    assert any(p.startswith(f"{path}: key 'training.lr'") for p in err.value.problems)
    with pytest.raises(InputError, match="unknown key 'training.nope'"):
        load_config(_write(tmp_path, "suite: {generator: seed-example}\n"), ["training.nope=1"])
    with pytest.raises(InputError, match="gradients: representation weighs tasks by a Gram matrix: .*not 'mean'"):
        load_config(_write(tmp_path, "suite: {generator: seed-example}\naggregation: {gradients: representation}\n"))
    good = _write(tmp_path, "suite: {generator: seed-example}\naggregation: {method: mgda, gradients: representation}\n")
    assert load_config(good).aggregation.gradients == "representation"


def test_missing_and_unreadable_config(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(str(tmp_path / "absent.yaml"))
    with pytest.raises(InputError, match=r"c.yaml: line 2, column 1: expected ',' or ']'"):  # where, for the editor
        load_config(_write(tmp_path, "suite: [unclosed\n"))
    with pytest.raises(InputError, match="give 'path', 'generator', or both"):
        load_config(_write(tmp_path, "suite: {}\n"))


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


def test_every_shipped_config_validates():
    paths = glob.glob(os.path.join(REPO, "jobs", "**", "*.yaml"), recursive=True)
    configs = [p for p in paths if "/configs/" in p]
    assert configs, "no shipped configs found"
    for path in configs:
        load_config(path)


def _leaf_keys(model, prefix=""):
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_keys(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_the_config_reference_lists_every_key_with_its_meaning():
    """The docs' config page is written from the schema: every key is there, none without words."""
    from distributed_mtml.config import Config
    from distributed_mtml.reference import config_keys, config_reference

    page = config_reference()
    rows = {key: meaning for key, _, meaning in config_keys(Config)}
    missing = [k for k in _leaf_keys(Config) if k not in rows and not any(r.startswith(k + ".") for r in rows)]
    assert not missing and "suite.path" in rows and "model.trunk.passthrough" in rows
    assert not [k for k in rows if f"`{k}`" not in page]
    assert not [k for k, meaning in rows.items() if not meaning.strip()], "keys without a description"


def test_representation_narrower_than_the_task_count_is_warned(seed_suite, capsys):
    """seed-example has 2 tasks: a trunk output of 1 cannot tell their representation gradients apart."""
    from distributed_mtml.config import validate_config
    from distributed_mtml.train.plan import make_plan

    for width, warned in ((1, True), (2, False)):
        make_plan(validate_config({"suite": {"path": seed_suite}, "model": {"trunk": {"widths": [8, width]}},
                                   "aggregation": {"method": "mgda", "gradients": "representation"}}))
        out = capsys.readouterr().out
        assert ("warning: aggregation.gradients: representation with 2 tasks and a trunk output of 1" in out) == warned


def test_num_workers_auto_is_local_mode_for_a_small_suite_and_workers_for_a_large_one_and_says_which(
        seed_suite, capsys, monkeypatch):
    from distributed_mtml import config as config_module
    from distributed_mtml.config import validate_config
    from distributed_mtml.train.plan import make_plan

    def planned(**scaling):
        return make_plan(validate_config({"suite": {"path": seed_suite}, "scaling": {"num_workers": "auto", **scaling}}))

    rows = sum(planned().train_rows.values())
    assert planned().config.scaling.num_workers == 0
    assert (f"[mtml] scaling.num_workers: auto -> 0 (local mode, in this process; {rows:,} train rows in all, "
            "at most 200,000)") in capsys.readouterr().out
    monkeypatch.setattr(config_module, "AUTO_LOCAL_ROWS", rows - 1)
    assert planned().config.scaling.num_workers == 2
    assert f"auto -> 2 (Ray Train workers; {rows:,} train rows in all, more than {rows - 1:,})" in capsys.readouterr().out
    monkeypatch.setattr(config_module, "AUTO_LOCAL_ROWS", rows)
    assert planned(use_gpu=True).config.scaling.num_workers == 2  # a GPU each
    with pytest.raises(InputError, match=r"key 'scaling.num_workers': Value error, 'many': a number of workers"):
        validate_config({"scaling": {"num_workers": "many"}})
