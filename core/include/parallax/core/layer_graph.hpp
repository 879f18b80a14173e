// LayerGraph: the model as a DAG of layers, the unit every planner and simulator decision uses.
//
// Each vertex is one Layer. Figures are per sequence (micro-batch size 1, seq_length tokens);
// every cost scales linearly with the micro-batch size B. Letters: s sequence length, h hidden
// size, a attention heads, V vocabulary, L transformer layers (blocks), t tensor-parallel size.
//
// Pipeline stages split the graph by `unit`: a transformer's units are its blocks 0..L-1, with
// the embedding in unit 0 and the final norm, LM head and loss in unit L-1. A Plan's stage
// ranges are [first, last) unit ranges.
#pragma once

#include <boost/graph/adjacency_list.hpp>

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace parallax {

enum class LayerKind {
  embedding,   // token (and position) lookup
  norm,        // LayerNorm / RMSNorm
  linear,      // a GEMM with weights
  attention,   // attention core: QK^T, softmax, dropout, context (batched GEMMs)
  activation,  // GELU, SwiGLU gate
  elementwise, // residual add, dropout, rotary embedding
  loss,        // softmax + cross-entropy
  generic,     // anything described only by its figures (generic JSON graphs)
};

// How a layer is divided among t tensor-parallel ranks (Megatron-LM).
enum class TpSplit {
  replicated, // every rank computes all of it
  column,     // weight split along output features (QKV, MLP up): no forward communication
  row,        // weight split along input features (attention out, MLP down): all-reduce after
  heads,      // attention core: heads divided, no communication
  vocab,      // vocabulary-parallel embedding / logits / loss
  sequence,   // norms, dropout, residuals: replicated, or split along s with sequence parallel
};

// The family of a fused kernel where it changes its speed: the device's best kernel
// (FlashAttention-2 on Ampere, FlashAttention-3 or cuDNN on Hopper), or FlashAttention-2-class
// kernels built on Ampere tensor-core instructions, which run far below peak on Hopper.
enum class FusedKernel { native, flash2 };

inline constexpr std::array<std::string_view, 8> kLayerKindNames = {
    "embedding", "norm", "linear", "attention", "activation", "elementwise", "loss", "generic"};
inline constexpr std::array<std::string_view, 6> kTpSplitNames = {
    "replicated", "column", "row", "heads", "vocab", "sequence"};
inline constexpr std::array<std::string_view, 2> kFusedKernelNames = {"native", "flash2"};

std::string_view layer_kind_name(LayerKind k);
std::string_view tp_split_name(TpSplit s);

// One GEMM: batch × (m × k) · (k × n). FLOPs = 2·batch·m·n·k.
struct Gemm {
  std::int64_t batch = 1;
  std::int64_t m = 0;
  std::int64_t n = 0;
  std::int64_t k = 0;
  double flops() const { return 2.0 * static_cast<double>(batch * m) * static_cast<double>(n * k); }
  bool operator==(const Gemm&) const = default;
};

struct Layer {
  std::string name; // e.g. "block3.mlp.up"
  LayerKind kind = LayerKind::generic;
  TpSplit tp_split = TpSplit::replicated;
  int unit = 0;   // pipeline partition unit
  int block = -1; // transformer block index, -1 outside blocks (embedding, head)

  std::vector<std::int64_t> output_shape; // per sequence, e.g. {s, h}
  std::int64_t params = 0;                // parameter count (weights + biases)
  std::vector<Gemm> gemms;                // forward GEMMs per sequence (before any TP split)
  double fwd_flops = 0;                   // forward FLOPs per sequence (GEMMs + element-wise)
  double bwd_flops = 0;                   // backward model FLOPs per sequence
  // FLOPs the backward executes beyond the model count: a fused (flash) attention backward
  // recomputes QKᵀ and the softmax instead of reading them from memory.
  double bwd_extra_flops = 0;
  bool fused = false; // GEMMs fused in one kernel (flash attention): no intermediate traffic
  FusedKernel kernel = FusedKernel::native; // which family the fused kernel belongs to
  double fwd_mem_elems = 0; // activation elements read + written in forward per sequence
  // Activation elements this layer keeps for backward per sequence (16-bit elements in mixed
  // precision), and 1-byte masks (dropout) kept — Korthikanti et al. 2022, Sec. 4.
  // Saved activations are sharded like the layer's *input*: column-parallel linear layers keep a
  // replicated input (sharded along s with sequence parallel), row / heads / activation layers
  // keep a tensor-parallel shard.
  double saved_act_elems = 0;
  double saved_mask_bytes = 0;
  // Elements live only while the layer runs, beyond those it keeps (sharded like the saved
  // ones): the loss's 16-bit logits and working copies beside the softmax it saves.
  double working_act_elems = 0;
  // Of saved_act_elems, the elements selective recomputation drops (the s² attention tensors);
  // it also drops saved_mask_bytes of such layers and recomputes their forward.
  double selective_saved_elems = 0;
  bool selective_recompute = false;
  // Tensor-parallel all-reduce volume (elements per sequence) after the forward (row-parallel
  // outputs, vocab-parallel embedding) and in the backward (input gradient of column-parallel
  // layers). Under sequence parallel each becomes a reduce-scatter + all-gather pair.
  double tp_fwd_comm_elems = 0;
  double tp_bwd_comm_elems = 0;
  // Mixture of experts: a layer of `experts` routed experts (its params and GEMMs count all of
  // them; each GEMM's batch is one expert) of which each token visits `experts_active` (top-k):
  // its FLOPs and activations are those of the tokens routed, and a token's active parameters
  // are params · experts_active / experts.
  int experts = 0;
  int experts_active = 0;

  bool operator==(const Layer&) const = default;
};

// Model-wide figures the planner needs beyond per-layer costs.
struct GraphInfo {
  std::string name;
  std::string family; // "gpt", "llama", "bert", or "generic"
  int num_layers = 0; // transformer blocks (L)
  std::int64_t seq_length = 0;
  std::int64_t hidden_size = 0;
  int num_attention_heads = 1;
  int num_kv_heads = 1;
  std::int64_t vocab_size = 0;
  std::int64_t ffn_hidden_size = 0; // MLP width (0: not a transformer, or not stated)
  // The LM head shares the embedding matrix; with pp > 1 the last stage keeps its own copy.
  bool tied_embeddings = false;
  // Mixture of experts (0 experts: every MLP dense): routed experts per MoE layer, experts per
  // token (top-k), and the width of one expert's MLP.
  int num_experts = 0;
  int experts_per_token = 0;
  std::int64_t expert_ffn_hidden_size = 0;
  bool operator==(const GraphInfo&) const = default;
};

class LayerGraph {
public:
  using Graph = boost::adjacency_list<boost::vecS, boost::vecS, boost::bidirectionalS, Layer>;
  using Vertex = Graph::vertex_descriptor;

  LayerGraph() = default;
  explicit LayerGraph(GraphInfo info) : info_(std::move(info)) {}

  const GraphInfo& info() const { return info_; }
  GraphInfo& info() { return info_; }
  const Graph& graph() const { return graph_; }

  Vertex add_layer(Layer layer);
  void add_edge(Vertex from, Vertex to);

  std::size_t num_layers() const { return boost::num_vertices(graph_); }
  std::size_t num_edges() const { return boost::num_edges(graph_); }
  const Layer& layer(Vertex v) const { return graph_[v]; }
  std::vector<std::pair<Vertex, Vertex>> edges() const;

  // Vertices in a topological order; throws InputError naming `source` if there is a cycle.
  std::vector<Vertex> topological_order(std::string_view source = "layer graph") const;
  int num_units() const;

  std::int64_t total_params() const;
  // Parameters one token computes with: every layer's, a routed-expert layer's in the share of
  // the experts the token visits (DeepSeek-V3: 37.6B of 671B).
  std::int64_t active_params() const;
  double total_fwd_flops() const;
  double total_bwd_flops() const;
  double total_gemm_flops() const; // forward GEMM FLOPs only
  // The MFU numerator of one sequence, the one definition simulate, train, compare and the
  // reports use: every layer's forward and backward model FLOPs (GEMMs and element-wise), no
  // recomputation (Narayanan et al. 2021's 72·s·L·h²·(1 + s/6h + V/16Lh) within 2% for GPT-3).
  double model_flops_per_sequence() const { return total_fwd_flops() + total_bwd_flops(); }

  bool operator==(const LayerGraph& other) const;

private:
  GraphInfo info_;
  Graph graph_;
};

// Model FLOPs utilisation: `sequences` sequences of `flops_per_sequence` model FLOPs in
// `seconds` on `ranks` devices of `peak_flops` each (0 when the peak is unknown).
inline double model_flops_utilization(double flops_per_sequence, double sequences, double seconds,
                                      int ranks, double peak_flops) {
  return peak_flops > 0 && seconds > 0
             ? flops_per_sequence * sequences / (seconds * ranks * peak_flops)
             : 0.0;
}

} // namespace parallax
