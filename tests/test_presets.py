"""Presets are files: train.py with no flags is config/dlo.json (the paper's DLO), every
compare.py method reads its preset, and an explicit flag overrides a preset."""
import dataclasses
import glob
import json
import os

import pytest

import compare
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def preset(name):
    with open(os.path.join(ROOT, "config", f"{name}.json")) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def test_no_flags_is_the_papers_dlo():
    default = train.parse_args([])
    for key, value in preset("dlo").items():
        assert getattr(default, key) == value, key
    assert (default.route, default.routed, default.kv_policy) == ("mlp", "new", "compute")   # attention always runs
    from_file = train.parse_args(["--config", os.path.join(ROOT, "config", "dlo.json")])
    assert dataclasses.asdict(default) == dataclasses.asdict(from_file)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "config", "*.json"))))
def test_every_preset_parses_and_sets_what_it_says(path):
    cfg = train.parse_args(["--config", path])
    with open(path) as f:
        for key, value in json.load(f).items():
            if not key.startswith("_"):
                assert getattr(cfg, key) == value, key


@pytest.mark.parametrize("name", list(compare.METHODS))
def test_compare_methods_read_the_preset_files(name):
    file, extra = compare.METHODS[name]
    cfg = train.parse_args(compare.method_flags(name))
    for key, value in preset(file).items():
        if f"--{key}" not in extra:
            assert getattr(cfg, key) == value, key


def test_an_explicit_flag_overrides_the_preset():
    cfg = train.parse_args(["--config", os.path.join(ROOT, "config", "dlo_fast.json"), "--capacity_end", "0.5"])
    assert (cfg.route, cfg.capacity_end) == ("attn+mlp", 0.5)
