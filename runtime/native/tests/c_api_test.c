/* A plain C99 program using only gemvg.h: grounds on a bundle, asks a follow-up, and checks that bad
 * input gives NULL and one line. Usage: c_api_test BUNDLE IMAGE_A IMAGE_B */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gemvg.h"

static int failures = 0;

#define CHECK(cond, what)                                              \
    do {                                                               \
        if (!(cond)) {                                                 \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, what); \
            failures++;                                                \
        }                                                              \
    } while (0)

static void check_error(const void *handle, const char *expect) {
    const char *message = gemvg_last_error();
    CHECK(handle == NULL, expect);
    CHECK(message[0] != '\0', "an error message is set");
    CHECK(strchr(message, '\n') == NULL, "the error message is one line");
    CHECK(strstr(message, expect) != NULL, expect);
    if (!strstr(message, expect)) fprintf(stderr, "  got: %s\n", message);
}

int main(int argc, char **argv) {
    gemvg_engine *engine;
    gemvg_result *first, *follow_up, *frame;
    const char *images[2];
    unsigned char pixels[16 * 12 * 3];
    const unsigned char *frames[1];
    int width = 16, height = 12, stride = 0;
    size_t i;
    if (argc != 4) {
        fprintf(stderr, "usage: c_api_test BUNDLE IMAGE_A IMAGE_B\n");
        return 2;
    }
    images[0] = argv[2];
    images[1] = argv[3];

    check_error(gemvg_engine_load("/nonexistent/bundle", "cpu", 0), "bundle not found");
    engine = gemvg_engine_load(argv[1], "cpu", 1);
    CHECK(engine != NULL, "the bundle loads");
    if (!engine) {
        fprintf(stderr, "%s\n", gemvg_last_error());
        return 1;
    }
    first = gemvg_ground_files(engine, images, 2, "the red cup", "direct", 12);
    CHECK(first != NULL, "a request grounds");
    CHECK(gemvg_result_token_count(first) >= 1 && gemvg_result_token_count(first) <= 12, "1..12 tokens");
    CHECK(gemvg_result_tokens(first) != NULL, "token ids");
    CHECK(gemvg_result_timing_ms(first, "time_to_first_token") > 0, "time to first token measured");
    CHECK(gemvg_result_timing_ms(first, "no such stage") == -1, "unknown stage is -1");
    CHECK(strstr(gemvg_result_json(first), "\"token_ids\"") != NULL, "JSON result");
    CHECK(gemvg_result_reused_prefix_tokens(first) == 0, "a cold request reuses nothing");
    for (i = 0; i < gemvg_result_box_count(first); i++) {
        gemvg_box box = gemvg_result_box(first, i);
        CHECK(box.image >= 0 && box.image < 2 && box.label != NULL, "a box names one of the images");
    }
    follow_up = gemvg_ground_files(engine, images, 2, "the blue bowl", "direct", 12);
    CHECK(follow_up != NULL, "a follow-up grounds");
    CHECK(gemvg_result_reused_prefix_tokens(follow_up) > 0, "a follow-up reuses the images' prefix");

    memset(pixels, 90, sizeof pixels);
    frames[0] = pixels;
    frame = gemvg_ground_rgb(engine, frames, &width, &height, &stride, 1, "the grey square", "raw", 4);
    CHECK(frame != NULL, "an RGB frame grounds");

    check_error(gemvg_ground_files(engine, images, 0, "the red cup", "direct", 8), "no images");
    check_error(gemvg_ground_files(engine, images, 2, "the red cup", "sideways", 8), "unknown mode");
    check_error(gemvg_ground_files(engine, images, 2, "   ", "direct", 8), "the query is empty");
    check_error(gemvg_ground_files(engine, images, 2, "the red cup", "direct", 0), "max_new_tokens");
    check_error(gemvg_ground_files(engine, images, 2, "the red cup", "direct", 100000000), "exceeds the model's context");
    images[1] = "/nonexistent/image.jpg";
    check_error(gemvg_ground_files(engine, images, 2, "the red cup", "direct", 8), "no such file");
    images[1] = argv[1]; /* a folder */
    check_error(gemvg_ground_files(engine, images, 2, "the red cup", "direct", 8), "is a directory");
    width = 0;
    check_error(gemvg_ground_rgb(engine, frames, &width, &height, &stride, 1, "x", "raw", 4), "empty image");
    check_error(gemvg_ground_files(NULL, images, 2, "the red cup", "direct", 8), "no engine");

    gemvg_result_free(first);
    gemvg_result_free(follow_up);
    gemvg_result_free(frame);
    gemvg_result_free(NULL);
    gemvg_engine_free(engine);
    gemvg_engine_free(NULL);
    if (failures) fprintf(stderr, "%d check(s) failed\n", failures);
    else printf("c_api_test: all checks passed\n");
    return failures ? 1 : 0;
}
