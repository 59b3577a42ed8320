#include "server/backend/http/nginx_index.h"

#include <cctype>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"

namespace chunkd::server {
namespace {

// A minimal reader of nginx's JSON directory index: an array of flat objects whose values are
// strings, numbers, booleans or null.
class IndexParser {
 public:
  using Item = NginxIndexEntry;
  explicit IndexParser(absl::string_view text) : s_(text) {}

  bool Parse(std::vector<Item>* items) {
    Skip();
    if (!Eat('[')) return false;
    Skip();
    if (Eat(']')) return AtEnd();
    while (true) {
      Item item;
      if (!ParseObject(&item)) return false;
      items->push_back(std::move(item));
      Skip();
      if (Eat(']')) return AtEnd();
      if (!Eat(',')) return false;
    }
  }

 private:
  bool AtEnd() {
    Skip();
    return i_ == s_.size();
  }
  void Skip() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool Eat(char c) {
    Skip();
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  static void AppendUtf8(uint32_t cp, std::string* out) {
    if (cp < 0x80) {
      out->push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }
  bool Hex4(uint32_t* v) {
    if (i_ + 4 > s_.size()) return false;
    *v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s_[i_++];
      *v <<= 4;
      if (c >= '0' && c <= '9') {
        *v |= c - '0';
      } else if (c >= 'a' && c <= 'f') {
        *v |= c - 'a' + 10;
      } else if (c >= 'A' && c <= 'F') {
        *v |= c - 'A' + 10;
      } else {
        return false;
      }
    }
    return true;
  }
  bool ParseString(std::string* out) {
    if (!Eat('"')) return false;
    while (i_ < s_.size()) {
      char c = s_[i_++];
      if (c == '"') return true;
      if (c != '\\') {
        out->push_back(c);
        continue;
      }
      if (i_ >= s_.size()) return false;
      char e = s_[i_++];
      switch (e) {
        case '"':
          out->push_back('"');
          break;
        case '\\':
          out->push_back('\\');
          break;
        case '/':
          out->push_back('/');
          break;
        case 'b':
          out->push_back('\b');
          break;
        case 'f':
          out->push_back('\f');
          break;
        case 'n':
          out->push_back('\n');
          break;
        case 'r':
          out->push_back('\r');
          break;
        case 't':
          out->push_back('\t');
          break;
        case 'u': {
          uint32_t cp;
          if (!Hex4(&cp)) return false;
          if (cp >= 0xD800 && cp < 0xDC00 && i_ + 1 < s_.size() && s_[i_] == '\\' &&
              s_[i_ + 1] == 'u') {
            i_ += 2;
            uint32_t low;
            if (!Hex4(&low)) return false;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          }
          AppendUtf8(cp, out);
          break;
        }
        default:
          return false;
      }
    }
    return false;
  }
  bool ParseScalar(std::string* out) {
    Skip();
    if (i_ < s_.size() && s_[i_] == '"') return ParseString(out);
    size_t start = i_;
    while (i_ < s_.size() && s_[i_] != ',' && s_[i_] != '}' && s_[i_] != ']' &&
           !std::isspace(static_cast<unsigned char>(s_[i_]))) {
      ++i_;
    }
    *out = std::string(s_.substr(start, i_ - start));
    return i_ > start;
  }
  bool ParseObject(Item* item) {
    if (!Eat('{')) return false;
    if (Eat('}')) return true;
    while (true) {
      std::string key, value;
      Skip();
      if (!ParseString(&key) || !Eat(':') || !ParseScalar(&value)) return false;
      if (key == "name") {
        item->name = std::move(value);
      } else if (key == "type") {
        item->type = std::move(value);
      } else if (key == "size") {
        if (!absl::SimpleAtoi(value, &item->size)) return false;
      }
      if (Eat('}')) return true;
      if (!Eat(',')) return false;
    }
  }

  absl::string_view s_;
  size_t i_ = 0;
};

}  // namespace

bool ParseNginxIndex(absl::string_view text, std::vector<NginxIndexEntry>* entries) {
  return IndexParser(text).Parse(entries);
}

}  // namespace chunkd::server
