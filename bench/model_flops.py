"""Forward FLOPs per item of the extraction encoders, counted from their configs.

What counts: every matrix product of the forward pass at 2 FLOPs per multiply-add, the
convention of MFU figures (PaLM, Appendix B): the linear layers, the patch embedding and
attention's two products (QK^T and AV) over the whole square of tokens, which is what the
kernels compute under a padding mask. Norms, activations, softmax, rotary embeddings and
embedding lookups are left out (well under 1% at these widths). tests/test_bench_extract.py
checks each count against a hand count and against torch's FlopCounterMode on the real
transformers modules.

Full-size figures (bench/configs): BLIP-2 opt-2.7b ViT-g + Q-Former about 534 GFLOP per
image; Llama-3-8B about 2.8 TFLOP per 200-token report.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

CONFIGS = Path(__file__).parent / "configs"


def linear(tokens: int, inputs: int, outputs: int) -> int:
    """A dense layer applied to `tokens` rows."""
    return 2 * tokens * inputs * outputs


def attention(queries: int, keys: int, width: int) -> int:
    """QK^T and AV over all heads, `width` = heads x head size."""
    return 2 * linear(queries, width, keys)


def bench_config(name: str) -> PretrainedConfig:
    """A config shipped in bench/configs/NAME.json, as a transformers config."""
    return AutoConfig.for_model(**json.loads((CONFIGS / f"{name}.json").read_text()))


def vit_tokens(vision: PretrainedConfig) -> int:
    """Tokens of a BLIP-2 ViT: one per patch, plus the class token."""
    return (vision.image_size // vision.patch_size) ** 2 + 1


def vit_flops(vision: PretrainedConfig) -> int:
    """One image through BLIP-2's ViT (Blip2VisionModel): patch embedding, then per layer a
    fused QKV projection, attention, output projection and a two-layer MLP."""
    tokens, width = vit_tokens(vision), vision.hidden_size
    patch_embedding = linear(tokens - 1, 3 * vision.patch_size**2, width)
    layer = (
        linear(tokens, width, 3 * width)
        + attention(tokens, tokens, width)
        + linear(tokens, width, width)
        + 2 * linear(tokens, width, vision.intermediate_size)
    )
    return patch_embedding + vision.num_hidden_layers * layer


def qformer_flops(qformer: PretrainedConfig, queries: int, image_tokens: int) -> int:
    """The query tokens of one image through BLIP-2's Q-Former (Blip2QFormerModel): per layer
    self-attention over the queries, cross-attention to the ViT's tokens in every
    cross_attention_frequency-th layer (from layer 0), and the queries' MLP."""
    width = qformer.hidden_size
    self_attention = (
        3 * linear(queries, width, width)
        + attention(queries, queries, width)
        + linear(queries, width, width)
    )
    cross_attention = (
        linear(queries, width, width)
        + 2 * linear(image_tokens, qformer.encoder_hidden_size, width)
        + attention(queries, image_tokens, width)
        + linear(queries, width, width)
    )
    mlp = 2 * linear(queries, width, qformer.intermediate_size)
    crossing = sum(
        index % qformer.cross_attention_frequency == 0 for index in range(qformer.num_hidden_layers)
    )
    return qformer.num_hidden_layers * (self_attention + mlp) + crossing * cross_attention


def blip2_image_flops(config: PretrainedConfig) -> int:
    """One image through the ViT and the Q-Former (what the blip2-qformer encoder runs)."""
    vision = config.vision_config
    return vit_flops(vision) + qformer_flops(
        config.qformer_config, config.num_query_tokens, vit_tokens(vision)
    )


def llama_flops(config: PretrainedConfig, tokens: int) -> int:
    """One sequence of `tokens` tokens through a LLaMA base model (no LM head): per layer
    the Q, K, V (grouped: num_key_value_heads) and O projections, attention and the gated
    MLP (gate, up, down)."""
    width = config.hidden_size
    head = getattr(config, "head_dim", None) or width // config.num_attention_heads
    query_width = config.num_attention_heads * head
    key_width = config.num_key_value_heads * head
    layer = (
        linear(tokens, width, query_width)
        + 2 * linear(tokens, width, key_width)
        + attention(tokens, tokens, query_width)
        + linear(tokens, query_width, width)
        + 3 * linear(tokens, width, config.intermediate_size)
    )
    return config.num_hidden_layers * layer
