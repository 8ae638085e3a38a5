"""Rebuild Qwen2.5-Coder-0.5B-Instruct on the GPU machine from GGUF parts (see ../shared/models/README.md).

Joins /tmp/q/gguf.part* (carried one per device call), checks the sha256 against
/tmp/q/gguf.sha256, converts to a bf16 HF folder with transformers and adds the
tokenizer files carried in .device/tok. Prints the folder; idempotent.
"""

import glob
import hashlib
import shutil
import sys
import time
from pathlib import Path

PARTS, OUT = Path("/tmp/q"), Path("/tmp/qwen05-hf")

if __name__ == "__main__":
    if (OUT / "config.json").exists():
        print(OUT)
        sys.exit(0)
    gguf = PARTS / "model.gguf"
    parts = sorted(glob.glob(str(PARTS / "gguf.part*")))
    with open(gguf, "wb") as out:
        for part in parts:
            out.write(Path(part).read_bytes())
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    want = (PARTS / "gguf.sha256").read_text().split()[0]
    if digest != want:
        sys.exit(f"gguf sha256 mismatch from {len(parts)} parts: {digest} != {want}")
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(PARTS), gguf_file="model.gguf", dtype=torch.bfloat16)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(OUT)
    for f in Path(".device/tok").iterdir():
        if f.name != "config.json":
            shutil.copy(f, OUT / f.name)
    print(f"converted in {time.time() - t0:.0f} s", file=sys.stderr)
    print(OUT)
