"""The alternative users would pick on a host: transformers' BertModel with the zoo model's
weights and head (mean pooling + classifier), adapted with Hugging Face PEFT."""
from __future__ import annotations

from benchmarks.common import model_name


def hf_model(tiny: bool, num_labels: int = 5):
    """transformers.BertModel + mean pooling + ``classifier``, with the zoo model's weights
    (MiniLM: all-MiniLM-L6-v2; tiny: the tiny encoder), dropout off (as the exported graphs)."""
    import torch
    import transformers

    from edgepeft.exporters import load_model
    from edgepeft.exporters.zoo import BBC_TOPICS

    class MeanPoolClassifier(transformers.BertModel):
        def __init__(self, config, n):
            super().__init__(config, add_pooling_layer=False)
            self.classifier = torch.nn.Linear(config.hidden_size, n)

        def forward(self, input_ids=None, attention_mask=None, **_):
            h = super().forward(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return self.classifier((h * m).sum(1) / m.sum(1).clamp(min=1e-9))

    src = load_model(model_name(tiny), labels=BBC_TOPICS[:num_labels])
    c = src.model.config
    cfg = transformers.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, layer_norm_eps=c.layer_norm_eps, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = MeanPoolClassifier(cfg, num_labels)
    missing, unexpected = model.load_state_dict(src.model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise RuntimeError(f"weights do not fit the transformers twin: missing {missing}, unexpected {unexpected}")
    del src
    return model


def lora_config():
    """HF PEFT's twin of benchmarks.common.lora_spec."""
    import peft

    return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                           modules_to_save=["classifier"])
