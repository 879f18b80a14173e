#!/bin/bash
# Megatron-LM (core_r0.10) arguments for dp16 tp8 pp8 z1 B1 interleaved(v=2) rc=selective sp=on bf16
torchrun --nnodes 128 --nproc-per-node 8 pretrain_gpt.py \
  --num-layers 96 --hidden-size 12288 --num-attention-heads 96 --seq-length 2048 --max-position-embeddings 2048 \
  --ffn-hidden-size 49152 \
  --micro-batch-size 1 --global-batch-size 1536 \
  --tensor-model-parallel-size 8 --pipeline-model-parallel-size 8 --num-layers-per-virtual-pipeline-stage 6 \
  --sequence-parallel --recompute-granularity selective --use-distributed-optimizer --overlap-grad-reduce --bf16
