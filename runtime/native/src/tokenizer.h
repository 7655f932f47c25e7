// The bundle's tokenizer.json, natively: added/special tokens split first, the byte-level pre-tokenizer
// (ByteLevel with its regex, or Qwen's Split regex + ByteLevel), BPE merges by rank; decoding back to
// UTF-8 as the tokenizers library does (invalid bytes become U+FFFD).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace gemvg {

// Whether `text` is well-formed UTF-8.
bool is_valid_utf8(const std::string &text);

class Tokenizer {
public:
    explicit Tokenizer(const std::string &path);  // throws Error(Bundle)
    ~Tokenizer();
    std::vector<int64_t> encode(const std::string &text) const;
    std::string decode(const std::vector<int32_t> &ids) const;  // special tokens kept

private:
    void encode_piece(const std::string &piece, std::vector<int64_t> &out) const;
    void bpe(const std::string &word, std::vector<int64_t> &out) const;

    std::unordered_map<std::string, int64_t> vocab_;
    std::unordered_map<int64_t, std::string> id_to_token_;
    std::unordered_map<std::string, int> merge_ranks_;  // "left right" -> rank
    std::vector<std::pair<std::string, int64_t>> added_;  // content, id (longest first)
    std::string byte_to_char_[256];
    std::unordered_map<std::string, uint8_t> char_to_byte_;
    bool ignore_merges_ = false;
    struct Regex;
    std::unique_ptr<Regex> split_;
};

}  // namespace gemvg
