"""Reports longer than the encoder's context: counted, and truncated or encoded in windows."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

from extract import loaders as extract_loaders
from extract import run as extract_run
from extract.encoders import Encoder
from extract.loaders import load_encoder
from extract.registry import get_spec
from pipeline.errors import UserError

CPU = torch.device("cpu")
MAX_LENGTH = 6  # tokens: the tiny tokenizer has whole words of the demo reports
OVERLAP = 2
HEAD = "左侧声带前中段可见白色斑块样新生物，表面粗糙，边界欠清"  # MAX_LENGTH tokens with BOS
SHORT = "双侧声带运动正常。"


def _llama(**preprocessing) -> Encoder:
    spec = get_spec("llama3")
    spec = dataclasses.replace(
        spec, preprocessing={**spec.preprocessing, "max_length": MAX_LENGTH, **preprocessing}
    )
    return load_encoder(spec, "tiny", CPU, torch.float32)


def _encode(encoder: Encoder, texts: list[str]) -> torch.Tensor:
    with torch.inference_mode():
        return encoder.encode(texts)


def test_reports_differing_only_after_the_context_are_equal_truncated_and_differ_windowed():
    ends_a, ends_b = HEAD + "，累及前联合。", HEAD + "，未累及前联合，声门闭合可。"
    truncate = _llama()
    assert min(truncate.token_lengths([ends_a, ends_b])) > MAX_LENGTH
    assert truncate.token_lengths([HEAD]) == [MAX_LENGTH]  # fits: not truncated
    vectors = _encode(truncate, [ends_a, ends_b, SHORT, HEAD])
    torch.testing.assert_close(vectors[0], vectors[1])
    assert truncate.truncated_reports == 2
    assert truncate.run_record() == {
        "max_length": MAX_LENGTH,
        "long_reports": "truncate",
        "truncated_reports": 2,
        "windowed_reports": 0,
    }

    windows = _llama(long_reports="windows", window_overlap=OVERLAP)
    windowed = _encode(windows, [ends_a, ends_b, SHORT, HEAD])
    assert not torch.allclose(windowed[0], windowed[1], atol=1e-3)
    assert (windows.truncated_reports, windows.windowed_reports) == (0, 2)
    # A report within the context is one window: the same vector either way.
    torch.testing.assert_close(windowed[2:], vectors[2:], atol=1e-5, rtol=1e-5)
    assert windows.provenance()["preprocessing"]["long_reports"] == "windows"


def test_windows_pool_every_token_once_with_left_context():
    # Windowed mean == mean over the report's tokens of the hidden states each window
    # computes, every token taken from exactly one window.
    encoder = _llama(long_reports="windows", window_overlap=OVERLAP)
    report = HEAD * 3
    tokens, text_of_row = encoder._windows([report])
    ids = encoder.tokenizer(report, add_special_tokens=False)["input_ids"]
    pooled = tokens["input_ids"][tokens["pooled_mask"].bool()].tolist()
    assert pooled == ids
    assert text_of_row.tolist() == [0] * tokens["input_ids"].shape[0]
    budget, step = MAX_LENGTH - 1, MAX_LENGTH - 1 - OVERLAP  # LLaMA adds one token, BOS
    starts = range(0, len(ids) - budget + step, step)
    assert len(starts) > 2
    assert tokens["input_ids"].shape == (len(starts), MAX_LENGTH)


def test_truncated_count_covers_prompt_pooling():
    encoder = load_encoder(
        dataclasses.replace(
            get_spec("llama3"),
            pooling="prompt",
            preprocessing={"max_length": 12, "prompt_template": "报告：{report}。"},
        ),
        "tiny",
        CPU,
        torch.float32,
    )
    lengths = encoder.token_lengths([SHORT, HEAD * 2])
    assert lengths[0] <= 12 < lengths[1]
    _encode(encoder, [SHORT, HEAD * 2])
    assert encoder.truncated_reports == 1


@pytest.mark.parametrize(
    ("name", "pooling", "preprocessing", "message"),
    [
        ("llama3", "last", {"long_reports": "windows"}, "windows needs a mean pooling"),
        ("clip-text", "projection", {"long_reports": "windows"}, "windows needs a mean"),
        ("llama3", "mean", {"long_reports": "split"}, "expected one of truncate, windows"),
        ("llama3", "mean", {"long_reports": "windows", "window_overlap": 3}, "window_overlap"),
    ],
)
def test_long_reports_settings_are_checked(name, pooling, preprocessing, message):
    spec = get_spec(name)
    spec = dataclasses.replace(
        spec,
        pooling=pooling,
        preprocessing={**spec.preprocessing, "max_length": MAX_LENGTH, **preprocessing},
    )
    with pytest.raises(UserError, match=message):
        load_encoder(spec, "tiny", CPU, torch.float32)


def test_the_console_names_truncated_reports_and_the_setting_that_keeps_them_whole(
    tmp_path, monkeypatch, capsys
):
    real_load = extract_loaders.load_encoders

    def load_short(specs, *args):
        short = [
            dataclasses.replace(
                spec, preprocessing={**spec.preprocessing, "max_length": MAX_LENGTH}
            )
            for spec in specs
        ]
        return real_load(short, *args)

    monkeypatch.setattr(extract_run, "load_encoders", load_short)
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(
        {
            "image_path": ["a.png", "b.png"],
            "report_text": [HEAD + "，累及前联合。", SHORT],
            "label": ["GC", "VCD"],
            "patient_id": ["1", "2"],
        }
    ).to_csv(manifest, index=False)
    config = extract_run.ExtractConfig(
        model="llama3", manifest=str(manifest), out=str(tmp_path / "text.h5")
    )
    extract_run.run(config)
    warning = capsys.readouterr().err
    assert (
        f"warning: 1 report(s) are longer than llama3's {MAX_LENGTH} tokens and were "
        f"truncated to their first {MAX_LENGTH} (first: {HEAD[:20]}" in warning
    )
    assert "preprocessing.long_reports: windows in a --registry file" in warning
