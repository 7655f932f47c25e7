"""The quantization report: a quantized bundle against its fp32 source on held-back requests.

Per request (none of them used for calibration):
* vision: cosine and max abs difference of each image's features (same pixels in, both encoders);
* decoder: last-position logits of the prefill with identical fp32 embeddings in (the decoder alone),
  and greedy-token agreement when both decoders are fed the fp32 model's greedy tokens (one-token
  steps run on the step decoder when the bundle has one, as in the engine);
* end to end: the quantized vision feeding the quantized decoder against fp32 throughout: last-position
  logits, and how many free-running greedy tokens equal fp32's;
and the file sizes of every graph, the bundle totals and the reduction ratio.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from gemvg.runtime.engine import Engine, KVCache
from gemvg.runtime.manifest import load_manifest, sha256_of

REPORT_NAME = "quantization_report.json"


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    from .quantize import cosine

    return cosine(a, b)


def _greedy(engine: Engine, logits: np.ndarray, position: int, cache: KVCache, count: int,
            forced: Sequence[int] | None = None) -> list[int]:
    """`count` argmax tokens (EOS does not stop it); with `forced`, those tokens are fed instead."""
    tokens = []
    for step in range(count):
        tokens.append(int(np.argmax(logits)))
        if step == count - 1:
            break
        logits = engine.decode_one_token(forced[step] if forced is not None else tokens[-1], position, cache)
        position += 1
    return tokens


def _sizes(fp32_dir: Path, quant_dir: Path) -> dict:
    fp32, quant = load_manifest(fp32_dir, verify=False), load_manifest(quant_dir, verify=False)

    graphs = {}
    for name in ("vision_graph", "embed_graph", "decoder_graph", "tokenizer"):
        a, b = getattr(fp32, name).disk_bytes(fp32_dir), getattr(quant, name).disk_bytes(quant_dir)
        graphs[name.replace("_graph", "")] = {"fp32_bytes": a, "bytes": b, "ratio": round(b / a, 4)}
    if quant.step_decoder_graph:  # no fp32 counterpart: it adds to the bundle
        step_bytes = quant.step_decoder_graph.disk_bytes(quant_dir)
        graphs["step_decoder"] = {"fp32_bytes": 0, "bytes": step_bytes, "ratio": None}
    total_fp32 = sum(g["fp32_bytes"] for g in graphs.values())
    total = sum(g["bytes"] for g in graphs.values())
    return {"files": graphs, "fp32_bytes": total_fp32, "bytes": total, "ratio": round(total / total_fp32, 4)}


def build_report(fp32_dir: str | Path, quant_dir: str | Path, samples, new_tokens: int = 8,
                 progress: Callable[[str], None] = lambda message: None) -> dict:
    fp32_dir, quant_dir = Path(fp32_dir), Path(quant_dir)
    reference = Engine.load(fp32_dir, verify=False)
    quantized = Engine.load(quant_dir)
    rows = []
    for index, sample in enumerate(samples, start=1):
        progress(f"  report request {index}/{len(samples)} ({sample.origin})")
        inputs = reference.prepare(list(sample.images), sample.query)
        prompt = inputs.prompt
        capacity = len(prompt.input_ids) + new_tokens
        ref_features = [reference.encode_image(image) for image in inputs.images]
        q_features = [quantized.encode_image(image) for image in inputs.images]
        vision = [(_cosine(q, r), float(np.abs(q - r).max())) for q, r in zip(q_features, ref_features)]

        ref_cache = reference.new_cache(capacity)
        ref_logits = reference.prefill(prompt, ref_features, ref_cache).copy()
        # The decoder alone: the fp32 embeddings (fp32 vision features) into both decoders.
        embeds, deepstack = reference.prompt_inputs(prompt, ref_features)
        dec_cache = quantized.new_cache(capacity)
        dec_logits = quantized.run_decoder(embeds, prompt.position_ids[:, None, :], dec_cache, deepstack).copy()
        # End to end: quantized vision into the quantized decoder.
        e2e_cache = quantized.new_cache(capacity)
        e2e_logits = quantized.prefill(prompt, q_features, e2e_cache).copy()

        ref_tokens = _greedy(reference, ref_logits, prompt.next_position, ref_cache, new_tokens)
        forced = _greedy(quantized, dec_logits, prompt.next_position, dec_cache, new_tokens, forced=ref_tokens)
        free = _greedy(quantized, e2e_logits, prompt.next_position, e2e_cache, new_tokens)
        common = next((i for i, (a, b) in enumerate(zip(free, ref_tokens)) if a != b), len(ref_tokens))
        rows.append({
            "request": sample.origin,
            "prompt_tokens": int(len(prompt.input_ids)),
            "vision_cosine": [round(c, 6) for c, _ in vision],
            "vision_max_abs_diff": [round(d, 6) for _, d in vision],
            "decoder_logits_cosine": round(_cosine(dec_logits, ref_logits), 6),
            "decoder_logits_max_abs_diff": round(float(np.abs(dec_logits - ref_logits).max()), 6),
            "decoder_token_agreement": round(float(np.mean(np.equal(forced, ref_tokens))), 4),
            "logits_cosine": round(_cosine(e2e_logits, ref_logits), 6),
            "logits_max_abs_diff": round(float(np.abs(e2e_logits - ref_logits).max()), 6),
            "greedy_agreement": round(float(np.mean(np.equal(free, ref_tokens))), 4),
            "greedy_common_prefix": common,
            "fp32_tokens": ref_tokens,
            "tokens": free,
        })

    def stat(key: str, reduce) -> float:
        values = [v for row in rows for v in (row[key] if isinstance(row[key], list) else [row[key]])]
        return round(float(reduce(values)), 6)

    manifest = quantized.manifest
    return {
        "precision": manifest.precision,
        "graphs": {"vision": manifest.vision_graph.precision, "embed": manifest.embed_graph.precision,
                   "decoder": manifest.decoder_graph.precision,
                   # one-token steps (token agreement, free-running greedy) run on this graph when present
                   **({"step_decoder": manifest.step_decoder_graph.precision} if manifest.step_decoder_graph else {})},
        "held_back_requests": [row["request"] for row in rows],
        "new_tokens": new_tokens,
        "vision": {"cosine_min": stat("vision_cosine", min), "cosine_mean": stat("vision_cosine", np.mean),
                   "max_abs_diff": stat("vision_max_abs_diff", max)},
        "decoder": {"logits_cosine_min": stat("decoder_logits_cosine", min),
                    "logits_cosine_mean": stat("decoder_logits_cosine", np.mean),
                    "logits_max_abs_diff": stat("decoder_logits_max_abs_diff", max),
                    "token_agreement": stat("decoder_token_agreement", np.mean)},
        "end_to_end": {"logits_cosine_min": stat("logits_cosine", min),
                       "logits_cosine_mean": stat("logits_cosine", np.mean),
                       "logits_max_abs_diff": stat("logits_max_abs_diff", max),
                       "greedy_agreement": stat("greedy_agreement", np.mean),
                       "greedy_common_prefix_mean": stat("greedy_common_prefix", np.mean)},
        "sizes": _sizes(fp32_dir, quant_dir),
        "per_request": rows,
    }


def write_report(bundle_dir: str | Path, report: dict) -> dict:
    """Save the report in the bundle; returns its manifest entry (path and sha256)."""
    path = Path(bundle_dir) / REPORT_NAME
    path.write_text(json.dumps(report, indent=2) + "\n")
    return {"path": REPORT_NAME, "sha256": sha256_of(path)}


def format_report(report: dict) -> str:
    sizes, vision, decoder, e2e = report["sizes"], report["vision"], report["decoder"], report["end_to_end"]
    graphs = report["graphs"]
    lines = [
        f"quantization report ({report['precision']}: vision {graphs['vision']}, decoder {graphs['decoder']}, "
        + (f"decode steps {graphs['step_decoder']}, " if "step_decoder" in graphs else "")
        + f"embed {graphs['embed']}) on {len(report['held_back_requests'])} held-back requests",
        f"  vision      cosine min {vision['cosine_min']:.5f} mean {vision['cosine_mean']:.5f}, "
        f"max abs diff {vision['max_abs_diff']:.4g}",
        f"  decoder     logits cosine min {decoder['logits_cosine_min']:.5f} mean {decoder['logits_cosine_mean']:.5f}, "
        f"max abs diff {decoder['logits_max_abs_diff']:.4g}, token agreement {decoder['token_agreement']:.3f} "
        f"(fp32 tokens fed, {report['new_tokens']} tokens)",
        f"  end to end  logits cosine min {e2e['logits_cosine_min']:.5f} mean {e2e['logits_cosine_mean']:.5f}, "
        f"max abs diff {e2e['logits_max_abs_diff']:.4g}, greedy agreement {e2e['greedy_agreement']:.3f}, "
        f"common prefix {e2e['greedy_common_prefix_mean']:.1f}/{report['new_tokens']}",
    ]
    for name, entry in sizes["files"].items():
        ratio = f"({entry['ratio']:.3f}x)" if entry["ratio"] is not None else "(added)"
        lines.append(f"  {name:<10}  {entry['fp32_bytes'] / 1e6:9.2f} MB -> {entry['bytes'] / 1e6:9.2f} MB {ratio}")
    lines.append(f"  bundle      {sizes['fp32_bytes'] / 1e6:9.2f} MB -> {sizes['bytes'] / 1e6:9.2f} MB "
                 f"({sizes['ratio']:.3f}x)")
    return "\n".join(lines)
