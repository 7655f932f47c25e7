// SHA-256 through OpenSSL's libcrypto (SHA extensions where the CPU has them, as Python's hashlib):
// the manifest's file checksums and the image content keys.
#include <openssl/evp.h>

#include <cstdio>
#include <memory>
#include <vector>

#include "common.h"

namespace gemvg {
namespace {

class Digest {
public:
    Digest() : context_(EVP_MD_CTX_new(), EVP_MD_CTX_free) {
        if (!context_ || EVP_DigestInit_ex(context_.get(), EVP_sha256(), nullptr) != 1)
            throw Error(ErrorKind::Internal, "OpenSSL cannot compute SHA-256");
    }
    void update(const void *data, size_t size) { EVP_DigestUpdate(context_.get(), data, size); }
    std::string hex() {
        unsigned char digest[EVP_MAX_MD_SIZE];
        unsigned int length = 0;
        EVP_DigestFinal_ex(context_.get(), digest, &length);
        std::string out;
        char byte[3];
        for (unsigned int i = 0; i < length; i++) {
            std::snprintf(byte, sizeof byte, "%02x", digest[i]);
            out += byte;
        }
        return out;
    }

private:
    std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX *)> context_;
};

}  // namespace

std::string sha256_bytes(const void *data, size_t size) {
    Digest digest;
    digest.update(data, size);
    return digest.hex();
}

std::string sha256_file(const std::string &path) {
    std::unique_ptr<FILE, int (*)(FILE *)> file(std::fopen(path.c_str(), "rb"), std::fclose);
    if (!file) throw Error(ErrorKind::Bundle, "cannot read " + path);
    Digest digest;
    std::vector<unsigned char> buffer(1 << 20);
    size_t got;
    while ((got = std::fread(buffer.data(), 1, buffer.size(), file.get())) > 0) digest.update(buffer.data(), got);
    return digest.hex();
}

}  // namespace gemvg
