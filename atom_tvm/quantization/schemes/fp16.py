"""``fp16`` and ``fp32``: no quantization, the model in one float dtype (fp32 is the CPU reference).

Nothing is swapped: the Linear layers stay ``nn.Linear``, which TVM's pipeline schedules (dlight on
CUDA, our `CPUGemm` rule on llvm), and the weights are the Hugging Face ones cast to the dtype.
"""

from __future__ import annotations

from pathlib import Path

from atom_tvm.errors import UserError
from atom_tvm.quantization.schemes import QuantizationScheme, SchemeOptions, register
from relax_models.llama import LlamaConfig


class FloatScheme(QuantizationScheme):
    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, dtype

    def check_target(self, target_kind: str) -> None:
        if self.dtype == "float32" and target_kind != "llvm":
            raise UserError("--quantization fp32 is for --target llvm; use fp16 on cuda")


@register("fp32")
def fp32(model_dir: Path, cfg: LlamaConfig, options: SchemeOptions) -> FloatScheme:
    return FloatScheme("fp32", "float32")


@register("fp16")
def fp16(model_dir: Path, cfg: LlamaConfig, options: SchemeOptions) -> FloatScheme:
    return FloatScheme("fp16", "float16")
