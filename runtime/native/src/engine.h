// The native engine (runtime/engine.py, runtime/prompt.py, runtime/rotary.py, runtime/manifest.py):
// a bundle's graphs on ONNX Runtime's C API, the shared KV cache, greedy decoding, the image-feature
// cache and prefix reuse across requests.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "grounding.h"
#include "image.h"
#include "tokenizer.h"

namespace gemvg {

struct TextConfig {
    int hidden_size = 0, num_layers = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0, vocab_size = 0;
    double rope_theta = 0;
    int mrope_section[3] = {0, 0, 0};
    bool mrope_interleaved = false;  // Qwen3-VL: the axes take turns over the frequencies (runtime/rotary.py)
};

struct GraphFile {
    std::string path, sha256, data_path, data_sha256;
    std::vector<std::string> inputs, outputs;
};

struct Manifest {
    std::string family;
    std::string box_syntax;  // ref_tokens, json_pixels or json_relative (absent in older bundles: the family's)
    TextConfig text;
    VisionConfig vision;
    PreprocessConfig preprocess;
    int64_t image_pad = 0;
    std::vector<int64_t> eos;
    std::string prompt_prefix, prompt_image, prompt_suffix;
    long long max_context = 0, max_images = 0, max_patches_per_image = 0;
    GraphFile vision_graph, embed_graph, decoder_graph, tokenizer;
    bool has_step_decoder = false;
    GraphFile step_decoder_graph;
};

// Reads manifest.json (schema version 2) and, with verify, checks every file's sha256. Throws Error(Bundle).
Manifest load_manifest(const std::string &bundle_dir, bool verify);

struct Prompt {
    std::vector<int64_t> input_ids;
    std::vector<int64_t> positions;  // [3, seq]: (temporal, height, width) per token
    std::vector<std::pair<size_t, size_t>> image_spans;
    int64_t next_position = 0;
};

// The prompt for a user text over prepared images: the chat template's text tokenized, each image's
// pad token expanded to its feature count, and M-RoPE positions as transformers' get_rope_index.
Prompt build_prompt(const Manifest &manifest, const Tokenizer &tokenizer, const std::string &user_text,
                    const std::vector<PreparedImage> &images);

// Writes cos/sin rows [head_dim / 2] of tokens from their (temporal, height, width) positions: the
// decoder's per-slot rotary tables (runtime/rotary.py).
class MRopeAngles {
public:
    explicit MRopeAngles(const TextConfig &text);
    // positions: axis a of token i at positions[a * stride + i]; rows of count tokens written.
    void fill(const int64_t *positions, size_t stride, size_t count, float *cos_rows, float *sin_rows) const;
    size_t half() const { return inv_freq_.size(); }

private:
    std::vector<float> inv_freq_;
    std::vector<int> axis_;  // frequency j follows positions[axis_[j]] (blocked or interleaved, as mrope_axes)
};

struct Result {
    std::vector<Box> boxes;
    std::string text;
    std::vector<int32_t> tokens;
    std::map<std::string, double> timings_ms;
    std::vector<ImageGeometry> images;
    size_t reused_prefix_tokens = 0;
    std::string to_json() const;
};

class Engine {
public:
    Engine(const std::string &bundle_dir, const std::string &device, int threads);
    ~Engine();
    // jump_forward: the text the box syntax forces after a pick goes through the decoder with it in one
    // pass (Engine.ground(..., jump_forward=True) in Python).
    Result ground(const std::vector<Rgb8Image> &images, const std::string &query, const std::string &mode, int max_new_tokens,
                  bool jump_forward = false);
    const Manifest &manifest() const { return manifest_; }
    // The ids of the text the box syntax forces after `tokens`, or none (when nothing is forced or the
    // forced text would not tokenize as a continuation).
    std::vector<int32_t> forced_tokens(const std::vector<int32_t> &tokens, const std::string &mode) const;
    // Forgets cached image features and the cached prompt prefix (the next request starts cold).
    void reset();
    PreparedImage prepare_image(const Rgb8Image &image) const { return preprocess_image(image, manifest_.preprocess); }

private:
    struct Cache;
    struct PrefixState;

    // An image's features stacked [1 + D, tokens, hidden] in raster order: row 0 the image features,
    // rows 1.. DeepStack's (D = len(deepstack_layers), 0 without DeepStack); cached by image content.
    std::vector<float> encode_image(const PreparedImage &image);
    std::vector<float> embed(const int64_t *ids, size_t count);
    std::string decode_text(const std::vector<int32_t> &tokens) const;
    bool is_eos(int32_t token) const;
    // One decoder pass over `count` embeddings after the cache's filled prefix; returns the last logits.
    // deepstack: DeepStack's input [D, 1, count, hidden] for a DeepStack decoder (null: zeros, text tokens).
    const std::vector<float> &run_decoder(const std::vector<float> &embeds, size_t count, const int64_t *positions,
                                          size_t position_stride, Cache &cache, const std::vector<float> *deepstack = nullptr);

    std::string bundle_dir_;
    Manifest manifest_;
    std::unique_ptr<Tokenizer> tokenizer_;
    Ort::SessionOptions options_;
    std::unique_ptr<Ort::Session> vision_, embed_, decoder_, step_decoder_;
    std::vector<std::string> vision_inputs_;
    std::unique_ptr<MRopeAngles> rotary_;
    std::vector<float> logits_;
    double session_ms_ = 0;  // time inside ONNX Runtime's Run during the current request
    // LRU of vision features keyed by image content, bounded in entries and bytes (a follow-up on the
    // same frames skips vision).
    std::list<std::pair<std::string, std::vector<float>>> features_;
    size_t feature_bytes_ = 0;
    std::unique_ptr<PrefixState> last_prefix_;
};

}  // namespace gemvg
