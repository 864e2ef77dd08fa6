"""The adapter-only path: the LoRA adapter as a GGUF (llama.cpp's convert_lora_to_gguf.py,
from the same sdist as the HF converter and the quantizer), used with the un-fine-tuned base's
GGUF (FROM base + ADAPTER in a Modelfile), so several fine-tunes of one base share its weights
on disk and in Ollama.

llama.cpp applies a LoRA GGUF at run time as W x + scale * B (A x), with scale = alpha / rank,
one `adapter.lora.alpha` for the whole file and the rank read from each tensor's shape. What
that cannot express is refused before the converter runs, naming the field:

- expert LoRA on a MoE (PEFT's `target_parameters`, lora.ParamWrapper on the fused 3-D
  `mlp.experts.gate_up_proj` / `down_proj`): convert_lora_to_gguf names each A/B pair by the
  adapter key with `.lora_A.weight` cut off, so the ParamWrapper keys
  (`model.layers.L.mlp.experts.base_layer.lora_A.weight` for gate_up, `...mlp.experts.lora_A.weight`
  for down) become `model.layers.L.mlp.experts.base_layer.weight` / `...mlp.experts.weight`. The
  Qwen MoE converter holds back every tensor named `experts` until it has the per-expert
  `mlp.experts.E.{gate,up,down}_proj.weight` to stack, which never come, and stops with
  `ValueError: Unprocessed experts: ['model.layers.0.mlp.experts.base_layer.weight',
  'model.layers.0.mlp.experts.weight', ...]` (llama-cpp-python 0.3.36's converter; run by
  tests/test_adapter_gguf.py). The attention LoRA of the same adapter converts. Even so, a GGUF
  LoRA pair per tensor is A [r, in], B [out, r], while PEFT's fused expert A/B are [E*r, in] /
  [out, E*r] with expert e owning rows/columns of them: no single low-rank pair equals the
  per-expert deltas of llama.cpp's merged `ffn_*_exps` tensors. Such models use the merged GGUFs.
- `use_rslora` (scale alpha / sqrt(r)) and `rank_pattern` / `alpha_pattern` (per-module scales):
  the single alpha / rank scale of the GGUF would apply the wrong strength.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from loraforge import llamacpp
from loraforge.errors import UserError
from loraforge.fileio import partial_path

ADAPTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


class AdapterGGUFError(UserError, ValueError):
    """An adapter llama.cpp's LoRA GGUF cannot represent; the message names the field and why."""


def converter_script() -> Path:
    return llamacpp.llamacpp_dir() / "convert_lora_to_gguf.py"


def _adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterGGUFError(f"{path}: missing (not a PEFT adapter folder)") from None
    except ValueError as e:
        raise AdapterGGUFError(f"{path}: not valid JSON ({e})") from None


def _adapter_tensor_names(adapter_dir: Path) -> list[str]:
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterGGUFError(f"{path}: missing (the adapter's weights)")
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def unsupported_reason(adapter_dir: str | os.PathLike) -> str | None:
    """Why llama.cpp's LoRA GGUF cannot carry this adapter, or None when it can."""
    d = Path(adapter_dir)
    cfg = _adapter_config(d)
    where = d / "adapter_config.json"
    expert_keys = [k for k in _adapter_tensor_names(d) if ".mlp.experts." in k]
    if cfg.get("target_parameters") or expert_keys:
        params = cfg.get("target_parameters") or sorted({k.split(".lora_")[0] for k in expert_keys})[:2]
        return (f"{where}: target_parameters {params}: expert LoRA on a MoE's fused expert tensors "
                "(PEFT lora.ParamWrapper) has no LoRA GGUF form: llama.cpp's convert_lora_to_gguf.py "
                "stops with 'Unprocessed experts' on these tensors, and a LoRA GGUF pair cannot hold "
                "per-expert deltas for llama.cpp's merged ffn_*_exps tensors. Use the merged GGUFs "
                "(results/<model>/*.gguf, Modelfile) for this model")
    if cfg.get("use_rslora"):
        return (f"{where}: use_rslora true scales by alpha/sqrt(r); a LoRA GGUF is applied with "
                "alpha/r (one adapter.lora.alpha), so it would have the wrong strength. Use the merged GGUFs")
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field):
            return (f"{where}: {field} {cfg[field]}: per-module ranks or alphas; a LoRA GGUF has one "
                    "alpha for every tensor, so some modules would get the wrong scale. Use the merged GGUFs")
    return None


def check_convertible(adapter_dir: str | os.PathLike) -> None:
    reason = unsupported_reason(adapter_dir)
    if reason:
        raise AdapterGGUFError(reason)


def converter_command(adapter_dir, base_dir, outfile, outtype: str) -> list[str]:
    """convert_lora_to_gguf.py with the base's config (only config.json is read: a base whose
    weights a consume-mode merge used up still works)."""
    return [sys.executable, str(converter_script()), str(adapter_dir), "--base", str(base_dir),
            "--outtype", outtype, "--outfile", str(outfile)]


def convert_adapter_to_gguf(adapter_dir, base_dir, out_path, outtype: str = "f16", *, log=None,
                            check: bool = True) -> Path:
    """A PEFT LoRA adapter folder -> a LoRA GGUF (general.type adapter) for llama.cpp / Ollama's
    ADAPTER, written under a temporary name and renamed when complete. base_dir: the base's HF
    folder (its config.json; the weights are not read). check=False skips the refusal of
    adapters the format cannot carry (tests use it to show what the converter itself does).
    Raises AdapterGGUFError for those, RuntimeError (with the converter's last lines) on a failure."""
    adapter, base, out = Path(adapter_dir), Path(base_dir), Path(out_path)
    outtype = outtype.lower()
    if outtype not in ADAPTER_OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: convert_lora_to_gguf.py writes {', '.join(ADAPTER_OUTTYPES)}")
    if check:
        check_convertible(adapter)
    if not (base / "config.json").is_file():
        raise AdapterGGUFError(f"{base}/config.json: missing; the adapter's GGUF needs the base's config")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(out)
    tmp.unlink(missing_ok=True)
    cmd = converter_command(adapter, base, tmp, outtype)
    # the converter's own gguf-py (same commit as the quantizer) first, as for the HF converter
    env = llamacpp.converter_env()
    env["HF_HUB_OFFLINE"] = "1"  # --base is given: the hub is never needed
    tail: collections.deque[str] = collections.deque(maxlen=40)
    started = time.time()
    log_file = open(log, "a", encoding="utf-8") if isinstance(log, (str, os.PathLike)) else log
    try:
        if log_file:
            log_file.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                              errors="replace")
        tail.extend(proc.stdout.splitlines())
        if log_file:
            log_file.write(proc.stdout)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"convert_lora_to_gguf.py failed (exit {proc.returncode}) on {adapter}:\n"
                               + "\n".join(tail))
        _check_adapter_gguf(tmp)
        os.replace(tmp, out)
        if log_file:
            log_file.write(f"converted {adapter} -> {out} ({outtype}, {out.stat().st_size} bytes) "
                           f"in {time.time() - started:.1f}s\n")
    finally:
        if log_file is not None and log_file is not log:
            log_file.close()
    return out


def _check_adapter_gguf(path: Path) -> None:
    """The file is a LoRA GGUF with tensor pairs (an empty adapter would apply nothing, silently)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def text(key):
        field = reader.get_field(key)
        return None if field is None else bytes(field.parts[field.data[0]]).decode()

    if text("general.type") != "adapter" or text("adapter.type") != "lora":
        raise RuntimeError(f"{path}: not a LoRA adapter GGUF (general.type {text('general.type')!r})")
    names = [t.name for t in reader.tensors]
    pairs = {n[: -len(".lora_a")] for n in names if n.endswith(".lora_a")}
    if not pairs or pairs != {n[: -len(".lora_b")] for n in names if n.endswith(".lora_b")}:
        raise RuntimeError(f"{path}: no complete lora_a/lora_b tensor pairs ({len(names)} tensors)")


def adapter_gguf_info(path: str | os.PathLike) -> dict:
    """alpha, tensor count and the base tensors an adapter GGUF modifies (for reports and tests)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    alpha = reader.get_field("adapter.lora.alpha")
    names = [t.name for t in reader.tensors]
    return {"alpha": float(alpha.parts[alpha.data[0]][0]) if alpha else None, "n_tensors": len(names),
            "targets": sorted({n.rsplit(".lora_", 1)[0] for n in names if ".lora_" in n})}


def config_refusal(config: dict, key: str) -> str | None:
    """Why a model's adapter cannot become a LoRA GGUF, judged from the config alone (before any
    job runs): expert LoRA (a MoE whose lora.target_modules include the expert projections) or
    use_rslora. The converter rule checks the adapter folder itself too (unsupported_reason)."""
    from loraforge.config import is_moe, model_settings

    lora = model_settings(config, key)["lora"]
    experts = sorted(set(lora["target_modules"]) & {"gate_proj", "up_proj", "down_proj", "experts"})
    if is_moe(config, key) and experts:
        return (f"models.{key}.lora.target_modules: {', '.join(experts)} on a MoE trains expert LoRA "
                "(PEFT lora.ParamWrapper on the fused expert tensors), which has no LoRA GGUF form: "
                "llama.cpp's convert_lora_to_gguf.py stops with 'Unprocessed experts' on it, and a LoRA "
                "GGUF pair cannot hold per-expert deltas. Use the merged GGUFs "
                f"(results/{key}/*.gguf, results/{key}/Modelfile)")
    if lora.get("use_rslora"):
        return (f"models.{key}.lora.use_rslora: true scales by alpha/sqrt(r); a LoRA GGUF is applied "
                f"with alpha/r. Use the merged GGUFs (results/{key}/Modelfile)")
    return None
