// The framework text of a published row → the zoo stack that ran it (published_detail.hpp).
#include "published_detail.hpp"
#include "published_runs.hpp"

#include <algorithm>
#include <cctype>
#include <optional>
#include <string>
#include <vector>

namespace parallax {
namespace published_detail {
namespace {

const std::vector<FrameworkStack>& framework_stacks() {
  static const std::vector<FrameworkStack> table = {
      {{"parallax"}, "parallax"},
      {{"torchtitan"}, "torchtitan"},
      {{"llm.c"}, "llm.c"},
      {{"megatron", "deepspeed"}, "megatron-deepspeed"},
      {{"deepspeed"}, "deepspeed"},
      {{"megatron"}, "megatron-lm-legacy", 2022},
      {{"megatron"}, "megatron-core"},
      {{"nemo"}, "megatron-core"},
      {{"llm-foundry"}, "pytorch-fsdp", 0, LossKernel::fused},
      {{"composer"}, "pytorch-fsdp", 0, LossKernel::fused},
      {{"internlm"}, "pytorch-fsdp", 0, LossKernel::fused},
      {{"lit-gpt"}, "pytorch-fsdp", 0, LossKernel::fused},
      {{"flash-attn"}, "pytorch-fsdp", 0, LossKernel::fused},
      {{"fsdp"}, "pytorch-fsdp"},
      {{"hugging"}, "pytorch-fsdp"},
      {{"lightning"}, "pytorch-fsdp"},
      {{"nanotron"}, "pytorch-fsdp"},
      {{"pytorch"}, "pytorch-fsdp"},
  };
  return table;
}

// The year a framework text names ("Megatron-LM (2021)"), else the source's.
std::optional<int> framework_year(const std::string& framework, std::optional<int> source_year) {
  const std::optional<int> stated = year_in_text(framework);
  return stated ? stated : source_year;
}

} // namespace

std::optional<int> year_in_text(const std::string& text) {
  for (std::size_t i = 0; i + 4 <= text.size(); ++i) {
    const bool digits = std::all_of(text.begin() + static_cast<std::ptrdiff_t>(i),
                                    text.begin() + static_cast<std::ptrdiff_t>(i + 4),
                                    [](unsigned char ch) { return std::isdigit(ch) != 0; });
    const bool alone =
        (i == 0 || std::isdigit(static_cast<unsigned char>(text[i - 1])) == 0) &&
        (i + 4 == text.size() || std::isdigit(static_cast<unsigned char>(text[i + 4])) == 0);
    if (digits && alone) {
      const int year = std::stoi(text.substr(i, 4));
      if (year >= 2015 && year <= 2100) {
        return year;
      }
    }
  }
  return std::nullopt;
}

const FrameworkStack* framework_entry(const std::string& framework, std::optional<int> year) {
  const std::string text = lower(framework);
  year = framework_year(framework, year);
  for (const FrameworkStack& entry : framework_stacks()) {
    const bool words =
        std::ranges::all_of(entry.words, [&](const char* w) { return has(text, w); });
    const bool in_years = entry.until_year == 0 || (year && *year <= entry.until_year);
    if (words && in_years) {
      return &entry;
    }
  }
  return nullptr;
}

} // namespace published_detail

std::optional<std::string> published_stack_name(const std::string& framework,
                                                std::optional<int> year) {
  const published_detail::FrameworkStack* entry =
      published_detail::framework_entry(framework, year);
  return entry != nullptr ? std::optional<std::string>(entry->stack) : std::nullopt;
}

} // namespace parallax
