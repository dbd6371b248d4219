"""The registry: JSON entries, one name each, and helpful misses."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from extract.registry import (
    MODEL_CONFIGS,
    available_encoders,
    get_spec,
    load_spec_file,
    register,
    spec_from_dict,
)
from pipeline.errors import UserError

CHINESE_REPORT = (
    "左侧声带前中段可见白色斑块样新生物，表面粗糙（约0.5cm），NBI下Ni分型Ⅴa型；喉癌待排😷"
)


def test_built_in_entries_are_the_json_files() -> None:
    assert available_encoders() == sorted(path.stem for path in MODEL_CONFIGS.glob("*.json"))
    assert {"blip2-qformer", "llama3"} <= set(available_encoders())
    assert get_spec("blip2-qformer").width == 768
    assert get_spec("llama3").width == 4096


def test_registering_a_name_twice_is_an_error() -> None:
    with pytest.raises(UserError, match="registered twice"):
        register(load_spec_file(MODEL_CONFIGS / "llama3.json"))


def test_unknown_name_lists_the_available_ones_and_how_to_add_one() -> None:
    with pytest.raises(UserError) as raised:
        get_spec("clip")
    message = str(raised.value)
    assert all(name in message for name in available_encoders())
    assert "model_configs" in message and ".json" in message


def test_entries_are_checked() -> None:
    entry = {
        key: value
        for key, value in vars(get_spec("llama3")).items()
        if key not in ("name", "origin")
    }
    with pytest.raises(UserError, match="unknown key"):
        spec_from_dict("x", {**entry, "poolin": "mean"}, "x.json")
    with pytest.raises(UserError, match="pooling 'first' is not one of"):
        spec_from_dict("x", {**entry, "pooling": "first"}, "x.json")
    assert spec_from_dict("x", entry, "x.json").loader == "decoder-text"


@pytest.mark.parametrize(
    "name", [name for name in available_encoders() if get_spec(name).tiny_tokenizer]
)
def test_tiny_tokenizer_round_trips_chinese_without_unknown_tokens(name: str) -> None:
    spec = get_spec(name)
    tokenizer = AutoTokenizer.from_pretrained(spec.tiny_tokenizer_folder)
    ids = tokenizer(CHINESE_REPORT).input_ids
    assert ids[0] == tokenizer.bos_token_id  # prepended, as LLaMA-3's tokenizer does
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == CHINESE_REPORT
    assert len(ids) < len(CHINESE_REPORT)  # merges learnt from the corpus, not bytes only
    assert len(tokenizer) == spec.tiny_config["vocab_size"]
    assert tokenizer.pad_token is None  # like LLaMA; the text encoder sets one
