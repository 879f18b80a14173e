#include "parallax/core/error.hpp"
#include "parallax/models/model_loader.hpp"

#include <gtest/gtest.h>

#include <filesystem>

namespace parallax {
namespace {

std::string hf(const char* file) {
  return (std::filesystem::path(PARALLAX_TEST_DATA_DIR) / "hf" / file).string();
}

TEST(HfImport, SameGraphAsZooEntry) {
  const std::pair<const char*, const char*> pairs[] = {{"gpt2.json", "gpt2-124m"},
                                                       {"llama2-7b.json", "llama2-7b"},
                                                       {"llama2-70b.json", "llama2-70b"},
                                                       {"llama3-8b.json", "llama3-8b"},
                                                       {"bert-large.json", "bert-large"}};
  for (const auto& [file, zoo] : pairs) {
    SCOPED_TRACE(file);
    LoadedModel imported = model_load(hf(file));
    LoadedModel reference = model_load(zoo);
    imported.graph.info().name = reference.graph.info().name;
    EXPECT_EQ(imported.graph, reference.graph);
  }
}

TEST(HfImport, OtherFamiliesCountParameters) {
  // Published totals: Mistral-7B-v0.1 7,241,732,096; Pythia-1.4B (GPT-NeoX) 1,414,647,808.
  EXPECT_NEAR(static_cast<double>(model_load(hf("mistral-7b.json")).graph.total_params()) /
                  7241732096.0, 1.0, 0.01);
  EXPECT_NEAR(static_cast<double>(model_load(hf("pythia-1.4b.json")).graph.total_params()) /
                  1414647808.0, 1.0, 0.01);
}

TEST(ModelConfigJson, RoundTripsExactly) {
  for (const char* name : {"gpt3-175b", "llama3-405b", "bert-large", "gpt-tiny"}) {
    LoadedModel m = model_load(name);
    ASSERT_TRUE(m.config.has_value());
    Json doc = model_config_to_json(*m.config);
    EXPECT_EQ(model_config_from_json(doc, "rt"), *m.config);
  }
}

struct BadModel {
  const char* what;
  const char* patch;
  const char* field;
};

TEST(ModelConfigJson, MalformedInputsNameTheField) {
  const Json valid = model_config_to_json(*model_load("gpt2-124m").config);
  const BadModel cases[] = {
      {"missing field", R"({"hidden_size": null})", "/hidden_size"},
      {"wrong type", R"({"num_layers": "12"})", "/num_layers"},
      {"negative size", R"({"vocab_size": -5})", "/vocab_size"},
      {"heads not dividing hidden", R"({"num_attention_heads": 7})", "/num_attention_heads"},
      {"kv heads not dividing heads", R"({"num_kv_heads": 5})", "/num_kv_heads"},
      {"unknown family", R"({"family": "rnn"})", "/family"},
      {"unknown activation", R"({"activation": "relu6"})", "/activation"},
      {"sequence past positions", R"({"seq_length": 4096})", "/seq_length"},
      {"unknown field", R"({"hidden": 768})", "/hidden"},
  };
  for (const auto& bad : cases) {
    SCOPED_TRACE(bad.what);
    Json doc = valid;
    doc.merge_patch(Json::parse(bad.patch));
    try {
      model_from_json(doc, "bad.json");
      ADD_FAILURE() << "accepted";
    } catch (const InputError& e) {
      EXPECT_EQ(e.file(), "bad.json");
      EXPECT_EQ(e.field(), bad.field) << e.what();
    }
  }
  EXPECT_THROW(model_from_json(Json::parse("[1, 2]"), "bad.json"), InputError);
  EXPECT_THROW(model_from_json(Json::parse(R"({"model_type": "t5"})"), "bad.json"), InputError);
  EXPECT_THROW(model_load("no-such-model"), InputError);
}

} // namespace
} // namespace parallax
