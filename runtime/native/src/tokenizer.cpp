#include "tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <climits>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common.h"

namespace gemvg {

using json = nlohmann::json;

// GPT-2's pre-tokenizer regex, which ByteLevel applies when its use_regex is true.
static const char *BYTE_LEVEL_REGEX =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

struct Tokenizer::Regex {
    pcre2_code *code = nullptr;
    ~Regex() { pcre2_code_free(code); }
};

namespace {

std::string utf8(uint32_t cp) {
    std::string out;
    if (cp < 0x80) out += char(cp);
    else if (cp < 0x800) out += char(0xC0 | cp >> 6), out += char(0x80 | (cp & 0x3F));
    else if (cp < 0x10000) out += char(0xE0 | cp >> 12), out += char(0x80 | (cp >> 6 & 0x3F)), out += char(0x80 | (cp & 0x3F));
    else out += char(0xF0 | cp >> 18), out += char(0x80 | (cp >> 12 & 0x3F)), out += char(0x80 | (cp >> 6 & 0x3F)), out += char(0x80 | (cp & 0x3F));
    return out;
}

// Length of the UTF-8 character starting at s[i] (1 for a stray byte).
size_t char_length(const std::string &s, size_t i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    return std::min(n, s.size() - i);
}

// String::from_utf8_lossy: each maximal invalid subsequence becomes one U+FFFD (Unicode's recommended practice).
std::string utf8_lossy(const std::string &bytes) {
    std::string out;
    size_t i = 0, n = bytes.size();
    auto byte = [&](size_t k) { return static_cast<unsigned char>(bytes[k]); };
    while (i < n) {
        unsigned char c = byte(i);
        if (c < 0x80) { out += char(c), i++; continue; }
        size_t need;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) need = 1;
        else if (c == 0xE0) need = 2, lo = 0xA0;
        else if (c >= 0xE1 && c <= 0xEC) need = 2;
        else if (c == 0xED) need = 2, hi = 0x9F;
        else if (c >= 0xEE && c <= 0xEF) need = 2;
        else if (c == 0xF0) need = 3, lo = 0x90;
        else if (c >= 0xF1 && c <= 0xF3) need = 3;
        else if (c == 0xF4) need = 3, hi = 0x8F;
        else { out += "\xEF\xBF\xBD", i++; continue; }
        size_t k = 1;
        for (; k <= need && i + k < n; k++) {
            unsigned char b = byte(i + k);
            unsigned char low = k == 1 ? lo : 0x80, high = k == 1 ? hi : 0xBF;
            if (b < low || b > high) break;
        }
        if (k == need + 1) out.append(bytes, i, need + 1);
        else out += "\xEF\xBF\xBD";
        i += k;
    }
    return out;
}

}  // namespace

bool is_valid_utf8(const std::string &text) { return utf8_lossy(text) == text; }

Tokenizer::Tokenizer(const std::string &path) {
    json data;
    std::string pattern;  // the pre-tokenizer's splitting regex ("" = none)
    try {
        std::ifstream in(path);
        if (!in) throw Error(ErrorKind::Bundle, path + ": cannot read the tokenizer");
        data = json::parse(in);
        // Qwen's tokenizers normalise with NFC, which leaves NFC text (what callers give) unchanged; the
        // native runtime applies no normalizer, so any other one is refused rather than ignored.
        if (data.contains("normalizer") && !data["normalizer"].is_null() && data["normalizer"].value("type", "") != "NFC")
            throw Error(ErrorKind::Bundle, path + ": the tokenizer's normalizer " + data["normalizer"].value("type", "?") +
                                               " is not supported natively");
        const json &model = data.at("model");
        if (model.value("type", "BPE") != "BPE")
            throw Error(ErrorKind::Bundle, path + ": only BPE tokenizers are supported natively");
        for (auto &[token, id] : model.at("vocab").items()) {
            vocab_[token] = id.get<int64_t>();
            id_to_token_[id.get<int64_t>()] = token;
        }
        int rank = 0;
        for (const json &merge : model.at("merges")) {
            std::string key = merge.is_string() ? merge.get<std::string>()
                                                : merge.at(0).get<std::string>() + " " + merge.at(1).get<std::string>();
            merge_ranks_.emplace(key, rank++);
        }
        ignore_merges_ = model.contains("ignore_merges") && model["ignore_merges"].is_boolean() && model["ignore_merges"].get<bool>();
        if (data.contains("added_tokens"))
            for (const json &token : data["added_tokens"]) {
                std::string content = token.at("content").get<std::string>();
                int64_t id = token.at("id").get<int64_t>();
                added_.emplace_back(content, id);
                id_to_token_[id] = content;
            }
        // Longest first, so that at any position the longest added token wins (leftmost-longest).
        std::stable_sort(added_.begin(), added_.end(), [](auto &a, auto &b) { return a.first.size() > b.first.size(); });
        // The pre-tokenizer: ByteLevel (its own regex or none) alone or after a Split with a regex.
        const json &pre = data.at("pre_tokenizer");
        std::vector<json> steps;
        if (pre.is_object() && pre.value("type", "") == "Sequence") steps = pre.at("pretokenizers").get<std::vector<json>>();
        else if (pre.is_object()) steps.push_back(pre);
        bool byte_level = false;
        for (const json &step : steps) {
            std::string type = step.value("type", "");
            if (type == "ByteLevel") {
                byte_level = true;
                if (step.value("add_prefix_space", false))
                    throw Error(ErrorKind::Bundle, path + ": ByteLevel add_prefix_space is not supported natively");
                if (step.value("use_regex", true)) {
                    if (!pattern.empty()) throw Error(ErrorKind::Bundle, path + ": two pre-tokenizer regexes");
                    pattern = BYTE_LEVEL_REGEX;
                }
            } else if (type == "Split") {
                if (!step.at("pattern").contains("Regex") || step.value("behavior", "") != "Isolated")
                    throw Error(ErrorKind::Bundle, path + ": only an isolating regex Split is supported natively");
                if (!pattern.empty()) throw Error(ErrorKind::Bundle, path + ": two pre-tokenizer regexes");
                pattern = step["pattern"]["Regex"].get<std::string>();
            } else {
                throw Error(ErrorKind::Bundle, path + ": pre-tokenizer " + type + " is not supported natively");
            }
        }
        if (!byte_level) throw Error(ErrorKind::Bundle, path + ": only byte-level BPE tokenizers are supported natively");
    } catch (const json::exception &err) {
        throw Error(ErrorKind::Bundle, path + ": malformed tokenizer (" + err.what() + ")");
    }
    // GPT-2's byte <-> printable character table.
    std::vector<int> printable;
    for (int b = '!'; b <= '~'; b++) printable.push_back(b);
    for (int b = 0xA1; b <= 0xAC; b++) printable.push_back(b);
    for (int b = 0xAE; b <= 0xFF; b++) printable.push_back(b);
    int extra = 0;
    for (int b = 0; b < 256; b++) {
        bool direct = std::find(printable.begin(), printable.end(), b) != printable.end();
        byte_to_char_[b] = utf8(direct ? uint32_t(b) : uint32_t(256 + extra++));
        char_to_byte_[byte_to_char_[b]] = uint8_t(b);
    }
    // Unicode properties; \s and \d Unicode-aware, as the Rust regex engines are.
    if (!pattern.empty()) {
        int code;
        PCRE2_SIZE offset;
        split_ = std::make_unique<Regex>();
        split_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(),
                                     PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &code, &offset, nullptr);
        if (!split_->code) throw Error(ErrorKind::Bundle, path + ": the pre-tokenizer regex does not compile");
    }
}

Tokenizer::~Tokenizer() = default;

void Tokenizer::bpe(const std::string &word, std::vector<int64_t> &out) const {
    // word: byte-level characters. Symbols start as single characters and merge by lowest rank.
    if (ignore_merges_) {
        auto whole = vocab_.find(word);
        if (whole != vocab_.end()) { out.push_back(whole->second); return; }
    }
    std::vector<std::string> symbols;
    for (size_t i = 0; i < word.size();) {
        size_t n = char_length(word, i);
        symbols.push_back(word.substr(i, n));
        i += n;
    }
    while (symbols.size() > 1) {
        int best = INT_MAX;
        size_t at = 0;
        for (size_t i = 0; i + 1 < symbols.size(); i++) {
            auto found = merge_ranks_.find(symbols[i] + " " + symbols[i + 1]);
            if (found != merge_ranks_.end() && found->second < best) best = found->second, at = i;
        }
        if (best == INT_MAX) break;
        // Merge every occurrence of the best pair, left to right.
        std::string left = symbols[at], right = symbols[at + 1];
        std::vector<std::string> merged;
        for (size_t i = 0; i < symbols.size();) {
            if (i + 1 < symbols.size() && symbols[i] == left && symbols[i + 1] == right) merged.push_back(left + right), i += 2;
            else merged.push_back(symbols[i]), i++;
        }
        symbols.swap(merged);
    }
    for (const std::string &symbol : symbols) {
        auto found = vocab_.find(symbol);
        if (found != vocab_.end()) out.push_back(found->second);  // no unk token: unknown symbols are dropped
    }
}

void Tokenizer::encode_piece(const std::string &piece, std::vector<int64_t> &out) const {
    auto emit = [&](size_t begin, size_t end) {
        if (end <= begin) return;
        std::string word;
        for (size_t i = begin; i < end; i++) word += byte_to_char_[static_cast<unsigned char>(piece[i])];
        bpe(word, out);
    };
    if (!split_) { emit(0, piece.size()); return; }
    pcre2_match_data *match = pcre2_match_data_create_from_pattern(split_->code, nullptr);
    size_t cursor = 0, start = 0;
    while (start < piece.size()) {
        int rc = pcre2_match(split_->code, reinterpret_cast<PCRE2_SPTR>(piece.data()), piece.size(), start, 0, match, nullptr);
        if (rc < 0) break;
        PCRE2_SIZE *ovector = pcre2_get_ovector_pointer(match);
        size_t mbegin = ovector[0], mend = ovector[1];
        if (mend == mbegin) {  // an empty match: step one character on
            start = mbegin + char_length(piece, mbegin);
            continue;
        }
        emit(cursor, mbegin);  // the gap before the match is a piece of its own (Isolated)
        emit(mbegin, mend);
        cursor = start = mend;
    }
    pcre2_match_data_free(match);
    emit(cursor, piece.size());
}

std::vector<int64_t> Tokenizer::encode(const std::string &text) const {
    std::vector<int64_t> out;
    size_t piece_start = 0, i = 0;
    while (i < text.size()) {
        const std::pair<std::string, int64_t> *hit = nullptr;
        for (const auto &token : added_)
            if (!token.first.empty() && text.compare(i, token.first.size(), token.first) == 0) { hit = &token; break; }
        if (!hit) { i++; continue; }
        encode_piece(text.substr(piece_start, i - piece_start), out);
        out.push_back(hit->second);
        i += hit->first.size();
        piece_start = i;
    }
    encode_piece(text.substr(piece_start), out);
    return out;
}

std::string Tokenizer::decode(const std::vector<int32_t> &ids) const {
    std::string bytes;
    for (int32_t id : ids) {
        auto found = id_to_token_.find(id);
        if (found == id_to_token_.end()) continue;  // ids past the tokenizer's vocabulary decode to nothing
        const std::string &token = found->second;
        std::string decoded;
        bool all_mapped = true;
        for (size_t i = 0; i < token.size();) {
            size_t n = char_length(token, i);
            auto byte = char_to_byte_.find(token.substr(i, n));
            if (byte == char_to_byte_.end()) { all_mapped = false; break; }
            decoded += char(byte->second);
            i += n;
        }
        bytes += all_mapped ? decoded : token;
    }
    return utf8_lossy(bytes);
}

}  // namespace gemvg
