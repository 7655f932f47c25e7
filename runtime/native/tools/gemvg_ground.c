/* gemvg-ground: the native `gemvg ground`, written in plain C99 against gemvg.h alone.
 *
 *   gemvg-ground --bundle B --image a.jpg [--image b.jpg ...] --query "the red cup"
 *                [--mode direct|cot|raw] [--max-new-tokens N] [--jump-forward] [--device cpu] [--threads N] [--json]
 *
 * Bad input: one line on stderr and exit code 2. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gemvg.h"

#define MAX_IMAGES 64

static int usage_error(const char *message, const char *detail) {
    fprintf(stderr, "gemvg-ground: error: %s%s\n", message, detail ? detail : "");
    return 2;
}

static int parse_int(const char *text, int *out) {
    char *end;
    long value;
    if (!text || !*text) return 0;
    value = strtol(text, &end, 10);
    if (*end || value < -2147483647L || value > 2147483647L) return 0;
    *out = (int)value;
    return 1;
}

int main(int argc, char **argv) {
    const char *bundle = NULL, *query = NULL, *mode = "direct", *device = "cpu";
    const char *images[MAX_IMAGES];
    size_t n_images = 0;
    int max_new_tokens = 256, threads = 0, as_json = 0, jump_forward = 0, i;
    gemvg_engine *engine;
    gemvg_result *result;

    for (i = 1; i < argc; i++) {
        const char *flag = argv[i];
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(flag, "--json") == 0) { as_json = 1; continue; }
        if (strcmp(flag, "--jump-forward") == 0) { jump_forward = 1; continue; }
        if (strcmp(flag, "-h") == 0 || strcmp(flag, "--help") == 0) {
            printf("usage: gemvg-ground --bundle B --image IMG [--image IMG ...] --query Q [--mode direct|cot|raw]\n"
                   "                    [--max-new-tokens N] [--jump-forward] [--device cpu] [--threads N] [--json]\n");
            return 0;
        }
        if (!value) return usage_error("missing value after ", flag);
        i++;
        if (strcmp(flag, "--bundle") == 0) bundle = value;
        else if (strcmp(flag, "--query") == 0) query = value;
        else if (strcmp(flag, "--mode") == 0) mode = value;
        else if (strcmp(flag, "--device") == 0) device = value;
        else if (strcmp(flag, "--image") == 0) {
            if (n_images == MAX_IMAGES) return usage_error("too many --image arguments", NULL);
            images[n_images++] = value;
        } else if (strcmp(flag, "--max-new-tokens") == 0) {
            if (!parse_int(value, &max_new_tokens)) return usage_error("--max-new-tokens takes an integer, not ", value);
        } else if (strcmp(flag, "--threads") == 0) {
            if (!parse_int(value, &threads)) return usage_error("--threads takes an integer, not ", value);
        } else {
            return usage_error("unknown argument ", flag);
        }
    }
    if (!bundle) return usage_error("--bundle is required", NULL);
    if (!query) return usage_error("--query is required", NULL);
    if (n_images == 0) return usage_error("no images: give at least one --image", NULL);
    if (strcmp(mode, "direct") && strcmp(mode, "cot") && strcmp(mode, "raw"))
        return usage_error("--mode must be direct, cot or raw, not ", mode);

    engine = gemvg_engine_load(bundle, device, threads);
    if (!engine) return usage_error(gemvg_last_error(), NULL);
    gemvg_engine_set_jump_forward(engine, jump_forward);
    result = gemvg_ground_files(engine, images, n_images, query, mode, max_new_tokens);
    if (!result) {
        int code = usage_error(gemvg_last_error(), NULL);
        gemvg_engine_free(engine);
        return code;
    }
    if (as_json) {
        printf("%s\n", gemvg_result_json(result));
    } else {
        size_t k, n = gemvg_result_box_count(result);
        printf("text: %s\n", gemvg_result_text(result));
        if (n == 0) printf("no targets found\n");
        for (k = 0; k < n; k++) {
            gemvg_box box = gemvg_result_box(result, k);
            printf("image %d: (%.1f, %.1f, %.1f, %.1f)%s%s\n", box.image, box.x1, box.y1, box.x2, box.y2,
                   box.label[0] ? " " : "", box.label);
        }
        printf("timings: time_to_first_token %.1f ms, decode %.1f ms, decode_per_token %.1f ms\n",
               gemvg_result_timing_ms(result, "time_to_first_token"), gemvg_result_timing_ms(result, "decode"),
               gemvg_result_timing_ms(result, "decode_per_token"));
    }
    gemvg_result_free(result);
    gemvg_engine_free(engine);
    return 0;
}
