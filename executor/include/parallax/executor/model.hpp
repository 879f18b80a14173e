// The executor's model: GPT and Llama transformers as parameter blocks with Megatron tensor
// parallelism, and the forward and backward passes of each block kind.
//
// Parameters are grouped in blocks — the token embedding, the learned positions, each
// transformer layer, the final norm, the LM head — and each block's local shard lives in one
// flat buffer padded to a multiple of the data-parallel size, so ZeRO sharding is slicing.
// Initial values are a pure function of (seed, logical name, logical element index), so every
// plan starts from the same logical weights.
#pragma once

#include "parallax/core/plan.hpp"
#include "parallax/executor/comm.hpp"
#include "parallax/executor/tensor.hpp"
#include "parallax/models/model_config.hpp"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

namespace parallax {

// How a logical [rows, cols] tensor is split over the tensor-parallel group.
enum class ShardDim { none, rows, cols };
enum class Init { normal, ones, zeros };

struct ParamInfo {
  std::string name;      // logical name, e.g. "block3.attn.wq"
  std::int64_t rows = 0; // logical shape
  std::int64_t cols = 0;
  ShardDim split = ShardDim::none;
  std::int64_t row0 = 0; // this rank's shard: rows [row0, row0 + local_rows) ...
  std::int64_t col0 = 0; // ... and cols [col0, col0 + local_cols) of the logical tensor
  std::int64_t local_rows = 0;
  std::int64_t local_cols = 0;
  std::int64_t offset = 0; // position in the block's flat buffer
  Init init = Init::normal;
  float init_std = 0.02f;
  bool decay = false; // AdamW weight decay applies (matrices, not norms or biases)
  // Under sequence parallelism a replicated parameter sees only this rank's part of the
  // sequence, so its gradient is summed over the tensor-parallel group.
  bool sp_partial = false;
  bool tied_copy = false; // the LM head's copy of the tied token embedding
  std::int64_t local_size() const { return local_rows * local_cols; }
  // The shard's rows / columns inside the logical tensor: fewer than local_rows / local_cols
  // on the last TP ranks of a padded vocabulary (the padding stays zero and is never trained).
  std::int64_t valid_rows() const { return std::clamp<std::int64_t>(rows - row0, 0, local_rows); }
  std::int64_t valid_cols() const { return std::clamp<std::int64_t>(cols - col0, 0, local_cols); }
};

// `experts`: a mixture-of-experts layer's routed experts (those of this rank's EP rank), in a
// block of their own after their layer's, sharded and reduced over the expert-data-parallel
// ranks; it runs with its layer.
enum class BlockKind { embedding, positions, layer, experts, final_norm, head };

struct BlockLayout {
  BlockKind kind = BlockKind::layer;
  std::string name; // "embedding", "positions", "block3", "final_norm", "head"
  int unit = 0;     // partition unit (transformer layer) it belongs to
  std::vector<ParamInfo> params;
  std::int64_t numel = 0;  // parameters in the flat buffer
  std::int64_t padded = 0; // numel rounded up to a multiple of dp
  const ParamInfo& param(std::string_view suffix) const;
};

// Shape facts the executor needs from a model config, validated for it (GPT or Llama family,
// learned or rotary positions, head dimension even for RoPE).
struct ExecModel {
  ModelConfig config;
  float norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  static ExecModel from_config(const ModelConfig& config, const std::string& source);
  bool llama() const { return config.activation == "swiglu"; }
  bool rmsnorm() const { return config.norm == "rmsnorm"; }
  bool rope() const { return config.position_embedding == "rope"; }
};

// The blocks of stage chunk `units` ([first, last) layers) on a rank at tensor-parallel rank
// tp_rank of tp, padded for dp data-parallel ranks (dp·cp). Under expert parallelism the
// experts blocks hold experts [ep_rank·E/ep, (ep_rank+1)·E/ep), padded for the dp / ep ranks
// holding them.
std::vector<BlockLayout> chunk_layout(const ExecModel& model, StageRange units, int tp, int tp_rank,
                                      int dp, int ep = 1, int ep_rank = 0);

// Every logical parameter of the model (name, shape), in model order; the tied copy excluded.
std::vector<ParamInfo> logical_params(const ExecModel& model);

// Fills a block's flat buffer (size padded) with the initial values of its local shards.
void init_block(const BlockLayout& block, std::uint64_t seed, std::span<float> flat);

// Model FLOPs of one training step per sequence: the layer graph's definition
// (LayerGraph::model_flops_per_sequence), so train and simulate report the same MFU.
double model_flops_per_sequence(const ExecModel& model);

// Seconds on the steady clock (the executor's time base for measured timelines).
double steady_seconds();

// ---- Forward and backward passes ----

// Tensor-parallel context of one rank: the TP communicator (size 1 when tp = 1) and the
// sequence-parallel switch.
struct TpContext {
  Communicator* comm = nullptr;
  bool sequence_parallel = false;
  // When set, each tensor-parallel collective reports what it was, when it ran (steady-clock
  // seconds) and the bytes it moved — the measured timeline's tp-comm events.
  std::function<void(const char* what, double start_s, double end_s, double bytes)> on_comm;
  int size() const { return comm ? comm->size() : 1; }
  int rank() const { return comm ? comm->rank() : 0; }
  // Context parallelism: the ranks holding the other chunks of the same sequences (null: cp 1).
  Communicator* cp_comm = nullptr;
  // How the CP ranks exchange K/V: passed around the ring with a running softmax (the plan's
  // cp_comm p2p), or all-gathered.
  bool cp_ring = true;
  int cp_size() const { return cp_comm ? cp_comm->size() : 1; }
  int cp_rank() const { return cp_comm ? cp_comm->rank() : 0; }
  // Expert parallelism: the ranks (of the same tensor-parallel rank) splitting the routed
  // experts, experts [r·E/ep, (r+1)·E/ep) computed on EP rank r (null: ep 1).
  Communicator* ep_comm = nullptr;
  int ep_size() const { return ep_comm ? ep_comm->size() : 1; }
  int ep_rank() const { return ep_comm ? ep_comm->rank() : 0; }
};

// Context parallelism with causal load balancing: a sequence of `seq` tokens split into 2·cp
// chunks, of which rank i holds chunks i and 2·cp − 1 − i, in that order. The positions in the
// whole sequence of the rank's seq / cp tokens.
std::vector<std::int32_t> context_chunk_positions(Eigen::Index seq, int cp, int cp_rank);

// One micro-batch's data as every chunk sees it: rows = batch · seq, batch-major.
struct MicroBatch {
  Eigen::Index batch = 0;
  Eigen::Index seq = 0;
  std::vector<std::int32_t> inputs;    // batch · seq tokens
  std::vector<std::int32_t> targets;   // batch · seq next tokens
  std::vector<std::int32_t> positions; // position of each row of this rank's activations
  // Context parallelism: the position in the whole sequence of each of this rank's seq tokens
  // of a sequence (context_chunk_positions); empty: 0 … seq − 1.
  std::vector<std::int32_t> seq_positions;
  std::int32_t seq_position(Eigen::Index i) const {
    return seq_positions.empty() ? static_cast<std::int32_t>(i)
                                 : seq_positions[static_cast<std::size_t>(i)];
  }
  // The gradient scale of one token's loss (1 / tokens of the global batch): a mixture of
  // experts' load-balancing loss is weighted like the token loss.
  float loss_scale = 0;
};

// What one block keeps from its forward for its backward.
struct BlockCache {
  std::vector<Tensor> t; // by slot, see model.cpp
};

// Parameter and gradient views of one block (into its flat buffers).
struct BlockBuffers {
  const BlockLayout* layout = nullptr;
  const float* params = nullptr;
  float* grads = nullptr;
  // A mixture-of-experts layer's experts block (its "moe.e<j>.*" parameters), when it has one.
  const BlockLayout* experts_layout = nullptr;
  const float* experts_params = nullptr;
  float* experts_grads = nullptr;
  ConstMatRef p(std::string_view suffix) const;
  MatRef g(std::string_view suffix) const;
};

enum class KeepMode { all, no_attention_probs, input_only };

// Transformer layer: x [rows_local, h] → y. `keep` decides what the cache holds; with
// input_only the backward reruns the forward (full recomputation), with no_attention_probs it
// recomputes the attention probabilities (selective recomputation).
Tensor layer_forward(const ExecModel& model, const BlockBuffers& b, const TpContext& tp,
                     const MicroBatch& mb, const Tensor& x, KeepMode keep, BlockCache& cache);
// Full recomputation: when the cache holds only the input (input_only), reruns the forward so
// it holds what the backward reads; otherwise nothing. layer_backward calls it first.
void layer_recompute(const ExecModel& model, const BlockBuffers& b, const TpContext& tp,
                     const MicroBatch& mb, BlockCache& cache);
Tensor layer_backward(const ExecModel& model, const BlockBuffers& b, const TpContext& tp,
                      const MicroBatch& mb, const Tensor& dy, BlockCache& cache);

// Embedding (+ learned positions when `positions` is given): tokens → x [rows_local, h].
Tensor embedding_forward(const ExecModel& model, const BlockBuffers& emb,
                         const BlockBuffers* positions, const TpContext& tp, const MicroBatch& mb);
void embedding_backward(const ExecModel& model, const BlockBuffers& emb,
                        const BlockBuffers* positions, const TpContext& tp, const MicroBatch& mb,
                        const Tensor& dx);

// Final norm + LM head + vocabulary-parallel cross-entropy. Returns the sum of the per-token
// losses of the micro-batch and fills the cache; head_backward returns dx for the chunk's input
// with the loss gradient scaled by loss_scale (1 / tokens in the global batch).
double head_forward(const ExecModel& model, const BlockBuffers& norm, const BlockBuffers& head,
                    const TpContext& tp, const MicroBatch& mb, const Tensor& x, BlockCache& cache);
Tensor head_backward(const ExecModel& model, const BlockBuffers& norm, const BlockBuffers& head,
                     const TpContext& tp, const MicroBatch& mb, float loss_scale,
                     BlockCache& cache);

} // namespace parallax
