// The C API (include/gemvg.h) over the engine: every failure becomes NULL and one line in this thread's
// gemvg_last_error(); nothing throws across the boundary.
#include "gemvg.h"

#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "common.h"
#include "engine.h"

struct gemvg_engine {
    std::unique_ptr<gemvg::Engine> engine;
    bool jump_forward = false;
};

struct gemvg_result {
    gemvg::Result result;
    std::string json;
};

namespace {

thread_local std::string last_error;

std::string one_line(std::string text) {
    for (char &c : text)
        if (c == '\n' || c == '\r') c = ' ';
    return text;
}

template <typename F>
auto guarded(F &&body) -> decltype(body()) {
    try {
        last_error.clear();
        return body();
    } catch (const gemvg::Error &err) {
        last_error = one_line(err.what());
    } catch (const Ort::Exception &err) {
        last_error = "onnxruntime: " + one_line(err.what());
    } catch (const std::bad_alloc &) {
        last_error = "out of memory";
    } catch (const std::exception &err) {
        last_error = "internal error: " + one_line(err.what());
    } catch (...) {
        last_error = "internal error";
    }
    return nullptr;
}

gemvg_result *ground(gemvg_engine *e, std::vector<gemvg::Rgb8Image> images, const char *query, const char *mode,
                     int max_new_tokens) {
    auto *out = new gemvg_result();
    std::unique_ptr<gemvg_result> owner(out);
    out->result = e->engine->ground(images, query, mode ? mode : "direct", max_new_tokens, e->jump_forward);
    out->json = out->result.to_json();
    return owner.release();
}

void check_request(gemvg_engine *e, size_t n_images, const void *images, const char *query) {
    using gemvg::Error;
    using gemvg::ErrorKind;
    if (!e) throw Error(ErrorKind::Input, "no engine (gemvg_engine_load failed or was not called)");
    if (!query) throw Error(ErrorKind::Input, "the query is empty");
    if (n_images == 0) throw Error(ErrorKind::Input, "no images: give at least one image to ground the query in");
    if (!images) throw Error(ErrorKind::Input, "no image array given");
}

}  // namespace

extern "C" {

gemvg_engine *gemvg_engine_load(const char *bundle_dir, const char *device, int threads) {
    return guarded([&]() -> gemvg_engine * {
        if (!bundle_dir) throw gemvg::Error(gemvg::ErrorKind::Bundle, "no bundle folder given");
        auto *e = new gemvg_engine();
        std::unique_ptr<gemvg_engine> owner(e);
        e->engine = std::make_unique<gemvg::Engine>(bundle_dir, device ? device : "cpu", threads);
        return owner.release();
    });
}

gemvg_result *gemvg_ground_files(gemvg_engine *e, const char *const *image_paths, size_t n_images, const char *query,
                                 const char *mode, int max_new_tokens) {
    return guarded([&]() -> gemvg_result * {
        check_request(e, n_images, image_paths, query);
        long long limit = e->engine->manifest().preprocess.max_image_pixels;
        std::vector<gemvg::Rgb8Image> images;
        for (size_t i = 0; i < n_images; i++) {
            if (!image_paths[i]) throw gemvg::Error(gemvg::ErrorKind::Image, "image " + std::to_string(i) + ": no path given");
            images.push_back(gemvg::load_image_file(image_paths[i], limit));
        }
        return ground(e, std::move(images), query, mode, max_new_tokens);
    });
}

gemvg_result *gemvg_ground_rgb(gemvg_engine *e, const unsigned char *const *pixels, const int *widths, const int *heights,
                               const int *strides, size_t n_images, const char *query, const char *mode, int max_new_tokens) {
    return guarded([&]() -> gemvg_result * {
        check_request(e, n_images, pixels, query);
        if (!widths || !heights) throw gemvg::Error(gemvg::ErrorKind::Image, "no image widths or heights given");
        long long limit = e->engine->manifest().preprocess.max_image_pixels;
        std::vector<gemvg::Rgb8Image> images;
        for (size_t i = 0; i < n_images; i++)
            images.push_back(gemvg::rgb_image(pixels[i], widths[i], heights[i], strides ? strides[i] : 0, limit,
                                              "image " + std::to_string(i)));
        return ground(e, std::move(images), query, mode, max_new_tokens);
    });
}

size_t gemvg_result_box_count(const gemvg_result *r) { return r ? r->result.boxes.size() : 0; }

gemvg_box gemvg_result_box(const gemvg_result *r, size_t i) {
    gemvg_box box = {0, 0, 0, 0, 0, ""};
    if (!r || i >= r->result.boxes.size()) return box;
    const gemvg::Box &b = r->result.boxes[i];
    box.image = b.image;
    box.x1 = float(b.x1), box.y1 = float(b.y1), box.x2 = float(b.x2), box.y2 = float(b.y2);
    box.label = b.label.c_str();
    return box;
}

const char *gemvg_result_text(const gemvg_result *r) { return r ? r->result.text.c_str() : ""; }
size_t gemvg_result_token_count(const gemvg_result *r) { return r ? r->result.tokens.size() : 0; }
const int32_t *gemvg_result_tokens(const gemvg_result *r) { return r ? r->result.tokens.data() : nullptr; }
size_t gemvg_result_reused_prefix_tokens(const gemvg_result *r) { return r ? r->result.reused_prefix_tokens : 0; }

double gemvg_result_timing_ms(const gemvg_result *r, const char *stage) {
    if (!r || !stage) return -1;
    auto found = r->result.timings_ms.find(stage);
    return found == r->result.timings_ms.end() ? -1 : found->second;
}

const char *gemvg_result_json(const gemvg_result *r) { return r ? r->json.c_str() : ""; }
void gemvg_result_free(gemvg_result *r) { delete r; }
void gemvg_engine_free(gemvg_engine *e) { delete e; }
void gemvg_engine_set_jump_forward(gemvg_engine *e, int enabled) {
    if (e) e->jump_forward = enabled != 0;
}

void gemvg_engine_reset(gemvg_engine *e) {
    if (e) e->engine->reset();
}

float *gemvg_pixel_values_file(gemvg_engine *e, const char *image_path, size_t *rows, size_t *cols) {
    return guarded([&]() -> float * {
        if (!e) throw gemvg::Error(gemvg::ErrorKind::Input, "no engine");
        if (!image_path) throw gemvg::Error(gemvg::ErrorKind::Image, "no image path given");
        gemvg::PreparedImage image = e->engine->prepare_image(
            gemvg::load_image_file(image_path, e->engine->manifest().preprocess.max_image_pixels));
        auto *out = static_cast<float *>(std::malloc(image.pixel_values.size() * sizeof(float)));
        if (!out) throw std::bad_alloc();
        std::memcpy(out, image.pixel_values.data(), image.pixel_values.size() * sizeof(float));
        if (rows) *rows = image.pixel_values.size() / image.patch_dim;
        if (cols) *cols = image.patch_dim;
        return out;
    });
}

void gemvg_free(void *p) { std::free(p); }

const char *gemvg_last_error(void) { return last_error.c_str(); }

}  // extern "C"
