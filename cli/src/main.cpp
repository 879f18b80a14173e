// parallax: plan, simulate and execute distributed training. Thin subcommands over the
// libraries; every user error becomes one line on standard error and exit code 2.
#include "commands.hpp"

#include "parallax/core/error.hpp"
#include "parallax/core/memory_policy.hpp"

#include <iostream>
#include <map>
#include <string>

int main(int argc, char** argv) {
  // The planner simulates plan after plan and the trainer frees activations every micro-batch.
  parallax::keep_freed_memory();
  parallax::cli::set_command_line(argc, argv);
  CLI::App app{"Parallax: plan, simulate and execute distributed training of large models"};
  app.require_subcommand(1);
  std::map<CLI::App*, parallax::cli::Run> runs;
  auto add = [&](parallax::cli::Run run) { runs[app.get_subcommands({}).back()] = std::move(run); };
  add(parallax::cli::register_models(app));
  add(parallax::cli::register_clusters(app));
  add(parallax::cli::register_stacks(app));
  add(parallax::cli::register_plan(app));
  add(parallax::cli::register_simulate(app));
  add(parallax::cli::register_train(app));
  add(parallax::cli::register_calibrate(app));
  add(parallax::cli::register_compare(app));
  add(parallax::cli::register_export(app));
  add(parallax::cli::register_launch(app));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (auto* sub : app.get_subcommands()) {
      return runs.at(sub)();
    }
  } catch (const parallax::InputError& e) {
    std::cerr << "parallax: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "parallax: internal error: " << e.what() << "\n";
    return 1;
  }
  return 1;
}
