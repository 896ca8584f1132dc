"""Every OFTConfig field set on the training command line reaches the saved adapter's config."""

from __future__ import annotations

import dataclasses

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from conftrl.diffusion import load_base
from conftrl.oft import OFTConfig
from conftrl.oft.serialization import read_config
from conftrl.training.methods import OFTMethod

# Two runs between them set every field of the seed's OFTConfig and of today's on the command
# line, each to a value other than its default (r and oft_block_size exclude each other).
SEED_FIELDS = {
    "r": ("2", 2),
    "module_dropout": ("0.25", 0.25),
    "target_modules": ("[to_q,to_k,to_v]", ["to_q", "to_k", "to_v"]),
    "init_weights": ("false", False),
    "layers_to_transform": ("[1]", [1]),
    "layers_pattern": ("down_blocks", "down_blocks"),
    "rank_pattern": ("{to_q:4}", {"to_q": 4}),
    "alpha_pattern": ("{to_k:2.0}", {"to_k": 2.0}),
    "modules_to_save": ("[conv_out]", ["conv_out"]),
    "coft": ("true", True),
    "eps": ("0.002", 0.002),
    "block_share": ("true", True),
}
LATER_FIELDS = {
    "r": ("0", 0),
    "oft_block_size": ("8", 8),
    "use_cayley_neumann": ("true", True),
    "num_cayley_neumann_terms": ("3", 3),
    "exclude_modules": ("[attn2.to_k]", ["attn2.to_k"]),
    "coft": ("false", False),
}


def test_the_two_runs_cover_every_field_of_oft_config_the_method_has():
    method_fields = {f.name for f in dataclasses.fields(OFTMethod)}
    config_fields = {f.name for f in dataclasses.fields(OFTConfig)}
    assert (set(SEED_FIELDS) | set(LATER_FIELDS)) == method_fields & config_fields


@pytest.mark.filterwarnings("ignore:alpha_pattern has no effect", "ignore:COFT adapter")
@pytest.mark.parametrize("fields", [SEED_FIELDS, LATER_FIELDS], ids=["seed", "later"])
def test_every_oft_field_from_the_command_line_reaches_the_adapter(make_config, tiny_base, tmp_path, fields):
    cfg = make_config("method=coft", *(f"method.{key}={text}" for key, (text, _) in fields.items()))
    method = instantiate(cfg.method)
    base = load_base(tiny_base)
    wrappers = method.adapt(base)
    method.save(wrappers, tmp_path / "adapter")
    written, _ = read_config(tmp_path / "adapter" / "unet")
    assert {key: getattr(written, key) for key in fields} == {key: value for key, (_, value) in fields.items()}
    adapted = [name for name, _ in wrappers["unet"].oft_layers()]
    assert adapted
    if fields is SEED_FIELDS:  # the selection fields did select
        assert all(name.startswith("down_blocks.1.") and name.endswith(("to_q", "to_k", "to_v")) for name in adapted)
    else:
        assert not any(name.endswith("attn2.to_k") for name in adapted)


def test_a_bad_oft_combination_fails_when_the_method_is_built(make_config):
    cfg = make_config("method=coft", "method.oft_block_size=8")
    with pytest.raises(InstantiationException, match="Set exactly one of r"):
        instantiate(cfg.method)
