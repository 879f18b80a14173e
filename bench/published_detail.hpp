// Private to the published-runs library: one row of the published-runs document read with
// errors that name the row and the field, text matching, and the framework → zoo stack table
// (published_framework.cpp).
#pragma once

#include "parallax/core/error.hpp"
#include "parallax/core/json_reader.hpp"
#include "parallax/core/stack.hpp"
#include "parallax/models/model_config.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <optional>
#include <string>
#include <vector>

namespace parallax::published_detail {

// One row of the document, read with errors that name the row and the field.
class Row {
public:
  Row(const Json& row, std::string file) : row_(row), file_(std::move(file)) {
    if (!row_.is_object()) {
      fail("", "an object", json_describe(row_));
    }
    id_ = string_or("", "id").value_or("");
    if (id_.empty()) {
      fail("/id", "a non-empty string", describe("", "id"));
    }
  }

  const std::string& id() const { return id_; }

  [[noreturn]] void fail(const std::string& field, const std::string& expected,
                         const std::string& found, const std::string& hint = {}) const {
    throw InputError(fmt::format("{} (row '{}')", file_, id_), field.empty() ? "/" : field,
                     expected, found, hint);
  }

  // The value at /section/key, or nullptr when absent or null.
  const Json* at(const char* section, const char* key) const {
    const Json* base = &row_;
    if (section[0] != '\0') {
      if (!row_.contains(section) || !row_[section].is_object()) {
        return nullptr;
      }
      base = &row_[section];
    }
    if (!base->contains(key) || (*base)[key].is_null()) {
      return nullptr;
    }
    return &(*base)[key];
  }

  std::string describe(const char* section, const char* key) const {
    const Json* v = at(section, key);
    return v == nullptr ? "nothing" : json_describe(*v);
  }

  static std::string path(const char* section, const char* key) {
    return section[0] == '\0' ? fmt::format("/{}", key) : fmt::format("/{}/{}", section, key);
  }

  std::optional<std::string> string_or(const char* section, const char* key) const {
    const Json* v = at(section, key);
    if (v == nullptr) {
      return std::nullopt;
    }
    if (!v->is_string()) {
      fail(path(section, key), "a string", json_describe(*v));
    }
    return v->get<std::string>();
  }

  std::string text(const char* section, const char* key) const {
    return string_or(section, key).value_or("");
  }

  std::optional<double> number(const char* section, const char* key) const {
    const Json* v = at(section, key);
    if (v == nullptr) {
      return std::nullopt;
    }
    if (!v->is_number() || !std::isfinite(v->get<double>()) || v->get<double>() < 0) {
      fail(path(section, key), "a non-negative number or null", json_describe(*v));
    }
    return v->get<double>();
  }

  std::optional<std::int64_t> integer(const char* section, const char* key) const {
    const std::optional<double> v = number(section, key);
    if (!v) {
      return std::nullopt;
    }
    if (*v != std::floor(*v) || *v < 1 || *v > 1e15) {
      fail(path(section, key), "a positive integer or null", describe(section, key));
    }
    return static_cast<std::int64_t>(*v);
  }

  std::int64_t required_integer(const char* section, const char* key) const {
    const std::optional<std::int64_t> v = integer(section, key);
    if (!v) {
      fail(path(section, key), "a positive integer", "nothing");
    }
    return *v;
  }

  std::optional<bool> boolean(const char* section, const char* key) const {
    const Json* v = at(section, key);
    if (v == nullptr) {
      return std::nullopt;
    }
    if (!v->is_boolean()) {
      fail(path(section, key), "true, false or null", json_describe(*v));
    }
    return v->get<bool>();
  }

private:
  const Json& row_;
  std::string file_;
  std::string id_;
};

inline std::string lower(std::string text) {
  std::ranges::transform(text, text.begin(),
                         [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return text;
}

inline bool has(const std::string& text, const char* what) {
  return text.find(what) != std::string::npos;
}

// The framework text of a row → the zoo stack that ran it; the first entry whose words all occur
// in the lowered text wins. Megatron-LM before its 2023 releases (materialised attention, local
// DDP reducing after the pipeline flush) is `megatron-lm-legacy`; eager PyTorch trainers
// (FSDP1, Composer, Hugging Face, Lightning, nanotron, InternLM) share `pytorch-fsdp`'s kernels
// and allocator, their sharding and reduction pinned by the row's own fields.
//
// Where a trainer's model code brings its own cross-entropy kernel, the entry names it: the
// fused flash-attn cross-entropy is the default loss of llm-foundry's MPT (loss_fn
// 'fused_crossentropy'), of InternLM (internlm/model/loss.py, FlashCrossEntropyLoss with
// parallel_output), of TinyLlama's pretraining script (lit_gpt FusedCrossEntropyLoss) and of the
// flash-attention repository's training configs (flash_attn.losses.cross_entropy).
struct FrameworkStack {
  std::vector<const char*> words;
  const char* stack;
  int until_year = 0;             // applies to publications of this year or earlier; 0: any
  std::optional<LossKernel> loss; // the model code's own loss kernel, when not the stack's
};

// The first four-digit number in `text` that stands alone and reads as a year (2015–2100).
std::optional<int> year_in_text(const std::string& text);

// The zoo stack entry of a framework text published in `year` (nullptr when none matches).
const FrameworkStack* framework_entry(const std::string& framework, std::optional<int> year);

// The row's mixture of experts (model.moe), latent attention (model.mla), stated head
// dimension and QK norms, into `c` (published_model.cpp).
void moe_and_mla_of(const Row& r, ModelConfig& c);

} // namespace parallax::published_detail
