"""Where a model comes from: a Hugging Face directory whose weights are read one tensor at a time.

The engine never loads a whole checkpoint. It builds the model with its parameters on the meta device (buffers
such as rotary frequencies are real, they are computed, not stored), then fills in one block's parameters from
the safetensors files when that block is worked on and drops them afterwards. Peak memory is one block plus
whatever lives outside the blocks (embeddings, final norm).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# A Hub repository id: "name" or "owner/name", letters, digits, '-', '_', '.'.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CheckpointError(ValueError):
    """The model argument does not name a usable checkpoint; the message says what to do."""


def resolve_model_dir(model: str | Path, *, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """A local directory for `model`: itself when it is one, else a Hub snapshot (safetensors and configs only)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"model: '{model}' is a file; give the model's directory (config.json and weights)")
    text = str(model)
    if text.startswith((".", "/", "~")) or not HUB_ID.match(text):
        raise CheckpointError(f"model: directory '{model}' does not exist")
    return _download_from_hub(text, revision=revision, allow_pickle=allow_pickle)


def _download_from_hub(repo_id: str, *, revision: str | None, allow_pickle: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - a transformers dependency
        raise CheckpointError("model: a Hub id needs the huggingface_hub package") from exc
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated: all end the same way for the caller
        raise CheckpointError(
            f"model: '{repo_id}' is not a local directory and could not be downloaded from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). Download it where the Hub is reachable and pass the local path, "
            "or set HF_HUB_OFFLINE=1 with the model already in the Hub cache."
        ) from exc


class SafetensorsCheckpoint:
    """Lazy, read-only access to the tensors of a Hugging Face directory's safetensors files."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / SINGLE_NAME).is_file():
            weight_map = None
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                if any((self.dir / name).exists() for name in PICKLE_NAMES):
                    raise CheckpointError(
                        f"model: '{self.dir}' holds only pickle (.bin) weights, which can run code when loaded; "
                        "convert it to safetensors, or pass --allow-pickle if you trust it"
                    )
                raise CheckpointError(f"model: no safetensors weights in '{self.dir}'")
            weight_map = None
        from safetensors import safe_open

        self._file_of: dict[str, str] = {}
        names = sorted(set(weight_map.values())) if weight_map else [p.name for p in self._single_files()]
        for name in names:
            with safe_open(str(self.dir / name), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    self._file_of[key] = name

    def _single_files(self) -> list[Path]:
        single = self.dir / SINGLE_NAME
        return [single] if single.is_file() else sorted(self.dir.glob("*.safetensors"))

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors for `keys`, copied into memory the caller owns.

        Each file is mapped only while it is read. A long-lived mapping would keep every page ever read (and,
        once a tensor backed by it is modified in place, a private copy of those pages) resident until the end
        of the run: peak memory would grow by a block per block instead of staying at one block.
        """
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._file_of[key], []).append(key)
        out = {}
        for name, file_keys in by_file.items():
            with safe_open(str(self.dir / name), framework="pt", device="cpu") as handle:
                for key in file_keys:
                    out[key] = handle.get_tensor(key).clone()
        return out


def load_config(model_dir: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise CheckpointError(
                f"model: '{model_dir}' needs its own Python code to load; pass --trust-remote-code if you trust it"
            ) from exc
        raise CheckpointError(f"model: cannot read config.json in '{model_dir}': {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"model: cannot read config.json in '{model_dir}': {exc}") from exc


def model_class(config, *, trust_remote_code: bool = False) -> type[nn.Module]:
    """The class named in config.architectures when transformers has it, else the causal-LM or base Auto class."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers import AutoModel, AutoModelForCausalLM

    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            return auto._model_mapping[type(config)]
        except KeyError:
            continue
    raise CheckpointError(f"model: transformers has no model class for architecture {config.architectures}")


def empty_model(config, *, trust_remote_code: bool = False) -> nn.Module:
    """The model with every parameter on the meta device (no memory) and real buffers, in eval mode."""
    from accelerate import init_empty_weights

    cls = model_class(config, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        if getattr(cls, "__module__", "").startswith("transformers_modules") or trust_remote_code:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        else:
            model = cls._from_config(config)
    from service.engine.moe import MoEError, unfuse_experts

    try:
        model = unfuse_experts(model)  # MoE: one Linear per expert, as the checkpoint stores them (service.engine.moe)
    except MoEError as exc:
        raise CheckpointError(str(exc)) from None
    return model.eval()


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """{tied parameter name: the parameter it shares storage with}, e.g. {"lm_head.weight": "model.embed_tokens.weight"}."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return {}
    keys = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(keys, dict):
        return dict(keys)
    # transformers 4.x: a list of tied names; the source is the input embedding.
    embed = model.get_input_embeddings()
    source = next(n for n, p in model.named_parameters() if p is embed.weight)
    return {k: source for k in keys if k != source}


def set_tensor(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter or buffer `name` (dotted, relative to root) by `tensor`, without autograd."""
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


class StreamedModel:
    """A model skeleton plus its checkpoint: parameters are loaded per module prefix and released again."""

    def __init__(self, model_dir: str | Path, *, trust_remote_code: bool = False, dtype: torch.dtype | None = None,
                 compressed: bool = False, checkpoint=None):
        """``compressed``: also read quantized (compressed-tensors) checkpoints and ones with online rotations, to
        score them (the caller attaches the online rotations). Without it they are refused: compressing one again
        would write dense weights under its quantization config, or drop its online rotations.

        ``checkpoint``: where the tensors come from, any object with SafetensorsCheckpoint's ``keys``, ``in`` and
        ``read`` (the job domain's S3 reader, say); ``model_dir`` then holds only config.json and the tokenizer.
        Default: the safetensors files in ``model_dir``."""
        self.dir = Path(model_dir)
        self.checkpoint = checkpoint if checkpoint is not None else SafetensorsCheckpoint(self.dir)
        self.config = load_config(self.dir, trust_remote_code=trust_remote_code)
        self.model = empty_model(self.config, trust_remote_code=trust_remote_code)
        self.dtype = dtype  # None keeps each tensor's stored dtype
        self.tied = tied_parameters(self.model)
        from service.engine.transform_export import DESCRIPTION_KEY

        quantization = getattr(self.config, "quantization_config", None)
        online = getattr(self.config, DESCRIPTION_KEY, None)
        if not compressed and (quantization is not None or online):
            what = "quantized" if quantization is not None else "rotated with online transforms (R3/R4)"
            raise CheckpointError(f"model: '{self.dir}' is already {what}; compress its unquantized original")
        # A compressed-tensors checkpoint stores quantized weights packed: {"<module>.weight": (the module's name,
        # its scheme)}, decompressed one module at a time as they are loaded.
        self.compressed: dict[str, tuple[str, object]] = {}
        if quantization is not None:
            from service.engine.quantized_export import compressed_modules

            quantization = quantization.to_dict() if hasattr(quantization, "to_dict") else dict(quantization)
            if quantization.get("quant_method") != "compressed-tensors":
                raise CheckpointError(f"model: '{self.dir}' is quantized with {quantization.get('quant_method')!r}; "
                                      "only compressed-tensors checkpoints can be streamed")
            for name, scheme in compressed_modules(self.model, quantization).items():
                self.compressed[f"{name}.weight"] = (name, scheme)
        self.keys = self._map_keys()
        self._packed_keys: dict[str, list[str]] = {}
        if self.compressed:
            stored = self.checkpoint.keys()
            for name in self.compressed:
                prefix = self.keys[name] + ".weight"
                self._packed_keys[name] = [k for k in stored if k.startswith(prefix)]

    def _map_keys(self) -> dict[str, str]:
        """{parameter name in the model: key in the checkpoint}; checkpoints sometimes omit or add the base prefix."""
        prefix = getattr(self.model, "base_model_prefix", "")
        mapping, missing = {}, []
        for name, _ in self.model.named_parameters(remove_duplicate=False):
            candidates = [name]
            if prefix and name.startswith(prefix + "."):
                candidates.append(name[len(prefix) + 1 :])
            elif prefix:
                candidates.append(f"{prefix}.{name}")
            if name in self.compressed:  # stored as <prefix>.weight_packed / weight_scale / ...
                candidates = [c.rsplit(".", 1)[0] for c in candidates]
                key = next((c for c in candidates if f"{c}.weight_scale" in self.checkpoint), None)
            else:
                key = next((c for c in candidates if c in self.checkpoint), None)
            if key is not None:
                mapping[name] = key
            elif name not in self.tied:
                missing.append(name)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise CheckpointError(f"model: the checkpoint in '{self.dir}' lacks {len(missing)} parameters: {shown}")
        return mapping

    def parameter_names(self, prefix: str = "") -> list[str]:
        """Names of the (untied) parameters under a module prefix ("" for all)."""
        head = prefix + "." if prefix else ""
        return [n for n in self.keys if n.startswith(head)]

    def load(self, names: list[str], device: torch.device | str) -> None:
        plain = [name for name in names if name not in self.compressed]
        packed = {name: self._packed_keys[name] for name in names if name in self.compressed}
        tensors = self.checkpoint.read([self.keys[name] for name in plain] + [k for ks in packed.values() for k in ks])
        for name in names:
            if name in packed:
                from service.engine.quantized_export import decompress_weight

                cut = len(self.keys[name]) + 1
                local = {k[cut:]: tensors.pop(k) for k in packed[name]}
                # in the skeleton's dtype (the checkpoint's torch_dtype): decompression may hand back fp32
                tensor = decompress_weight(local, self.compressed[name][1]).to(self.model.get_parameter(name).dtype)
            else:
                tensor = tensors.pop(self.keys[name])
            if self.dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(self.dtype)
            set_tensor(self.model, name, tensor.to(device))
        self._retie()

    def release(self, names: list[str]) -> None:
        """Drop the tensors again: the parameters go back to the meta device and their memory is freed."""
        for name in names:
            param = self.model.get_parameter(name)
            set_tensor(self.model, name, torch.empty_like(param, device="meta"))
        trim_heap()


    def _retie(self) -> None:
        # Tied parameters (lm_head <- embed_tokens) must be the very same Parameter object, as from_pretrained makes them.
        for target, source in self.tied.items():
            owner_name, _, leaf = target.rpartition(".")
            owner = self.model.get_submodule(owner_name) if owner_name else self.model
            owner._parameters[leaf] = self.model.get_parameter(source)


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc only; elsewhere nothing to do).

    glibc raises its mmap threshold after large frees, so later block-sized tensors come from the heap and stay
    resident once freed: measured on an 8-block model, peak RSS crept up by ~50 MiB per block without this and
    stays flat with it.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def load_dense(model_dir: Path, device: torch.device, trust_remote_code: bool = False) -> nn.Module:
    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    cls = model_class(config, trust_remote_code=trust_remote_code)
    return cls.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code).to(device).eval()


def load_output(directory: str | Path, *, trust_remote_code: bool = False) -> nn.Module:
    """A compressed output as the model it computes: a quantized one decompressed by compressed-tensors, online
    rotations (R3/R4) re-attached from the checkpoint's description. On CPU, in eval mode."""
    from service.engine.transform_export import DESCRIPTION_KEY
    from service.recipes.online_rotations import attach_online_transforms

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if "quantization_config" in config:
        from service.engine.quantized_export import load_quantized

        model = load_quantized(directory)
    else:
        model = load_dense(directory, torch.device("cpu"), trust_remote_code)
    if DESCRIPTION_KEY in config:
        attach_online_transforms(model, config[DESCRIPTION_KEY])
    return model.eval()
