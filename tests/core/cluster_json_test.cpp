#include "parallax/core/cluster_json.hpp"
#include "parallax/core/error.hpp"
#include "parallax/core/zoo_path.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"

#include <gtest/gtest.h>

namespace parallax {
namespace {

TEST(ClusterJson, EveryZooProfileRoundTripsExactly) {
  auto names = zoo_list(ZooKind::clusters);
  ASSERT_GE(names.size(), 5U);
  for (const auto& name : names) {
    SCOPED_TRACE(name);
    Cluster c = cluster_load(name);
    Json doc = cluster_to_json(c);
    EXPECT_EQ(cluster_from_json(doc, "roundtrip"), c);
    EXPECT_EQ(cluster_to_json(cluster_from_json(doc, "roundtrip")), doc);
  }
}

TEST(ClusterZoo, RequiredProfilesWithSensibleFigures) {
  for (const char* name : {"dgx-a100-40g", "dgx-a100-80g", "dgx-h100", "dgx-h200", "cpu-local"}) {
    SCOPED_TRACE(name);
    Cluster c = cluster_load(name);
    EXPECT_EQ(c.name, name);
    EXPECT_FALSE(c.notes.empty()) << "every profile names its sources";
    EXPECT_GT(c.device.memory_gib, 0);
  }
  Cluster h100 = cluster_load("dgx-h100");
  EXPECT_TRUE(h100.supports(Precision::fp8));
  EXPECT_DOUBLE_EQ(h100.peak_flops(Precision::bf16), 989e12);
  Cluster a100 = cluster_load("dgx-a100-80g");
  EXPECT_FALSE(a100.supports(Precision::fp8));
  EXPECT_THROW(a100.peak_flops(Precision::fp8), InputError);
  EXPECT_EQ(a100.node.devices_per_node, 8);
}

TEST(ClusterResize, GpusSetNodeCount) {
  Cluster c = cluster_load("dgx-a100-80g");
  EXPECT_EQ(c.with_devices(1024).network.num_nodes, 128);
  EXPECT_EQ(c.with_devices(4).num_devices(), 4);
  EXPECT_THROW(c.with_devices(12), InputError);
  EXPECT_THROW(c.with_devices(0), InputError);
}

struct BadCluster {
  const char* what;
  const char* patch; // JSON merge patch applied to a valid profile
  const char* field;
};

TEST(ClusterJson, MeasuredCollectivesRoundTrip) {
  Cluster c = cluster_load("cpu-local");
  c.node.devices_per_node = 4;
  c.node.measured_collectives = {{2, 1, 3.5, 4.25}, {2, 2, 4.0, 3.0}, {4, 1, 5.0, 2.5}};
  const Json doc = cluster_to_json(c);
  EXPECT_EQ(cluster_from_json(doc, "measured.json"), c);
  EXPECT_EQ(doc.at("node").at("measured_collectives").size(), 3u);
  c.device.optimizer_efficiency = 0.31;
  EXPECT_EQ(cluster_from_json(cluster_to_json(c), "measured.json"), c);
}

TEST(ClusterJson, MalformedInputsNameTheField) {
  const Json valid = cluster_to_json(cluster_load("dgx-a100-80g"));
  const BadCluster cases[] = {
      {"missing device", R"({"device": null})", "/device"},
      {"wrong type", R"({"device": {"memory_gib": "80"}})", "/device/memory_gib"},
      {"negative size", R"({"device": {"memory_gib": -80}})", "/device/memory_gib"},
      {"zero bandwidth", R"({"node": {"intra_bandwidth_gbps": 0}})", "/node/intra_bandwidth_gbps"},
      {"unknown precision", R"({"device": {"peak_tflops": {"fp64": 9.7}}})",
       "/device/peak_tflops/fp64"},
      {"unknown field", R"({"devcie": {}})", "/devcie"},
      {"bad topology", R"({"network": {"topology": "torus"}})", "/network/topology"},
      {"undersubscribed", R"({"network": {"oversubscription": 0.5}})", "/network/oversubscription"},
      {"zero nodes", R"({"network": {"num_nodes": 0}})", "/network/num_nodes"},
      {"efficiency above 1",
       R"({"device": {"gemm_efficiency": [{"flops": 1e9, "efficiency": 1.5}]}})",
       "/device/gemm_efficiency/0/efficiency"},
      {"optimizer efficiency above 1", R"({"device": {"optimizer_efficiency": 1.2}})",
       "/device/optimizer_efficiency"},
      {"flash2 efficiency above 1", R"({"device": {"flash2_attention_efficiency": 1.5}})",
       "/device/flash2_attention_efficiency"},
      {"measured group larger than a node",
       R"({"node": {"measured_collectives": [{"group_size": 16, "bus_bandwidth_gbps": 5}]}})",
       "/node/measured_collectives/0/group_size"},
      {"measured bandwidth zero",
       R"({"node": {"measured_collectives": [{"group_size": 2, "bus_bandwidth_gbps": 0}]}})",
       "/node/measured_collectives/0/bus_bandwidth_gbps"},
  };
  for (const auto& bad : cases) {
    SCOPED_TRACE(bad.what);
    Json doc = valid;
    doc.merge_patch(Json::parse(bad.patch));
    try {
      cluster_from_json(doc, "bad.json");
      ADD_FAILURE() << "accepted";
    } catch (const InputError& e) {
      EXPECT_EQ(e.file(), "bad.json");
      EXPECT_EQ(e.field(), bad.field) << e.what();
    }
  }
}

} // namespace
} // namespace parallax
