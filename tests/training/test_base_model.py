"""The tiny base builder and loading a local diffusers folder with clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer, CLIPTokenizer

from conftrl.diffusion import ModelFolderError, load_base
from conftrl.diffusion.tiny import DEFAULT_WORDS, build_tokenizer, learn_merges

BUILD_AND_PRINT_VOCAB = (
    "import json; from conftrl.diffusion.tiny import DEFAULT_WORDS, build_tokenizer; "
    "print(json.dumps(build_tokenizer(DEFAULT_WORDS, 16).get_vocab(), sort_keys=True))"
)


def test_tiny_base_loads_with_every_component(tiny_base):
    base = load_base(tiny_base)
    assert base.vae_scale_factor == 4
    assert not any(p.requires_grad for m in (base.unet, base.vae, base.text_encoder) for p in m.parameters())
    # No cross-attention at the highest resolution (the expensive one on a CPU).
    assert type(base.unet.down_blocks[0]).__name__ == "DownBlock2D"
    assert type(base.unet.up_blocks[-1]).__name__ == "UpBlock2D"


@pytest.mark.parametrize("loader", [CLIPTokenizer, AutoTokenizer])
def test_tokenizer_loads_and_knows_the_caption_words(tiny_base, loader):
    tokenizer = loader.from_pretrained(tiny_base / "tokenizer")
    ids = tokenizer("a red circle on a gray background").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert len(ids) == 9  # one token per word


def test_the_built_tokenizer_is_the_same_in_every_process():
    # Hash-ordered tie-breaking (tokenizers' BpeTrainer) gave each process other ids.
    vocabs = {subprocess.run([sys.executable, "-c", BUILD_AND_PRINT_VOCAB], capture_output=True, text=True,
                             check=True).stdout for _ in range(3)}
    assert len(vocabs) == 1 and build_tokenizer(DEFAULT_WORDS, 16).get_vocab() == json.loads(vocabs.pop())


def test_the_built_tokenizer_keeps_every_word_whole_and_splits_others():
    tokenizer = build_tokenizer(DEFAULT_WORDS, 16)
    assert all(len(tokenizer(word).input_ids) == 3 for word in DEFAULT_WORDS)
    pieces = tokenizer.tokenize("zebra squares!")
    assert pieces[-2:] == ["squares</w>", "!</w>"] and "".join(pieces[:-2]) == "zebra</w>"
    assert tokenizer.unk_token_id not in tokenizer("zebra squares!").input_ids[1:-1]


def test_merges_go_to_the_most_frequent_pair_and_ties_alphabetically():
    assert learn_merges(("ab", "cb", "ab")) == [("a", "b</w>"), ("c", "b</w>")]
    assert learn_merges(("xyz", "wyz")) == [("y", "z</w>"), ("w", "yz</w>"), ("x", "yz</w>")]


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ModelFolderError, match="does-not-exist.*does not exist"):
        load_base(tmp_path / "does-not-exist")


def test_folder_without_components_lists_what_is_missing(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(ModelFolderError) as error:
        load_base(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "model_index.json" in message and "vae/config.json" in message
    assert "unet/" not in message


def test_corrupt_weights_name_the_component(tiny_base, tmp_path):
    import shutil

    broken = shutil.copytree(tiny_base, tmp_path / "broken")
    weights = next((broken / "vae").glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFolderError, match="cannot load 'vae'"):
        load_base(broken)
