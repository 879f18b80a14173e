#include "parallax/viz/svg_writer.hpp"

#include <fmt/format.h>

namespace parallax::viz {

std::string xml_escape(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    switch (c) {
    case '&':
      out += "&amp;";
      break;
    case '<':
      out += "&lt;";
      break;
    case '>':
      out += "&gt;";
      break;
    case '"':
      out += "&quot;";
      break;
    case '\'':
      out += "&apos;";
      break;
    default:
      out += c;
    }
  }
  return out;
}

SvgWriter::SvgWriter(double width, double height) : width_(width), height_(height) {}

void SvgWriter::rect(double x, double y, double w, double h, const std::string& fill,
                     const std::string& title, const std::string& extra) {
  body_ +=
      fmt::format(R"(<rect x="{:.2f}" y="{:.2f}" width="{:.2f}" height="{:.2f}" fill="{}"{}{})", x,
                  y, w, h, xml_escape(fill), extra.empty() ? "" : " ", extra);
  body_ += title.empty() ? "/>\n" : fmt::format("><title>{}</title></rect>\n", xml_escape(title));
}

void SvgWriter::line(double x1, double y1, double x2, double y2, const std::string& stroke,
                     double width, const std::string& extra) {
  body_ += fmt::format(
      R"(<line x1="{:.2f}" y1="{:.2f}" x2="{:.2f}" y2="{:.2f}" stroke="{}" stroke-width="{:.2f}"{}{}/>)",
      x1, y1, x2, y2, xml_escape(stroke), width, extra.empty() ? "" : " ", extra);
  body_ += "\n";
}

void SvgWriter::circle(double cx, double cy, double r, const std::string& fill,
                       const std::string& title, const std::string& extra) {
  body_ += fmt::format(R"(<circle cx="{:.2f}" cy="{:.2f}" r="{:.2f}" fill="{}"{}{})", cx, cy, r,
                       xml_escape(fill), extra.empty() ? "" : " ", extra);
  body_ += title.empty() ? "/>\n" : fmt::format("><title>{}</title></circle>\n", xml_escape(title));
}

void SvgWriter::text(double x, double y, const std::string& text, double size,
                     const std::string& anchor, const std::string& extra) {
  body_ += fmt::format(
      R"(<text x="{:.2f}" y="{:.2f}" font-size="{:.1f}" text-anchor="{}"{}{}>{}</text>)", x, y,
      size, anchor, extra.empty() ? "" : " ", extra, xml_escape(text));
  body_ += "\n";
}

std::string SvgWriter::finish() const {
  return fmt::format(R"(<svg xmlns="http://www.w3.org/2000/svg" width="{:.0f}" height="{:.0f}" )"
                     R"(viewBox="0 0 {:.0f} {:.0f}" font-family="Helvetica, Arial, sans-serif">)"
                     "\n{}</svg>\n",
                     width_, height_, width_, height_, body_);
}

} // namespace parallax::viz
