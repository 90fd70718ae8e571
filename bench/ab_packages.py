"""Library-only packages of one Llama shape and scheme (sm_90a), built twice: ``old`` with one of
this session's changes switched off, ``new`` with the committed code, for an A/B on a GPU
(`bench/decode_step.py` on each, `bench/compare_logits.py` on the pair).

    python bench/ab_packages.py append llama-2-13b atom-w4a4 OUT_DIR   # 4 warps per append block
    python bench/ab_packages.py head llama-2-7b fp16 OUT_DIR          # logits by TVM's matmul

Writes OUT_DIR/old/<scheme>, OUT_DIR/new/<scheme> (and the shared OUT_DIR/*/model config dirs).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e  # noqa: E402
from relax_models import llama  # noqa: E402
from tir_kernels import kv_attention  # noqa: E402

#: What ``old`` switches off: (module, attribute, value before session 10).
SWITCHES = {
    "append": (kv_attention, "_APPEND_TIERS", ((None, 4),)),
    "head": (llama, "_vocab_kernel", lambda target, weight: None),
}


def main() -> int:
    switch, shape, scheme, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    module, name, before = SWITCHES[switch]
    committed = getattr(module, name)
    for label, value in (("old", before), ("new", committed)):
        setattr(module, name, value)
        rc = e2e.main(["build", "--target", "cuda", "--arch", "sm_90a", "--shapes", shape,
                       "--variants", scheme, "-o", str(out / label)])
        if rc:
            return rc
    setattr(module, name, committed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
