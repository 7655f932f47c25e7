// Shared by the native runtime's parts: the typed error every stage throws on bad input.
#pragma once

#include <stdexcept>
#include <string>

namespace gemvg {

// The kinds mirror gemvg.runtime.errors (ImageError, BundleError, PromptTooLongError, InputError,
// ProviderError); the C API turns each into NULL and one line in gemvg_last_error().
enum class ErrorKind { Image, Bundle, PromptTooLong, Input, Provider, Internal };

class Error : public std::runtime_error {
public:
    Error(ErrorKind kind, const std::string &message) : std::runtime_error(message), kind(kind) {}
    ErrorKind kind;
};

// The hex sha256 of a file's bytes (the manifest's checksums).
std::string sha256_file(const std::string &path);
// The hex sha256 of a buffer (image content keys).
std::string sha256_bytes(const void *data, size_t size);

}  // namespace gemvg
