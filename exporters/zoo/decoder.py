"""What the zoo's decoder-only causal LMs (Llama, Gemma 3) share: the layer loop, the LM head
over the text positions, and the cut into lean parts. A model supplies ``pre`` (embeddings
and the context every layer reads), ``layers`` and ``norm``."""
from __future__ import annotations

import torch
import torch.nn as nn

from edgepeft.errors import ExportError
from edgepeft.exporters.zoo.parts import LeanParts


class DecoderModel(nn.Module):
    """forward(input_ids, attention_mask) -> hidden states (B, n_prompt + T, D)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x, *ctx = self.pre(input_ids, attention_mask)
        for layer in self.layers:
            x = layer(x, *ctx)
        return self.norm(x)


class CausalLM(nn.Module):
    """forward(input_ids, attention_mask) -> logits (batch, seq, vocab). Subclasses name their
    ``MODEL`` class (a DecoderModel built from the config)."""

    MODEL: type[DecoderModel]
    PEFT_SITES = {
        "attention_output": r"^model\.layers\.\d+\.self_attn\.o_proj$",
        "ffn_output": r"^model\.layers\.\d+\.mlp\.down_proj$",
        "layers": r"^model\.layers\.\d+$",
    }

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = self.MODEL(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self._text_positions(self.model(input_ids, attention_mask)))

    def _text_positions(self, h: torch.Tensor) -> torch.Tensor:
        n = self.model.n_prompt
        return h[:, n:] if n else h  # virtual prompt positions produce no logits: output stays (B, T, V)

    def _post(self, h: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._text_positions(self.model.norm(h))

    @classmethod
    def from_state_dict(cls, config, state: dict[str, torch.Tensor]) -> "CausalLM":
        """``cls(config)`` holding exactly ``state`` (Hugging Face names; float32 tensors are
        used, not copied), built on the meta device: no random init of weights about to be
        replaced."""
        with torch.device("meta"):
            model = cls(config)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        if config.tie_word_embeddings and "model.embed_tokens.weight" in state:
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
        wrong = [f"{k} {tuple(state[k].shape)} != {shapes[k]}" for k in shapes
                 if k in state and tuple(state[k].shape) != shapes[k]]
        if missing or unexpected or wrong:
            raise ExportError(f"the weights do not fit {config}: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, wrong shapes {wrong[:5]}")
        model.load_state_dict(state, assign=True)
        if config.tie_word_embeddings:  # assign=True replaced the shared Parameter: tie again
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    def lean_parts(self) -> LeanParts:
        """Embeddings (and the layers' context) -> decoder layers -> final norm; the (tied) LM
        head runs in vocabulary chunks on the device."""
        return LeanParts(pre=self.model.pre, blocks=list(self.model.layers), post=self._post, head="lm_head.weight")
