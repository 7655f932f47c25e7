#include "grounding.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <tuple>

#include "common.h"

namespace gemvg {
namespace {

const char *ORDINALS[] = {"first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
                          "eleventh", "twelfth"};
const char *NO_TARGET_TEXT = "None";

// The instruction's format hint per box syntax (_FORMAT_HINT in runtime/grounding.py, verbatim).
std::string format_hint(const std::string &syntax) {
    if (syntax == "ref_tokens")
        return "Give every target as <|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|> "
               "with coordinates from 0 to 1000, each after the image it lies in (\"In the second image: ...\"). "
               "If nothing matches, answer " + std::string(NO_TARGET_TEXT) + ".";
    if (syntax == "json_relative")
        return "Give every target as JSON: [{\"bbox_2d\": [x1, y1, x2, y2], \"label\": \"...\", \"image\": n}], "
               "with coordinates from 0 to 1000 and n the number of the image it lies in. If nothing matches, answer [].";
    return "Give every target as JSON: [{\"bbox_2d\": [x1, y1, x2, y2], \"label\": \"...\", \"image\": n}], "
           "with pixel coordinates and n the number of the image it lies in. If nothing matches, answer [].";
}

const char *COT_HINT = "First think it through inside <think></think>, then give the final answer inside <answer></answer>.";

// A compiled PCRE2 pattern with Python re's meaning of \d, \s, \w and \b on str (Unicode).
class Pattern {
public:
    explicit Pattern(const std::string &pattern, uint32_t options = 0) {
        int code;
        PCRE2_SIZE offset;
        code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(),
                              PCRE2_UTF | PCRE2_UCP | options, &code, &offset, nullptr);
        if (!code_) throw Error(ErrorKind::Internal, "grounding regex does not compile: " + pattern);
    }
    ~Pattern() { pcre2_code_free(code_); }
    Pattern(const Pattern &) = delete;

    // Finds the next match at or after `start`; groups[i] = (begin, end), begin = npos when unset.
    bool search(const std::string &text, size_t start, std::vector<std::pair<size_t, size_t>> &groups) const {
        if (start > text.size()) return false;
        // Match data per call: the patterns are shared by every engine, in any thread.
        std::unique_ptr<pcre2_match_data, void (*)(pcre2_match_data *)> match(
            pcre2_match_data_create_from_pattern(code_, nullptr), pcre2_match_data_free);
        if (!match) throw std::bad_alloc();
        int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), start, 0, match.get(), nullptr);
        if (rc < 0) return false;
        PCRE2_SIZE *ovector = pcre2_get_ovector_pointer(match.get());
        uint32_t count = pcre2_get_ovector_count(match.get());
        groups.assign(count, {std::string::npos, std::string::npos});
        for (uint32_t i = 0; i < count; i++)
            if (ovector[2 * i] != PCRE2_UNSET) groups[i] = {ovector[2 * i], ovector[2 * i + 1]};
        return true;
    }

    // Every non-overlapping match, as Python's finditer (an empty match advances one character).
    std::vector<std::vector<std::pair<size_t, size_t>>> find_all(const std::string &text) const {
        std::vector<std::vector<std::pair<size_t, size_t>>> all;
        std::vector<std::pair<size_t, size_t>> groups;
        size_t start = 0;
        while (start <= text.size() && search(text, start, groups)) {
            all.push_back(groups);
            start = groups[0].second > groups[0].first ? groups[0].second : groups[0].second + 1;
            while (start < text.size() && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) start++;
        }
        return all;
    }

private:
    pcre2_code *code_ = nullptr;
};

using Groups = std::vector<std::pair<size_t, size_t>>;

std::string group(const std::string &text, const Groups &groups, size_t i) {
    if (i >= groups.size() || groups[i].first == std::string::npos) return "";
    return text.substr(groups[i].first, groups[i].second - groups[i].first);
}
bool has_group(const Groups &groups, size_t i) { return i < groups.size() && groups[i].first != std::string::npos; }

const std::string NUM = "(-?\\d+(?:\\.\\d+)?)";

const Pattern &image_ref() {
    static const Pattern p(
        "\\b(?:(?P<word>first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth)|(?P<num1>\\d+)"
        "(?:st|nd|rd|th))\\s+(?:image|picture|photo|frame|view)\\b"
        "|\\b(?:image|picture|photo|frame|view)\\s*[#:\\-]?\\s*(?P<num2>\\d+)\\b",
        PCRE2_CASELESS);
    return p;
}
const Pattern &qwen2_box() {
    static const Pattern p("(?:<\\|object_ref_start\\|>(?P<label>.*?)<\\|object_ref_end\\|>\\s*)?"
                           "(?:<\\|box_start\\|>)?\\s*\\(\\s*" + NUM + "\\s*,\\s*" + NUM + "\\s*\\)\\s*,\\s*\\(\\s*" + NUM +
                               "\\s*,\\s*" + NUM + "\\s*\\)\\s*(?:<\\|box_end\\|>|<\\|box_start\\|>)?",
                           PCRE2_DOTALL);
    return p;
}
const Pattern &json_object() { static const Pattern p("\\{[^{}]*\\}", PCRE2_DOTALL); return p; }
const Pattern &bbox_key() {
    static const Pattern p("\"bbox_2d\"\\s*:\\s*\\[\\s*" + NUM + "\\s*,\\s*" + NUM + "\\s*,\\s*" + NUM + "\\s*,\\s*" + NUM + "\\s*\\]");
    return p;
}
const Pattern &label_key() { static const Pattern p("\"label\"\\s*:\\s*\"((?:[^\"\\\\]|\\\\.)*)\""); return p; }
const Pattern &image_key() { static const Pattern p("\"(?:image|image_index|image_id|img)\"\\s*:\\s*\"?(\\d+)\"?"); return p; }
const Pattern &answer_tag() { static const Pattern p("<answer>(.*?)(?:</answer>|$)", PCRE2_DOTALL); return p; }

// Python's int()/float() of a matched number (ASCII digits; other Unicode digits count as 0-9 by value).
std::string ascii_digits(const std::string &s) {
    std::string out;
    for (size_t i = 0; i < s.size(); i++) {
        unsigned char c = static_cast<unsigned char>(s[i]);
        if (c < 0x80) { out += char(c); continue; }
        out += '0';  // a non-ASCII digit: rare in model output; its value is not looked up
        while (i + 1 < s.size() && (static_cast<unsigned char>(s[i + 1]) & 0xC0) == 0x80) i++;
    }
    return out;
}
double to_double(const std::string &s) { return std::strtod(ascii_digits(s).c_str(), nullptr); }
long long to_int(const std::string &s) { return std::strtoll(ascii_digits(s).c_str(), nullptr, 10); }

std::string lower_ascii(std::string s) {
    for (char &c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
    return s;
}

int image_mention(const std::string &segment, bool &found) {
    int index = 0;
    found = false;
    for (const Groups &g : image_ref().find_all(segment)) {
        found = true;
        if (has_group(g, 1)) {
            std::string word = lower_ascii(group(segment, g, 1));
            for (int i = 0; i < 12; i++)
                if (word == ORDINALS[i]) index = i;
        } else {
            index = int(to_int(has_group(g, 2) ? group(segment, g, 2) : group(segment, g, 3))) - 1;
        }
    }
    return index;
}

struct RawBox {
    int image;
    double coords[4];
    std::string label;
};

// Special-token boxes (the ref_tokens form).
std::vector<RawBox> parse_ref_tokens(const std::string &text) {
    std::vector<RawBox> out;
    int image = 0;
    size_t last_end = 0;
    for (const Groups &g : qwen2_box().find_all(text)) {
        bool found;
        int mentioned = image_mention(text.substr(last_end, g[0].first - last_end), found);
        if (found) image = mentioned;
        RawBox box{image, {}, group(text, g, 1)};
        for (int i = 0; i < 4; i++) box.coords[i] = to_double(group(text, g, size_t(2 + i)));
        out.push_back(box);
        last_end = g[0].second;
    }
    return out;
}

// json.loads of a JSON string body; the raw text when it does not decode.
std::string json_unescape(const std::string &s) {
    std::string out;
    auto hex4 = [&](size_t at, unsigned &value) {
        if (at + 4 > s.size()) return false;
        value = 0;
        for (size_t k = at; k < at + 4; k++) {
            char c = s[k];
            value <<= 4;
            if (c >= '0' && c <= '9') value |= unsigned(c - '0');
            else if (c >= 'a' && c <= 'f') value |= unsigned(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') value |= unsigned(c - 'A' + 10);
            else return false;
        }
        return true;
    };
    for (size_t i = 0; i < s.size(); i++) {
        if (s[i] != '\\') { out += s[i]; continue; }
        if (++i >= s.size()) return s;
        switch (s[i]) {
            case '"': out += '"'; break;
            case '\\': out += '\\'; break;
            case '/': out += '/'; break;
            case 'b': out += '\b'; break;
            case 'f': out += '\f'; break;
            case 'n': out += '\n'; break;
            case 'r': out += '\r'; break;
            case 't': out += '\t'; break;
            case 'u': {
                unsigned cp;
                if (!hex4(i + 1, cp)) return s;
                i += 4;
                unsigned low;
                if (cp >= 0xD800 && cp < 0xDC00 && i + 2 < s.size() && s[i + 1] == '\\' && s[i + 2] == 'u' &&
                    hex4(i + 3, low) && low >= 0xDC00 && low < 0xE000) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                    i += 6;
                }
                if (cp >= 0xD800 && cp < 0xE000) cp = 0xFFFD;
                if (cp < 0x80) out += char(cp);
                else if (cp < 0x800) out += char(0xC0 | cp >> 6), out += char(0x80 | (cp & 0x3F));
                else if (cp < 0x10000) out += char(0xE0 | cp >> 12), out += char(0x80 | (cp >> 6 & 0x3F)), out += char(0x80 | (cp & 0x3F));
                else out += char(0xF0 | cp >> 18), out += char(0x80 | (cp >> 12 & 0x3F)), out += char(0x80 | (cp >> 6 & 0x3F)), out += char(0x80 | (cp & 0x3F));
                break;
            }
            default: return s;
        }
    }
    return out;
}

// bbox_2d objects (the JSON form of json_pixels and json_relative).
std::vector<RawBox> parse_json(const std::string &text) {
    std::vector<RawBox> out;
    Groups g;
    for (const Groups &object : json_object().find_all(text)) {
        std::string obj = group(text, object, 0);
        if (!bbox_key().search(obj, 0, g)) continue;
        RawBox box{0, {}, ""};
        for (int i = 0; i < 4; i++) box.coords[i] = to_double(group(obj, g, size_t(1 + i)));
        if (label_key().search(obj, 0, g)) box.label = json_unescape(group(obj, g, 1));
        if (image_key().search(obj, 0, g)) box.image = int(to_int(group(obj, g, 1))) - 1;
        out.push_back(box);
    }
    return out;
}

// Python's str.strip(): whitespace at both ends (ASCII and the common Unicode spaces).
std::string strip(const std::string &s) {
    auto space_at_start = [&](size_t i) -> size_t {
        unsigned char c = static_cast<unsigned char>(s[i]);
        if (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) return 1;
        if (c == 0xC2 && i + 1 < s.size() && (static_cast<unsigned char>(s[i + 1]) == 0x85 || static_cast<unsigned char>(s[i + 1]) == 0xA0)) return 2;
        return 0;
    };
    size_t begin = 0;
    while (begin < s.size()) {
        size_t n = space_at_start(begin);
        if (!n) break;
        begin += n;
    }
    size_t end = s.size();
    while (end > begin) {
        unsigned char c = static_cast<unsigned char>(s[end - 1]);
        if (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) end--;
        else if (end - begin >= 2 && static_cast<unsigned char>(s[end - 2]) == 0xC2 && (c == 0x85 || c == 0xA0)) end -= 2;
        else break;
    }
    return s.substr(begin, end - begin);
}

}  // namespace

std::string forced_continuation(const std::string &text, const std::string &syntax, const std::string &mode) {
    if (mode == "raw" || (mode == "cot" && text.find("<answer>") == std::string::npos)) return "";
    // (what the generated text ends with, what must follow), as the formatter writes each form's boxes.
    static const Pattern object_ref_end("<\\|object_ref_end\\|>$"), first_corner("<\\|box_start\\|>\\(\\d+,\\d+\\)$"),
        both_corners("<\\|box_start\\|>\\(\\d+,\\d+\\),\\(\\d+,\\d+\\)$"), open_object("\\{\"$"),
        bbox("\"bbox_2d\": \\[\\d+, \\d+, \\d+, \\d+\\]$");
    static const std::vector<std::pair<const Pattern *, std::string>> ref_tokens = {
        {&object_ref_end, "<|box_start|>("}, {&first_corner, ",("}, {&both_corners, "<|box_end|>"}};
    static const std::vector<std::pair<const Pattern *, std::string>> json_form = {
        {&open_object, "bbox_2d\": ["}, {&bbox, ", \"label\": \""}};
    Groups groups;
    for (const auto &[ending, forced] : syntax == "ref_tokens" ? ref_tokens : json_form)
        if (ending->search(text, 0, groups)) return forced;
    return "";
}

bool is_mode(const std::string &mode) { return mode == "direct" || mode == "cot" || mode == "raw"; }
bool is_family(const std::string &family) { return !family_box_syntax(family).empty(); }
bool is_box_syntax(const std::string &syntax) {
    return syntax == "ref_tokens" || syntax == "json_pixels" || syntax == "json_relative";
}
std::string family_box_syntax(const std::string &family) {
    if (family == "qwen2_vl") return "ref_tokens";
    if (family == "qwen2_5_vl") return "json_pixels";
    if (family == "qwen3_vl") return "json_relative";
    return "";
}

std::string build_instruction(const std::string &query, const std::string &syntax, const std::string &mode) {
    if (mode == "raw") return query;
    if (mode == "direct") return query + "\n" + format_hint(syntax);
    return query + "\n" + format_hint(syntax) + "\n" + COT_HINT;
}

std::vector<Box> parse_answer(const std::string &text, const std::string &syntax, const std::vector<ImageGeometry> &geometries) {
    std::string body = text;
    auto answers = answer_tag().find_all(text);
    if (!answers.empty()) body = group(text, answers.back(), 1);
    // The syntax's own form; when it yields no box, the other form (_OTHER_FORM in Python): special-token
    // boxes (always relative) for a JSON syntax, json_pixels for ref_tokens.
    bool json_form = syntax != "ref_tokens";
    bool relative = syntax != "json_pixels";
    std::vector<RawBox> raw = json_form ? parse_json(body) : parse_ref_tokens(body);
    if (raw.empty()) {
        json_form = !json_form;
        relative = !json_form;
        raw = json_form ? parse_json(body) : parse_ref_tokens(body);
    }
    std::vector<Box> boxes;
    for (const RawBox &r : raw) {
        if (r.image < 0 || r.image >= int(geometries.size())) continue;
        const ImageGeometry &geom = geometries[size_t(r.image)];
        double sx, sy;
        if (relative) sx = geom.width / 1000.0, sy = geom.height / 1000.0;
        else sx = double(geom.width) / geom.resized_width, sy = double(geom.height) / geom.resized_height;
        double x1 = r.coords[0] * sx, x2 = r.coords[2] * sx, y1 = r.coords[1] * sy, y2 = r.coords[3] * sy;
        if (x1 > x2) std::swap(x1, x2);
        if (y1 > y2) std::swap(y1, y2);
        auto clamp = [](double v, double hi) { return std::min(std::max(v, 0.0), hi); };
        boxes.push_back({r.image, clamp(x1, geom.width), clamp(y1, geom.height), clamp(x2, geom.width), clamp(y2, geom.height),
                         strip(r.label)});
    }
    return boxes;
}

}  // namespace gemvg
