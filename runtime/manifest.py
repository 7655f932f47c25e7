"""The bundle manifest: one JSON file that makes a bundle self-describing and language-neutral.

A bundle is a folder holding this `manifest.json`, the ONNX graphs, and tokenizer.json. The manifest
names every file with its sha256, every graph input and output, every token id, dimension and
preprocessing parameter, and the chat-template pieces, so a runtime in any language needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import BundleError
from .preprocess import PreprocessConfig

# 2: the decoder takes host-computed rotary tables (rotary_cos, rotary_sin, cache_positions), not
# 3-D position_ids; version-1 bundles must be re-exported.
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int  # width of the vision blocks
    out_hidden_size: int  # width of the merged features = text hidden size
    num_heads: int
    head_dim: int
    rope_theta: float
    patch_size: int
    spatial_merge_size: int
    window_size: int  # Qwen2.5-VL window attention in pixels; 0 = every block attends to the whole image
    fullatt_block_indexes: tuple[int, ...]


@dataclass(frozen=True)
class TokenIds:
    image_pad: int
    vision_start: int
    vision_end: int
    eos: tuple[int, ...]
    pad: int


@dataclass(frozen=True)
class PromptTemplate:
    """What the checkpoint's chat template renders for one user turn: prefix + image * N + text + suffix."""

    prefix: str
    image: str
    suffix: str

    def render(self, num_images: int, text: str) -> str:
        return self.prefix + self.image * num_images + text + self.suffix


@dataclass(frozen=True)
class Limits:
    max_context: int  # prompt + generated tokens
    max_images: int
    max_image_pixels: int  # decompression-bomb guard on original images
    max_patches_per_image: int


@dataclass(frozen=True)
class GraphFile:
    path: str
    sha256: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    precision: str = "fp32"
    data_path: str = ""  # the graph's ONNX external-data file (the exporter writes every graph's weights there)
    data_sha256: str = ""

    def disk_bytes(self, bundle: Path) -> int:
        """The file's size in `bundle`, its external data included."""
        return sum((bundle / name).stat().st_size for name in (self.path, self.data_path) if name)


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    family: str
    precision: str
    text: TextConfig
    vision: VisionConfig
    preprocess: PreprocessConfig
    tokens: TokenIds
    prompt: PromptTemplate
    limits: Limits
    vision_graph: GraphFile
    embed_graph: GraphFile
    decoder_graph: GraphFile
    tokenizer: GraphFile
    # Optional: a decoder with decoder_graph's inputs and outputs that the engine uses for one-token steps
    # (a weight-only graph reads fewer bytes per token than a static-INT8 one, which is faster on prompts).
    step_decoder_graph: GraphFile | None = None
    source: dict = field(default_factory=dict)  # where the bundle came from: checkpoint, tool versions
    extra: dict = field(default_factory=dict)  # per-precision records (quantization choices, reports)

    def files(self) -> list[GraphFile]:
        graphs = [self.vision_graph, self.embed_graph, self.decoder_graph, self.tokenizer]
        return graphs + ([self.step_decoder_graph] if self.step_decoder_graph else [])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def write(self, bundle_dir: str | Path) -> Path:
        path = Path(bundle_dir) / MANIFEST_NAME
        path.write_text(self.to_json() + "\n")
        return path


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def graph_file(bundle_dir: str | Path, name: str, inputs=(), outputs=(), precision: str = "fp32") -> GraphFile:
    bundle = Path(bundle_dir)
    data_name = name + ".data"
    has_data = (bundle / data_name).is_file()
    return GraphFile(name, sha256_of(bundle / name), tuple(inputs), tuple(outputs), precision,
                     data_name if has_data else "", sha256_of(bundle / data_name) if has_data else "")


def _build(cls, data: dict, what: str):
    try:
        fields = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        for name, value in fields.items():
            if isinstance(value, list):
                fields[name] = tuple(value)
        return cls(**fields)
    except TypeError as err:
        raise BundleError(f"manifest section {what!r} is malformed ({err})") from None


def load_manifest(bundle_dir: str | Path, verify: bool = True) -> Manifest:
    """Read and check a bundle's manifest; with `verify`, every file's sha256 is checked too."""
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise BundleError(f"bundle not found: {bundle} is not a folder")
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle} is not a gemvg bundle: {MANIFEST_NAME} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path}: unknown manifest schema version {version!r}; this gemvg reads version "
                          f"{SCHEMA_VERSION} (re-export the bundle or upgrade gemvg)")
    try:
        manifest = Manifest(
            schema_version=version,
            family=data["family"],
            precision=data["precision"],
            text=_build(TextConfig, data["text"], "text"),
            vision=_build(VisionConfig, data["vision"], "vision"),
            preprocess=_build(PreprocessConfig, data["preprocess"], "preprocess"),
            tokens=_build(TokenIds, data["tokens"], "tokens"),
            prompt=_build(PromptTemplate, data["prompt"], "prompt"),
            limits=_build(Limits, data["limits"], "limits"),
            vision_graph=_build(GraphFile, data["vision_graph"], "vision_graph"),
            embed_graph=_build(GraphFile, data["embed_graph"], "embed_graph"),
            decoder_graph=_build(GraphFile, data["decoder_graph"], "decoder_graph"),
            tokenizer=_build(GraphFile, data["tokenizer"], "tokenizer"),
            step_decoder_graph=(_build(GraphFile, data["step_decoder_graph"], "step_decoder_graph")
                                if data.get("step_decoder_graph") else None),
            source=data.get("source", {}),
            extra=data.get("extra", {}),
        )
    except KeyError as err:
        raise BundleError(f"{path}: manifest lacks the field {err}") from None
    if verify:
        verify_files(bundle, manifest)
    return manifest


def verify_files(bundle: Path, manifest: Manifest) -> None:
    """Every file the manifest names is present and matches its sha256. The files are hashed in parallel
    (hashlib releases the GIL): a 1 GB bundle is checked in about half the time of one thread."""
    expected = [(name, digest) for entry in manifest.files()
                for name, digest in ((entry.path, entry.sha256), (entry.data_path, entry.data_sha256)) if name]
    for name, _ in expected:
        if not (bundle / name).is_file():
            raise BundleError(f"bundle {bundle} is incomplete: {name} is missing")
    with ThreadPoolExecutor(max_workers=min(len(expected), os.cpu_count() or 1)) as pool:
        actual = list(pool.map(lambda item: sha256_of(bundle / item[0]), expected))
    for (name, digest), found in zip(expected, actual):
        if found != digest:
            raise BundleError(f"bundle {bundle} is altered: {name} does not match its sha256 in the manifest")
