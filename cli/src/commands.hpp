// The parallax subcommands: each registers its flags on a CLI11 app and returns the function
// that runs it. main.cpp maps InputError to exit code 2 and a one-line message.
#pragma once

#include "parallax/core/plan.hpp"

#include <CLI/CLI.hpp>

#include <functional>

namespace parallax::cli {

using Run = std::function<int()>;

Run register_models(CLI::App& app);
Run register_clusters(CLI::App& app);
Run register_plan(CLI::App& app);
Run register_simulate(CLI::App& app);
Run register_train(CLI::App& app);
Run register_calibrate(CLI::App& app);
Run register_compare(CLI::App& app);
Run register_export(CLI::App& app);

} // namespace parallax::cli
