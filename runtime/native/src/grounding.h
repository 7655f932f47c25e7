// The grounding language (runtime/grounding.py), natively: instructions per mode and box parsing
// into original pixels.
#pragma once

#include <string>
#include <vector>

namespace gemvg {

struct Box {
    int image = 0;
    double x1 = 0, y1 = 0, x2 = 0, y2 = 0;
    std::string label;
};

struct ImageGeometry {
    int width = 0, height = 0, resized_width = 0, resized_height = 0;
};

bool is_mode(const std::string &mode);
// The model families (a manifest's family) and box syntaxes (its box_syntax: ref_tokens, json_pixels,
// json_relative; runtime/grounding.py's SYNTAXES) this runtime reads.
bool is_family(const std::string &family);
bool is_box_syntax(const std::string &syntax);
// A family's own box syntax (what a manifest without box_syntax means); "" for an unknown family.
std::string family_box_syntax(const std::string &family);
// The user text for a query: raw sends it verbatim; direct and cot add the box syntax's format hint.
std::string build_instruction(const std::string &query, const std::string &syntax, const std::string &mode);
// Boxes in a whole completion written in a box syntax, mapped to original pixels and clamped (parse_answer).
std::vector<Box> parse_answer(const std::string &text, const std::string &syntax, const std::vector<ImageGeometry> &geometries);

// The text the box syntax forces after `text` (what has been generated so far), or "": only inside an
// answer (in cot mode after <answer>), never in raw mode (forced_continuation in Python).
std::string forced_continuation(const std::string &text, const std::string &syntax, const std::string &mode);

}  // namespace gemvg
