"""Every registered encoder, built tiny, honours the contract: a batch in, [N, width] out."""

from __future__ import annotations

import dataclasses
import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    Blip2ForConditionalGeneration,
    Blip2Model,
    BlipImageProcessorPil,
    LlamaForCausalLM,
)

from extract.encoders import Encoder, load_encoder, pool
from extract.preprocess import image_transform
from extract.registry import EncoderSpec, available_encoders, get_spec

CPU = torch.device("cpu")
TEXTS = (
    "双侧声带运动正常。",
    "左侧声带前中段可见白色斑块样新生物，表面粗糙，边界欠清，NBI下Ni分型Ⅳ型。",
)


@cache
def tiny_encoder(name: str, pooling: str = "") -> Encoder:
    """The tiny encoder `name`, built once per module run ("" keeps its pooling)."""
    spec = get_spec(name)
    if pooling:
        spec = dataclasses.replace(spec, pooling=pooling)
    return load_encoder(spec, "tiny", CPU, torch.float32)


def _images(spec: EncoderSpec) -> torch.Tensor:
    """Two different pictures, preprocessed as the spec says."""
    transform = image_transform(spec.preprocessing)
    dark = Image.new("RGB", (320, 300), (40, 10, 10))
    light = Image.new("RGB", (400, 360), (230, 180, 170))
    light.paste((120, 20, 30), (100, 100, 250, 220))
    return torch.stack([transform(dark), transform(light)])


TINY_INPUTS = {"image": _images, "text": lambda spec: list(TEXTS)}


@pytest.mark.parametrize("name", available_encoders())
def test_tiny_encoder_gives_one_vector_per_input(name: str) -> None:
    encoder = tiny_encoder(name)
    with torch.inference_mode():
        vectors = encoder.encode(TINY_INPUTS[encoder.spec.modality](encoder.spec))
    assert vectors.shape == (2, encoder.width)
    assert vectors.dtype == torch.float32
    assert torch.isfinite(vectors).all()
    # Random tiny weights must still carry the input, or demo features would be constant.
    cosine = torch.nn.functional.cosine_similarity(vectors[0], vectors[1], dim=0)
    assert cosine < 0.99


@pytest.mark.parametrize("name", available_encoders())
def test_tiny_weights_are_the_same_on_every_build(name: str) -> None:
    spec = get_spec(name)
    first = load_encoder(spec, "tiny", CPU, torch.float32)
    assert first.weights_fingerprint == tiny_encoder(name).weights_fingerprint


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_text_pooling_ignores_right_padding(pooling: str) -> None:
    encoder = tiny_encoder("llama3", pooling)
    short, long = TEXTS
    assert len(encoder.tokenizer(short).input_ids) < len(encoder.tokenizer(long).input_ids)
    with torch.inference_mode():
        padded = encoder.encode([short, long])  # the short row gets right padding
        alone = encoder.encode([short])
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)


def test_last_pooling_takes_the_last_real_token_on_either_side() -> None:
    hidden = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1)
    right_padded = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left_padded = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(hidden, "last", right_padded).flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, "last", left_padded).flatten().tolist() == [3.0, 7.0]
    assert pool(hidden, "mean", right_padded).flatten().tolist() == [0.5, 5.5]


def test_image_preprocessing_matches_blip2_image_processor() -> None:
    spec = get_spec("blip2-qformer")
    settings = spec.preprocessing
    reference = BlipImageProcessorPil(
        size={"height": settings["image_size"], "width": settings["image_size"]},
        resample=Image.Resampling.BICUBIC,
        image_mean=settings["mean"],
        image_std=settings["std"],
        do_convert_rgb=True,
    )
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (333, 451, 3), dtype=np.uint8))
    expected = torch.as_tensor(np.asarray(reference(image)["pixel_values"][0]))
    torch.testing.assert_close(image_transform(settings)(image), expected, atol=1e-5, rtol=0)


def test_blip2_encoder_reads_a_full_blip2_checkpoint_as_get_qformer_features_does(
    tmp_path: Path,
) -> None:
    # A whole BLIP-2 (with a small OPT) saved as the hub checkpoints are: the encoder must
    # take its vision tower, queries and Q-Former, skip the OPT, and match transformers.
    spec = get_spec("blip2-qformer")
    small_opt = {"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 1}
    small_opt |= {"num_attention_heads": 2, "vocab_size": 64, "word_embed_proj_dim": 32}
    config = AutoConfig.for_model(**spec.tiny_config, text_config=small_opt)
    torch.manual_seed(1)
    Blip2ForConditionalGeneration(config).save_pretrained(tmp_path)

    encoder = load_encoder(spec, str(tmp_path), CPU, torch.float32)
    reference = Blip2Model.from_pretrained(tmp_path).eval()
    images = _images(spec)
    with torch.inference_mode():
        expected = reference.get_qformer_features(pixel_values=images)
        torch.testing.assert_close(encoder.model(images), expected)
        torch.testing.assert_close(encoder.encode(images), expected.mean(dim=1))


def test_decoder_text_encoder_reads_a_causal_lm_checkpoint(tmp_path: Path) -> None:
    spec = get_spec("llama3")
    torch.manual_seed(1)
    causal_lm = LlamaForCausalLM(AutoConfig.for_model(**spec.tiny_config)).eval()
    causal_lm.save_pretrained(tmp_path)
    shutil.copytree(spec.tiny_tokenizer_folder, tmp_path, dirs_exist_ok=True)

    encoder = load_encoder(spec, str(tmp_path), CPU, torch.float32)
    tokens = encoder.tokenizer([TEXTS[1]], return_tensors="pt")
    with torch.inference_mode():
        expected = causal_lm.model(**tokens).last_hidden_state.mean(dim=1)
        torch.testing.assert_close(encoder.encode([TEXTS[1]]), expected)


def test_half_precision_keeps_the_qformer_in_float32() -> None:
    # As BLIP-2's from_pretrained does; bfloat16 runs on a CPU, so this needs no GPU.
    encoder = load_encoder(get_spec("blip2-qformer"), "tiny", CPU, torch.bfloat16)
    dtypes = {
        name.split(".")[0]: parameter.dtype for name, parameter in encoder.model.named_parameters()
    }
    assert dtypes == {
        "vision_model": torch.bfloat16,
        "query_tokens": torch.float32,
        "qformer": torch.float32,
    }
    with torch.inference_mode():
        half = encoder.encode(_images(encoder.spec))
        full = tiny_encoder("blip2-qformer").encode(_images(encoder.spec))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.1, rtol=0.1)
