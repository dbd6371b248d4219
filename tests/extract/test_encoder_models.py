"""Every registered encoder, built tiny, honours the contract: a batch in, [N, width] out.

"Every" means the built-in entries and those of a user registry file (user_encoders.yaml),
and the real checkpoints' layouts are checked on tiny checkpoints saved the way the hub
ones are.
"""

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
    Blip2ForImageTextRetrieval,
    Blip2Model,
    Blip2TextModelWithProjection,
    BlipImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPModel,
    EfficientNetImageProcessorPil,
    LlamaForCausalLM,
)
from transformers.modeling_utils import PreTrainedModel

from extract.auto_encoders import DEFAULT_PROMPT_TEMPLATE
from extract.encoders import Encoder, pool, torch_dtype
from extract.loaders import load_encoder
from extract.preprocess import image_transform
from extract.registry import LOADERS, get_spec, load_registry

CPU = torch.device("cpu")
USER_REGISTRY = Path(__file__).parent / "user_encoders.yaml"
REGISTRY = load_registry(USER_REGISTRY)
TEXTS = (
    "双侧声带运动正常。",
    "左侧声带前中段可见白色斑块样新生物，表面粗糙，边界欠清，NBI下Ni分型Ⅳ型。",
)
# Output width of each entry with its tiny config: from the config, worked out by hand.
TINY_WIDTHS = {
    "align-image": 32,  # EfficientNet's last block: 320 channels x width_coefficient 0.1
    "align-text": 24,  # projection_dim
    "blip2-qformer": 64,  # Q-Former hidden size
    "blip2-text": 16,  # image_text_hidden_size
    "blip2-vit": 64,  # ViT hidden size
    "chinese-clip-image": 24,  # projection_dim
    "chinese-clip-text": 24,
    "clip-image": 24,
    "clip-text": 24,
    "llama3": 64,  # hidden size
    "vilt": 32,  # hidden size
    "user-bert": 32,
    "user-qwen2": 32,
    "user-vit": 32,
}


@cache
def tiny_encoder(name: str, pooling: str = "") -> Encoder:
    """The tiny encoder `name`, built once per module run ("" keeps its pooling)."""
    spec = REGISTRY.get(name)
    if pooling:
        spec = dataclasses.replace(spec, pooling=pooling)
    return load_encoder(spec, "tiny", CPU, torch.float32)


def _images(preprocessing: dict) -> torch.Tensor:
    """Two different pictures, preprocessed as the spec says."""
    transform = image_transform(preprocessing)
    dark = Image.new("RGB", (320, 300), (40, 10, 10))
    light = Image.new("RGB", (400, 360), (230, 180, 170))
    light.paste((120, 20, 30), (100, 100, 250, 220))
    return torch.stack([transform(dark), transform(light)])


def tiny_inputs(encoder: Encoder):
    """Two inputs of the encoder's modality: images, reports or (images, reports)."""
    if encoder.spec.modality == "text":
        return list(TEXTS)
    images = _images(encoder.preprocessing)
    return images if encoder.spec.modality == "image" else (images, list(TEXTS))


def test_every_entry_has_its_tiny_width_stated() -> None:
    assert set(TINY_WIDTHS) == set(REGISTRY.names())
    assert not REGISTRY.broken


@pytest.mark.parametrize("name", REGISTRY.names())
def test_tiny_encoder_gives_one_vector_per_input(name: str) -> None:
    encoder = tiny_encoder(name)
    with torch.inference_mode():
        vectors = encoder.encode(tiny_inputs(encoder))
    assert vectors.shape == (2, TINY_WIDTHS[name])
    assert encoder.width == TINY_WIDTHS[name]
    assert vectors.dtype == torch.float32
    assert torch.isfinite(vectors).all()
    # Random tiny weights must still carry the input, or demo features would be constant.
    cosine = torch.nn.functional.cosine_similarity(vectors[0], vectors[1], dim=0)
    assert cosine < 0.99


@pytest.mark.parametrize("name", REGISTRY.names())
def test_tiny_weights_are_the_same_on_every_build(name: str) -> None:
    first = load_encoder(REGISTRY.get(name), "tiny", CPU, torch.float32)
    assert first.weights_fingerprint == tiny_encoder(name).weights_fingerprint


@pytest.mark.parametrize(
    ("name", "pooling"),
    [
        (name, pooling)
        for name in REGISTRY.names()
        if REGISTRY.get(name).modality == "text"
        for pooling in LOADERS[REGISTRY.get(name).loader].poolings
    ],
)
def test_text_pooling_ignores_right_padding(name: str, pooling: str) -> None:
    encoder = tiny_encoder(name, pooling)
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


def _reference_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (333, 451, 3), dtype=np.uint8))


def test_image_preprocessing_matches_blip2_image_processor() -> None:
    settings = get_spec("blip2-qformer").preprocessing
    reference = BlipImageProcessorPil(
        size={"height": settings["image_size"], "width": settings["image_size"]},
        resample=Image.Resampling.BICUBIC,
        image_mean=settings["mean"],
        image_std=settings["std"],
        do_convert_rgb=True,
    )
    image = _reference_image()
    expected = torch.as_tensor(np.asarray(reference(image)["pixel_values"][0]))
    torch.testing.assert_close(image_transform(settings)(image), expected, atol=1e-5, rtol=0)


def test_clip_preprocessing_matches_clip_image_processor() -> None:
    # Shorter side to 224, centre crop 224: a portrait and a landscape image.
    settings = get_spec("clip-image").preprocessing
    reference = CLIPImageProcessorPil(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        resample=Image.Resampling.BICUBIC,
        image_mean=settings["mean"],
        image_std=settings["std"],
    )
    for image in (_reference_image(), _reference_image().transpose(Image.Transpose.ROTATE_90)):
        expected = torch.as_tensor(np.asarray(reference(image)["pixel_values"][0]))
        torch.testing.assert_close(image_transform(settings)(image), expected, atol=1e-4, rtol=0)


def test_align_preprocessing_matches_efficientnet_image_processor() -> None:
    # The processor align-base was converted with (transformers' convert_align_tf_to_hf):
    # bilinear 346 x 346, centre crop 289, pixels / 127.5 - 1, no normalising.
    settings = get_spec("align-image").preprocessing
    reference = EfficientNetImageProcessorPil(
        size={"height": 346, "width": 346},
        crop_size={"height": 289, "width": 289},
        do_center_crop=True,
        resample=Image.Resampling.BILINEAR,
        rescale_factor=1 / 127.5,
        rescale_offset=True,
        do_normalize=False,
        include_top=False,
    )
    image = _reference_image()
    expected = torch.as_tensor(np.asarray(reference(image)["pixel_values"][0]))
    torch.testing.assert_close(image_transform(settings)(image), expected, atol=1e-4, rtol=0)


def _small_opt_blip2(spec_name: str, **overrides) -> AutoConfig:
    """A BLIP-2 config with the entry's tiny parts and a small OPT, as hub checkpoints hold."""
    small_opt = {"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 1}
    small_opt |= {"num_attention_heads": 2, "vocab_size": 64, "word_embed_proj_dim": 32}
    tiny = {**get_spec("blip2-qformer").tiny_config, **get_spec(spec_name).tiny_config}
    return AutoConfig.for_model(**tiny, text_config=small_opt, **overrides)


def test_blip2_encoder_reads_a_full_blip2_checkpoint_as_get_qformer_features_does(
    tmp_path: Path,
) -> None:
    # A whole BLIP-2 (with a small OPT) saved as the hub checkpoints are: the encoder must
    # take its vision tower, queries and Q-Former, skip the OPT, and match transformers.
    torch.manual_seed(1)
    Blip2ForConditionalGeneration(_small_opt_blip2("blip2-qformer")).save_pretrained(tmp_path)

    spec = get_spec("blip2-qformer")
    encoder = load_encoder(spec, str(tmp_path), CPU, torch.float32)
    reference = Blip2Model.from_pretrained(tmp_path).eval()
    images = _images(spec.preprocessing)
    with torch.inference_mode():
        expected = reference.get_qformer_features(pixel_values=images)
        torch.testing.assert_close(encoder.model(images), expected)
        torch.testing.assert_close(encoder.encode(images), expected.mean(dim=1))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_blip2_vit_encoder_is_the_vit_output_of_a_full_checkpoint(
    pooling: str, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    Blip2ForConditionalGeneration(_small_opt_blip2("blip2-vit")).save_pretrained(tmp_path)
    spec = dataclasses.replace(get_spec("blip2-vit"), pooling=pooling)

    encoder = load_encoder(spec, str(tmp_path), CPU, torch.float32)
    assert not any(name.startswith("qformer") for name, _ in encoder.model.named_parameters())
    reference = Blip2Model.from_pretrained(tmp_path).eval()
    images = _images(spec.preprocessing)
    with torch.inference_mode():
        vit = reference.get_image_features(pixel_values=images)
        expected = vit.pooler_output if pooling == "cls" else vit.last_hidden_state[:, 1:].mean(1)
        torch.testing.assert_close(encoder.encode(images), expected)


def test_blip2_text_encoder_reads_a_retrieval_checkpoint(tmp_path: Path) -> None:
    # Salesforce/blip2-itm-vit-g is a Blip2ForImageTextRetrieval: vision tower, Q-Former
    # with word embeddings, both projections and the ITM head.
    spec = get_spec("blip2-text")
    torch.manual_seed(1)
    Blip2ForImageTextRetrieval(AutoConfig.for_model(**spec.tiny_config)).save_pretrained(tmp_path)
    shutil.copytree(spec.tiny_tokenizer_folder, tmp_path, dirs_exist_ok=True)

    encoder = load_encoder(spec, str(tmp_path), CPU, torch.float32)
    reference = Blip2TextModelWithProjection.from_pretrained(tmp_path).eval()
    tokens = encoder.tokenizer(list(TEXTS), padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = reference(**tokens).text_embeds[:, 0]
        torch.testing.assert_close(encoder.encode(list(TEXTS)), expected)
    assert encoder.provenance()["l2_normalised"] is True
    torch.testing.assert_close(expected.norm(dim=1), torch.ones(2))


def test_blip2_text_refuses_a_captioning_checkpoint_without_word_embeddings(
    tmp_path: Path,
) -> None:
    from pipeline.errors import UserError

    torch.manual_seed(1)
    Blip2ForConditionalGeneration(_small_opt_blip2("blip2-text")).save_pretrained(tmp_path)
    shutil.copytree(get_spec("blip2-text").tiny_tokenizer_folder, tmp_path, dirs_exist_ok=True)
    with pytest.raises(UserError, match=r"lacks \d+ weight\(s\) of blip2-text"):
        load_encoder(get_spec("blip2-text"), str(tmp_path), CPU, torch.float32)


def test_clip_text_tower_reads_the_end_of_text_token_of_a_clip_checkpoint(
    tmp_path: Path,
) -> None:
    # CLIP pools the position of <|endoftext|>: the tiny tokenizer must end every text with
    # the id the config calls its end-of-text token, or CLIP would pool another token.
    spec = get_spec("clip-text")
    torch.manual_seed(1)
    clip = CLIPModel(AutoConfig.for_model(**spec.tiny_config)).eval()
    clip.save_pretrained(tmp_path)
    shutil.copytree(spec.tiny_tokenizer_folder, tmp_path, dirs_exist_ok=True)

    encoder = load_encoder(spec, str(tmp_path), CPU, torch.float32)
    tokens = encoder.tokenizer(list(TEXTS), padding=True, return_tensors="pt")
    ends = [
        ids.index(spec.tiny_config["text_config"]["eos_token_id"])
        for ids in tokens.input_ids.tolist()
    ]
    with torch.inference_mode():
        hidden = clip.text_model(**tokens).last_hidden_state
        expected = clip.text_projection(hidden[torch.arange(2), torch.tensor(ends)])
        torch.testing.assert_close(encoder.encode(list(TEXTS)), expected)


def _causal_lm_folder(folder: Path) -> LlamaForCausalLM:
    spec = get_spec("llama3")
    torch.manual_seed(1)
    causal_lm = LlamaForCausalLM(AutoConfig.for_model(**spec.tiny_config)).eval()
    causal_lm.save_pretrained(folder)
    shutil.copytree(spec.tiny_tokenizer_folder, folder, dirs_exist_ok=True)
    return causal_lm


def test_decoder_mean_pooling_leaves_out_the_begin_of_text_token(tmp_path: Path) -> None:
    causal_lm = _causal_lm_folder(tmp_path)
    encoder = load_encoder(get_spec("llama3"), str(tmp_path), CPU, torch.float32)
    tokens = encoder.tokenizer([TEXTS[1]], return_tensors="pt")
    assert tokens.input_ids[0, 0] == encoder.tokenizer.bos_token_id
    with torch.inference_mode():
        hidden = causal_lm.model(**tokens).last_hidden_state
        torch.testing.assert_close(encoder.encode([TEXTS[1]]), hidden[:, 1:].mean(dim=1))
    assert "<|begin_of_text|>" in encoder.provenance()["pooled"]


def test_decoder_prompt_pooling_reads_the_template_end_even_when_truncated(
    tmp_path: Path,
) -> None:
    causal_lm = _causal_lm_folder(tmp_path)
    spec = dataclasses.replace(get_spec("llama3"), pooling="prompt")
    encoder = load_encoder(spec, str(tmp_path), CPU, torch.float32)
    prefix, suffix = DEFAULT_PROMPT_TEMPLATE.split("{report}")
    pieces = [
        encoder.tokenizer(text, add_special_tokens=False).input_ids
        for text in (prefix, TEXTS[1], suffix)
    ]
    ids = torch.tensor([[encoder.tokenizer.bos_token_id, *pieces[0], *pieces[1], *pieces[2]]])
    with torch.inference_mode():
        expected = causal_lm.model(input_ids=ids).last_hidden_state[:, -1]
        torch.testing.assert_close(encoder.encode([TEXTS[1]]), expected)
    provenance = encoder.provenance()
    assert provenance["preprocessing"]["prompt_template"] == DEFAULT_PROMPT_TEMPLATE
    assert "template" in provenance["pooled"]

    # Cut to 3 report tokens: the report is truncated, never the template's end.
    short = dataclasses.replace(
        spec, preprocessing={"max_length": ids.shape[1] - len(pieces[1]) + 3}
    )
    truncated = load_encoder(short, str(tmp_path), CPU, torch.float32)
    cut = torch.tensor([[encoder.tokenizer.bos_token_id, *pieces[0], *pieces[1][:3], *pieces[2]]])
    with torch.inference_mode():
        expected = causal_lm.model(input_ids=cut).last_hidden_state[:, -1]
        torch.testing.assert_close(truncated.encode([TEXTS[1]]), expected)


def test_prompt_template_must_hold_the_report_once(tmp_path: Path) -> None:
    from pipeline.errors import UserError

    spec = dataclasses.replace(
        get_spec("llama3"), pooling="prompt", preprocessing={"prompt_template": "no slot"}
    )
    with pytest.raises(UserError, match=r"prompt_template.*\{report\} exactly once"):
        load_encoder(spec, "tiny", CPU, torch.float32)


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
        half = encoder.encode(_images(encoder.preprocessing))
        full = tiny_encoder("blip2-qformer").encode(_images(encoder.preprocessing))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("name", REGISTRY.names())
def test_attention_is_sdpa_where_the_architecture_has_it(name: str) -> None:
    encoder = tiny_encoder(name)
    # ALIGN and ViLT have no SDPA path in transformers; everything else runs fused attention.
    eager = REGISTRY.get(name).loader == "vilt" or name.startswith("align")
    expected = "eager" if eager else "sdpa"
    assert encoder.provenance()["attention"] == expected
    assert {
        module.config._attn_implementation
        for module in encoder.model.modules()
        if isinstance(module, PreTrainedModel)
    } == {expected}


@pytest.mark.parametrize("name", ["llama3", "blip2-vit"])
def test_bfloat16_on_cpu_runs_with_sdpa_close_to_float32(name: str) -> None:
    encoder = load_encoder(get_spec(name), "tiny", CPU, torch_dtype("bfloat16", CPU))
    assert encoder.provenance()["attention"] == "sdpa"
    with torch.inference_mode():
        half = encoder.encode(tiny_inputs(encoder))
        full = tiny_encoder(name).encode(tiny_inputs(encoder))
    assert half.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(half, full, dim=1)
    assert (cosine > 0.99).all()
