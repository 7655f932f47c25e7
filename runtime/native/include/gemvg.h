/* gemvg.h: the native gemvg runtime's C API (C99 and C++).
 *
 * Grounds a query over N images with a gemvg bundle (the same bundle the Python engine opens; see
 * BUNDLE.md), token for token as the Python engine does. Every call that can fail returns NULL (or a
 * negative count) and leaves one line in gemvg_last_error(), which is per thread.
 *
 *   gemvg_engine *e = gemvg_engine_load("bundle/", "cpu", 0);
 *   const char *images[] = {"left.jpg", "right.jpg"};
 *   gemvg_result *r = gemvg_ground_files(e, images, 2, "the red cup", "direct", 256);
 *   for (size_t i = 0; i < gemvg_result_box_count(r); i++) { gemvg_box b = gemvg_result_box(r, i); ... }
 *   gemvg_result_free(r); gemvg_engine_free(e);
 *
 * An engine is not thread-safe: use one per thread (they may share nothing but the bundle's files).
 */
#ifndef GEMVG_H
#define GEMVG_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define GEMVG_API __attribute__((visibility("default")))
#else
#define GEMVG_API
#endif

typedef struct gemvg_engine gemvg_engine;
typedef struct gemvg_result gemvg_result;

/* A target: the 0-based image it lies in and its corners in that image's original pixels. The label
 * points into the result and lives as long as it. */
typedef struct {
    int image;
    float x1, y1, x2, y2;
    const char *label;
} gemvg_box;

/* Opens a bundle (checking every file's sha256). device: "cpu" (NULL means "cpu"); threads: ONNX
 * Runtime's intra-op threads, 0 = all cores. NULL on error. */
GEMVG_API gemvg_engine *gemvg_engine_load(const char *bundle_dir, const char *device, int threads);

/* Every target of `query` in the images (JPEG or PNG files). mode: "direct", "cot" or "raw" (NULL means
 * "direct"); max_new_tokens >= 1. A follow-up on the same images reuses their vision features and the
 * prompt's cached prefix. NULL on error. */
GEMVG_API gemvg_result *gemvg_ground_files(gemvg_engine *e, const char *const *image_paths, size_t n_images,
                                           const char *query, const char *mode, int max_new_tokens);

/* The same over caller-decoded frames: RGB8, row i of image k at pixels[k] + i * strides[k] (bytes;
 * a stride of 0 means 3 * width). */
GEMVG_API gemvg_result *gemvg_ground_rgb(gemvg_engine *e, const unsigned char *const *pixels, const int *widths,
                                         const int *heights, const int *strides, size_t n_images,
                                         const char *query, const char *mode, int max_new_tokens);

GEMVG_API size_t gemvg_result_box_count(const gemvg_result *r);
GEMVG_API gemvg_box gemvg_result_box(const gemvg_result *r, size_t i); /* an all-zero box when i is out of range */
GEMVG_API const char *gemvg_result_text(const gemvg_result *r);       /* the generated text, UTF-8 */
GEMVG_API size_t gemvg_result_token_count(const gemvg_result *r);
GEMVG_API const int32_t *gemvg_result_tokens(const gemvg_result *r);  /* generated token ids, EOS kept */
GEMVG_API size_t gemvg_result_reused_prefix_tokens(const gemvg_result *r); /* prompt tokens taken from the last request */
/* Milliseconds of a stage: "preprocess", "vision", "prefill", "time_to_first_token", "decode",
 * "decode_per_token", "total", and "onnxruntime" (inside the graphs' runs; total minus it is host-side
 * work); -1 for an unknown name. */
GEMVG_API double gemvg_result_timing_ms(const gemvg_result *r, const char *stage);
/* The result as the JSON `gemvg ground --json` prints (boxes, text, token_ids, timings_ms, images,
 * reused_prefix_tokens). */
GEMVG_API const char *gemvg_result_json(const gemvg_result *r);
GEMVG_API void gemvg_result_free(gemvg_result *r);
/* Jump-forward (off by default): the text the box syntax forces after a generated token is fed with it
 * in one decoder pass instead of one pass per token, as `gemvg ground --jump-forward`. */
GEMVG_API void gemvg_engine_set_jump_forward(gemvg_engine *e, int enabled);
/* Forgets cached image features and the cached prompt prefix: the next request starts cold. */
GEMVG_API void gemvg_engine_reset(gemvg_engine *e);
GEMVG_API void gemvg_engine_free(gemvg_engine *e);

/* The model pixels of one image file (what the vision encoder sees, before window reordering):
 * float32 [*rows, *cols], freed with gemvg_free. NULL on error. For golden-vector comparisons. */
GEMVG_API float *gemvg_pixel_values_file(gemvg_engine *e, const char *image_path, size_t *rows, size_t *cols);
GEMVG_API void gemvg_free(void *p);

/* This thread's message for its last failed call ("" if none). */
GEMVG_API const char *gemvg_last_error(void);

#ifdef __cplusplus
}
#endif
#endif /* GEMVG_H */
