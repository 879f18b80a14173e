#include "parallax/viz/graphviz_render.hpp"

#include "parallax/core/error.hpp"

#include <graphviz/cgraph.h>
#include <graphviz/gvc.h>

#include <memory>
#include <mutex>

namespace parallax::viz {

namespace {

std::mutex& graphviz_mutex() {
  static std::mutex m;
  return m;
}

// Graphviz reports errors through a callback; collect them for the exception message.
std::string& graphviz_errors() {
  static std::string errors;
  return errors;
}

int collect_error(char* message) {
  graphviz_errors() += message;
  return 0;
}

struct GraphCloser {
  void operator()(Agraph_t* g) const { agclose(g); }
};
using GraphPtr = std::unique_ptr<Agraph_t, GraphCloser>;

// Parses under the lock (caller holds it); throws with Graphviz's messages.
GraphPtr parse_locked(const std::string& dot, const std::string& source) {
  graphviz_errors().clear();
  agseterr(AGERR);
  agusererrf previous = agseterrf(collect_error);
  GraphPtr g(agmemread(dot.c_str()));
  agseterrf(previous);
  if (!g) {
    std::string message = graphviz_errors();
    while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) {
      message.pop_back();
    }
    throw InputError(source, "(graph)", "a graph in the DOT language",
                     message.empty() ? "text Graphviz cannot parse" : message);
  }
  return g;
}

} // namespace

void dot_check(const std::string& dot, const std::string& source) {
  std::lock_guard lock(graphviz_mutex());
  parse_locked(dot, source);
}

std::string dot_to_svg(const std::string& dot, const std::string& source) {
  std::lock_guard lock(graphviz_mutex());
  static GVC_t* gvc = gvContext(); // plugins load once; Graphviz keeps them for the process
  PARALLAX_CHECK(gvc != nullptr, "Graphviz context could not be created");
  GraphPtr g = parse_locked(dot, source);
  if (gvLayout(gvc, g.get(), "dot") != 0) {
    throw InputError(source, "(layout)", "a graph the dot layout engine accepts",
                     graphviz_errors().empty() ? "layout failure" : graphviz_errors());
  }
  char* data = nullptr;
  unsigned int length = 0;
  const int rc = gvRenderData(gvc, g.get(), "svg", &data, &length);
  std::string svg = (rc == 0 && data != nullptr) ? std::string(data, length) : std::string();
  gvFreeRenderData(data);
  gvFreeLayout(gvc, g.get());
  PARALLAX_CHECK(rc == 0 && !svg.empty(),
                 "Graphviz could not render SVG (is the core plugin of libgvc installed?)");
  return svg;
}

std::string dot_quote(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    switch (c) {
    case '"':
      out += "\\\"";
      break;
    case '\\':
      out += "\\\\";
      break;
    case '\n':
      out += "\\n";
      break;
    default:
      out += c;
    }
  }
  return out + "\"";
}

} // namespace parallax::viz
