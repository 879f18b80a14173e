// Graphviz in process: DOT text → SVG through the gvc/cgraph C libraries (no `dot` binary).
//
// Graphviz keeps global state and is not thread-safe; every call here takes one process-wide
// lock. Layout uses the "dot" engine (hierarchical), which suits layer graphs and meshes.
#pragma once

#include <string>

namespace parallax::viz {

// Parses `dot`; throws InputError naming `source` with Graphviz's own message on a syntax error.
void dot_check(const std::string& dot, const std::string& source = "DOT");

// Lays `dot` out and renders it as a standalone SVG document.
std::string dot_to_svg(const std::string& dot, const std::string& source = "DOT");

// Double-quoted DOT string: backslashes and quotes escaped, newlines as centred line breaks.
std::string dot_quote(const std::string& text);

} // namespace parallax::viz
