"""The registry: built-in JSON entries, user files, broken entries kept apart, --list."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

import extract.registry as registry_module
from extract.__main__ import main
from extract.registry import (
    LOADERS,
    MODEL_CONFIGS,
    available_encoders,
    built_in_entry,
    describe,
    get_spec,
    load_registry,
    spec_from_dict,
)
from pipeline.errors import UserError

CHINESE_REPORT = (
    "左侧声带前中段可见白色斑块样新生物，表面粗糙（约0.5cm），NBI下Ni分型Ⅴa型；喉癌待排😷"
)
USER_REGISTRY = Path(__file__).parent / "user_encoders.yaml"
# The paper's encoders with their real output widths (hub checkpoint, registered pooling).
REAL_WIDTHS = {
    "blip2-qformer": ("Salesforce/blip2-opt-2.7b", "image", 768),
    "blip2-vit": ("Salesforce/blip2-opt-2.7b", "image", 1408),
    "blip2-text": ("Salesforce/blip2-itm-vit-g", "text", 256),
    "llama3": ("hfl/llama-3-chinese-8b", "text", 4096),
    "clip-image": ("openai/clip-vit-large-patch14", "image", 768),
    "clip-text": ("openai/clip-vit-large-patch14", "text", 768),
    "align-image": ("kakaobrain/align-base", "image", 640),
    "align-text": ("kakaobrain/align-base", "text", 640),
    "chinese-clip-image": ("OFA-Sys/chinese-clip-vit-base-patch16", "image", 512),
    "chinese-clip-text": ("OFA-Sys/chinese-clip-vit-base-patch16", "text", 512),
    "vilt": ("dandelin/vilt-b32-mlm", "pair", 768),
}


def test_built_in_entries_are_the_json_files_with_their_real_widths() -> None:
    assert available_encoders() == sorted(path.stem for path in MODEL_CONFIGS.glob("*.json"))
    assert set(available_encoders()) == set(REAL_WIDTHS)
    for name, (source, modality, width) in REAL_WIDTHS.items():
        spec = get_spec(name)
        assert (spec.source, spec.modality, spec.width) == (source, modality, width), name
        assert spec.pooling in LOADERS[spec.loader].poolings


@pytest.mark.parametrize("family", ["clip", "align", "chinese-clip"])
def test_the_two_towers_of_a_dual_encoder_come_from_one_model(family: str) -> None:
    image, text = get_spec(f"{family}-image"), get_spec(f"{family}-text")
    assert image.source == text.source
    # One tiny model, so tiny image and text vectors share a space as the real ones do.
    assert image.tiny_config == text.tiny_config


def test_user_file_adds_its_entries_to_the_built_in_ones() -> None:
    registry = load_registry(USER_REGISTRY)
    assert set(registry.names()) == set(available_encoders()) | {
        "user-bert",
        "user-vit",
        "user-qwen2",
    }
    bert = registry.get("user-bert")
    assert (bert.loader, bert.modality, bert.pooling) == ("encoder-text", "text", "mean")
    assert registry.get("user-vit").loader == "encoder-image"  # the modality's default
    assert bert.origin == str(USER_REGISTRY)
    assert "user-bert" not in available_encoders()  # the built-in registry is unchanged


def test_a_user_entry_needs_only_source_modality_and_pooling(tmp_path: Path) -> None:
    (tmp_path / "models" / "bert").mkdir(parents=True)
    user_file = tmp_path / "mine.yaml"
    user_file.write_text(
        "my-bert:\n  source: models/bert\n  modality: text\n  pooling: cls\n", encoding="utf-8"
    )
    spec = load_registry(user_file).get("my-bert")
    # A folder named relative to the file is found from the file's folder, wherever the
    # command runs.
    assert spec.source == str(tmp_path / "models" / "bert")
    assert (spec.width, spec.tiny_config, spec.loader) == (0, {}, "encoder-text")


def _broken_file(tmp_path: Path) -> Path:
    good = {"source": "some/bert", "modality": "text", "pooling": "mean"}
    entries = {
        "ok-bert": good,
        "typo": {**good, "poolin": "mean"},
        "bad-pooling": {**good, "pooling": "first"},
        "no-source": {"modality": "text", "pooling": "mean"},
        "bad-modality": {**good, "modality": "audio"},
        "bad-loader": {**good, "loader": "my-loader"},
        "wrong-tower": {**good, "modality": "image", "loader": "encoder-text"},
        "tiny-without-type": {**good, "tiny_config": {"hidden_size": 8}},
        "not-a-mapping": ["source", "modality"],
        "negative-forward-batch": {**good, "forward_batch": -4},
        "llama3": good,  # a built-in name
    }
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(entries), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("typo", "unknown key(s) poolin; valid keys are"),
        ("bad-pooling", "key 'pooling': 'first' is not one of mean, cls for encoder-text"),
        ("no-source", "missing key(s) source"),
        ("bad-modality", "key 'modality': 'audio' is not one of image, text, pair"),
        ("bad-loader", "key 'loader': 'my-loader' is not one of"),
        ("wrong-tower", "key 'modality': loader encoder-text encodes text, not image"),
        ("tiny-without-type", "key 'tiny_config': needs a model_type"),
        ("not-a-mapping", "expected a mapping of keys"),
        ("negative-forward-batch", "key 'forward_batch': expected a whole number, got -4"),
    ],
)
def test_a_broken_entry_fails_alone_with_one_line_naming_file_and_key(
    name: str, expected: str, tmp_path: Path
) -> None:
    path = _broken_file(tmp_path)
    registry = load_registry(path)
    with pytest.raises(UserError) as raised:
        registry.get(name)
    message = str(raised.value)
    assert message.startswith(f"{path}, encoder '{name}'")
    assert expected in message
    assert "\n" not in message
    # The other entries, built-in and from the same file, are untouched.
    assert registry.get("ok-bert").source == "some/bert"
    assert registry.get("llama3").origin == str(MODEL_CONFIGS / "llama3.json")


def test_a_user_entry_reusing_a_built_in_name_is_ignored_with_a_message(tmp_path: Path) -> None:
    registry = load_registry(_broken_file(tmp_path))
    assert registry.get("llama3").origin == str(MODEL_CONFIGS / "llama3.json")
    (message,) = registry.ignored
    assert message.startswith(f"{tmp_path / 'broken.yaml'}, encoder 'llama3': ignored")
    assert "registered twice" in message and "IGNORED: " + message in describe(registry)


def test_a_file_that_is_not_a_registry_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(UserError, match="expected encoder names as top-level keys"):
        load_registry(path)
    path.write_text("a: [\n", encoding="utf-8")
    with pytest.raises(UserError, match="cannot be read as YAML or JSON"):
        load_registry(path)
    with pytest.raises(UserError, match="--registry .*absent.yaml: file does not exist"):
        load_registry(tmp_path / "absent.yaml")


def test_a_broken_built_in_json_breaks_neither_the_others_nor_help(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # Issue 7: a JSON missing tiny_config crashed every `python -m extract`, --help too.
    configs = tmp_path / "model_configs"
    shutil.copytree(MODEL_CONFIGS, configs)
    entry = built_in_entry("llama3")
    del entry["tiny_config"]
    (configs / "no-tiny.json").write_text(json.dumps(entry), encoding="utf-8")
    (configs / "garbled.json").write_text('{"modality": ', encoding="utf-8")
    monkeypatch.setattr(registry_module, "MODEL_CONFIGS", configs)
    registry_module._built_in.cache_clear()
    try:
        registry = load_registry()
        assert registry.get("no-tiny").tiny_config == {}  # fine: only --weights tiny needs it
        with pytest.raises(UserError, match="garbled.json: cannot be read as YAML or JSON"):
            registry.get("garbled")
        assert registry.get("llama3").width == 4096
        listing = describe(registry)
        assert "garbled  BROKEN:" in listing
        with pytest.raises(SystemExit) as exited:
            main(["--help"])
        assert exited.value.code == 0
    finally:
        registry_module._built_in.cache_clear()
    assert "--registry" in capsys.readouterr().out


def test_list_shows_every_entry_with_its_source_and_origin(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["--list", "--registry", str(_broken_file(tmp_path))]) is None
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "modality", "loader", "pooling", "width", "source", "from"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    for name in available_encoders():
        assert rows[name][5] == get_spec(name).source and rows[name][6] == "built-in"
    assert rows["ok-bert"][1:] == [
        "text",
        "encoder-text",
        "mean",
        "from",
        "weights",
        "some/bert",
        str(tmp_path / "broken.yaml"),
    ]
    assert rows["typo"][1] == "BROKEN:"


def test_list_reads_the_registry_from_params(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(f"extract_text:\n  registry: {USER_REGISTRY}\n", encoding="utf-8")
    main(["--list", "--params", str(params), "--section", "extract_text"])
    assert "user-qwen2" in capsys.readouterr().out


def test_entries_are_checked() -> None:
    entry = built_in_entry("llama3")
    with pytest.raises(UserError, match="unknown key"):
        spec_from_dict("x", {**entry, "poolin": "mean"}, "x.json")
    with pytest.raises(UserError, match="pooling': 'first' is not one of mean, last, prompt"):
        spec_from_dict("x", {**entry, "pooling": "first"}, "x.json")
    assert spec_from_dict("x", entry, "x.json").loader == "decoder-text"


def test_unknown_name_lists_the_available_ones_and_how_to_add_one() -> None:
    with pytest.raises(UserError) as raised:
        get_spec("clip")
    message = str(raised.value)
    assert all(name in message for name in available_encoders())
    assert "--registry" in message and ".json" in message


TINY_TOKENIZERS = sorted(
    {
        (spec.tiny_tokenizer, name)
        for name in load_registry(USER_REGISTRY).names()
        if (spec := load_registry(USER_REGISTRY).get(name)).tiny_tokenizer
    }
)


def _vocab_size(tiny_config: dict) -> int:
    for part in ("text_config", "qformer_config"):
        if part in tiny_config:
            return tiny_config[part]["vocab_size"]
    return tiny_config["vocab_size"]


@pytest.mark.parametrize(("folder", "name"), TINY_TOKENIZERS)
def test_tiny_config_vocabulary_is_its_tokenizer_s(folder: str, name: str) -> None:
    spec = load_registry(USER_REGISTRY).get(name)
    tokenizer = AutoTokenizer.from_pretrained(spec.tiny_tokenizer_folder)
    assert len(tokenizer) == _vocab_size(spec.tiny_config)


def _tokenizer(folder: str):
    return AutoTokenizer.from_pretrained(MODEL_CONFIGS / folder)


def test_llama_like_tiny_tokenizer_round_trips_chinese_without_unknown_tokens() -> None:
    tokenizer = _tokenizer("tiny-zh-tokenizer")
    ids = tokenizer(CHINESE_REPORT).input_ids
    assert ids[0] == tokenizer.bos_token_id  # prepended, as LLaMA-3's tokenizer does
    assert tokenizer.decode(ids, skip_special_tokens=True) == CHINESE_REPORT
    assert len(ids) < len(CHINESE_REPORT)  # merges learnt from the corpus, not bytes only
    assert tokenizer.pad_token is None  # like LLaMA; the text encoder sets one


def test_clip_like_tiny_tokenizer_wraps_texts_as_clip_does() -> None:
    tokenizer = _tokenizer("tiny-clip-tokenizer")
    ids = tokenizer(CHINESE_REPORT).input_ids
    assert tokenizer.convert_ids_to_tokens([ids[0], ids[-1]]) == [
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == CHINESE_REPORT.lower()
    assert get_spec("clip-text").tiny_config["text_config"]["eos_token_id"] == ids[-1]


def test_bert_like_tiny_tokenizer_covers_the_demo_reports() -> None:
    from pipeline.demo.patients import SITES, plan_site
    from pipeline.demo.reports import write_report

    tokenizer = _tokenizer("tiny-bert-zh-tokenizer")
    reports = [write_report(patient) for site in SITES for patient in plan_site(site, 40, 1, 0)]
    ids = tokenizer(reports).input_ids
    assert all(
        row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id for row in ids
    )
    assert not any(tokenizer.unk_token_id in row for row in ids)
    # BERT splits Chinese into characters: one token per character of a Chinese phrase.
    assert tokenizer.tokenize("声带白斑") == ["声", "带", "白", "斑"]
