"""The bundle's graph input and output names and conventions, written once.

Every runtime that opens a bundle (the Python engine, the native runtime under runtime/native, the
TensorRT profiles, the exporter that writes the graphs) uses these names; BUNDLE.md describes their
shapes, dtypes and meaning. The manifest lists each graph's inputs and outputs as well, so a bundle
can be checked against this convention at load time.
"""

from __future__ import annotations

# -- embed.onnx: token ids -> embeddings -------------------------------------------------------------
EMBED_INPUT_IDS = "input_ids"  # int64 [1, seq]
EMBED_OUTPUT = "inputs_embeds"  # float32 [1, seq, hidden]

# -- vision.onnx: one image's patches -> merged image features ---------------------------------------
VISION_PIXEL_VALUES = "pixel_values"  # float32 [patches, 3 * temporal_patch * patch * patch]
VISION_ROTARY_COS = "rotary_cos"  # float32 [patches, vision head_dim]
VISION_ROTARY_SIN = "rotary_sin"
VISION_WINDOW_GATHER = "window_gather"  # int64 [windows, L] (window attention only)
VISION_WINDOW_BIAS = "window_bias"  # float32 [windows, 1, 1, L] (window attention only)
VISION_WINDOW_SCATTER = "window_scatter"  # int64 [patches] (window attention only)
# Learned position embeddings resampled to the image's grid (Qwen3-VL only): each patch's embedding is
# the weighted sum of 4 rows of the table (bilinear taps), tap indices and weights computed on the host.
VISION_POSITION_TAPS = "position_taps"  # int64 [patches, 4]
VISION_POSITION_WEIGHTS = "position_weights"  # float32 [patches, 4]
VISION_OUTPUT = "image_features"  # float32 [patches / merge^2, text hidden]
# DeepStack (Qwen3-VL only): merged features of intermediate vision layers, one per decoder layer they
# are added into (the first len(vision.deepstack_layers) decoder layers).
VISION_DEEPSTACK_OUTPUT = "deepstack_features"  # float32 [deepstack layers, patches / merge^2, text hidden]
VISION_INPUTS = (VISION_PIXEL_VALUES, VISION_ROTARY_COS, VISION_ROTARY_SIN,
                 VISION_WINDOW_GATHER, VISION_WINDOW_BIAS, VISION_WINDOW_SCATTER,
                 VISION_POSITION_TAPS, VISION_POSITION_WEIGHTS)

# -- decoder.onnx / decoder_step.onnx: a pass over new tokens after the KV cache's filled prefix ----
DECODER_INPUTS_EMBEDS = "inputs_embeds"  # float32 [1, seq, hidden]
DECODER_CACHE_POSITIONS = "cache_positions"  # int64 [1, seq]: the cache slots the tokens fill
DECODER_SEQLENS_K = "seqlens_k"  # int32 [1]: total length - 1
DECODER_TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # int32 scalar: filled prefix + seq
DECODER_ROTARY_COS = "rotary_cos"  # float32 [capacity, head_dim / 2]: row i = the token in slot i
DECODER_ROTARY_SIN = "rotary_sin"
DECODER_LOGITS = "logits"  # float32 [1, 1, vocab]: the last position only
# DeepStack (Qwen3-VL only): added to the output of decoder layer i (i < deepstack layers); image
# positions carry the image's deepstack features, every other position zeros.
DECODER_DEEPSTACK_EMBEDS = "deepstack_embeds"  # float32 [deepstack layers, 1, seq, hidden]
# The per-pass inputs besides the cache buffers and rotary tables.
DECODER_STEP_INPUTS = (DECODER_INPUTS_EMBEDS, DECODER_CACHE_POSITIONS, DECODER_SEQLENS_K,
                       DECODER_TOTAL_SEQUENCE_LENGTH)


def past_key(layer: int) -> str:
    """float32 [1, kv_heads, capacity, head_dim]; the same buffer as present_key(layer)."""
    return f"past_key_{layer}"


def past_value(layer: int) -> str:
    return f"past_value_{layer}"


def present_key(layer: int) -> str:
    """Written in place into past_key(layer)'s buffer by the attention op."""
    return f"present_key_{layer}"


def present_value(layer: int) -> str:
    return f"present_value_{layer}"


def decoder_inputs(num_layers: int) -> tuple[str, ...]:
    """Every decoder input name (the order carries no meaning)."""
    caches = tuple(name for layer in range(num_layers) for name in (past_key(layer), past_value(layer)))
    return (DECODER_INPUTS_EMBEDS, DECODER_CACHE_POSITIONS, DECODER_ROTARY_COS, DECODER_ROTARY_SIN) + caches + (
        DECODER_SEQLENS_K, DECODER_TOTAL_SEQUENCE_LENGTH)


def decoder_outputs(num_layers: int) -> tuple[str, ...]:
    caches = tuple(name for layer in range(num_layers) for name in (present_key(layer), present_value(layer)))
    return (DECODER_LOGITS,) + caches
