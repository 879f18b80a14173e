// The HTML report: one self-contained page (inline CSS and SVG, no scripts, no network) showing a
// plan search and, when produced by `compare`, simulated against measured runs.
//
// Sections appear when their inputs are present: the ranked plan table, the scatter of candidate
// plans with the Pareto front, the chosen plan's memory breakdown, its timeline, its layer graph
// and device mesh, and simulated vs measured bars with MAPE and Kendall tau.
#pragma once

#include "parallax/simulator/estimate.hpp"
#include "parallax/viz/report_plots.hpp"

#include <optional>
#include <string>
#include <vector>

namespace parallax::viz {

struct ReportPlan {
  PlanEstimate estimate;
  int gpus = 0;
  bool chosen = false;
  bool simulated = false; // figures from the discrete-event simulator (else analytic)
  // plan --uncertainty's 80 % interval of the step and the chance it is the fastest.
  std::optional<double> p10_s, p90_s, p_best;
};

// The chosen plan on degraded hardware (simulate's what-ifs), beside the healthy plan.
struct WhatIf {
  std::string label; // "rank 3 1.5x slower"
  PlanEstimate estimate;
};

struct ReportInput {
  std::string title;
  std::string context;                    // one line: model, cluster, GPUs, global batch
  std::vector<ReportPlan> plans;          // best first
  std::vector<CandidatePoint> candidates; // every timed plan of the search
  double memory_capacity_bytes = 0;
  std::optional<PlanEstimate> chosen; // memory breakdown and headline figures
  // Timelines of the chosen plan (caption, SVG document): simulated, and measured from compare.
  std::vector<std::pair<std::string, std::string>> timelines;
  std::string layer_graph_svg;
  std::string mesh_svg;
  std::vector<ComparedPlan> compared;
  std::optional<double> mape;
  std::optional<double> kendall_tau;
  std::vector<WhatIf> what_ifs;
};

std::string report_html(const ReportInput& input);

// An SVG document without its XML prolog and DOCTYPE, ready to inline in HTML.
std::string svg_for_html(const std::string& svg);

} // namespace parallax::viz
