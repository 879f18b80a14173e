// Feeds arbitrary bytes to every JSON loader: each must either accept the input or throw
// InputError — never crash, hang, or throw anything else. The first byte picks the loader.
#include "parallax/core/cluster_json.hpp"
#include "parallax/core/error.hpp"
#include "parallax/core/layer_graph_json.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/core/stack_json.hpp"
#include "parallax/core/timeline_json.hpp"
#include "parallax/models/model_loader.hpp"

#include <cstdint>
#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) {
    return 0;
  }
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  try {
    parallax::Json doc = parallax::json_parse_text(text, "fuzz.json");
    switch (data[0] % 6) {
    case 0:
      parallax::cluster_from_json(doc, "fuzz.json");
      break;
    case 1:
      parallax::plan_from_json(doc, "fuzz.json");
      break;
    case 2:
      parallax::model_from_json(doc, "fuzz.json");
      break;
    case 3:
      parallax::layer_graph_from_json(doc, "fuzz.json");
      break;
    case 4:
      parallax::timeline_from_chrome_trace(doc, "fuzz.json");
      break;
    default:
      parallax::stack_from_json(doc, "fuzz.json");
      break;
    }
  } catch (const parallax::InputError&) {
    // Rejected with a message: the expected outcome for malformed input.
  }
  return 0;
}
