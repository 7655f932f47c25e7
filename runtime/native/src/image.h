// Images in, model pixels out (runtime/preprocess.py and runtime/vision.py, natively).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace gemvg {

struct Rgb8Image {
    int width = 0, height = 0;
    std::vector<uint8_t> pixels;  // RGB, rows of 3 * width bytes
};

// The checkpoint's preprocessor parameters, as the manifest records them.
struct PreprocessConfig {
    long long min_pixels = 0, max_pixels = 0;
    int patch_size = 14, temporal_patch_size = 2, merge_size = 2;
    double image_mean[3] = {0, 0, 0}, image_std[3] = {1, 1, 1};
    double rescale_factor = 1.0 / 255;
    long long max_image_pixels = 0;
};

struct VisionConfig {
    int hidden_size = 0, out_hidden_size = 0, num_heads = 0, head_dim = 0;
    double rope_theta = 10000;
    int patch_size = 14, spatial_merge_size = 2;
    int window_size = 0;  // Qwen2.5-VL window attention in pixels; 0 = none
    long long num_position_embeddings = 0;  // Qwen3-VL: a learned square position table's rows; 0 = none
    std::vector<int> deepstack_layers;      // Qwen3-VL DeepStack: vision blocks added into the first decoder layers
};

struct PreparedImage {
    std::vector<float> pixel_values;  // [grid_h * grid_w, 3 * temporal * patch * patch]
    int grid_t = 1, grid_h = 0, grid_w = 0;
    int width = 0, height = 0, resized_width = 0, resized_height = 0;
    std::string key;  // content hash of the decoded image: the feature and prefix caches' key
    size_t patch_dim = 0;
};

// The vision encoder's inputs for one image (window fields empty without window attention).
struct VisionFeeds {
    std::vector<float> pixel_values, rotary_cos, rotary_sin;  // [patches, patch_dim] / [patches, head_dim]
    std::vector<int64_t> window_gather;                        // [windows, longest]
    std::vector<float> window_bias;                            // [windows, 1, 1, longest]
    std::vector<int64_t> window_scatter;                       // [patches]
    int64_t windows = 0, longest = 0;
    std::vector<int64_t> restore_order;  // merged-token permutation back to raster order (windows only)
    // Learned position table only (Qwen3-VL; empty without it): each patch's 4 bilinear taps and weights.
    std::vector<int64_t> position_taps;   // [patches, 4]
    std::vector<float> position_weights;  // [patches, 4]
};

// Decodes a JPEG or PNG file to RGB8 (EXIF orientation applied for JPEG), checking the size against
// max_image_pixels from the header before decoding. Throws Error(Image) with one line.
Rgb8Image load_image_file(const std::string &path, long long max_image_pixels);
// Copies a caller's RGB8 frame (stride 0 = 3 * width).
Rgb8Image rgb_image(const uint8_t *pixels, int width, int height, int stride, long long max_image_pixels,
                    const std::string &name);

// float32 1 / theta^(2j / dim) for j < dim / 2, the power rounded once from float64, and float32 cos/sin
// rounded once from float64: the rotary arithmetic both runtimes share (runtime/rotary.py).
std::vector<float> inverse_frequencies(double theta, int dim);
inline float rounded_cos(float angle);
inline float rounded_sin(float angle);

// Qwen2-VL's resize rule (Python's round: half to even). Returns {height, width}.
std::pair<int, int> smart_resize(int height, int width, int factor, long long min_pixels, long long max_pixels);
// PIL's bicubic resample of an 8-bit RGB image (Image.resize(..., BICUBIC)), bit for bit.
Rgb8Image resize_bicubic(const Rgb8Image &image, int width, int height);
PreparedImage preprocess_image(const Rgb8Image &image, const PreprocessConfig &config);
VisionFeeds vision_feeds(const PreparedImage &image, const VisionConfig &config);
// Bilinear resampling (align corners) of a square table of num_position_embeddings rows to a grid_h x
// grid_w image, per patch in merge-block order: 4 taps and their float32 weights, bit for bit as
// runtime/vision.py's position_interpolation (BUNDLE.md 3.3).
void position_interpolation(int grid_h, int grid_w, int merge, long long num_position_embeddings,
                            std::vector<int64_t> &taps, std::vector<float> &weights);

inline float rounded_cos(float angle) { return float(std::cos(double(angle))); }
inline float rounded_sin(float angle) { return float(std::sin(double(angle))); }

}  // namespace gemvg
