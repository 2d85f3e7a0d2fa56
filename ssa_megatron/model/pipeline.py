"""The SSA GPT model as a DeepSpeed PipelineModule of megatron-core pieces.

Stages pass a tuple (hidden [s, b, h], position_ids [b, s], branch code [1] or [b]) down the
pipe. The branch code carries each micro-batch's full/sparse draw to every stage, so a stage that
runs micro-batch m (in whatever order the 1F1B schedule interleaves them) uses m's branch: each
layer gets it in its forward's ``packed_seq_params``, as the PP = 1 trainer hands it to the whole
model, with the documents from the position ids under --reset-attention-mask. The
embedding and the output head share the word embeddings through ``TiedLayerSpec`` (first and
last stage) unless the model has an untied output layer (``OutputLayerPipe`` on the last stage),
and every layer's alignment loss trains on its own stage (model/align_loss.py).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.spec_utils import build_module

from ssa_megatron.model.builder import init_output_layer
from ssa_megatron.model.layer_spec import get_ssa_layer_spec
from ssa_megatron.model.options import scale_rotary_embedding
from ssa_megatron.model.runtime import (collapse_branches, document_packed_seq_params, forward_params,
                                        masked_lm_loss)

BRANCH_CODES = {"full": 1, "sparse": 0}


def branch_code(mode) -> torch.Tensor:
    """[1] code of a micro-batch's branch, or [b] codes for per-sequence draws (a bool tensor)."""
    if isinstance(mode, torch.Tensor):
        return mode.to(torch.int64) * BRANCH_CODES["full"]
    return torch.tensor([BRANCH_CODES[mode]], dtype=torch.int64)


def branch_from_code(code: torch.Tensor):
    return collapse_branches(code.reshape(-1).cpu() == BRANCH_CODES["full"])


class EmbeddingPipe(torch.nn.Module):
    """Token embedding on the first stage; with ``as_head`` the tied output projection."""

    def __init__(self, config, vocab_size: int, max_sequence_length: int):
        super().__init__()
        if config.use_cpu_initialization:
            torch.manual_seed(config.init_seed)  # the same draw as GPTModel's embedding
        self.embedding = LanguageModelEmbedding(config, vocab_size, max_sequence_length,
                                                position_embedding_type="rope")

    @property
    def weight(self):
        return self.embedding.word_embeddings.weight

    def forward(self, inputs):
        tokens, position_ids, code = inputs
        hidden = self.embedding(input_ids=tokens, position_ids=position_ids)
        return hidden, position_ids, code


def lm_head(embed: EmbeddingPipe, inputs):
    """Logits for the local vocabulary shard, [s, b, V / tp], from the tied embedding."""
    hidden = inputs[0] if isinstance(inputs, tuple) else inputs
    hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
    return F.linear(hidden, embed.weight)


class TransformerLayerPipe(torch.nn.Module):
    def __init__(self, config, layer_number: int, rotary_base: float):
        super().__init__()
        self.layer = build_module(get_ssa_layer_spec(config.attention_mode, config.qk_layernorm),
                                  config=config,
                                  layer_number=layer_number)
        self.rotary = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                      rotary_base=rotary_base,
                                      use_cpu_initialization=config.use_cpu_initialization)
        scale_rotary_embedding(self.rotary, config.rope_scaling)
        self.reset_attention_mask = config.reset_attention_mask

    def forward(self, inputs):
        hidden, position_ids, code = inputs
        packed = document_packed_seq_params(position_ids) if self.reset_attention_mask else None
        rotary = self.rotary(hidden.shape[0])
        hidden, _ = self.layer(hidden, attention_mask=None, rotary_pos_emb=rotary,
                               packed_seq_params=forward_params(packed, ssa_branch=branch_from_code(code)))
        return hidden, position_ids, code


class OutputLayerPipe(torch.nn.Module):
    """The untied output layer on the last stage: megatron-core's ColumnParallelLinear, as
    GPTModel's ``output_layer`` (logits for the local vocabulary shard, [s, b, V / tp])."""

    def __init__(self, config, vocab_size: int):
        super().__init__()
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method,
            bias=False, skip_bias_add=False, gather_output=False)
        init_output_layer(self.output_layer.weight, config)

    def forward(self, inputs):
        hidden = inputs[0] if isinstance(inputs, tuple) else inputs
        return self.output_layer(hidden)[0]


class FinalNormPipe(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        # the same norm class as the GPTModel's final norm (apex when present, else torch)
        norm_spec = get_ssa_layer_spec().submodules.input_layernorm
        self.norm = build_module(norm_spec, config=config, hidden_size=config.hidden_size,
                                 eps=config.layernorm_epsilon)

    def forward(self, inputs):
        return self.norm(inputs[0])


def lm_loss_fn(logits: torch.Tensor, labels, fused: bool = False, weight: float = 1.0):
    """Masked mean of the vocab-parallel cross entropy times ``weight`` (the same as the GPTModel
    path; ``fused``: megatron-core's fused native implementation, as --cross-entropy-loss-fusion
    picks there)."""
    labels, loss_mask = labels
    target = labels.transpose(0, 1).contiguous()
    if fused:
        from megatron.core import parallel_state
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
        per_token = fused_vocab_parallel_cross_entropy(
            logits, target, parallel_state.get_tensor_model_parallel_group())
    else:
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), target)
    return masked_lm_loss(per_token.transpose(0, 1), loss_mask, weight)


def build_pipeline_model(config, vocab_size: int, max_sequence_length: int, rotary_base: float,
                         topology, activation_checkpoint_interval: int = 0,
                         partition_method: str = "type:TransformerLayerPipe") -> PipelineModule:
    if config.num_layers % config.pipeline_model_parallel_size:
        raise ValueError(f"{config.num_layers} layers do not split evenly over "
                         f"{config.pipeline_model_parallel_size} pipeline stages")
    """Embedding, N SSA layers, final norm, head (tied, or untied); layers balanced over the stages."""
    layers = [TiedLayerSpec("embed", EmbeddingPipe, config, vocab_size, max_sequence_length,
                            tied_weight_attr=["weight"])]
    # megatron numbers a stage's layers from 1 and adds the stage offset itself; the uniform
    # split below matches its offset (num_layers / pp per stage)
    per_stage = config.num_layers // config.pipeline_model_parallel_size
    layers += [LayerSpec(TransformerLayerPipe, config, i % per_stage + 1, rotary_base)
               for i in range(config.num_layers)]
    layers.append(LayerSpec(FinalNormPipe, config))
    if config.untie_embeddings_and_output_weights:
        layers.append(LayerSpec(OutputLayerPipe, config, vocab_size))
    else:
        layers.append(TiedLayerSpec("embed", EmbeddingPipe, config, vocab_size, max_sequence_length,
                                    forward_fn=lm_head, tied_weight_attr=["weight"]))
    loss_fn = functools.partial(lm_loss_fn, fused=bool(config.cross_entropy_loss_fusion),
                                weight=config.lm_loss_weight)
    return PipelineModule(layers=layers, loss_fn=loss_fn, topology=topology,
                          partition_method=partition_method,
                          activation_checkpoint_interval=activation_checkpoint_interval,
                          # only transformer layers: a checkpointed embedding would cut the graph
                          # (its input, the token ids, needs no grad)
                          checkpointable_layers=["TransformerLayerPipe"])


def gpt_model_name(index: int, key: str) -> Optional[str]:
    """GPTModel name of entry ``key`` of pipe layer ``index`` in :func:`build_pipeline_model`'s
    list [embedding, N transformer layers, final norm, head]; None for entries with no such name
    (the layers' RoPE buffers). Checkpoints (layer_LL-model_XX files) and parameters use it."""
    if key.startswith(("embedding.", "output_layer.")):
        return key  # EmbeddingPipe (the tied head is the same module), OutputLayerPipe
    if key.startswith("layer."):
        return f"decoder.layers.{index - 1}.{key[len('layer.'):]}"
    if key.startswith("norm."):
        return "decoder.final_layernorm." + key[len("norm."):]
    return None


def gpt_param_name(name: str) -> Optional[str]:
    """GPTModel name of a parameter of the pipeline model (``named_parameters()``: tied modules
    apart, the others by layer index) or of a GPTModel (as it is)."""
    name = name.removeprefix("module.")
    if name.startswith("tied_modules.embed."):
        return name.removeprefix("tied_modules.embed.")
    if name.startswith(("embedding.", "decoder.", "output_layer.")):
        return name
    index, _, key = name.partition(".")
    return gpt_model_name(int(index), key) if index.isdigit() else None
