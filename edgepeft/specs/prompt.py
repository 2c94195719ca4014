"""Prompt tuning: n trainable virtual token embeddings prepended to the input embeddings."""
from __future__ import annotations

import dataclasses

from edgepeft.errors import SpecError
from edgepeft.specs.base import MethodSpec, check_choice, check_int, check_seed


@dataclasses.dataclass(frozen=True)
class PromptSpec(MethodSpec):
    """``init="random"``: rows drawn with the spread of the model's own token embeddings;
    ``init="text"``: rows copied from the embeddings of ``init_text``'s tokens (cycled to
    ``n_tokens``), the PEFT initialisation that usually trains faster."""

    method = "prompt"

    n_tokens: int = 8
    init: str = "random"
    init_text: str | None = None
    init_seed: int = 0

    def __post_init__(self) -> None:
        check_int("n_tokens", self.n_tokens, 1)
        check_choice("init", self.init, ("random", "text"))
        check_seed(self.init_seed)
        if self.init == "text" and not (isinstance(self.init_text, str) and self.init_text.strip()):
            raise SpecError('`init_text` must be a non-empty string when init="text", '
                            f"got {self.init_text!r}")
        if self.init == "random" and self.init_text is not None:
            raise SpecError('`init_text` is only used with init="text"; drop it or set init="text"')
