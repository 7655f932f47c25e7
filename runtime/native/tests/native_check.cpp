// native-check: the runtime's parts one at a time, for tests/test_native.py to compare with Python.
//   native-check tokenize TOKENIZER_JSON   stdin: JSON list of strings     -> stdout: JSON list of id lists
//   native-check decode TOKENIZER_JSON     stdin: JSON list of id lists    -> stdout: JSON list of strings
//   native-check parse                     stdin: JSON list of {text, syntax, geometries: [[w, h, rw, rh]]}
//                                          (syntax: ref_tokens, json_pixels or json_relative)
//                                          -> stdout: JSON list of box lists [image, x1, y1, x2, y2, label]
//   native-check vision BUNDLE IMAGE       -> stdout: JSON of the vision encoder's feeds
//   native-check forced BUNDLE MODE        stdin: JSON list of generated id lists -> the ids jump-forward feeds
//   native-check prompt BUNDLE MODE QUERY IMAGE...  -> stdout: JSON of the prompt's ids, positions, spans
//                                          and the decoder's rotary rows for them
#include <iostream>
#include <nlohmann/json.hpp>

#include "common.h"
#include "engine.h"
#include "grounding.h"
#include "image.h"
#include "tokenizer.h"

using json = nlohmann::json;

int main(int argc, char **argv) {
    try {
        std::string command = argc > 1 ? argv[1] : "";
        if (command == "tokenize" && argc == 3) {
            gemvg::Tokenizer tokenizer(argv[2]);
            json out = json::array();
            for (const std::string &text : json::parse(std::cin)) out.push_back(tokenizer.encode(text));
            std::cout << out.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
        } else if (command == "decode" && argc == 3) {
            gemvg::Tokenizer tokenizer(argv[2]);
            json out = json::array();
            for (const json &ids : json::parse(std::cin)) out.push_back(tokenizer.decode(ids.get<std::vector<int32_t>>()));
            std::cout << out.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
        } else if (command == "parse" && argc == 2) {
            json out = json::array();
            for (const json &item : json::parse(std::cin)) {
                std::vector<gemvg::ImageGeometry> geometries;
                for (const json &g : item.at("geometries")) geometries.push_back({g.at(0), g.at(1), g.at(2), g.at(3)});
                json boxes = json::array();
                for (const gemvg::Box &b : gemvg::parse_answer(item.at("text"), item.at("syntax"), geometries))
                    boxes.push_back({b.image, b.x1, b.y1, b.x2, b.y2, b.label});
                out.push_back(boxes);
            }
            std::cout << out.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
        } else if (command == "vision" && argc == 4) {
            gemvg::Manifest manifest = gemvg::load_manifest(argv[2], false);
            gemvg::PreparedImage image = gemvg::preprocess_image(
                gemvg::load_image_file(argv[3], manifest.preprocess.max_image_pixels), manifest.preprocess);
            gemvg::VisionFeeds feeds = gemvg::vision_feeds(image, manifest.vision);
            json out = {{"pixel_values", feeds.pixel_values}, {"rotary_cos", feeds.rotary_cos},
                        {"rotary_sin", feeds.rotary_sin}, {"window_gather", feeds.window_gather},
                        {"window_scatter", feeds.window_scatter}, {"restore_order", feeds.restore_order},
                        {"windows", feeds.windows}, {"longest", feeds.longest},
                        {"position_taps", feeds.position_taps}, {"position_weights", feeds.position_weights}};
            std::vector<int> bias;  // -inf does not survive JSON: 1 marks a masked slot
            for (float b : feeds.window_bias) bias.push_back(b < 0);
            out["window_masked"] = bias;
            std::cout << out.dump() << "\n";
        } else if (command == "forced" && argc == 4) {
            gemvg::Engine engine(argv[2], "cpu", 1);
            json out = json::array();
            for (const json &ids : json::parse(std::cin)) out.push_back(engine.forced_tokens(ids.get<std::vector<int32_t>>(), argv[3]));
            std::cout << out.dump() << "\n";
        } else if (command == "prompt" && argc >= 6) {
            gemvg::Manifest manifest = gemvg::load_manifest(argv[2], false);
            gemvg::Tokenizer tokenizer(std::string(argv[2]) + "/" + manifest.tokenizer.path);
            std::vector<gemvg::PreparedImage> images;
            for (int i = 5; i < argc; i++)
                images.push_back(gemvg::preprocess_image(gemvg::load_image_file(argv[i], manifest.preprocess.max_image_pixels),
                                                         manifest.preprocess));
            gemvg::Prompt prompt = gemvg::build_prompt(manifest, tokenizer,
                                                       gemvg::build_instruction(argv[4], manifest.box_syntax, argv[3]), images);
            size_t n = prompt.input_ids.size();
            gemvg::MRopeAngles rotary(manifest.text);
            std::vector<float> cos_rows(n * rotary.half()), sin_rows(n * rotary.half());
            rotary.fill(prompt.positions.data(), n, n, cos_rows.data(), sin_rows.data());
            json spans = json::array();
            for (auto &[start, end] : prompt.image_spans) spans.push_back({start, end});
            std::cout << json({{"input_ids", prompt.input_ids}, {"positions", prompt.positions}, {"image_spans", spans},
                               {"next_position", prompt.next_position}, {"rotary_cos", cos_rows}, {"rotary_sin", sin_rows}})
                             .dump()
                      << "\n";
        } else {
            std::cerr << "usage: native-check tokenize|decode TOKENIZER_JSON | parse | vision BUNDLE IMAGE | forced BUNDLE MODE | prompt BUNDLE MODE QUERY IMAGE...\n";
            return 2;
        }
    } catch (const std::exception &err) {
        std::cerr << "native-check: error: " << err.what() << "\n";
        return 2;
    }
    return 0;
}
