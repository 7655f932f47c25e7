// Image decoding (libjpeg-turbo, libpng), PIL's bicubic resample, Qwen2-VL's normalisation and patch
// order, and the vision encoder's host-side inputs: runtime/preprocess.py and runtime/vision.py.
#include "image.h"

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>

#include "common.h"

namespace gemvg {
namespace {

constexpr double MAX_ASPECT_RATIO = 200;

[[noreturn]] void image_error(const std::string &message) { throw Error(ErrorKind::Image, message); }

using File = std::unique_ptr<FILE, int (*)(FILE *)>;

void check_size(const std::string &name, long long width, long long height, long long max_image_pixels) {
    if (width < 1 || height < 1)
        image_error(name + ": empty image (" + std::to_string(width) + "x" + std::to_string(height) + ")");
    if (width * height > max_image_pixels)
        image_error(name + ": " + std::to_string(width) + "x" + std::to_string(height) + " is over the limit of " +
                    std::to_string(max_image_pixels) + " pixels (decompression-bomb guard)");
}

// -- EXIF orientation (what PIL's ImageOps.exif_transpose applies) ------------------------------------

// The orientation tag of EXIF data: a JPEG APP1 segment ("Exif\0\0" + TIFF) or a PNG eXIf chunk (TIFF).
int exif_orientation(const uint8_t *data, size_t size) {
    if (size >= 6 && std::memcmp(data, "Exif\0\0", 6) == 0) data += 6, size -= 6;
    if (size < 8 || !(std::memcmp(data, "II*\0", 4) == 0 || std::memcmp(data, "MM\0*", 4) == 0)) return 1;
    const uint8_t *tiff = data;
    size_t n = size;
    bool little = tiff[0] == 'I';
    auto u16 = [&](size_t at) -> unsigned { return at + 2 > n ? 0 : little ? tiff[at] | tiff[at + 1] << 8 : tiff[at] << 8 | tiff[at + 1]; };
    auto u32 = [&](size_t at) -> size_t {
        if (at + 4 > n) return 0;
        return little ? size_t(tiff[at]) | size_t(tiff[at + 1]) << 8 | size_t(tiff[at + 2]) << 16 | size_t(tiff[at + 3]) << 24
                      : size_t(tiff[at]) << 24 | size_t(tiff[at + 1]) << 16 | size_t(tiff[at + 2]) << 8 | size_t(tiff[at + 3]);
    };
    size_t ifd = u32(4);
    unsigned entries = u16(ifd);
    for (unsigned i = 0; i < entries; i++) {
        size_t entry = ifd + 2 + 12 * size_t(i);
        if (entry + 12 > n) break;
        if (u16(entry) == 0x0112) {
            unsigned value = u16(entry + 8);
            return value >= 1 && value <= 8 ? int(value) : 1;
        }
    }
    return 1;
}

Rgb8Image apply_orientation(Rgb8Image image, int orientation) {
    if (orientation <= 1) return image;
    bool swap = orientation >= 5;
    Rgb8Image out;
    out.width = swap ? image.height : image.width;
    out.height = swap ? image.width : image.height;
    out.pixels.resize(image.pixels.size());
    int w = image.width, h = image.height;
    for (int y = 0; y < out.height; y++)
        for (int x = 0; x < out.width; x++) {
            int sx, sy;  // the source pixel of output (x, y)
            switch (orientation) {
                case 2: sx = w - 1 - x, sy = y; break;                  // mirror horizontal
                case 3: sx = w - 1 - x, sy = h - 1 - y; break;          // rotate 180
                case 4: sx = x, sy = h - 1 - y; break;                  // mirror vertical
                case 5: sx = y, sy = x; break;                          // transpose
                case 6: sx = y, sy = h - 1 - x; break;                  // rotate 90 clockwise
                case 7: sx = w - 1 - y, sy = h - 1 - x; break;          // transverse
                default: sx = w - 1 - y, sy = x; break;                 // 8: rotate 270 clockwise
            }
            std::memcpy(&out.pixels[(size_t(y) * out.width + x) * 3], &image.pixels[(size_t(sy) * w + sx) * 3], 3);
        }
    return out;
}

// -- JPEG --------------------------------------------------------------------------------------------

struct JpegErrorManager {
    jpeg_error_mgr base;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

void jpeg_fail(j_common_ptr cinfo) {
    auto *manager = reinterpret_cast<JpegErrorManager *>(cinfo->err);
    (*cinfo->err->format_message)(cinfo, manager->message);
    longjmp(manager->jump, 1);
}

// Warnings stay silent, except a premature end of data: PIL refuses a truncated JPEG, so we do too.
void jpeg_warning(j_common_ptr cinfo, int level) {
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) jpeg_fail(cinfo);
}

Rgb8Image decode_jpeg(FILE *file, const std::string &name, long long max_image_pixels) {
    jpeg_decompress_struct cinfo;
    JpegErrorManager errors;
    cinfo.err = jpeg_std_error(&errors.base);
    errors.base.error_exit = jpeg_fail;
    errors.base.emit_message = jpeg_warning;
    // Everything that setjmp must not clobber lives in `image` (heap-backed) and the error text.
    auto image = std::make_unique<Rgb8Image>();
    int orientation = 1;
    if (setjmp(errors.jump)) {
        jpeg_destroy_decompress(&cinfo);
        image_error(name + ": cannot decode image (" + std::string(errors.message) + ")");
    }
    jpeg_create_decompress(&cinfo);
    jpeg_stdio_src(&cinfo, file);
    jpeg_save_markers(&cinfo, JPEG_APP0 + 1, 0xFFFF);
    jpeg_read_header(&cinfo, TRUE);
    for (jpeg_saved_marker_ptr marker = cinfo.marker_list; marker; marker = marker->next)
        if (marker->marker == JPEG_APP0 + 1) orientation = exif_orientation(marker->data, marker->data_length);
    long long width = cinfo.image_width, height = cinfo.image_height;
    if (width < 1 || height < 1 || width * height > max_image_pixels) {
        jpeg_destroy_decompress(&cinfo);
        check_size(name, width, height, max_image_pixels);
    }
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        jpeg_destroy_decompress(&cinfo);
        image_error(name + ": CMYK JPEG images are not supported by the native runtime");
    }
    cinfo.out_color_space = JCS_RGB;  // grayscale is replicated, as PIL's convert("RGB") does
    jpeg_start_decompress(&cinfo);
    image->width = int(cinfo.output_width);
    image->height = int(cinfo.output_height);
    image->pixels.resize(size_t(image->width) * image->height * 3);
    while (cinfo.output_scanline < cinfo.output_height) {
        JSAMPROW row = &image->pixels[size_t(cinfo.output_scanline) * image->width * 3];
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return apply_orientation(std::move(*image), orientation);
}

// -- PNG ---------------------------------------------------------------------------------------------

void png_fail(png_structp png, png_const_charp message) {
    auto *text = static_cast<std::string *>(png_get_error_ptr(png));
    *text = message;
    png_longjmp(png, 1);
}

void png_silent(png_structp, png_const_charp) {}

Rgb8Image decode_png(FILE *file, const std::string &name, long long max_image_pixels) {
    std::string failure;
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &failure, png_fail, png_silent);
    png_infop info = png ? png_create_info_struct(png) : nullptr;
    if (!info) {
        png_destroy_read_struct(&png, nullptr, nullptr);
        image_error(name + ": out of memory decoding the image");
    }
    auto image = std::make_unique<Rgb8Image>();
    std::vector<png_bytep> *rows = new std::vector<png_bytep>();
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_read_struct(&png, &info, nullptr);
        delete rows;
        image_error(name + ": cannot decode image (" + failure + ")");
    }
    png_set_user_limits(png, 0x7fffffff, 0x7fffffff);
    png_init_io(png, file);
    png_read_info(png, info);
    long long width = png_get_image_width(png, info), height = png_get_image_height(png, info);
    if (width < 1 || height < 1 || width * height > max_image_pixels) {
        png_destroy_read_struct(&png, &info, nullptr);
        delete rows;
        check_size(name, width, height, max_image_pixels);
    }
    int color = png_get_color_type(png, info);
    int depth = png_get_bit_depth(png, info);
    // As PIL's convert("RGB"): palettes and gray expanded, alpha dropped (not composited), 16-bit samples
    // cut to their high byte, except 16-bit grey without alpha, which PIL opens as I;16 and clips at 255.
    bool gray16 = color == PNG_COLOR_TYPE_GRAY && depth == 16;
    if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
    if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
    if (depth == 16 && !gray16) png_set_strip_16(png);
    if ((color == PNG_COLOR_TYPE_GRAY && !gray16) || color == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(png);
    png_set_strip_alpha(png);
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    size_t row_bytes = gray16 ? size_t(width) * 2 : size_t(width) * 3;
    if (png_get_rowbytes(png, info) != row_bytes) {
        png_destroy_read_struct(&png, &info, nullptr);
        delete rows;
        image_error(name + ": unsupported PNG layout");
    }
    image->width = int(width);
    image->height = int(height);
    image->pixels.resize(size_t(width) * height * 3);
    // 16-bit grey rows are read into the first two thirds of each RGB row, then widened in place.
    rows->resize(size_t(height));
    for (long long y = 0; y < height; y++) (*rows)[size_t(y)] = &image->pixels[size_t(y) * width * 3];
    png_read_image(png, rows->data());
    png_read_end(png, info);
    int orientation = 1;
    png_uint_32 exif_size = 0;
    png_bytep exif = nullptr;
    if (png_get_eXIf_1(png, info, &exif_size, &exif) && exif) orientation = exif_orientation(exif, exif_size);
    png_destroy_read_struct(&png, &info, nullptr);
    delete rows;
    if (gray16)
        for (long long y = 0; y < height; y++) {
            uint8_t *row = &image->pixels[size_t(y) * width * 3];
            for (long long x = width - 1; x >= 0; x--) {  // backwards: the 2-byte samples lie before their RGB slots
                unsigned value = unsigned(row[2 * x]) << 8 | row[2 * x + 1];
                uint8_t clipped = uint8_t(value > 255 ? 255 : value);
                row[3 * x] = row[3 * x + 1] = row[3 * x + 2] = clipped;
            }
        }
    return apply_orientation(std::move(*image), orientation);
}

// -- PIL's resample (Pillow's libImaging/Resample.c, 8 bits per channel) -----------------------------

constexpr int PRECISION_BITS = 32 - 8 - 2;

double bicubic_filter(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

struct Coefficients {
    int ksize = 0;
    std::vector<int> bounds;  // (first input index, count) per output index
    std::vector<int32_t> weights;  // fixed point, ksize per output index
};

Coefficients precompute_coeffs(int in_size, float in0, float in1, int out_size) {
    const double support_of_filter = 2.0;
    double scale = double(in1 - in0) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = support_of_filter * filterscale;
    Coefficients c;
    c.ksize = int(std::ceil(support)) * 2 + 1;
    c.bounds.resize(size_t(out_size) * 2);
    std::vector<double> kk(size_t(out_size) * c.ksize, 0.0);
    for (int xx = 0; xx < out_size; xx++) {
        double center = in0 + (xx + 0.5) * scale;
        double ww = 0.0, ss = 1.0 / filterscale;
        int xmin = int(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = int(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        double *k = &kk[size_t(xx) * c.ksize];
        for (int x = 0; x < xmax; x++) {
            double w = bicubic_filter((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (int x = 0; x < xmax; x++)
            if (ww != 0.0) k[x] /= ww;
        c.bounds[size_t(xx) * 2] = xmin;
        c.bounds[size_t(xx) * 2 + 1] = xmax;
    }
    c.weights.resize(kk.size());
    for (size_t i = 0; i < kk.size(); i++)
        c.weights[i] = kk[i] < 0 ? int(-0.5 + kk[i] * (1 << PRECISION_BITS)) : int(0.5 + kk[i] * (1 << PRECISION_BITS));
    return c;
}

inline uint8_t clip8(int in) {
    if (in >= (1 << PRECISION_BITS << 8)) return 255;
    if (in <= 0) return 0;
    return uint8_t(in >> PRECISION_BITS);
}

}  // namespace

Rgb8Image load_image_file(const std::string &path, long long max_image_pixels) {
    struct stat info;
    if (stat(path.c_str(), &info) != 0) image_error(path + ": no such file");
    if (S_ISDIR(info.st_mode)) image_error(path + ": is a directory, not an image");
    if (info.st_size == 0) image_error(path + ": file is empty (0 bytes)");
    File file(std::fopen(path.c_str(), "rb"), std::fclose);
    if (!file) image_error(path + ": cannot open image (" + std::strerror(errno) + ")");
    uint8_t magic[8] = {0};
    size_t got = std::fread(magic, 1, sizeof magic, file.get());
    std::rewind(file.get());
    if (got >= 3 && magic[0] == 0xFF && magic[1] == 0xD8 && magic[2] == 0xFF)
        return decode_jpeg(file.get(), path, max_image_pixels);
    if (got == 8 && png_sig_cmp(magic, 0, 8) == 0) return decode_png(file.get(), path, max_image_pixels);
    image_error(path + ": not a readable image file (the native runtime reads JPEG and PNG)");
}

Rgb8Image rgb_image(const uint8_t *pixels, int width, int height, int stride, long long max_image_pixels,
                    const std::string &name) {
    if (!pixels) image_error(name + ": no pixel buffer");
    check_size(name, width, height, max_image_pixels);
    if (stride == 0) stride = 3 * width;
    if (stride < 3 * width) image_error(name + ": stride " + std::to_string(stride) + " is under 3 * width");
    Rgb8Image image;
    image.width = width, image.height = height;
    image.pixels.resize(size_t(width) * height * 3);
    for (int y = 0; y < height; y++)
        std::memcpy(&image.pixels[size_t(y) * width * 3], pixels + size_t(y) * stride, size_t(width) * 3);
    return image;
}

std::pair<int, int> smart_resize(int height, int width, int factor, long long min_pixels, long long max_pixels) {
    double ratio = double(std::max(height, width)) / std::min(height, width);
    if (ratio > MAX_ASPECT_RATIO)
        image_error("aspect ratio " + std::to_string(int(std::nearbyint(ratio))) + " of a " + std::to_string(width) + "x" +
                    std::to_string(height) + " image is over the model's limit of 200");
    // Python's round() rounds halves to even, as nearbyint does in the default rounding mode.
    long long h_bar = (long long)(std::nearbyint(double(height) / factor)) * factor;
    long long w_bar = (long long)(std::nearbyint(double(width) / factor)) * factor;
    if (h_bar * w_bar > max_pixels) {
        double beta = std::sqrt(double((long long)height * width) / double(max_pixels));
        h_bar = std::max<long long>(factor, (long long)(std::floor(height / beta / factor)) * factor);
        w_bar = std::max<long long>(factor, (long long)(std::floor(width / beta / factor)) * factor);
    } else if (h_bar * w_bar < min_pixels) {
        double beta = std::sqrt(double(min_pixels) / double((long long)height * width));
        h_bar = (long long)(std::ceil(height * beta / factor)) * factor;
        w_bar = (long long)(std::ceil(width * beta / factor)) * factor;
    }
    return {int(h_bar), int(w_bar)};
}

namespace {

// One pass of PIL's 8-bit resample along rows (horizontal) or columns (vertical), over a whole image.
Rgb8Image resample_pass(const Rgb8Image &in, int out_size, bool horizontal) {
    Coefficients c = horizontal ? precompute_coeffs(in.width, 0.0f, float(in.width), out_size)
                                : precompute_coeffs(in.height, 0.0f, float(in.height), out_size);
    Rgb8Image out;
    out.width = horizontal ? out_size : in.width;
    out.height = horizontal ? in.height : out_size;
    out.pixels.resize(size_t(out.width) * out.height * 3);
    for (int yy = 0; yy < out.height; yy++)
        for (int xx = 0; xx < out.width; xx++) {
            int index = horizontal ? xx : yy;
            int first = c.bounds[size_t(index) * 2], count = c.bounds[size_t(index) * 2 + 1];
            const int32_t *k = &c.weights[size_t(index) * c.ksize];
            int ss0 = 1 << (PRECISION_BITS - 1), ss1 = ss0, ss2 = ss0;
            for (int t = 0; t < count; t++) {
                int x = horizontal ? first + t : xx, y = horizontal ? yy : first + t;
                const uint8_t *p = &in.pixels[(size_t(y) * in.width + x) * 3];
                ss0 += p[0] * k[t], ss1 += p[1] * k[t], ss2 += p[2] * k[t];
            }
            uint8_t *o = &out.pixels[(size_t(yy) * out.width + xx) * 3];
            o[0] = clip8(ss0), o[1] = clip8(ss1), o[2] = clip8(ss2);
        }
    return out;
}

}  // namespace

Rgb8Image resize_bicubic(const Rgb8Image &image, int width, int height) {
    if (width == image.width && height == image.height) return image;  // PIL returns a copy
    bool need_horizontal = width != image.width, need_vertical = height != image.height;
    if (!need_horizontal) return resample_pass(image, height, false);
    if (!need_vertical) return resample_pass(image, width, true);
    // Two passes through an 8-bit intermediate, so their order changes the result. Pillow 13 runs the
    // vertical one first when the height shrinks by more than twice the width's shrinkage in pixels
    // (python-pillow/Pillow#9549; this rule was checked against Pillow 13.0 on 395 random size pairs);
    // earlier Pillows always run the horizontal one first.
    bool vertical_first = height < image.height && (image.height - height) > 2 * (image.width - width);
    if (vertical_first) return resample_pass(resample_pass(image, height, false), width, true);
    return resample_pass(resample_pass(image, width, true), height, false);
}

PreparedImage preprocess_image(const Rgb8Image &image, const PreprocessConfig &config) {
    int factor = config.patch_size * config.merge_size;
    auto [resized_h, resized_w] = smart_resize(image.height, image.width, factor, config.min_pixels, config.max_pixels);
    Rgb8Image resized = resize_bicubic(image, resized_w, resized_h);
    // float64 rescale cast to float32, then float32 normalisation, as the HF image processor computes.
    float table[3][256];
    for (int c = 0; c < 3; c++) {
        float mean = float(config.image_mean[c]), std = float(config.image_std[c]);
        for (int v = 0; v < 256; v++) {
            float scaled = float(double(v) * config.rescale_factor);
            float centred = scaled - mean;
            table[c][v] = centred / std;
        }
    }
    int p = config.patch_size, m = config.merge_size, t = config.temporal_patch_size;
    PreparedImage out;
    out.grid_h = resized_h / p, out.grid_w = resized_w / p;
    out.width = image.width, out.height = image.height, out.resized_width = resized_w, out.resized_height = resized_h;
    out.patch_dim = size_t(3) * t * p * p;
    out.pixel_values.resize(size_t(out.grid_h) * out.grid_w * out.patch_dim);
    int blocks_w = out.grid_w / m;
    for (int bh = 0; bh < out.grid_h / m; bh++)
        for (int bw = 0; bw < blocks_w; bw++)
            for (int mh = 0; mh < m; mh++)
                for (int mw = 0; mw < m; mw++) {
                    size_t row = ((size_t(bh) * blocks_w + bw) * m + mh) * m + mw;
                    float *dst = &out.pixel_values[row * out.patch_dim];
                    for (int c = 0; c < 3; c++)
                        for (int ti = 0; ti < t; ti++)
                            for (int ph = 0; ph < p; ph++)
                                for (int pw = 0; pw < p; pw++) {
                                    int y = (bh * m + mh) * p + ph, x = (bw * m + mw) * p + pw;
                                    *dst++ = table[c][resized.pixels[(size_t(y) * resized_w + x) * 3 + c]];
                                }
                }
    std::string dims = std::to_string(image.width) + "x" + std::to_string(image.height);
    out.key = sha256_bytes(image.pixels.data(), image.pixels.size()) + "-" + dims;
    return out;
}

std::vector<float> inverse_frequencies(double theta, int dim) {
    std::vector<float> inv_freq;
    for (int j = 0; j < dim / 2; j++) {
        float exponent = float(2 * j) / float(dim);
        float power = float(std::pow(double(float(theta)), double(exponent)));
        inv_freq.push_back(1.0f / power);
    }
    return inv_freq;
}

namespace {

// The 2 taps into a `side`-long table axis and their float32 weights for position `index` on an axis of
// `size` patches (align_corners=True), in runtime/vision.py's _bilinear_axis float32 operation order.
void bilinear_axis(int index, int size, long long side, int64_t taps[2], float weights[2]) {
    float src = float(index) * float(side - 1) / float(std::max(size - 1, 1));
    float floor = std::floor(src);
    for (int k = 0; k < 2; k++) {
        taps[k] = std::min<int64_t>(std::max<int64_t>(int64_t(floor) + k, 0), side - 1);
        float distance = std::fabs(src - floor - float(k));
        weights[k] = std::max(1.0f - distance, 0.0f);
    }
}

}  // namespace

void position_interpolation(int grid_h, int grid_w, int merge, long long num_position_embeddings,
                            std::vector<int64_t> &taps, std::vector<float> &weights) {
    long long side = (long long)std::sqrt(double(num_position_embeddings));  // Python's math.isqrt
    while (side * side > num_position_embeddings) side--;
    while ((side + 1) * (side + 1) <= num_position_embeddings) side++;
    size_t patches = size_t(grid_h) * size_t(grid_w);
    taps.assign(patches * 4, 0);
    weights.assign(patches * 4, 0.0f);
    size_t row = 0;
    for (int bh = 0; bh < grid_h / merge; bh++)
        for (int bw = 0; bw < grid_w / merge; bw++)
            for (int mh = 0; mh < merge; mh++)
                for (int mw = 0; mw < merge; mw++, row++) {
                    int64_t h_taps[2], w_taps[2];
                    float h_weights[2], w_weights[2];
                    bilinear_axis(bh * merge + mh, grid_h, side, h_taps, h_weights);
                    bilinear_axis(bw * merge + mw, grid_w, side, w_taps, w_weights);
                    for (int i = 0; i < 2; i++)
                        for (int j = 0; j < 2; j++) {  // (top, left), (top, right), (bottom, left), (bottom, right)
                            taps[row * 4 + size_t(i * 2 + j)] = h_taps[i] * side + w_taps[j];
                            weights[row * 4 + size_t(i * 2 + j)] = h_weights[i] * w_weights[j];
                        }
                }
}

VisionFeeds vision_feeds(const PreparedImage &image, const VisionConfig &config) {
    int m = config.spatial_merge_size, unit = m * m;
    size_t patches = size_t(image.grid_t) * image.grid_h * image.grid_w;
    VisionFeeds feeds;
    // Rotary: the axial 2-D embedding, (row freqs, col freqs) twice, in float32 as the vision tower does.
    int head_dim = config.head_dim, spatial = head_dim / 2, half = spatial / 2;
    std::vector<float> inv_freq = inverse_frequencies(config.rope_theta, spatial);
    feeds.rotary_cos.resize(patches * head_dim);
    feeds.rotary_sin.resize(patches * head_dim);
    size_t row = 0;
    for (int ti = 0; ti < image.grid_t; ti++)
        for (int bh = 0; bh < image.grid_h / m; bh++)
            for (int bw = 0; bw < image.grid_w / m; bw++)
                for (int mh = 0; mh < m; mh++)
                    for (int mw = 0; mw < m; mw++, row++) {
                        float position[2] = {float(bh * m + mh), float(bw * m + mw)};
                        for (int axis = 0; axis < 2; axis++)
                            for (int j = 0; j < half; j++) {
                                float angle = position[axis] * inv_freq[size_t(j)];
                                float c = rounded_cos(angle), s = rounded_sin(angle);
                                size_t at = row * head_dim + size_t(axis) * half + j;
                                feeds.rotary_cos[at] = feeds.rotary_cos[at + spatial] = c;
                                feeds.rotary_sin[at] = feeds.rotary_sin[at + spatial] = s;
                            }
                    }
    if (config.num_position_embeddings > 0) {  // Qwen3-VL: a learned position table, no window attention
        if (config.window_size > 0)
            throw Error(ErrorKind::Bundle, "a vision config with both a learned position table and window attention is not a "
                                           "Qwen-VL tower gemvg knows");
        std::vector<int64_t> taps;
        std::vector<float> weights;
        position_interpolation(image.grid_h, image.grid_w, m, config.num_position_embeddings, taps, weights);
        for (int ti = 0; ti < image.grid_t; ti++) {  // the same taps for every temporal patch
            feeds.position_taps.insert(feeds.position_taps.end(), taps.begin(), taps.end());
            feeds.position_weights.insert(feeds.position_weights.end(), weights.begin(), weights.end());
        }
    }
    if (config.window_size <= 0) {
        feeds.pixel_values = image.pixel_values;
        return feeds;
    }
    // Qwen2.5-VL's windows over merged tokens, each window's members in raster order.
    int rows = image.grid_h / m, cols = image.grid_w / m;
    int window = config.window_size / m / config.patch_size;
    int padded_rows = rows + window - rows % window, padded_cols = cols + window - cols % window;
    std::vector<int64_t> order, lengths;
    for (int wr = 0; wr < padded_rows / window; wr++)
        for (int wc = 0; wc < padded_cols / window; wc++) {
            int64_t count = 0;
            for (int r = wr * window; r < (wr + 1) * window; r++)
                for (int c = wc * window; c < (wc + 1) * window; c++)
                    if (r < rows && c < cols) order.push_back(int64_t(r) * cols + c), count++;
            if (count) lengths.push_back(count * unit);
        }
    size_t merged = order.size();
    feeds.restore_order.resize(merged);
    for (size_t k = 0; k < merged; k++) feeds.restore_order[size_t(order[k])] = int64_t(k);
    auto regroup = [&](const std::vector<float> &source, size_t width) {
        std::vector<float> out(source.size());
        size_t block = unit * width;
        for (size_t k = 0; k < merged; k++)
            std::memcpy(&out[k * block], &source[size_t(order[k]) * block], block * sizeof(float));
        return out;
    };
    feeds.pixel_values = regroup(image.pixel_values, image.patch_dim);
    feeds.rotary_cos = regroup(feeds.rotary_cos, size_t(head_dim));
    feeds.rotary_sin = regroup(feeds.rotary_sin, size_t(head_dim));
    feeds.windows = int64_t(lengths.size());
    feeds.longest = *std::max_element(lengths.begin(), lengths.end());
    feeds.window_gather.resize(size_t(feeds.windows * feeds.longest));
    feeds.window_bias.resize(size_t(feeds.windows * feeds.longest));
    feeds.window_scatter.resize(patches);
    int64_t start = 0;
    for (int64_t w = 0; w < feeds.windows; w++) {
        int64_t length = lengths[size_t(w)];
        for (int64_t s = 0; s < feeds.longest; s++) {
            bool real = s < length;
            feeds.window_gather[size_t(w * feeds.longest + s)] = real ? start + s : start;
            feeds.window_bias[size_t(w * feeds.longest + s)] = real ? 0.0f : -std::numeric_limits<float>::infinity();
        }
        for (int64_t s = 0; s < length; s++) feeds.window_scatter[size_t(start + s)] = w * feeds.longest + s;
        start += length;
    }
    return feeds;
}

}  // namespace gemvg
