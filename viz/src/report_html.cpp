#include "parallax/viz/report_html.hpp"

#include "parallax/viz/palette.hpp"
#include "parallax/viz/svg_writer.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace parallax::viz {

namespace {

constexpr const char* kStyle = R"(
body { font-family: Helvetica, Arial, sans-serif; margin: 24px 32px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; }
h2 { font-size: 17px; margin-top: 32px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.context { color: #555; margin-bottom: 16px; }
.figures span { display: inline-block; margin-right: 24px; }
.figures b { font-size: 18px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f5f5f5; }
td.plan { text-align: left; font-family: monospace; }
tr.chosen { background: #fff7d6; font-weight: bold; }
.picture { overflow: auto; max-height: 900px; border: 1px solid #eee; padding: 4px; }
.note { color: #666; font-size: 12px; }
)";

std::string section(const std::string& id, const std::string& title, const std::string& body) {
  return fmt::format("<section id=\"{}\">\n<h2>{}</h2>\n{}\n</section>\n", id, xml_escape(title),
                     body);
}

std::string plan_table(const std::vector<ReportPlan>& plans) {
  std::string rows;
  const bool intervals = !plans.empty() && plans.front().p10_s.has_value();
  for (std::size_t i = 0; i < plans.size(); ++i) {
    const auto& p = plans[i];
    const auto& e = p.estimate;
    const auto& b = e.breakdown;
    const double t = std::max(e.iteration_time_s, 1e-30);
    const std::string interval = intervals && p.p10_s && p.p90_s && p.p_best
                                     ? fmt::format("<td>{:.4f}–{:.4f}</td><td>{:.0f}%</td>",
                                                   *p.p10_s, *p.p90_s, 100 * *p.p_best)
                                     : std::string(intervals ? "<td></td><td></td>" : "");
    rows += fmt::format(
        "<tr{}><td>{}</td><td class=\"plan\">{}</td><td>{}</td><td>{:.4f}</td>{}<td>{:.0f}</td>"
        "<td>{:.1f}%</td><td>{}</td><td>{:.0f}%</td><td>{:.0f}%</td><td>{:.0f}%</td><td>{:.0f}%"
        "</td><td>{:.0f}%</td><td>{}</td><td>{}</td></tr>\n",
        p.chosen ? " class=\"chosen\"" : "", i + 1, xml_escape(plan_label(e.plan)), p.gpus,
        e.iteration_time_s, interval, e.tokens_per_s, 100 * e.mfu,
        xml_escape(format_bytes(e.memory.total())), 100 * b.compute / t, 100 * b.tp_comm / t,
        100 * b.pp_comm / t, 100 * b.dp_comm / t, 100 * b.bubble / t, xml_escape(e.bottleneck),
        p.simulated ? "simulated" : "analytic");
  }
  return "<table>\n<tr><th>#</th><th>plan</th><th>GPUs</th><th>step s</th>" +
         std::string(intervals ? "<th>80% interval s</th><th>fastest</th>" : "") +
         "<th>tokens/s</th><th>MFU</th><th>memory/GPU</th><th>compute</th><th>TP</th><th>PP</"
         "th><th>DP</th>"
         "<th>bubble</th><th>bottleneck</th><th>figures</th></tr>\n" +
         rows + "</table>\n";
}

std::string what_if_table(const ReportInput& in) {
  const double healthy = in.chosen ? in.chosen->iteration_time_s : 0.0;
  std::string rows =
      fmt::format("<tr><td>healthy</td><td>{:.4f}</td><td>1.00×</td><td>{}</td></tr>\n", healthy,
                  in.chosen ? xml_escape(in.chosen->bottleneck) : "");
  for (const WhatIf& w : in.what_ifs) {
    rows += fmt::format("<tr><td>{}</td><td>{:.4f}</td><td>{:.2f}×</td><td>{}</td></tr>\n",
                        xml_escape(w.label), w.estimate.iteration_time_s,
                        healthy > 0 ? w.estimate.iteration_time_s / healthy : 0.0,
                        xml_escape(w.estimate.bottleneck));
  }
  return "<table>\n<tr><th>hardware</th><th>step s</th><th>against healthy</th>"
         "<th>bottleneck</th></tr>\n" +
         rows + "</table>\n";
}

std::string compare_table(const ReportInput& in) {
  std::string rows;
  for (std::size_t i = 0; i < in.compared.size(); ++i) {
    const auto& p = in.compared[i];
    const double err = p.measured_step_s > 0 ? p.simulated_step_s / p.measured_step_s - 1 : 0;
    const double mem_err = p.measured_peak_memory_bytes > 0
                               ? p.simulated_peak_memory_bytes / p.measured_peak_memory_bytes - 1
                               : 0;
    rows += fmt::format("<tr><td>{}</td><td class=\"plan\">{}</td><td>{:.2f}</td><td>{:.2f}</td>"
                        "<td>{:+.1f}%</td><td>{}</td><td>{}</td><td>{:+.1f}%</td></tr>\n",
                        i + 1, xml_escape(plan_label(p.plan)), 1e3 * p.measured_step_s,
                        1e3 * p.simulated_step_s, 100 * err,
                        xml_escape(format_bytes(p.measured_peak_memory_bytes)),
                        xml_escape(format_bytes(p.simulated_peak_memory_bytes)), 100 * mem_err);
  }
  std::string summary;
  if (in.mape) {
    summary += fmt::format("mean absolute percentage error <b>{:.1f}%</b>", 100 * *in.mape);
  }
  if (in.kendall_tau) {
    summary +=
        fmt::format("{}Kendall tau <b>{:.2f}</b>", summary.empty() ? "" : " · ", *in.kendall_tau);
  }
  return fmt::format("<p>{}</p>\n<table>\n<tr><th>#</th><th>plan</th><th>measured ms</th>"
                     "<th>simulated ms</th><th>error</th><th>measured peak</th>"
                     "<th>simulated peak</th><th>error</th></tr>\n{}</table>\n",
                     summary, rows);
}

// The first plan's ops with both times, largest misses first (what calibration fixes next).
std::string op_table(const ComparedPlan& p, std::size_t max_rows = 40) {
  std::vector<const ComparedOp*> ops;
  for (const ComparedOp& op : p.ops) {
    if (op.simulated_s && op.measured_s)
      ops.push_back(&op);
  }
  std::stable_sort(ops.begin(), ops.end(), [](const ComparedOp* a, const ComparedOp* b) {
    return std::abs(*a->simulated_s - *a->measured_s) > std::abs(*b->simulated_s - *b->measured_s);
  });
  std::string rows;
  for (std::size_t i = 0; i < ops.size() && i < max_rows; ++i) {
    const ComparedOp& op = *ops[i];
    const double err = *op.measured_s > 0 ? *op.simulated_s / *op.measured_s - 1 : 0;
    rows += fmt::format("<tr><td>{}</td><td class=\"plan\">{}</td><td>{}</td><td>{:.3f}</td>"
                        "<td>{:.3f}</td><td>{:+.1f}%</td></tr>\n",
                        op.rank, xml_escape(op.name), xml_escape(op.category), 1e3 * *op.measured_s,
                        1e3 * *op.simulated_s, 100 * err);
  }
  return fmt::format("<h3>Per op, plan 1 ({} of {} ops with both times, largest misses first)"
                     "</h3>\n<table>\n<tr><th>rank</th><th>op</th><th>category</th>"
                     "<th>measured ms</th><th>simulated ms</th><th>error</th></tr>\n{}</table>\n",
                     std::min(ops.size(), max_rows), ops.size(), rows);
}

std::string picture(const std::string& svg) {
  return "<div class=\"picture\">\n" + svg_for_html(svg) + "</div>\n";
}

} // namespace

std::string svg_for_html(const std::string& svg) {
  const auto start = svg.find("<svg");
  return start == std::string::npos ? svg : svg.substr(start);
}

std::string report_html(const ReportInput& in) {
  std::string body;
  body += fmt::format("<h1>{}</h1>\n<div class=\"context\">{}</div>\n", xml_escape(in.title),
                      xml_escape(in.context));
  if (in.chosen) {
    const auto& e = *in.chosen;
    body +=
        fmt::format("<div class=\"figures\"><span>plan <b>{}</b></span><span>step <b>{}</b></span>"
                    "<span>tokens/s <b>{:.0f}</b></span><span>MFU <b>{:.1f}%</b></span>"
                    "<span>memory/GPU <b>{}</b></span></div>\n",
                    xml_escape(plan_label(e.plan)), xml_escape(format_seconds(e.iteration_time_s)),
                    e.tokens_per_s, 100 * e.mfu, xml_escape(format_bytes(e.memory.total())));
  }
  if (!in.compared.empty()) {
    body += section("compare", "Simulated vs measured",
                    compare_table(in) + picture(compare_bars_svg(in.compared)) +
                        "<p class=\"note\">Bars stack each timeline's breakdown; the black tick "
                        "is the step time.</p>" +
                        op_table(in.compared.front()) + "<h3>Per-op error, every plan</h3>\n" +
                        picture(op_error_histogram_svg(in.compared)));
  }
  if (!in.plans.empty()) {
    body += section("plans", "Ranked plans", plan_table(in.plans));
  }
  if (!in.what_ifs.empty()) {
    body += section("what-if", "The chosen plan on degraded hardware", what_if_table(in));
  }
  if (!in.candidates.empty()) {
    body += section("candidates", "Candidate plans: throughput against memory",
                    picture(candidates_scatter_svg(in.candidates, in.memory_capacity_bytes)));
  }
  if (in.chosen) {
    body += section("memory", "Memory of the chosen plan",
                    picture(memory_breakdown_svg(in.chosen->memory, in.memory_capacity_bytes)));
  }
  if (!in.timelines.empty()) {
    std::string pictures;
    for (const auto& [caption, svg] : in.timelines) {
      pictures += fmt::format("<h3>{}</h3>\n", xml_escape(caption)) + picture(svg);
    }
    body += section("timeline", "Timeline of one iteration", pictures);
  }
  if (!in.layer_graph_svg.empty()) {
    body += section("layer-graph", "Layer graph by pipeline stage", picture(in.layer_graph_svg));
  }
  if (!in.mesh_svg.empty()) {
    body += section("mesh", "Device mesh", picture(in.mesh_svg));
  }
  return fmt::format("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n"
                     "<title>{}</title>\n<style>{}</style>\n</head>\n<body>\n{}</body>\n</html>\n",
                     xml_escape(in.title), kStyle, body);
}

} // namespace parallax::viz
