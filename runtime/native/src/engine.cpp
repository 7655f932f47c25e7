#include "engine.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>

#include "common.h"

namespace gemvg {

using json = nlohmann::json;

namespace {

constexpr int MANIFEST_SCHEMA_VERSION = 2;
// The feature cache's bounds, as the Python engine's (runtime/caches.py): entries and bytes.
constexpr size_t FEATURE_CACHE_CAPACITY = 32;
constexpr size_t FEATURE_CACHE_BYTES = size_t(256) << 20;
// Tokens of generated text re-tokenized with the forced text (the longest forced ending is under 20 tokens).
constexpr size_t FORCING_CONTEXT = 32;

// The bundle's graph I/O names (runtime/bundle_io.py; BUNDLE.md).
const char *EMBED_INPUT_IDS = "input_ids";
const char *EMBED_OUTPUT = "inputs_embeds";
const char *VISION_PIXEL_VALUES = "pixel_values";
const char *VISION_WINDOW_GATHER = "window_gather";
const char *VISION_WINDOW_BIAS = "window_bias";
const char *VISION_WINDOW_SCATTER = "window_scatter";
const char *VISION_POSITION_TAPS = "position_taps";
const char *VISION_POSITION_WEIGHTS = "position_weights";
const char *VISION_OUTPUT = "image_features";
const char *VISION_DEEPSTACK_OUTPUT = "deepstack_features";
const char *DECODER_INPUTS_EMBEDS = "inputs_embeds";
const char *DECODER_CACHE_POSITIONS = "cache_positions";
const char *DECODER_SEQLENS_K = "seqlens_k";
const char *DECODER_TOTAL_SEQUENCE_LENGTH = "total_sequence_length";
const char *ROTARY_COS = "rotary_cos";
const char *ROTARY_SIN = "rotary_sin";
const char *DECODER_LOGITS = "logits";
const char *DECODER_DEEPSTACK_EMBEDS = "deepstack_embeds";
std::string past_key(int layer) { return "past_key_" + std::to_string(layer); }
std::string past_value(int layer) { return "past_value_" + std::to_string(layer); }
std::string present_key(int layer) { return "present_key_" + std::to_string(layer); }
std::string present_value(int layer) { return "present_value_" + std::to_string(layer); }

[[noreturn]] void bundle_error(const std::string &message) { throw Error(ErrorKind::Bundle, message); }
[[noreturn]] void input_error(const std::string &message) { throw Error(ErrorKind::Input, message); }

bool is_file(const std::string &path) {
    struct stat info;
    return stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode);
}
bool is_dir(const std::string &path) {
    struct stat info;
    return stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

GraphFile graph_file(const json &entry) {
    GraphFile file;
    file.path = entry.at("path").get<std::string>();
    file.sha256 = entry.at("sha256").get<std::string>();
    file.data_path = entry.value("data_path", "");
    file.data_sha256 = entry.value("data_sha256", "");
    if (entry.contains("inputs")) file.inputs = entry["inputs"].get<std::vector<std::string>>();
    if (entry.contains("outputs")) file.outputs = entry["outputs"].get<std::vector<std::string>>();
    return file;
}

double elapsed_ms(std::chrono::steady_clock::time_point since) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - since).count();
}

Ort::Env &ort_env() {
    static Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "gemvg");
    return env;
}

const Ort::MemoryInfo &cpu_memory() {
    static Ort::MemoryInfo info = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    return info;
}

template <typename T>
Ort::Value tensor(T *data, size_t count, std::vector<int64_t> shape) {
    return Ort::Value::CreateTensor<T>(cpu_memory(), data, count, shape.data(), shape.size());
}

// A JSON value as Python's repr writes it in the manifest's messages ('text', numbers and lists as JSON).
std::string repr(const json &value) {
    return value.is_string() ? "'" + value.get<std::string>() + "'" : value.dump();
}

std::string one_line(std::string text) {
    std::replace(text.begin(), text.end(), '\n', ' ');
    return text;
}

}  // namespace

Manifest load_manifest(const std::string &bundle_dir, bool verify) {
    if (!is_dir(bundle_dir)) bundle_error("bundle not found: " + bundle_dir + " is not a folder");
    std::string path = bundle_dir + "/manifest.json";
    if (!is_file(path)) bundle_error(bundle_dir + " is not a gemvg bundle: manifest.json is missing");
    json data;
    try {
        std::ifstream in(path);
        data = json::parse(in);
    } catch (const json::exception &err) {
        bundle_error(path + ": not valid JSON (" + one_line(err.what()) + ")");
    }
    if (!data.is_object()) bundle_error(path + ": expected a JSON object");
    if (!data.contains("schema_version") || data["schema_version"] != MANIFEST_SCHEMA_VERSION)
        bundle_error(path + ": unknown manifest schema version " + (data.contains("schema_version") ? data["schema_version"].dump() : "None") +
                     "; this gemvg reads version 2 (re-export the bundle or upgrade gemvg)");
    Manifest m;
    try {
        m.family = data.at("family").get<std::string>();
        // Bundles written before the syntax was recorded apart from the family: the family's own (as
        // Python's `data.get("box_syntax") or ...`: a missing or empty value).
        const json *syntax = data.contains("box_syntax") ? &data["box_syntax"] : nullptr;
        bool given = syntax && !syntax->is_null() && !(syntax->is_string() && syntax->get<std::string>().empty()) &&
                     !(syntax->is_boolean() && !syntax->get<bool>()) && !(syntax->is_number() && syntax->get<double>() == 0) &&
                     !((syntax->is_array() || syntax->is_object()) && syntax->empty());
        if (!given) m.box_syntax = family_box_syntax(m.family);
        else if (syntax->is_string()) m.box_syntax = syntax->get<std::string>();
        else bundle_error(path + ": unknown box syntax " + repr(*syntax) + "; this gemvg reads ref_tokens, json_pixels, json_relative");
        const json &text = data.at("text");
        m.text.hidden_size = text.at("hidden_size");
        m.text.num_layers = text.at("num_layers");
        m.text.num_heads = text.at("num_heads");
        m.text.num_kv_heads = text.at("num_kv_heads");
        m.text.head_dim = text.at("head_dim");
        m.text.vocab_size = text.at("vocab_size");
        m.text.rope_theta = text.at("rope_theta");
        for (int i = 0; i < 3; i++) m.text.mrope_section[i] = text.at("mrope_section").at(size_t(i));
        if (text.contains("mrope_interleaved")) {
            if (!text["mrope_interleaved"].is_boolean())
                bundle_error(path + ": text.mrope_interleaved is " + repr(text["mrope_interleaved"]) + ", not true or false");
            m.text.mrope_interleaved = text["mrope_interleaved"].get<bool>();
        }
        const json &vision = data.at("vision");
        m.vision.hidden_size = vision.at("hidden_size");
        m.vision.out_hidden_size = vision.at("out_hidden_size");
        m.vision.num_heads = vision.at("num_heads");
        m.vision.head_dim = vision.at("head_dim");
        m.vision.rope_theta = vision.at("rope_theta");
        m.vision.patch_size = vision.at("patch_size");
        m.vision.spatial_merge_size = vision.at("spatial_merge_size");
        m.vision.window_size = vision.at("window_size");
        if (vision.contains("num_position_embeddings")) {
            const json &table = vision["num_position_embeddings"];
            if (!table.is_number_integer() || table.get<long long>() < 0 || table.get<long long>() > (1LL << 24))
                bundle_error(path + ": vision.num_position_embeddings is " + repr(table) + ", outside 0..16777216");
            m.vision.num_position_embeddings = table.get<long long>();
        }
        if (vision.contains("deepstack_layers") && !vision["deepstack_layers"].is_null()) {
            const json &layers = vision["deepstack_layers"];
            bool blocks = layers.is_array();
            if (blocks)
                for (const json &layer : layers)
                    if (!layer.is_number_integer() || layer.get<long long>() < 0 || layer.get<long long>() >= 1024) blocks = false;
            if (!blocks) bundle_error(path + ": vision.deepstack_layers " + layers.dump() + " are not block numbers");
            m.vision.deepstack_layers = layers.get<std::vector<int>>();
        }
        const json &pre = data.at("preprocess");
        m.preprocess.min_pixels = pre.at("min_pixels");
        m.preprocess.max_pixels = pre.at("max_pixels");
        m.preprocess.patch_size = pre.at("patch_size");
        m.preprocess.temporal_patch_size = pre.at("temporal_patch_size");
        m.preprocess.merge_size = pre.at("merge_size");
        for (int i = 0; i < 3; i++) {
            m.preprocess.image_mean[i] = pre.at("image_mean").at(size_t(i));
            m.preprocess.image_std[i] = pre.at("image_std").at(size_t(i));
        }
        m.preprocess.rescale_factor = pre.at("rescale_factor");
        m.preprocess.max_image_pixels = pre.at("max_image_pixels");
        const json &tokens = data.at("tokens");
        m.image_pad = tokens.at("image_pad");
        m.eos = tokens.at("eos").get<std::vector<int64_t>>();
        m.prompt_prefix = data.at("prompt").at("prefix");
        m.prompt_image = data.at("prompt").at("image");
        m.prompt_suffix = data.at("prompt").at("suffix");
        const json &limits = data.at("limits");
        m.max_context = limits.at("max_context");
        m.max_images = limits.at("max_images");
        m.max_patches_per_image = limits.at("max_patches_per_image");
        m.vision_graph = graph_file(data.at("vision_graph"));
        m.embed_graph = graph_file(data.at("embed_graph"));
        m.decoder_graph = graph_file(data.at("decoder_graph"));
        m.tokenizer = graph_file(data.at("tokenizer"));
        if (data.contains("step_decoder_graph") && data["step_decoder_graph"].is_object()) {
            m.has_step_decoder = true;
            m.step_decoder_graph = graph_file(data["step_decoder_graph"]);
        }
    } catch (const json::exception &err) {
        bundle_error(path + ": manifest is malformed (" + one_line(err.what()) + ")");
    }
    if (!is_family(m.family))
        bundle_error(path + ": unknown model family '" + m.family + "'; this gemvg reads qwen2_vl, qwen2_5_vl, qwen3_vl");
    if (!is_box_syntax(m.box_syntax))
        bundle_error(path + ": unknown box syntax '" + m.box_syntax + "'; this gemvg reads ref_tokens, json_pixels, json_relative");
    if (m.vision.deepstack_layers.size() > size_t(std::max(m.text.num_layers, 0)))
        bundle_error(path + ": vision.deepstack_layers feeds " + std::to_string(m.vision.deepstack_layers.size()) +
                     " decoder layers; the decoder has " + std::to_string(m.text.num_layers));
    if (m.vision.num_position_embeddings > 0 && m.vision.window_size > 0)
        bundle_error(path + ": a vision config with both a learned position table and window attention is not a Qwen-VL "
                            "tower gemvg knows");
    if (m.text.mrope_section[0] + m.text.mrope_section[1] + m.text.mrope_section[2] != m.text.head_dim / 2)
        bundle_error("manifest text.mrope_section does not sum to head_dim / 2 = " + std::to_string(m.text.head_dim / 2));
    if (verify) {
        std::vector<std::pair<std::string, std::string>> expected;
        std::vector<const GraphFile *> files = {&m.vision_graph, &m.embed_graph, &m.decoder_graph, &m.tokenizer};
        if (m.has_step_decoder) files.push_back(&m.step_decoder_graph);
        for (const GraphFile *file : files) {
            expected.emplace_back(file->path, file->sha256);
            if (!file->data_path.empty()) expected.emplace_back(file->data_path, file->data_sha256);
        }
        std::unique_ptr<char, decltype(&std::free)> root(realpath(bundle_dir.c_str(), nullptr), std::free);
        for (auto &[name, digest] : expected) {
            // Every file must lie inside the bundle: no absolute path, no "..", no link leading out.
            bool escapes = name.empty() || name[0] == '/' || ("/" + name + "/").find("/../") != std::string::npos;
            std::unique_ptr<char, decltype(&std::free)> real(realpath((bundle_dir + "/" + name).c_str(), nullptr), std::free);
            if (!escapes && real && root && std::string(real.get()).rfind(std::string(root.get()) + "/", 0) != 0) escapes = true;
            if (escapes) bundle_error("bundle " + bundle_dir + " names a file outside itself: " + name);
            if (!is_file(bundle_dir + "/" + name)) bundle_error("bundle " + bundle_dir + " is incomplete: " + name + " is missing");
        }
        std::vector<std::future<std::string>> hashes;  // the files hashed in parallel
        for (auto &item : expected)
            hashes.push_back(std::async(std::launch::async, sha256_file, bundle_dir + "/" + item.first));
        for (size_t i = 0; i < expected.size(); i++)
            if (hashes[i].get() != expected[i].second)
                bundle_error("bundle " + bundle_dir + " is altered: " + expected[i].first + " does not match its sha256 in the manifest");
    }
    return m;
}

// -- the KV cache and the prefix of the last request -----------------------------------------------

// Preallocated [1, kv_heads, capacity, head_dim] buffers per layer and the rotary tables [capacity,
// head_dim / 2]; the decoder's attention reads the first `length` slots and writes the new ones in place.
struct Engine::Cache {
    Cache(int layers, size_t capacity, int kv_heads, int head_dim)
        : capacity(capacity), kv_heads(kv_heads), head_dim(head_dim) {
        keys.assign(size_t(layers), std::vector<float>(size_t(kv_heads) * capacity * head_dim));
        values = keys;
        rotary_cos.assign(capacity * size_t(head_dim / 2), 0.0f);
        rotary_sin = rotary_cos;
    }

    // Grow, keeping the filled prefix, when a reused cache must hold a longer request.
    void ensure_capacity(size_t wanted) {
        if (wanted <= capacity) return;
        for (auto *buffers : {&keys, &values})
            for (auto &old : *buffers) {
                std::vector<float> grown(size_t(kv_heads) * wanted * head_dim, 0.0f);
                for (int h = 0; h < kv_heads; h++)
                    std::memcpy(&grown[size_t(h) * wanted * head_dim], &old[size_t(h) * capacity * head_dim],
                                length * head_dim * sizeof(float));
                old.swap(grown);
            }
        for (auto *table : {&rotary_cos, &rotary_sin}) table->resize(wanted * size_t(head_dim / 2), 0.0f);
        capacity = wanted;
    }

    std::vector<std::vector<float>> keys, values;
    std::vector<float> rotary_cos, rotary_sin;
    size_t length = 0, capacity;
    int kv_heads, head_dim;
};

struct Engine::PrefixState {
    std::vector<int64_t> input_ids;
    std::vector<std::string> image_keys;
    std::vector<std::pair<size_t, size_t>> image_spans;
    std::unique_ptr<Cache> cache;

    // How many leading tokens have the same ids *and* the same images as the stored prompt (image tokens
    // share one id, so a prefix may only cover images whose content keys match); at least one token is
    // always left to recompute, for its logits.
    size_t reusable_length(const std::vector<int64_t> &ids, const std::vector<std::string> &keys,
                           const std::vector<std::pair<size_t, size_t>> &spans) const {
        long long limit = (long long)std::min({ids.size(), input_ids.size(), cache->length}) - 1;
        if (limit <= 0) return 0;
        size_t common = size_t(limit);
        for (size_t i = 0; i < size_t(limit); i++)
            if (ids[i] != input_ids[i]) { common = i; break; }
        for (size_t index = 0; index < spans.size(); index++) {
            if (spans[index].first >= common) break;
            bool same = index < image_keys.size() && image_keys[index] == keys[index] && image_spans[index] == spans[index];
            if (!same) return spans[index].first;
        }
        return common;
    }
};

// -- the engine ------------------------------------------------------------------------------------

Engine::Engine(const std::string &bundle_dir, const std::string &device, int threads) : bundle_dir_(bundle_dir) {
    if (device != "cpu")
        throw Error(ErrorKind::Provider, "device '" + device + "' is not available in the native runtime (it runs on 'cpu')");
    if (threads < 0) input_error("threads must be 0 (all cores) or more");
    manifest_ = load_manifest(bundle_dir, true);
    tokenizer_ = std::make_unique<Tokenizer>(bundle_dir + "/" + manifest_.tokenizer.path);
    options_.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    // No memory patterns, as the Python engine (runtime/sessions.py): our shapes change with every request
    // (prompt length, KV capacity, image size), so cached patterns make ONNX Runtime's arena take blocks of
    // ever different sizes, and with concurrent requests its resident part climbs in steps.
    options_.DisableMemPattern();
    if (threads > 0) {
        options_.SetIntraOpNumThreads(threads);
        options_.SetInterOpNumThreads(1);
    }
    auto open = [&](const GraphFile &graph) {
        std::string path = bundle_dir + "/" + graph.path;
        try {
            return std::make_unique<Ort::Session>(ort_env(), path.c_str(), options_);
        } catch (const Ort::Exception &err) {
            bundle_error(path + ": ONNX Runtime cannot open it (" + one_line(err.what()) + ")");
        }
    };
    vision_ = open(manifest_.vision_graph);
    embed_ = open(manifest_.embed_graph);
    decoder_ = open(manifest_.decoder_graph);
    if (manifest_.has_step_decoder) step_decoder_ = open(manifest_.step_decoder_graph);
    Ort::AllocatorWithDefaultOptions allocator;
    for (size_t i = 0; i < vision_->GetInputCount(); i++)
        vision_inputs_.push_back(vision_->GetInputNameAllocated(i, allocator).get());
    std::vector<std::string> needed = {DECODER_INPUTS_EMBEDS, DECODER_CACHE_POSITIONS, DECODER_SEQLENS_K,
                                       DECODER_TOTAL_SEQUENCE_LENGTH, ROTARY_COS, ROTARY_SIN, DECODER_LOGITS};
    for (int layer = 0; layer < manifest_.text.num_layers; layer++)
        for (auto name : {past_key(layer), past_value(layer), present_key(layer), present_value(layer)}) needed.push_back(name);
    const GraphFile &decoder = manifest_.decoder_graph;
    for (const std::string &name : needed)
        if (std::find(decoder.inputs.begin(), decoder.inputs.end(), name) == decoder.inputs.end() &&
            std::find(decoder.outputs.begin(), decoder.outputs.end(), name) == decoder.outputs.end())
            bundle_error(bundle_dir + ": decoder graph lacks " + name + " (manifest and graph disagree)");
    if (!manifest_.vision.deepstack_layers.empty()) {  // DeepStack: the decoder takes it, the vision graph gives it
        if (std::find(decoder.inputs.begin(), decoder.inputs.end(), DECODER_DEEPSTACK_EMBEDS) == decoder.inputs.end())
            bundle_error(bundle_dir + ": decoder graph lacks " + DECODER_DEEPSTACK_EMBEDS + " (manifest and graph disagree)");
        bool found = false;
        for (size_t i = 0; i < vision_->GetOutputCount(); i++)
            if (std::string(vision_->GetOutputNameAllocated(i, allocator).get()) == VISION_DEEPSTACK_OUTPUT) found = true;
        if (!found) bundle_error(bundle_dir + ": vision graph lacks " + VISION_DEEPSTACK_OUTPUT + " (manifest and graph disagree)");
    }
    rotary_ = std::make_unique<MRopeAngles>(manifest_.text);
    logits_.resize(size_t(manifest_.text.vocab_size));
}

Engine::~Engine() = default;

void Engine::reset() {
    features_.clear();
    feature_bytes_ = 0;
    last_prefix_.reset();
}

MRopeAngles::MRopeAngles(const TextConfig &text) {
    inv_freq_ = inverse_frequencies(text.rope_theta, text.head_dim);
    if (!text.mrope_interleaved) {  // blocked (Qwen2-VL, Qwen2.5-VL): section[0] temporal, section[1] height, section[2] width
        for (int axis = 0; axis < 3; axis++)
            for (int k = 0; k < text.mrope_section[axis]; k++) axis_.push_back(axis);
    } else {  // interleaved (Qwen3-VL): height when j % 3 == 1 and j < 3 * section[1], width alike, else temporal
        int total = text.mrope_section[0] + text.mrope_section[1] + text.mrope_section[2];
        for (int j = 0; j < total; j++)
            axis_.push_back(j % 3 == 1 && j < 3 * text.mrope_section[1] ? 1 : j % 3 == 2 && j < 3 * text.mrope_section[2] ? 2 : 0);
    }
}

void MRopeAngles::fill(const int64_t *positions, size_t stride, size_t count, float *cos_rows, float *sin_rows) const {
    size_t half = inv_freq_.size();
    for (size_t i = 0; i < count; i++)
        for (size_t j = 0; j < half; j++) {
            float angle = float(positions[size_t(axis_[j]) * stride + i]) * inv_freq_[j];
            cos_rows[i * half + j] = rounded_cos(angle);
            sin_rows[i * half + j] = rounded_sin(angle);
        }
}

Prompt build_prompt(const Manifest &manifest, const Tokenizer &tokenizer, const std::string &user_text,
                    const std::vector<PreparedImage> &images) {
    std::string text = manifest.prompt_prefix;
    for (size_t i = 0; i < images.size(); i++) text += manifest.prompt_image;
    text += user_text + manifest.prompt_suffix;
    std::vector<int64_t> ids = tokenizer.encode(text);
    size_t pads = size_t(std::count(ids.begin(), ids.end(), manifest.image_pad));
    if (pads != images.size()) input_error("the query must not contain the model's image placeholder token");
    int m = manifest.vision.spatial_merge_size;
    Prompt prompt;
    size_t image = 0;
    int64_t current = 0;
    std::vector<int64_t> temporal, height, width;
    for (int64_t id : ids) {
        if (id != manifest.image_pad) {
            prompt.input_ids.push_back(id);
            temporal.push_back(current), height.push_back(current), width.push_back(current);
            current++;
            continue;
        }
        // An image's tokens carry (t, row, col) of its merged grid offset by the running position; the
        // text after it resumes at that offset + max(rows, cols).
        const PreparedImage &im = images[image++];
        int rows = im.grid_h / m, cols = im.grid_w / m;
        size_t start = prompt.input_ids.size();
        for (int t = 0; t < im.grid_t; t++)
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < cols; c++) {
                    prompt.input_ids.push_back(id);
                    temporal.push_back(current + t), height.push_back(current + r), width.push_back(current + c);
                }
        prompt.image_spans.emplace_back(start, prompt.input_ids.size());
        current += std::max(rows, cols);
    }
    prompt.positions = temporal;
    prompt.positions.insert(prompt.positions.end(), height.begin(), height.end());
    prompt.positions.insert(prompt.positions.end(), width.begin(), width.end());
    prompt.next_position = prompt.positions.empty() ? 0 : *std::max_element(prompt.positions.begin(), prompt.positions.end()) + 1;
    return prompt;
}

std::vector<float> Engine::encode_image(const PreparedImage &image) {
    for (auto it = features_.begin(); it != features_.end(); ++it)
        if (it->first == image.key) {
            features_.splice(features_.begin(), features_, it);  // most recently used first
            return it->second;
        }
    VisionFeeds feeds = vision_feeds(image, manifest_.vision);
    int64_t patches = int64_t(feeds.pixel_values.size() / image.patch_dim);
    int64_t head_dim = manifest_.vision.head_dim;
    std::vector<Ort::Value> values;
    std::vector<const char *> names;
    for (const std::string &name : vision_inputs_) {
        if (name == VISION_PIXEL_VALUES)
            values.push_back(tensor(feeds.pixel_values.data(), feeds.pixel_values.size(), {patches, int64_t(image.patch_dim)}));
        else if (name == ROTARY_COS)
            values.push_back(tensor(feeds.rotary_cos.data(), feeds.rotary_cos.size(), {patches, head_dim}));
        else if (name == ROTARY_SIN)
            values.push_back(tensor(feeds.rotary_sin.data(), feeds.rotary_sin.size(), {patches, head_dim}));
        else if (name == VISION_WINDOW_GATHER && !feeds.window_gather.empty())
            values.push_back(tensor(feeds.window_gather.data(), feeds.window_gather.size(), {feeds.windows, feeds.longest}));
        else if (name == VISION_WINDOW_BIAS && !feeds.window_bias.empty())
            values.push_back(tensor(feeds.window_bias.data(), feeds.window_bias.size(), {feeds.windows, 1, 1, feeds.longest}));
        else if (name == VISION_WINDOW_SCATTER && !feeds.window_scatter.empty())
            values.push_back(tensor(feeds.window_scatter.data(), feeds.window_scatter.size(), {patches}));
        else if (name == VISION_POSITION_TAPS && !feeds.position_taps.empty())
            values.push_back(tensor(feeds.position_taps.data(), feeds.position_taps.size(), {patches, 4}));
        else if (name == VISION_POSITION_WEIGHTS && !feeds.position_weights.empty())
            values.push_back(tensor(feeds.position_weights.data(), feeds.position_weights.size(), {patches, 4}));
        else
            bundle_error(bundle_dir_ + ": the vision graph takes " + name + ", which this gemvg does not feed; re-export the bundle");
        names.push_back(name.c_str());
    }
    // The image features and, with DeepStack, the intermediate layers' features [D, tokens, hidden].
    size_t layers = manifest_.vision.deepstack_layers.size();
    const char *output_names[2] = {VISION_OUTPUT, VISION_DEEPSTACK_OUTPUT};
    auto clock = std::chrono::steady_clock::now();
    auto outputs = vision_->Run(Ort::RunOptions{nullptr}, names.data(), values.data(), values.size(), output_names,
                                layers ? 2 : 1);
    session_ms_ += elapsed_ms(clock);
    auto shape = outputs[0].GetTensorTypeAndShapeInfo().GetShape();
    size_t tokens = size_t(shape[0]), hidden = size_t(shape[1]);
    if (layers) {
        auto deep = outputs[1].GetTensorTypeAndShapeInfo().GetShape();
        if (deep.size() != 3 || size_t(deep[0]) != layers || size_t(deep[1]) != tokens || size_t(deep[2]) != hidden)
            bundle_error(bundle_dir_ + ": the vision graph's " + VISION_DEEPSTACK_OUTPUT + " is not [" + std::to_string(layers) +
                         ", " + std::to_string(tokens) + ", " + std::to_string(hidden) + "] (manifest and graph disagree)");
    }
    // Stacked [1 + D, tokens, hidden] as Python's encode_image: row 0 the features, rows 1.. DeepStack's.
    std::vector<float> features((1 + layers) * tokens * hidden);
    for (size_t d = 0; d <= layers; d++) {
        const float *merged = d == 0 ? outputs[0].GetTensorData<float>() : outputs[1].GetTensorData<float>() + (d - 1) * tokens * hidden;
        float *stacked = &features[d * tokens * hidden];
        for (size_t i = 0; i < tokens; i++) {  // back to raster order (window attention reorders the tokens)
            size_t source = feeds.restore_order.empty() ? i : size_t(feeds.restore_order[i]);
            std::memcpy(&stacked[i * hidden], merged + source * hidden, hidden * sizeof(float));
        }
    }
    size_t bytes = features.size() * sizeof(float);
    if (bytes > FEATURE_CACHE_BYTES) return features;  // keeping it would only evict everything else
    features_.emplace_front(image.key, features);
    feature_bytes_ += bytes;
    while (features_.size() > FEATURE_CACHE_CAPACITY || feature_bytes_ > FEATURE_CACHE_BYTES) {
        feature_bytes_ -= features_.back().second.size() * sizeof(float);
        features_.pop_back();
    }
    return features;
}

std::vector<float> Engine::embed(const int64_t *ids, size_t count) {
    Ort::Value input = tensor(const_cast<int64_t *>(ids), count, {1, int64_t(count)});
    const char *output = EMBED_OUTPUT;
    auto clock = std::chrono::steady_clock::now();
    auto outputs = embed_->Run(Ort::RunOptions{nullptr}, &EMBED_INPUT_IDS, &input, 1, &output, 1);
    session_ms_ += elapsed_ms(clock);
    const float *data = outputs[0].GetTensorData<float>();
    return std::vector<float>(data, data + count * size_t(manifest_.text.hidden_size));
}

const std::vector<float> &Engine::run_decoder(const std::vector<float> &embeds, size_t count, const int64_t *positions,
                                              size_t position_stride, Cache &cache, const std::vector<float> *deepstack) {
    size_t start = cache.length, total = start + count;
    if (total > cache.capacity)
        input_error("KV cache of " + std::to_string(cache.capacity) + " positions cannot hold " + std::to_string(total));
    size_t half = size_t(manifest_.text.head_dim / 2);
    rotary_->fill(positions, position_stride, count, &cache.rotary_cos[start * half], &cache.rotary_sin[start * half]);
    std::vector<int64_t> slots(count);
    for (size_t i = 0; i < count; i++) slots[i] = int64_t(start + i);
    int32_t seqlens_k = int32_t(total - 1), total_length = int32_t(total);
    const TextConfig &text = manifest_.text;
    std::vector<int64_t> cache_shape = {1, text.num_kv_heads, int64_t(cache.capacity), text.head_dim};
    size_t cache_size = size_t(text.num_kv_heads) * cache.capacity * size_t(text.head_dim);
    std::vector<std::string> input_names = {DECODER_INPUTS_EMBEDS, DECODER_CACHE_POSITIONS, DECODER_SEQLENS_K,
                                            DECODER_TOTAL_SEQUENCE_LENGTH, ROTARY_COS, ROTARY_SIN};
    std::vector<Ort::Value> inputs;
    inputs.push_back(tensor(const_cast<float *>(embeds.data()), count * size_t(text.hidden_size), {1, int64_t(count), text.hidden_size}));
    inputs.push_back(tensor(slots.data(), count, {1, int64_t(count)}));
    inputs.push_back(tensor(&seqlens_k, 1, {1}));
    inputs.push_back(tensor(&total_length, 1, {}));
    inputs.push_back(tensor(cache.rotary_cos.data(), cache.rotary_cos.size(), {int64_t(cache.capacity), int64_t(half)}));
    inputs.push_back(tensor(cache.rotary_sin.data(), cache.rotary_sin.size(), {int64_t(cache.capacity), int64_t(half)}));
    // DeepStack's input [D, 1, count, hidden]: the prompt's (image tokens carry their image's rows), or
    // zeros for generated tokens.
    size_t layers = manifest_.vision.deepstack_layers.size();
    std::vector<float> zeros;
    if (layers) {
        size_t size = layers * count * size_t(text.hidden_size);
        if (!deepstack) zeros.assign(size, 0.0f), deepstack = &zeros;
        else if (deepstack->size() != size) throw Error(ErrorKind::Internal, "deepstack_embeds of the wrong size");
        input_names.push_back(DECODER_DEEPSTACK_EMBEDS);
        inputs.push_back(tensor(const_cast<float *>(deepstack->data()), size, {int64_t(layers), 1, int64_t(count), text.hidden_size}));
    }
    std::vector<std::string> output_names = {DECODER_LOGITS};
    std::vector<Ort::Value> outputs;
    outputs.push_back(tensor(logits_.data(), logits_.size(), {1, 1, text.vocab_size}));
    // Past and present are the same buffers: the attention writes the new slots in place.
    for (int layer = 0; layer < text.num_layers; layer++) {
        float *keys = cache.keys[size_t(layer)].data(), *values = cache.values[size_t(layer)].data();
        input_names.push_back(past_key(layer));
        inputs.push_back(tensor(keys, cache_size, cache_shape));
        input_names.push_back(past_value(layer));
        inputs.push_back(tensor(values, cache_size, cache_shape));
        output_names.push_back(present_key(layer));
        outputs.push_back(tensor(keys, cache_size, cache_shape));
        output_names.push_back(present_value(layer));
        outputs.push_back(tensor(values, cache_size, cache_shape));
    }
    std::vector<const char *> in_ptrs, out_ptrs;
    for (auto &name : input_names) in_ptrs.push_back(name.c_str());
    for (auto &name : output_names) out_ptrs.push_back(name.c_str());
    Ort::Session &session = count == 1 && step_decoder_ ? *step_decoder_ : *decoder_;
    auto clock = std::chrono::steady_clock::now();
    session.Run(Ort::RunOptions{nullptr}, in_ptrs.data(), inputs.data(), inputs.size(), out_ptrs.data(), outputs.data(),
                outputs.size());
    session_ms_ += elapsed_ms(clock);
    cache.length = total;
    return logits_;
}

bool Engine::is_eos(int32_t token) const {
    return std::find(manifest_.eos.begin(), manifest_.eos.end(), token) != manifest_.eos.end();
}

std::string Engine::decode_text(const std::vector<int32_t> &tokens) const {
    bool ends_with_eos = !tokens.empty() && is_eos(tokens.back());
    return tokenizer_->decode(std::vector<int32_t>(tokens.begin(), tokens.end() - (ends_with_eos ? 1 : 0)));
}

std::vector<int32_t> Engine::forced_tokens(const std::vector<int32_t> &tokens, const std::string &mode) const {
    std::string forced = forced_continuation(decode_text(tokens), manifest_.box_syntax, mode);
    if (forced.empty()) return {};
    // The forced endings are local: a few tokens of text to tokenize. The forced ids are what tokenizing
    // the text with them adds to tokenizing it alone, provided the forced text does not merge with the
    // text's last token (then it would not be a continuation).
    size_t context = std::min<size_t>(tokens.size(), FORCING_CONTEXT);
    std::string text = tokenizer_->decode(std::vector<int32_t>(tokens.end() - long(context), tokens.end()));
    std::vector<int64_t> alone = tokenizer_->encode(text), ids = tokenizer_->encode(text + forced);
    if (ids.size() < alone.size() || !std::equal(alone.begin(), alone.end(), ids.begin())) return {};
    return std::vector<int32_t>(ids.begin() + long(alone.size()), ids.end());
}

Result Engine::ground(const std::vector<Rgb8Image> &images, const std::string &query, const std::string &mode, int max_new_tokens,
                      bool jump_forward) {
    if (max_new_tokens < 1) input_error("max_new_tokens must be at least 1");
    Result result;
    session_ms_ = 0;
    auto clock = std::chrono::steady_clock::now();
    if (!is_mode(mode)) input_error("unknown mode '" + mode + "'; expected one of direct, cot, raw");
    if (query.find_first_not_of(" \t\n\r\f\v") == std::string::npos) input_error("the query is empty");
    if (!is_valid_utf8(query)) input_error("the query is not valid UTF-8");
    if (images.empty()) input_error("no images: give at least one image to ground the query in");
    if ((long long)images.size() > manifest_.max_images)
        input_error(std::to_string(images.size()) + " images is over this bundle's limit of " + std::to_string(manifest_.max_images));
    std::vector<PreparedImage> prepared;
    for (size_t i = 0; i < images.size(); i++) {
        prepared.push_back(preprocess_image(images[i], manifest_.preprocess));
        long long patches = (long long)prepared.back().pixel_values.size() / (long long)prepared.back().patch_dim;
        if (patches > manifest_.max_patches_per_image)
            input_error("image " + std::to_string(i) + " needs " + std::to_string(patches) + " patches, over this bundle's limit of " +
                        std::to_string(manifest_.max_patches_per_image));
    }
    Prompt prompt = build_prompt(manifest_, *tokenizer_, build_instruction(query, manifest_.box_syntax, mode), prepared);
    size_t prompt_length = prompt.input_ids.size();
    if ((long long)(prompt_length + size_t(max_new_tokens)) > manifest_.max_context)
        throw Error(ErrorKind::PromptTooLong, "prompt of " + std::to_string(prompt_length) + " tokens (images included) + " +
                                                  std::to_string(max_new_tokens) + " new tokens exceeds the model's context of " +
                                                  std::to_string(manifest_.max_context) +
                                                  " tokens; use fewer or smaller images, a shorter query or fewer new tokens");
    result.timings_ms["preprocess"] = elapsed_ms(clock);

    clock = std::chrono::steady_clock::now();
    std::vector<std::string> keys;
    for (auto &image : prepared) keys.push_back(image.key);
    size_t capacity = prompt_length + size_t(max_new_tokens);
    size_t reusable = last_prefix_ ? last_prefix_->reusable_length(prompt.input_ids, keys, prompt.image_spans) : 0;
    std::unique_ptr<Cache> cache;
    if (reusable == 0) {
        last_prefix_.reset();  // its cache is not reused: free it before allocating the new one
        cache = std::make_unique<Cache>(manifest_.text.num_layers, capacity, manifest_.text.num_kv_heads, manifest_.text.head_dim);
    } else {
        cache = std::move(last_prefix_->cache);
        last_prefix_.reset();
        cache->length = reusable;  // positions after the shared prefix are simply overwritten
        cache->ensure_capacity(capacity);
    }
    size_t start = cache->length;
    std::vector<std::vector<float>> features(prepared.size());
    for (size_t i = 0; i < prepared.size(); i++)  // only images the reused prefix does not cover
        if (prompt.image_spans[i].second > start) features[i] = encode_image(prepared[i]);
    result.timings_ms["vision"] = elapsed_ms(clock);

    clock = std::chrono::steady_clock::now();
    size_t hidden = size_t(manifest_.text.hidden_size);
    size_t fed = prompt_length - start, layers = manifest_.vision.deepstack_layers.size();
    std::vector<float> embeds = embed(prompt.input_ids.data() + start, fed);
    // DeepStack's input [D, 1, fed, hidden]: each image's rows 1..D at its tokens, zeros elsewhere.
    std::vector<float> deepstack(layers * fed * hidden, 0.0f);
    for (size_t i = 0; i < prepared.size(); i++) {
        auto [span_start, span_end] = prompt.image_spans[i];
        if (span_end <= start) continue;
        size_t from = std::max(span_start, start), tokens = span_end - span_start;
        for (size_t d = 0; d <= layers; d++) {
            float *to = d == 0 ? &embeds[(from - start) * hidden] : &deepstack[((d - 1) * fed + (from - start)) * hidden];
            std::memcpy(to, &features[i][(d * tokens + (from - span_start)) * hidden], (span_end - from) * hidden * sizeof(float));
        }
    }
    const std::vector<float> *logits =
        &run_decoder(embeds, fed, prompt.positions.data() + start, prompt_length, *cache, layers ? &deepstack : nullptr);
    result.timings_ms["prefill"] = elapsed_ms(clock);
    result.timings_ms["time_to_first_token"] = result.timings_ms["preprocess"] + result.timings_ms["vision"] + result.timings_ms["prefill"];

    clock = std::chrono::steady_clock::now();
    auto argmax = [](const std::vector<float> &v) { return int32_t(std::max_element(v.begin(), v.end()) - v.begin()); };
    std::vector<int32_t> &tokens = result.tokens;
    tokens.push_back(argmax(*logits));
    int64_t position = prompt.next_position;
    while (!is_eos(tokens.back()) && tokens.size() < size_t(max_new_tokens)) {
        std::vector<int64_t> fed = {tokens.back()};
        if (jump_forward) {
            std::vector<int32_t> forced = forced_tokens(tokens, mode);
            forced.resize(std::min(forced.size(), size_t(max_new_tokens) - tokens.size()));
            tokens.insert(tokens.end(), forced.begin(), forced.end());
            fed.insert(fed.end(), forced.begin(), forced.end());
            if (tokens.size() >= size_t(max_new_tokens)) break;
        }
        std::vector<float> step = embed(fed.data(), fed.size());
        std::vector<int64_t> positions(3 * fed.size());  // text positions: the same on all three axes
        for (size_t axis = 0; axis < 3; axis++)
            for (size_t i = 0; i < fed.size(); i++) positions[axis * fed.size() + i] = position + int64_t(i);
        logits = &run_decoder(step, fed.size(), positions.data(), fed.size(), *cache);
        position += int64_t(fed.size());
        tokens.push_back(argmax(*logits));
    }
    result.timings_ms["decode"] = elapsed_ms(clock);
    result.timings_ms["decode_per_token"] = result.timings_ms["decode"] / double(std::max<size_t>(1, tokens.size() - 1));
    result.timings_ms["total"] = result.timings_ms["time_to_first_token"] + result.timings_ms["decode"];
    result.timings_ms["onnxruntime"] = session_ms_;  // inside the graphs' runs: the rest is host-side work
    result.reused_prefix_tokens = start;
    last_prefix_ = std::make_unique<PrefixState>();
    last_prefix_->input_ids = prompt.input_ids;
    last_prefix_->image_keys = keys;
    last_prefix_->image_spans = prompt.image_spans;
    last_prefix_->cache = std::move(cache);

    result.text = decode_text(tokens);
    for (auto &image : prepared)
        result.images.push_back({image.width, image.height, image.resized_width, image.resized_height});
    result.boxes = parse_answer(result.text, manifest_.box_syntax, result.images);
    return result;
}

std::string Result::to_json() const {
    nlohmann::ordered_json out;
    out["boxes"] = nlohmann::ordered_json::array();
    for (const Box &b : boxes)
        out["boxes"].push_back({{"image", b.image}, {"x1", b.x1}, {"y1", b.y1}, {"x2", b.x2}, {"y2", b.y2}, {"label", b.label}});
    out["text"] = text;
    out["token_ids"] = tokens;
    nlohmann::ordered_json timings;
    for (const char *stage : {"preprocess", "vision", "prefill", "time_to_first_token", "decode", "decode_per_token", "total", "onnxruntime"})
        timings[stage] = timings_ms.at(stage);
    out["timings_ms"] = timings;
    out["images"] = nlohmann::ordered_json::array();
    for (const ImageGeometry &g : images) out["images"].push_back({{"width", g.width}, {"height", g.height}});
    out["reused_prefix_tokens"] = reused_prefix_tokens;
    return out.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

}  // namespace gemvg
