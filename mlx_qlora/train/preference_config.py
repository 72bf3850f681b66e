"""Settings of preference tuning (``method: dpo | orpo``), the ``preference:`` recipe section.

Kept apart from ``config.py`` (which only nests this section) and free of MLX, so a recipe is
checked before anything heavy loads. The names follow TRL's ``DPOConfig`` / ``ORPOConfig``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import require

METHODS = ("sft", "dpo", "orpo")
LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class PreferenceConfig:
    beta: float = 0.1               # DPO: the KL strength beta; ORPO: the odds-ratio weight lambda
    loss_type: str = "sigmoid"      # DPO only: sigmoid (the DPO paper) or ipo (squared, per-token means)
    label_smoothing: float = 0.0    # DPO sigmoid: share of pairs assumed flipped (conservative DPO)
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"  # the prompt is data.prompt_key ("prompt"); chat rows need none

    def __post_init__(self):
        ok = isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool) and math.isfinite(self.beta)
        require(ok and self.beta > 0, f"preference.beta={self.beta!r}: use a positive number such as 0.1")
        require(self.loss_type in LOSS_TYPES,
                f"preference.loss_type={self.loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
        ls = self.label_smoothing
        require(isinstance(ls, (int, float)) and not isinstance(ls, bool) and 0 <= ls < 0.5,
                f"preference.label_smoothing={ls!r}: use a value in [0, 0.5), e.g. 0.1 (0: plain DPO)")
        require(ls == 0 or self.loss_type == "sigmoid",
                f"preference.label_smoothing={ls}: applies to loss_type sigmoid only; set it to 0 for {self.loss_type}")
        for name in ("chosen_key", "rejected_key"):
            v = getattr(self, name)
            require(isinstance(v, str) and v, f"preference.{name}={v!r}: give the JSONL key, e.g. {name.split('_')[0]}")
        require(self.chosen_key != self.rejected_key, "preference.chosen_key and rejected_key are the same key; "
                                                      "give the two answers different keys")


def check_method(method, init_adapter, pref: PreferenceConfig) -> None:
    """``method`` and ``init_adapter`` of a TrainConfig (the top-level keys this feature adds)."""
    require(method in METHODS, f"method={method!r}: use one of {', '.join(METHODS)}")
    require(method != "orpo" or (pref.loss_type == "sigmoid" and not pref.label_smoothing),
            "preference.loss_type / label_smoothing apply to method dpo; ORPO has one loss: remove them")
    require(init_adapter is None or (isinstance(init_adapter, str) and init_adapter),
            f"init_adapter={init_adapter!r}: give the directory of an adapter from `mlx_qlora train`, or null")
