"""The bundle manifest: one JSON file that makes a bundle self-describing and language-neutral.

A bundle is a folder holding this `manifest.json`, the ONNX graphs, and tokenizer.json. The manifest
names every file with its sha256, every graph input and output, every token id, dimension and
preprocessing parameter, and the chat-template pieces, so a runtime in any language needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import BundleError
from .families import FAMILIES
from .grounding import SYNTAXES
from .model_config import TextConfig, VisionConfig
from .onnx_external import MalformedModel, external_data_locations
from .preprocess import PreprocessConfig

# 2: the decoder takes host-computed rotary tables (rotary_cos, rotary_sin, cache_positions), not
# 3-D position_ids; version-1 bundles must be re-exported.
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
# What the exporter writes; a graph of another precision is a bundle this gemvg does not know.
PRECISIONS = ("fp32", "int8", "int4", "int8w")

# Bounds of the manifest's numbers (inclusive). Far beyond any Qwen2-VL-family model, they refuse what
# would make the engine allocate absurd buffers (the KV cache is layers x kv_heads x context x head_dim)
# or index outside a table (token ids against vocab_size).
_COUNT = (1, 1 << 16)
_RANGES = {
    "text": {"hidden_size": _COUNT, "num_layers": (1, 1024), "num_heads": (1, 1024), "num_kv_heads": (1, 1024),
             "head_dim": (2, 4096), "vocab_size": (1, 1 << 24), "max_position_embeddings": (1, 1 << 24)},
    "vision": {"hidden_size": _COUNT, "out_hidden_size": _COUNT, "num_heads": (1, 1024), "head_dim": (2, 4096),
               "patch_size": (1, 1024), "spatial_merge_size": (1, 64), "window_size": (0, 1 << 16),
               "num_position_embeddings": (0, 1 << 24)},
    "preprocess": {"min_pixels": (1, 1 << 34), "max_pixels": (1, 1 << 34), "patch_size": (1, 1024),
                   "temporal_patch_size": (1, 64), "merge_size": (1, 64), "max_image_pixels": (1, 1 << 34)},
    "limits": {"max_context": (1, 1 << 20), "max_images": (1, 1024), "max_image_pixels": (1, 1 << 34),
               "max_patches_per_image": (1, 1 << 24)},
}


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
    family: str  # the checkpoint's model_type (gemvg.runtime.families)
    box_syntax: str  # how the model writes boxes (gemvg.runtime.grounding.SYNTAXES)
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
            # Bundles written before the syntax was recorded apart from the family: the family's own.
            box_syntax=data.get("box_syntax") or _family_syntax(data["family"]),
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
    check_fields(manifest, path)
    check_paths(bundle, manifest)
    if verify:
        verify_files(bundle, manifest)
    check_external_data(bundle, manifest)  # parses the graphs: after their checksums
    return manifest


def _family_syntax(name) -> str:
    known = FAMILIES.get(name) if isinstance(name, str) else None
    return known.box_syntax if known else ""  # an unknown family is reported by check_fields


def check_fields(manifest: Manifest, path: Path) -> None:
    """Every number in range, every name known: a manifest fault is one line at load, not a failure
    deep inside a request."""
    def fail(what: str) -> None:
        raise BundleError(f"{path}: {what}")

    if manifest.family not in FAMILIES:
        fail(f"unknown model family {manifest.family!r}; this gemvg reads {', '.join(FAMILIES)}")
    if manifest.box_syntax not in SYNTAXES:
        fail(f"unknown box syntax {manifest.box_syntax!r}; this gemvg reads {', '.join(SYNTAXES)}")
    for name, entry in [("precision", manifest.precision)] + [
            (f"{graph.path} precision", graph.precision) for graph in manifest.files()]:
        if entry not in PRECISIONS:
            fail(f"unknown {name} {entry!r}; this gemvg reads {', '.join(PRECISIONS)}")
    for section, ranges in _RANGES.items():
        values = getattr(manifest, section)
        for name, (low, high) in ranges.items():
            value = getattr(values, name)
            if not _is_int(value) or not low <= value <= high:
                fail(f"{section}.{name} is {value!r}, outside {low}..{high}")
    text, vision, preprocess = manifest.text, manifest.vision, manifest.preprocess
    floats = [("text.rope_theta", text.rope_theta), ("vision.rope_theta", vision.rope_theta),
              ("preprocess.rescale_factor", preprocess.rescale_factor)]
    floats += [(f"preprocess.image_std[{i}]", v) for i, v in enumerate(_sequence(preprocess.image_std, 3))]
    for name, value in floats:
        if not _is_number(value) or not 0 < value < 1e30:
            fail(f"{name} is {value!r}, not a positive finite number")
    if not all(_is_number(v) and abs(v) < 1e30 for v in _sequence(preprocess.image_mean, 3)):
        fail(f"preprocess.image_mean is {preprocess.image_mean!r}, not three finite numbers")
    if text.num_heads % text.num_kv_heads:
        fail(f"text.num_heads {text.num_heads} is not a multiple of text.num_kv_heads {text.num_kv_heads}")
    if preprocess.min_pixels > preprocess.max_pixels:
        fail(f"preprocess.min_pixels {preprocess.min_pixels} exceeds max_pixels {preprocess.max_pixels}")
    section = _sequence(text.mrope_section, 3)
    if not all(_is_int(v) and v >= 0 for v in section) or sum(section) != text.head_dim // 2:
        fail(f"text.mrope_section {list(section)!r} is not three counts summing to head_dim / 2 = "
             f"{text.head_dim // 2}")
    if not all(_is_int(v) and 0 <= v < 1024 for v in _sequence(vision.fullatt_block_indexes)):
        fail(f"vision.fullatt_block_indexes {vision.fullatt_block_indexes!r} are not block numbers")
    deepstack = _sequence(vision.deepstack_layers)
    if vision.deepstack_layers and not all(_is_int(v) and 0 <= v < 1024 for v in deepstack):
        fail(f"vision.deepstack_layers {vision.deepstack_layers!r} are not block numbers")
    if len(_sequence(vision.deepstack_layers)) > text.num_layers:
        fail(f"vision.deepstack_layers feeds {len(deepstack)} decoder layers; the decoder has {text.num_layers}")
    if vision.num_position_embeddings and vision.window_size:
        fail("vision has both a learned position table and window attention: no Qwen-VL tower gemvg knows")
    if not isinstance(text.mrope_interleaved, bool):
        fail(f"text.mrope_interleaved is {text.mrope_interleaved!r}, not true or false")
    tokens = manifest.tokens
    ids = [("image_pad", tokens.image_pad), ("vision_start", tokens.vision_start),
           ("vision_end", tokens.vision_end), ("pad", tokens.pad)]
    ids += [("eos", v) for v in _sequence(tokens.eos)]
    if not _sequence(tokens.eos):
        fail("tokens.eos is empty: generation could not stop")
    for name, value in ids:
        if not _is_int(value) or not 0 <= value < text.vocab_size:
            fail(f"tokens.{name} is {value!r}, not a token id below text.vocab_size {text.vocab_size}")
    for name, value in (("prefix", manifest.prompt.prefix), ("image", manifest.prompt.image),
                        ("suffix", manifest.prompt.suffix)):
        if not isinstance(value, str):
            fail(f"prompt.{name} is not text")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sequence(value, length: int | None = None) -> tuple:
    """`value` as a tuple when it is a list of the given length, else a tuple no check accepts."""
    if not isinstance(value, (tuple, list)) or (length is not None and len(value) != length):
        return (None,) * (length or 1)
    return tuple(value)


def check_paths(bundle: Path, manifest: Manifest) -> None:
    """Every file the manifest names lies inside the bundle folder: a relative path without `..`, and
    no symlink on the way that leads out of the folder (a copied bundle must not read other files)."""
    for entry in manifest.files():
        for name in (entry.path, entry.data_path):
            if name:
                _inside(bundle, PurePosixPath(), name, f"the manifest names {name!r}")


def check_external_data(bundle: Path, manifest: Manifest) -> None:
    """Every external-data location in every graph is a data file that the manifest names (so its sha256
    is checked) inside the bundle: ONNX Runtime opens whatever a location names."""
    checked = {entry.data_path for entry in manifest.files() if entry.data_path}
    for entry in manifest.files():
        if entry is manifest.tokenizer or not (bundle / entry.path).is_file():
            continue  # a missing graph: verify_files reports it, or (verify=False) opening it does
        try:
            locations = set(external_data_locations(bundle / entry.path))
        except (MalformedModel, OSError) as err:
            raise BundleError(f"bundle {bundle}: {entry.path} is not an ONNX model ({err})") from None
        folder = PurePosixPath(entry.path).parent
        for location in sorted(locations):
            named = _inside(bundle, folder, location, f"{entry.path} keeps weights in {location!r}")
            if named.as_posix() not in checked:
                raise BundleError(f"bundle {bundle}: {entry.path} keeps weights in {location!r}, which is not "
                                  "a data file the manifest names and checksums")


def _inside(bundle: Path, folder: PurePosixPath, name: str, what: str) -> PurePosixPath:
    """`name` (relative to `folder` in the bundle) as a bundle-relative path, or a BundleError when it
    leaves the bundle."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise BundleError(f"bundle {bundle}: {what}, not a plain relative file name")
    relative = PurePosixPath(name)
    if relative.is_absolute() or PureWindowsPath(name).drive or ".." in relative.parts:
        raise BundleError(f"bundle {bundle}: {what}, a path outside the bundle folder (absolute or with ..)")
    joined = folder / relative
    root = bundle.resolve()
    if not (bundle / joined).resolve().is_relative_to(root):
        raise BundleError(f"bundle {bundle}: {what}, which is a symlink leading out of the bundle folder")
    return joined


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
