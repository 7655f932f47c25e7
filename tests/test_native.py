"""The native runtime (libgemvg, gemvg-ground) against the Python engine on the same bundles.

The native build is made (or brought up to date) with cmake in $GEMVG_NATIVE_BUILD, default build/ in
the repository; ctest sets it to its own build. A missing compiler or dependency FAILS these tests (run
runtime/native/install-deps.sh), it never skips them.

Parity: token ids, text, boxes and prefix reuse identical to the Python engine for a first query and a
follow-up on the same images (1, 2 and 3 images of different sizes, modes and formats, every family);
pixel values within 1e-6; the tokenizer, its decoding and the box parser (every box syntax) on tricky
inputs; every vision feed (Qwen3-VL's position taps and weights bit for bit) as `gemvg inspect`. Bad input:
NULL and one line from the C API, exit 2 and one line from gemvg-ground.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gemvg.runtime import Engine
from gemvg.runtime.grounding import ImageGeometry, format_answer, Box, parse_answer
from gemvg.runtime.preprocess import load_image, preprocess_image

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # every family: Qwen3-VL's DeepStack and interleaved M-RoPE too
SYNTAX = {"qwen2_vl": "ref_tokens", "qwen2_5_vl": "json_pixels", "qwen3_vl": "json_relative"}  # each one's box syntax
SYNTAXES = ("ref_tokens", "json_pixels", "json_relative")


def _run(command: list, what: str) -> None:
    try:
        done = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=900)
    except FileNotFoundError as err:
        pytest.fail(f"{what}: {err} (run runtime/native/install-deps.sh)")
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        pytest.fail(f"{what} failed (run runtime/native/install-deps.sh):\n{tail}")


@pytest.fixture(scope="session")
def native_build() -> Path:
    build = Path(os.environ.get("GEMVG_NATIVE_BUILD") or REPO / "build")
    if not (build / "CMakeCache.txt").is_file():
        _run(["cmake", "-S", REPO, "-B", build, f"-DPython_EXECUTABLE={sys.executable}"], "cmake configure")
    _run(["cmake", "--build", build, "-j", str(min(4, os.cpu_count() or 1))], "cmake build")
    return build


class NativeError(Exception):
    pass


class Native:
    """libgemvg through ctypes: the C API exactly as a C caller sees it."""

    def __init__(self, build: Path):
        lib = ctypes.CDLL(str(build / "libgemvg.so"))
        lib.gemvg_engine_load.restype = ctypes.c_void_p
        lib.gemvg_engine_load.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
        lib.gemvg_ground_files.restype = ctypes.c_void_p
        lib.gemvg_ground_files.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t,
                                           ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
        lib.gemvg_ground_rgb.restype = ctypes.c_void_p
        lib.gemvg_ground_rgb.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int),
                                         ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int), ctypes.c_size_t,
                                         ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
        lib.gemvg_result_json.restype = ctypes.c_char_p
        lib.gemvg_result_json.argtypes = [ctypes.c_void_p]
        lib.gemvg_result_free.argtypes = [ctypes.c_void_p]
        lib.gemvg_engine_free.argtypes = [ctypes.c_void_p]
        lib.gemvg_last_error.restype = ctypes.c_char_p
        lib.gemvg_pixel_values_file.restype = ctypes.POINTER(ctypes.c_float)
        lib.gemvg_pixel_values_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t),
                                                ctypes.POINTER(ctypes.c_size_t)]
        lib.gemvg_free.argtypes = [ctypes.c_void_p]
        self.lib = lib

    def error(self) -> str:
        return self.lib.gemvg_last_error().decode()

    def load(self, bundle: Path, threads: int = 0) -> int:
        engine = self.lib.gemvg_engine_load(str(bundle).encode(), b"cpu", threads)
        if not engine:
            raise NativeError(self.error())
        return engine

    def _result(self, result) -> dict:
        if not result:
            raise NativeError(self.error())
        try:
            return json.loads(self.lib.gemvg_result_json(result).decode())
        finally:
            self.lib.gemvg_result_free(result)

    def ground_files(self, engine: int, paths, query: str, mode: str, max_new_tokens: int) -> dict:
        array = (ctypes.c_char_p * max(1, len(paths)))(*[str(p).encode() for p in paths])
        return self._result(self.lib.gemvg_ground_files(engine, array, len(paths), query.encode(), mode.encode(),
                                                        max_new_tokens))

    def ground_rgb(self, engine: int, frames: list[np.ndarray], query: str, mode: str, max_new_tokens: int) -> dict:
        n = len(frames)
        pixels = (ctypes.c_void_p * n)(*[frame.ctypes.data for frame in frames])
        widths = (ctypes.c_int * n)(*[frame.shape[1] for frame in frames])
        heights = (ctypes.c_int * n)(*[frame.shape[0] for frame in frames])
        strides = (ctypes.c_int * n)(*[frame.strides[0] for frame in frames])
        return self._result(self.lib.gemvg_ground_rgb(engine, pixels, widths, heights, strides, n, query.encode(),
                                                      mode.encode(), max_new_tokens))

    def pixel_values(self, engine: int, path: Path) -> np.ndarray:
        rows, cols = ctypes.c_size_t(), ctypes.c_size_t()
        data = self.lib.gemvg_pixel_values_file(engine, str(path).encode(), ctypes.byref(rows), ctypes.byref(cols))
        if not data:
            raise NativeError(self.error())
        try:
            return np.ctypeslib.as_array(data, shape=(rows.value, cols.value)).copy()
        finally:
            self.lib.gemvg_free(data)


@pytest.fixture(scope="session")
def native(native_build) -> Native:
    return Native(native_build)


def check_tool(native_build: Path, *args, stdin: object = None) -> object:
    done = subprocess.run([str(native_build / "native-tests" / "native-check"), *map(str, args)], capture_output=True,
                          input=None if stdin is None else json.dumps(stdin), text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def same_result(ours: dict, theirs) -> None:
    expected = theirs.to_dict()
    assert ours["token_ids"] == expected["token_ids"]
    assert ours["text"] == expected["text"]
    assert ours["boxes"] == expected["boxes"]
    assert ours["images"] == expected["images"]
    assert ours["reused_prefix_tokens"] == expected["reused_prefix_tokens"]


REQUESTS = [  # images, mode: 1, 2 and 3 images of different sizes, colour modes and formats
    (["rgb.jpg"], "direct"),
    (["gray.png", "palette.png"], "cot"),
    (["rgba.png", "wide.jpg", "large.jpg"], "raw"),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_match_the_python_engine_first_query_and_follow_up(family, native, tiny_bundles, image_files):
    python = Engine.load(tiny_bundles[family])
    engine = native.load(tiny_bundles[family])
    try:
        for names, mode in REQUESTS:
            paths = [image_files[name] for name in names]
            for query in ("the red cup on the left", "and the blue bowl?"):  # a first query, then a follow-up
                ours = native.ground_files(engine, paths, query, mode, 24)
                same_result(ours, python.ground(paths, query, mode=mode, max_new_tokens=24))
            assert ours["reused_prefix_tokens"] > 0  # the follow-up reused the prompt up to the query
    finally:
        native.lib.gemvg_engine_free(engine)


@pytest.mark.parametrize("family", FAMILIES)
def test_jump_forward_matches_the_python_engine(family, native, native_build, tiny_bundles, image_files):
    python = Engine.load(tiny_bundles[family])
    # What jump-forward feeds after every prefix of trained answers (both syntaxes, every mode).
    geometries = [python.prepare([image_files["rgb.jpg"]], "q").images[0].geometry] * 2
    answer_boxes = [Box(1, 3, 4, 30, 40, "red cup"), Box(0, 10, 12, 50, 44, "the lid")]
    for mode in ("direct", "cot", "raw"):
        answer = format_answer(answer_boxes, SYNTAX[family], geometries, mode, reasoning='two {"things')
        ids = python.tokenizer.encode(answer, add_special_tokens=False).ids
        prefixes = [ids[:end] for end in range(1, len(ids) + 1)]
        expected = [python.forced_tokens(prefix, mode) for prefix in prefixes]
        assert sum(map(bool, expected)) >= (0 if mode == "raw" else 4)
        assert check_tool(native_build, "forced", tiny_bundles[family], mode, stdin=prefixes) == expected
    # Whole requests with jump-forward on (the random model rarely writes forcing text: they check the
    # option changes nothing else).
    engine = native.load(tiny_bundles[family])
    native.lib.gemvg_engine_set_jump_forward.argtypes = [ctypes.c_void_p, ctypes.c_int]
    native.lib.gemvg_engine_set_jump_forward(engine, 1)
    try:
        paths = [image_files["rgb.jpg"], image_files["wide.jpg"]]
        ours = native.ground_files(engine, paths, "the cup", "direct", 24)
        same_result(ours, python.ground(paths, "the cup", max_new_tokens=24, jump_forward=True))
    finally:
        native.lib.gemvg_engine_free(engine)


@pytest.mark.parametrize("family", FAMILIES)
def test_rgb_frames_match_the_python_engine(family, native, tiny_bundles, image_files):
    frames = [np.asarray(load_image(image_files[name], 10**9)) for name in ("large.jpg", "rgb.jpg")]
    # A frame with row padding (stride > 3 * width), as camera buffers have.
    padded = np.zeros((40, 33 * 3 + 5), np.uint8)
    padded[:, :99] = np.random.default_rng(2).integers(0, 256, (40, 99), dtype=np.uint8)
    frame = np.ndarray((40, 33, 3), np.uint8, padded.data, strides=(padded.strides[0], 3, 1))
    engine = native.load(tiny_bundles[family])
    try:
        ours = native.ground_rgb(engine, frames + [frame], "every cup", "direct", 16)
        same_result(ours, Engine.load(tiny_bundles[family]).ground(frames + [np.ascontiguousarray(frame)], "every cup",
                                                                   max_new_tokens=16))
    finally:
        native.lib.gemvg_engine_free(engine)


def test_pixel_values_match_the_python_preprocessing(native, tiny_bundle, image_files, tmp_path):
    python = Engine.load(tiny_bundle)
    engine = native.load(tiny_bundle)
    files = dict(image_files)
    rng = np.random.default_rng(9)
    for width, height in rng.integers(8, 400, (12, 2)):  # both resample pass orders, up- and downscaling
        files[f"{width}x{height}.png"] = tmp_path / f"{width}x{height}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(files[f"{width}x{height}.png"])
    try:
        for name, path in files.items():
            expected = preprocess_image(load_image(path, 10**9), python.manifest.preprocess).pixel_values
            ours = native.pixel_values(engine, path)
            assert ours.shape == expected.shape, name
            assert np.abs(ours - expected).max() <= 1e-6, name
    finally:
        native.lib.gemvg_engine_free(engine)


def test_exif_orientation_is_applied_as_pil_does(native, tiny_bundle, tmp_path):
    python = Engine.load(tiny_bundle)
    engine = native.load(tiny_bundle)
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (30, 70, 3), dtype=np.uint8))
    try:
        for orientation in range(1, 9):
            for suffix in (".jpg", ".png"):  # JPEG APP1 and PNG eXIf
                exif = Image.Exif()
                exif[0x0112] = orientation
                path = tmp_path / f"orientation_{orientation}{suffix}"
                image.save(path, exif=exif.tobytes())
                expected = preprocess_image(load_image(path, 10**9), python.manifest.preprocess).pixel_values
                ours = native.pixel_values(engine, path)
                assert ours.shape == expected.shape and np.abs(ours - expected).max() <= 1e-6, path.name
    finally:
        native.lib.gemvg_engine_free(engine)


def _write_png(path: Path, samples: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (PIL writes 16-bit grey only)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = samples.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in samples.reshape(height, -1))
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_sixteen_bit_pngs_decode_as_pil_does(native, tiny_bundle, tmp_path):
    python = Engine.load(tiny_bundle)
    engine = native.load(tiny_bundle)
    rng = np.random.default_rng(8)
    files = {"rgb16.png": (rng.integers(0, 65536, (40, 50, 3)), 2), "gray_alpha16.png": (rng.integers(0, 65536, (40, 50, 2)), 4),
             "gray16.png": (rng.integers(0, 600, (40, 50)), 0)}  # grey: PIL's I;16, clipped at 255 on conversion
    try:
        for name, (samples, color_type) in files.items():
            _write_png(tmp_path / name, samples, color_type)
            expected = preprocess_image(load_image(tmp_path / name, 10**9), python.manifest.preprocess).pixel_values
            ours = native.pixel_values(engine, tmp_path / name)
            assert ours.shape == expected.shape and np.abs(ours - expected).max() <= 1e-6, name
    finally:
        native.lib.gemvg_engine_free(engine)


@pytest.mark.parametrize("family", FAMILIES)
def test_stages_equal_the_inspect_golden_vectors(family, native_build, tiny_bundles, image_files, tmp_path):
    """`gemvg inspect` dumps every stage for other runtimes; the native one computes each of them alike."""
    from gemvg.runtime.cli import main as gemvg

    bundle, paths = tiny_bundles[family], [image_files[name] for name in ("large.jpg", "thin_tall.png", "palette.png")]
    dump = tmp_path / "golden.npz"
    argv = ["inspect", "--bundle", bundle, "--mode", "cot", "--query", "the cup, ünïcödé", "--out", dump]
    assert gemvg([str(a) for a in argv + [x for path in paths for x in ("--image", path)]]) == 0
    golden = np.load(dump)
    ours = check_tool(native_build, "prompt", bundle, "cot", "the cup, ünïcödé", *paths)
    assert ours["input_ids"] == golden["input_ids"][0].tolist()
    assert np.array_equal(np.asarray(ours["positions"]).reshape(3, -1), golden["position_ids"][:, 0])
    assert ours["image_spans"] == golden["image_spans"].tolist()
    assert ours["next_position"] == int(golden["next_position"])
    for table in ("rotary_cos", "rotary_sin"):  # bit for bit: cos/sin are rounded once from float64 on both sides
        expected = golden[f"decoder_{table}"]
        assert np.array_equal(np.asarray(ours[table], np.float32).reshape(expected.shape), expected)
    for index, path in enumerate(paths):
        feeds = check_tool(native_build, "vision", bundle, path)
        expected = golden[f"image_{index}_vision_pixel_values"]
        assert np.abs(np.asarray(feeds["pixel_values"]).reshape(expected.shape) - expected).max() <= 1e-6, path
        for name in ("rotary_cos", "rotary_sin"):
            expected = golden[f"image_{index}_vision_{name}"]
            assert np.array_equal(np.asarray(feeds[name], np.float32).reshape(expected.shape), expected), (path, name)
        tabled = f"image_{index}_vision_position_taps" in golden  # Qwen3-VL's learned position table
        assert tabled == (family == "qwen3_vl")
        if tabled:  # bit for bit: the same float32 operations in the same order
            taps = golden[f"image_{index}_vision_position_taps"]
            assert np.array_equal(np.asarray(feeds["position_taps"], np.int64).reshape(taps.shape), taps)
            weights = golden[f"image_{index}_vision_position_weights"]
            assert np.array_equal(np.asarray(feeds["position_weights"], np.float32).reshape(weights.shape), weights)
        else:
            assert feeds["position_taps"] == [] and feeds["position_weights"] == []
        windowed = f"image_{index}_vision_window_gather" in golden
        assert windowed == (family == "qwen2_5_vl")
        if windowed:
            gather = golden[f"image_{index}_vision_window_gather"]
            assert np.array_equal(np.asarray(feeds["window_gather"]).reshape(gather.shape), gather)
            assert np.array_equal(feeds["window_scatter"], golden[f"image_{index}_vision_window_scatter"])
            bias = golden[f"image_{index}_vision_window_bias"]
            assert np.array_equal(np.asarray(feeds["window_masked"]).reshape(bias.shape), bias < 0)


TEXTS = [
    "the red cup on the left",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
    "<|vision_end|>Find it<|im_end|>\n<|im_start|>assistant\n",
    "I'LL say it's 42, don't   you think?\n\n\tTabs\r\nand 12345 digits",
    "café naïve Zürich – “quotes” 東京タワー 🙂👍🏽 ünïcödé",
    "   leading and trailing   ",
    '[{"bbox_2d": [12, 34, 56, 78], "label": "cup", "image": 2}]',
    "",
]


def qwen_like_tokenizer(path: Path, specials: list[str]) -> Path:
    """A trained byte-level BPE (real merges) with Qwen2's pre-tokenizer: Split by Qwen's regex + ByteLevel."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [text * 3 for text in TEXTS] + ["the cup the bowl the table there then these"] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.save(str(path))
    return path


def test_tokenizer_matches_the_tokenizers_library(native_build, tiny_bundle, tmp_path):
    from tokenizers import Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
    files = [tiny_bundle / "tokenizer.json", qwen_like_tokenizer(tmp_path / "qwen_like.json", specials)]
    assert len(json.loads(files[1].read_text())["model"]["merges"]) > 100
    rng = np.random.default_rng(5)
    for path in files:
        reference = Tokenizer.from_file(str(path))
        assert check_tool(native_build, "tokenize", path, stdin=TEXTS) == [reference.encode(t).ids for t in TEXTS]
        size = reference.get_vocab_size(with_added_tokens=True)
        # Random ids (invalid UTF-8 included, and ids past the vocabulary, as a random model writes them).
        id_lists = [rng.integers(0, size + 20, n).tolist() for n in (1, 3, 8, 30, 60)] + [reference.encode(TEXTS[3]).ids]
        decoded = [reference.decode(ids, skip_special_tokens=False) for ids in id_lists]
        assert check_tool(native_build, "decode", path, stdin=id_lists) == decoded


GEOMETRIES = [ImageGeometry(640, 480, 644, 476), ImageGeometry(100, 50, 112, 56), ImageGeometry(300, 300, 308, 308)]
PARSE_TEXTS = [
    "It is in the second image. <|box_start|>(100,200),(500,600)<|box_end|> and image 3: "
    "<|object_ref_start|>cup<|object_ref_end|><|box_start|>(0,0),(1000,1000)<|box_end|>",
    '```json\n[{"bbox_2d": [0, 0, 644, 476], "label": "all", "image": 1}, {"bbox_2d": [90, 5, 3, 40], '
    '"label": "caf\\u00e9 \\"x\\"", "image": "3"}]\n```',
    "<think>the third image has it</think><answer>[{\"bbox_2d\": [1.5, 2, 30, 40.25], \"label\": \" dog \"}]</answer>",
    "In the Third Image: (10, 20), (30, 40) then 2nd picture (-5,-5),(2000,2000) image #9 (1,1),(2,2)",
    "nothing here", "None", "[]", "<answer>unfinished (1,2),(3,4)",
    format_answer([Box(0, 10, 20, 300, 400, "cat"), Box(2, 5, 5, 50, 40, "dog")], "ref_tokens", GEOMETRIES, "cot", "x"),
    format_answer([Box(1, 10, 20, 30, 40, "ü")], "json_pixels", GEOMETRIES),
    format_answer([Box(2, 10, 20, 30, 40, "q"), Box(0, 600, 5, 100, 470, "wide")], "json_relative", GEOMETRIES, "cot", "y"),
    '[{"bbox_2d": [-10, 999.5, 1000, 2000], "label": "edge"}]',
]


def test_box_parser_matches_python(native_build):
    items = [{"text": text, "syntax": syntax, "geometries": [[g.width, g.height, g.resized_width, g.resized_height]
                                                             for g in GEOMETRIES]}
             for text in PARSE_TEXTS for syntax in SYNTAXES]
    ours = check_tool(native_build, "parse", stdin=items)
    for item, boxes in zip(items, ours):
        expected = [[b.image, b.x1, b.y1, b.x2, b.y2, b.label] for b in parse_answer(item["text"], item["syntax"],
                                                                                      GEOMETRIES)]
        assert boxes == expected, item
    # The syntaxes read the same JSON in different frames: the parser does not read them alike.
    relative = [boxes for item, boxes in zip(items, ours) if item["syntax"] == "json_relative"]
    pixels = [boxes for item, boxes in zip(items, ours) if item["syntax"] == "json_pixels"]
    assert relative != pixels


# -- bad input -----------------------------------------------------------------------------------------


def cli(native_build: Path, *args) -> tuple[int, str, str]:
    done = subprocess.run([str(native_build / "gemvg-ground"), *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    return done.returncode, done.stdout, done.stderr


def assert_cli_error(result: tuple[int, str, str], needle: str) -> None:
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("gemvg-ground: error:") and needle in lines[0], lines[0]


def test_cli_grounds_with_the_python_cli_json(native_build, tiny_bundle, image_files):
    from gemvg.runtime.cli import main as gemvg

    args = ["--bundle", tiny_bundle, "--image", image_files["rgb.jpg"], "--image", image_files["gray.png"], "--query",
            "the cup", "--max-new-tokens", "12", "--jump-forward", "--json"]
    code, out, err = cli(native_build, *args)
    assert code == 0, err
    ours = json.loads(out)
    expected = Engine.load(tiny_bundle).ground([image_files["rgb.jpg"], image_files["gray.png"]], "the cup",
                                               max_new_tokens=12, jump_forward=True)
    same_result(ours, expected)
    assert list(ours) == list(expected.to_dict())
    assert gemvg(["ground", *map(str, args)]) == 0  # the same flags work for `gemvg ground`


@pytest.fixture
def damaged_bundles(tiny_bundle, tmp_path) -> dict[str, Path]:
    bundles = {}
    for name in ("altered", "incomplete", "schema", "short_context", "escaping", "syntax", "interleaved", "deepstack"):
        bundles[name] = Path(shutil.copytree(tiny_bundle, tmp_path / name))
    data = bundles["altered"] / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    (bundles["incomplete"] / "embed.onnx").unlink()
    for name, change in (("schema", lambda m: m.update(schema_version=99)),
                         ("short_context", lambda m: m["limits"].update(max_context=40)),
                         ("escaping", lambda m: m["tokenizer"].update(path="../qwen2_vl/tokenizer.json")),
                         ("syntax", lambda m: m.update(box_syntax="xml")),
                         ("interleaved", lambda m: m["text"].update(mrope_interleaved="yes")),
                         ("deepstack", lambda m: m["vision"].update(deepstack_layers=[0, "x"]))):
        manifest = json.loads((bundles[name] / "manifest.json").read_text())
        change(manifest)
        (bundles[name] / "manifest.json").write_text(json.dumps(manifest))
    return bundles


def test_bad_bundles_give_null_and_one_line(native, native_build, damaged_bundles, tiny_bundles, image_files, tmp_path):
    cases = {tmp_path / "nowhere": "bundle not found", damaged_bundles["altered"]: "is altered",
             damaged_bundles["syntax"]: "unknown box syntax 'xml'",
             damaged_bundles["interleaved"]: "text.mrope_interleaved is 'yes', not true or false",
             damaged_bundles["deepstack"]: "are not block numbers",
             damaged_bundles["incomplete"]: "is incomplete", damaged_bundles["schema"]: "schema version",
             damaged_bundles["escaping"]: "outside itself",
             image_files["rgb.jpg"]: "not a folder"}
    for bundle, needle in cases.items():
        with pytest.raises(NativeError, match=needle) as caught:
            native.load(bundle)
        assert "\n" not in str(caught.value)
        assert_cli_error(cli(native_build, "--bundle", bundle, "--image", image_files["rgb.jpg"], "--query", "x"), needle)
    engine = native.load(damaged_bundles["short_context"])
    try:
        with pytest.raises(NativeError, match="exceeds the model's context"):
            native.ground_files(engine, [image_files["large.jpg"]], "the cup", "direct", 8)
    finally:
        native.lib.gemvg_engine_free(engine)
    assert_cli_error(cli(native_build, "--bundle", damaged_bundles["short_context"], "--image", image_files["large.jpg"],
                         "--query", "x"), "exceeds the model's context")


def test_bad_images_and_requests_give_null_and_one_line(native, native_build, tiny_bundle, image_files, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    jpeg = tmp_path / "good.jpg"
    Image.open(good).save(jpeg)
    files = {"empty.png": (b"", "file is empty"), "notes.jpg": (b"not an image\n" * 20, "not a readable image"),
             "truncated.png": (good.read_bytes()[:300], "cannot decode"),
             "truncated.jpg": (jpeg.read_bytes()[:400], "cannot decode"),
             "corrupt.png": (good.read_bytes()[:60] + bytes(300), "cannot decode")}
    cases = {}
    for name, (content, needle) in files.items():
        (tmp_path / name).write_bytes(content)
        cases[tmp_path / name] = needle
    bomb = tmp_path / "bomb.png"
    Image.new("1", (14000, 14000)).save(bomb)
    cases[bomb] = "decompression-bomb"
    cases[tmp_path / "missing.jpg"] = "no such file"
    cases[tmp_path] = "is a directory"
    engine = native.load(tiny_bundle)
    try:
        for path, needle in cases.items():
            with pytest.raises(NativeError, match=needle) as caught:
                native.ground_files(engine, [image_files["rgb.jpg"], path], "the cup", "direct", 8)
            assert "\n" not in str(caught.value)
            assert_cli_error(cli(native_build, "--bundle", tiny_bundle, "--image", path, "--query", "x"), needle)
        for images, query, mode, new_tokens, needle in (
                ([], "the cup", "direct", 8, "no images"), ([image_files["rgb.jpg"]], " ", "direct", 8, "query is empty"),
                ([image_files["rgb.jpg"]], "x", "sideways", 8, "unknown mode"),
                ([image_files["rgb.jpg"]], "x", "direct", 0, "max_new_tokens"),
                ([image_files["rgb.jpg"]], "x", "direct", 10**8, "exceeds the model's context"),
                ([image_files["rgb.jpg"]] * 17, "x", "direct", 8, "over this bundle's limit"),
                ([image_files["rgb.jpg"]], "<|image_pad|>", "direct", 8, "placeholder")):
            with pytest.raises(NativeError, match=needle):
                native.ground_files(engine, images, query, mode, new_tokens)
        # The engine still grounds after every failure.
        assert native.ground_files(engine, [image_files["rgb.jpg"]], "the cup", "direct", 4)["token_ids"]
    finally:
        native.lib.gemvg_engine_free(engine)
    assert_cli_error(cli(native_build, "--bundle", tiny_bundle, "--query", "x"), "no images")
    assert_cli_error(cli(native_build, "--bundle", tiny_bundle, "--image", image_files["rgb.jpg"], "--query", "x",
                         "--max-new-tokens", "many"), "--max-new-tokens")
    assert_cli_error(cli(native_build, "--bundle", tiny_bundle, "--image", image_files["rgb.jpg"], "--query", "x",
                         "--device", "cuda"), "not available")
    assert_cli_error(cli(native_build, "--bundle", tiny_bundle, "--image", image_files["rgb.jpg"], "--query"),
                     "missing value")


def test_engines_in_threads_and_thread_local_errors(native, tiny_bundles, image_files):
    """One engine per thread, concurrently (ctypes releases the GIL): the same answers as one after the
    other; a failure in one thread leaves its message there and none in the other."""
    import threading

    paths = [image_files["rgb.jpg"], image_files["gray.png"]]
    engines = [native.load(tiny_bundles[family]) for family in FAMILIES]
    try:
        alone = [native.ground_files(engine, paths, "the cup", "direct", 16)["token_ids"] for engine in engines]
        for engine in engines:
            native.lib.gemvg_engine_reset.argtypes = [ctypes.c_void_p]
            native.lib.gemvg_engine_reset(engine)
        results, errors = {}, {}

        def work(index: int) -> None:
            for _ in range(3):
                results.setdefault(index, []).append(
                    native.ground_files(engines[index], paths, "the cup", "direct", 16)["token_ids"])
                native.lib.gemvg_engine_reset(engines[index])
            if index == 1:
                with pytest.raises(NativeError):
                    native.ground_files(engines[index], paths, "the cup", "sideways", 4)
            errors[index] = native.error()

        threads = [threading.Thread(target=work, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == {0: [alone[0]] * 3, 1: [alone[1]] * 3}
        assert errors[0] == "" and "unknown mode" in errors[1]
    finally:
        for engine in engines:
            native.lib.gemvg_engine_free(engine)


def test_native_graph_names_are_the_bundle_io_names():
    """The native runtime spells the bundle's graph I/O names as runtime/bundle_io.py defines them."""
    import re

    from gemvg.runtime import bundle_io

    source = (REPO / "runtime" / "native" / "src" / "engine.cpp").read_text()
    constants = dict(re.findall(r'const char \*(\w+) = "([^"]+)";', source))
    shared = [name for name in constants if hasattr(bundle_io, name)]
    assert len(shared) >= 10, constants
    assert {name: constants[name] for name in shared} == {name: getattr(bundle_io, name) for name in shared}
    assert constants["ROTARY_COS"] == bundle_io.DECODER_ROTARY_COS == bundle_io.VISION_ROTARY_COS
    assert constants["ROTARY_SIN"] == bundle_io.DECODER_ROTARY_SIN == bundle_io.VISION_ROTARY_SIN
    for helper in ("past_key", "past_value", "present_key", "present_value"):
        prefix = re.search(rf'std::string {helper}\(int layer\) {{ return "(\w+)" \+ std::to_string\(layer\); }}', source)
        assert prefix and prefix.group(1) + "7" == getattr(bundle_io, helper)(7), helper
