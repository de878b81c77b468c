"""The parts models are assembled from: item and position embeddings, self-attention, feed-forward, LiGR's gated
layer, the Mamba-1 and Mamba-2 (SSD) mixers, a cheaper CPU dropout, the output bias of a tied head, and weight inits.
Each part keeps its parameters in a fixed creation order, so a model assembled from them initialises exactly as
before."""

from recsys.nn.attention import MultiHeadSelfAttention
from recsys.nn.dropout import FastDropout
from recsys.nn.embedding import ItemEmbedding, PositionEmbedding, left_pad_positions
from recsys.nn.feedforward import FeedForward, ResidualFeedForward
from recsys.nn.heads import biased_queries, biased_table
from recsys.nn.init import normal_init, truncated_normal_init, xavier_init, zero_padding_rows
from recsys.nn.layers import MixerLayer
from recsys.nn.ligr import GatedTransformerLayer
from recsys.nn.mamba import Backend, MambaBlock, conv_backend
from recsys.nn.ssd import RMSNormGated, SSDBlock

__all__ = [
    "Backend", "FastDropout", "FeedForward", "GatedTransformerLayer", "ItemEmbedding", "MambaBlock", "MixerLayer",
    "MultiHeadSelfAttention", "PositionEmbedding", "RMSNormGated", "ResidualFeedForward", "SSDBlock",
    "biased_queries", "biased_table", "conv_backend", "left_pad_positions", "normal_init", "truncated_normal_init",
    "xavier_init", "zero_padding_rows",
]
