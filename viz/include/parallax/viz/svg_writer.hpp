// A small SVG builder for the pictures Parallax draws itself (timelines, plots): elements are
// appended as text with every attribute value and text node escaped.
#pragma once

#include <string>

namespace parallax::viz {

// Escapes &, <, >, " and ' for XML text and attribute values.
std::string xml_escape(const std::string& text);

class SvgWriter {
public:
  SvgWriter(double width, double height);

  void rect(double x, double y, double w, double h, const std::string& fill,
            const std::string& title = {}, const std::string& extra = {});
  void line(double x1, double y1, double x2, double y2, const std::string& stroke, double width = 1,
            const std::string& extra = {});
  void circle(double cx, double cy, double r, const std::string& fill,
              const std::string& title = {}, const std::string& extra = {});
  // anchor: "start", "middle" or "end".
  void text(double x, double y, const std::string& text, double size = 11,
            const std::string& anchor = "start", const std::string& extra = {});
  void raw(const std::string& markup) { body_ += markup; }

  // The document: an <svg> root with the xmlns, a viewBox and the elements appended.
  std::string finish() const;

private:
  double width_;
  double height_;
  std::string body_;
};

} // namespace parallax::viz
