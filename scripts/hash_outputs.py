"""CPU byte-identity check: quantize the fixtures with several recipes, export, print a sha256 per output file.

    PYTHONPATH=/path/to/other/checkout .venv/bin/python scripts/hash_outputs.py /tmp/a > a.json   # e.g. main
    .venv/bin/python scripts/hash_outputs.py /tmp/b > b.json && diff a.json b.json
safetensors files are hashed as (header parsed and re-serialised with sorted keys) + data: the safetensors
library writes `__metadata__` in hash-map order, which differs from process to process. layer_*.json are hashed
without their "seconds". About 8 minutes on 2 busy cores."""
import hashlib
import json
import shutil
import struct
import sys
from pathlib import Path
import gemmaquant
print("gemmaquant from", gemmaquant.__file__, file=sys.stderr)
from gemmaquant.quantize import quantize
from gemmaquant.recipe import Recipe
from gemmaquant.workflow import export_outputs



def canonical_sha(p: Path) -> str:
    b = p.read_bytes()
    if p.suffix == ".safetensors":
        n = struct.unpack("<Q", b[:8])[0]
        b = json.dumps(json.loads(b[8:8 + n]), sort_keys=True).encode() + b[8 + n:]
    return hashlib.sha256(b).hexdigest()[:16]


out_root = Path(sys.argv[1]); shutil.rmtree(out_root, ignore_errors=True)
kw = {k.split("=")[0]: k.split("=")[1] for k in sys.argv[2:]}
cases = [("tiny-moe", dict(method="gptq")), ("tiny-moe", dict(method="awq")), ("tiny-moe", dict(method="rtn")),
         ("tiny-moe", dict(method="imatrix")), ("tiny-moe", dict(method="gptq", gguf_type="Q4_K_M")),
         ("tiny-moe", dict(method="gptq", moe_min_tokens=100)),
         ("tiny-edge", dict(method="gptq")), ("tiny-edge", dict(method="awq")), ("tiny-dense", dict(method="gptq")),
         ("tiny-dense", dict(method="gptq", weight_format="int8"))]
res = {}
for model, r in cases:
    rec = Recipe.from_dict({"n_samples": 8, "seq_len": 64, "batch_size": 4, **r})
    tag = model + "-" + "-".join(f"{k}{v}" for k, v in r.items())
    out = out_root / tag
    q = quantize(model, rec, out=out, progress=False, **({"device": kw["device"]} if "device" in kw else {}))
    fmts = ("gguf",) if rec.gguf_type else (("gguf", "safetensors") if rec.weight_format in ("int4_g32_sym", "int8") else ("safetensors",))
    export_outputs(q.work_dir, out, model, rec, fmts)
    for f in sorted(out.rglob("*")):
        if f.is_file() and not f.name.endswith(".json") and f.name != "state.json":
            res[str(f.relative_to(out_root))] = canonical_sha(f)
    for f in sorted(out.rglob("layer_*.json")):
        d = json.loads(f.read_text()); d.pop("seconds", None)
        res[str(f.relative_to(out_root))] = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
print(json.dumps(res, indent=1, sort_keys=True))
