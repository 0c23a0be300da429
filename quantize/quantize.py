"""Re-quantize a GGUF model with llama.cpp's own quantizer (e.g. Q8_0 for higher fidelity).

    .venv/bin/python quantize/quantize.py IN.gguf OUT.gguf [--type Q8_0] [--threads 2]

Use it on a full-precision (F16/F32/BF16) GGUF; re-quantizing an already 4-bit model only
loses more. LoRA adapters are kept separate and need no re-quantization (llama.cpp applies them
in F16/F32 on top of any base quantization).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "Q4_K_M", "Q5_K_M", "Q6_K")  # llama_cpp.LLAMA_FTYPE_MOSTLY_*


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--type", default="Q8_0", choices=TYPES)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not args.src.is_file():
        print(f"quantize: {args.src}: no such file", file=sys.stderr)
        return 3
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{args.type}")
    params.nthread = args.threads
    tmp = args.dst.with_name(f".{args.dst.name}.tmp")
    status = llama_cpp.llama_model_quantize(str(args.src).encode(), str(tmp).encode(), params)
    if status != 0:
        tmp.unlink(missing_ok=True)
        print(f"quantize: llama.cpp failed (status {status})", file=sys.stderr)
        return 4
    tmp.replace(args.dst)  # atomic: a half-written file never carries the final name
    print(args.dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
