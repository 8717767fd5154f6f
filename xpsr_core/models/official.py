"""The authors' released checkpoint layout (qyp2000/XPSR): reading, validating, mapping, writing.

Their checkpoint is ``checkpoint-N/{unet,controlnet}``, each a diffusers ``save_pretrained`` folder
of their own forked classes. It corresponds to :meth:`XPSRSettings.official` (full-transformer
``CA_f`` and Conditional Attention, 13 latent DFC heads on the residuals) and maps tensor for
tensor onto our parts:

==========================================================  =============================================
theirs                                                      ours
==========================================================  =============================================
controlnet ``{block}.attentions.{j}.*``                     controlnet ``{block}.attentions.{j}.high.*``
controlnet ``{block}.attentions_lowlevel.{j}.*``            controlnet ``{block}.attentions.{j}.low.*``
controlnet ``{block}.attentions_connect.{j}.*``             controlnet ``{block}.attentions.{j}.fusion.*``
controlnet ``controlnet_cond_embedding.to_rgbs.{i}.*``      dfc_heads ``pixel_heads.{i}.*``
controlnet ``conv_degradation.{i}.0.*``                     dfc_heads ``latent_heads.{i}.*``
controlnet ``conv_degradation_mid.0.*``                     dfc_heads ``latent_heads.{last}.*``
unet ``up_blocks.{i}.pixel_attentions.{j}.*``               conditional_attention ``layers.{decoder layer}.*``
unet (every other tensor: the SD-1.5 UNet)                  the frozen base UNet (checked, not trained)
any other controlnet tensor                                 controlnet, same name
==========================================================  =============================================

``{block}`` is ``down_blocks.{i}`` or ``mid_block``; decoder layers are counted over the up blocks
in order. :func:`import_official` (the ``xpsr import-official`` command) uses this module, and
:func:`export_official` writes one of our models back in their layout.
"""

from __future__ import annotations

import inspect
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from diffusers import UNet2DConditionModel
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..io.atomic import share_per_umask
from ..io.model_files import loading_model
from ..io.pipeline_folder import SD_COMPONENTS, write_pipeline_folder
from .controlnet import XPSRControlNet
from .loading import check_base_model, load_base_sd
from .xpsr import XPSRModel, XPSRSettings, write_trainable_record

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
AUTHORS_DIFFUSERS_VERSION = "0.21.4"
# the flags their ControlNet config adds to diffusers' ControlNetModel, with the values we support
CONTROLNET_FLAGS = {"return_rgbs": (True, False), "use_rrdb": (False,), "use_lowlevel_prompt": (True, False),
                    "use_latent_pred": (True, False)}
# diffusers ControlNetModel options their class keeps, and the only values XPSR (SD-1.x/2.x) supports
CONTROLNET_FIXED = {"encoder_hid_dim": None, "encoder_hid_dim_type": None, "class_embed_type": None,
                    "addition_embed_type": None, "addition_time_embed_dim": None, "num_class_embeds": None,
                    "projection_class_embeddings_input_dim": None, "controlnet_conditioning_channel_order": "rgb",
                    "global_pool_conditions": False}
UNET_FLAGS = ("up_use_lowlevel_prompt", "mid_use_lowlevel_prompt", "down_use_lowlevel_prompt")
SD_TOLERANCE = 0.0  # the checkpoint's SD-1.5 UNet tensors must equal the base model's exactly
# parts larger than this are written in shards, as diffusers' save_pretrained(max_shard_size=...) does: an import
# then holds one shard's tensors at a time
MAX_SHARD_SIZE = "1GB"
SHARD_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}

_SFA = re.compile(r"^(down_blocks\.\d+|mid_block)\.attentions\.(\d+)\.(high|low|fusion)\.(.+)$")
_BRANCH_TO_THEIRS = {"high": "attentions", "low": "attentions_lowlevel", "fusion": "attentions_connect"}


@dataclass
class OfficialCheckpoint:
    """Both folders of a checkpoint as read from disk: configs and tensors."""

    folder: Path
    controlnet_config: dict
    unet_config: dict
    controlnet: Mapping = field(repr=False)  # name -> tensor, read on access (LazyTensors)
    unet: Mapping = field(repr=False)
    files: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------- reading


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    sharded = sorted(folder.glob("*.index.json"))
    hint = " (sharded weights: merge them into one file first)" if sharded else ""
    raise UserError(f"{folder} holds no {' or '.join(WEIGHT_FILES)}{hint}. Point at the checkpoint folder that has "
                    "unet/ and controlnet/ (e.g. runs/xpsr/checkpoint-300000).")


def load_tensors(path: Path) -> dict:
    """A ``save_pretrained`` weights file (safetensors or a torch pickle) as a CPU state dict."""
    with loading_model("the weights", path, "Copy the authors' checkpoint again: the file is incomplete."):
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)


class LazyTensors(Mapping):
    """The tensors of one weights file by name, each read when asked for: a safetensors file through
    ``safe_open`` (names and shapes from its header), a torch pickle memory-mapped where its format allows. An
    import then holds one tensor of the checkpoint at a time, not the whole file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None
        self._tensors: dict = {}
        with loading_model("the weights", self.path, "Copy the authors' checkpoint again: the file is incomplete."):
            if self.path.suffix == ".safetensors":
                self._file = safe_open(str(self.path), framework="pt", device="cpu")
                self._names = list(self._file.keys())
            else:
                try:
                    self._tensors = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                    self._tensors = torch.load(str(self.path), map_location="cpu", weights_only=True)
                self._names = list(self._tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._file is None:
            return self._tensors[name]
        if name not in self._names:
            raise KeyError(name)
        # read with plain file reads, not through safe_open's memory map: the mapped pages of a 6.5 GB file would
        # count as this process's resident memory once read
        start, end = self._data_offsets(name)
        data = bytearray(end - start)
        with open(self.path, "rb") as handle:
            handle.seek(start)
            if handle.readinto(data) != len(data):
                raise UserError(f"{self.path} is truncated. Copy the authors' checkpoint again: the file is "
                                "incomplete.")
        tensor = torch.frombuffer(data, dtype=self.dtype(name)) if data else torch.empty(0, dtype=self.dtype(name))
        return tensor.reshape(self.shape(name))

    def _data_offsets(self, name: str) -> tuple[int, int]:
        """Where ``name``'s bytes lie in the file (safetensors: an 8-byte header length, the JSON header, data)."""
        if not hasattr(self, "_header"):
            with open(self.path, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                self._header = json.loads(handle.read(length))
                self._data_start = 8 + length
        start, end = self._header[name]["data_offsets"]
        return self._data_start + start, self._data_start + end

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._file is None:
            return tuple(self._tensors[name].shape)
        return tuple(self._file.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        if self._file is None:
            return self._tensors[name].dtype
        return SAFETENSORS_DTYPES[self._file.get_slice(name).get_dtype()]


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} has no config.json; it is not a diffusers save_pretrained folder.")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not readable JSON ({error}).") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} does not hold a JSON object.")
    return config


def read_checkpoint(folder: str | Path) -> OfficialCheckpoint:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"The checkpoint folder {folder} does not exist.")
    parts = {}
    for name in ("controlnet", "unet"):
        sub = folder / name
        if not sub.is_dir():
            raise UserError(f"{folder} has no {name}/ folder; the authors' checkpoint holds unet/ and controlnet/.")
        config = _read_config(sub)
        weights = _weights_file(sub)
        parts[name] = (config, weights)
    validate_configs(parts["controlnet"][0], parts["unet"][0])
    return OfficialCheckpoint(
        folder=folder,
        controlnet_config=parts["controlnet"][0],
        unet_config=parts["unet"][0],
        controlnet=LazyTensors(parts["controlnet"][1]),
        unet=LazyTensors(parts["unet"][1]),
        files={name: str(weights) for name, (_, weights) in parts.items()},
    )


# ---------------------------------------------------------------------------------- validation


def _known_controlnet_keys() -> set[str]:
    ours = {p for p in inspect.signature(XPSRControlNet.__init__).parameters if p != "self"}
    # addition_embed_type_num_heads is read only when addition_embed_type is set (never, here)
    return (ours - {"sfa_mode", "fusion_heads", "fusion_type"}) | set(CONTROLNET_FLAGS) | set(CONTROLNET_FIXED) | {
        "addition_embed_type_num_heads"}


def _known_unet_keys() -> set[str]:
    keys = {p for p in inspect.signature(UNet2DConditionModel.__init__).parameters if p != "self"}
    # options of diffusers 0.21's UNet that later versions dropped or renamed
    return keys | set(UNET_FLAGS) | {"dual_cross_attention", "attention_type", "cross_attention_norm"}


def validate_configs(controlnet_config: dict, unet_config: dict) -> None:
    """Refuse configs this implementation cannot reproduce, naming each offending key."""
    problems = []
    unknown = sorted(k for k in controlnet_config if not k.startswith("_") and k not in _known_controlnet_keys())
    if unknown:
        problems.append(f"controlnet/config.json has options this importer does not know: {', '.join(unknown)}")
    for key, allowed in CONTROLNET_FLAGS.items():
        value = controlnet_config.get(key, allowed[0])
        if value not in allowed:
            problems.append(f"controlnet/config.json sets {key}: {json.dumps(value)}, which is not supported "
                            f"(supported: {', '.join(json.dumps(a) for a in allowed)})")
    for key, expected in CONTROLNET_FIXED.items():
        value = controlnet_config.get(key, expected)
        if value != expected:
            problems.append(
                f"controlnet/config.json sets {key}: {json.dumps(value)}; XPSR supports only {json.dumps(expected)}"
            )
    unknown = sorted(k for k in unet_config if not k.startswith("_") and k not in _known_unet_keys())
    if unknown:
        problems.append(f"unet/config.json has options this importer does not know: {', '.join(unknown)}")
    for key in UNET_FLAGS:
        value = unet_config.get(key, False)
        values = value if isinstance(value, list) else [value]
        if any(bool(v) for v in values):
            problems.append(f"unet/config.json sets {key}: {json.dumps(value)}; the released model (and this importer) "
                            "needs it false everywhere (the UNet sees only the high-level prompt)")
    for key in (
        "class_embed_type",
        "addition_embed_type",
        "encoder_hid_dim_type",
        "encoder_hid_dim",
        "num_class_embeds",
    ):
        if unet_config.get(key) is not None:
            problems.append(
                f"unet/config.json sets {key}: {json.dumps(unet_config[key])}; XPSR supports SD-1.x/2.x UNets only"
            )
    if problems:
        raise UserError("The checkpoint cannot be imported:\n- " + "\n- ".join(problems))


def settings_for(controlnet_config: dict):
    """Our architecture settings for a checkpoint of theirs."""
    return XPSRSettings.official(
        sfa_mode="parallel" if controlnet_config.get("use_lowlevel_prompt", True) else "high",
        dfc_pixel=bool(controlnet_config.get("return_rgbs", True)),
        dfc_latent=bool(controlnet_config.get("use_latent_pred", True)),
        conditioning_embedding_out_channels=tuple(
            controlnet_config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
        ),
    )


def check_base_matches(unet_config: dict, base_unet) -> None:
    """The checkpoint's UNet must have the base model's shapes."""
    structural = (
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "layers_per_block",
        "cross_attention_dim",
        "attention_head_dim",
        "norm_num_groups",
        "use_linear_projection",
    )
    diffs = []
    for key in structural:
        theirs, ours = unet_config.get(key), base_unet.config.get(key)
        if theirs is not None and (list(theirs) if isinstance(theirs, (list, tuple)) else theirs) != (
                list(ours) if isinstance(ours, (list, tuple)) else ours):
            diffs.append(
                f"{key}: checkpoint {json.dumps(theirs)}, "
                f"base model {json.dumps(ours if not isinstance(ours, tuple) else list(ours))}"
            )
    if diffs:
        raise UserError(
            "The checkpoint was not trained on this base model (UNet shapes differ):\n- " + "\n- ".join(diffs)
        )


# ---------------------------------------------------------------------------------- names


def _decoder_layers(unet) -> list[tuple[int, int]]:
    """(up block, layer within it) of every decoder layer, in Conditional Attention's order."""
    return [(i, j) for i, block in enumerate(unet.up_blocks) for j in range(len(block.resnets))]


def official_name(part: str, key: str, unet, latent_heads: int) -> tuple[str, str]:
    """(their folder, their tensor name) of our ``part``'s tensor ``key``."""
    if part == "controlnet":
        match = _SFA.match(key)
        if match:
            block, j, branch, rest = match.groups()
            return "controlnet", f"{block}.{_BRANCH_TO_THEIRS[branch]}.{j}.{rest}"
        return "controlnet", key
    if part == "dfc_heads":
        kind, index, rest = key.split(".", 2)
        index = int(index)
        if kind == "pixel_heads":
            return "controlnet", f"controlnet_cond_embedding.to_rgbs.{index}.{rest}"
        if index == latent_heads - 1:
            return "controlnet", f"conv_degradation_mid.0.{rest}"
        return "controlnet", f"conv_degradation.{index}.0.{rest}"
    if part == "conditional_attention":
        _, index, rest = key.split(".", 2)
        block, layer = _decoder_layers(unet)[int(index)]
        return "unet", f"up_blocks.{block}.pixel_attentions.{layer}.{rest}"
    if part == "unet":
        return "unet", key
    raise ValueError(f"unknown part {part!r}")


def name_map(parts: dict, unet) -> dict[tuple[str, str], tuple[str, str]]:
    """(their folder, their name) -> (our part, our name) for every tensor of ``parts`` and the UNet."""
    heads = parts.get("dfc_heads")
    latent_heads = len(heads.latent_heads) if heads is not None else 0
    mapping = {}
    for part, module in {**parts, "unet": unet}.items():
        for key in module.state_dict():
            mapping[official_name(part, key, unet, latent_heads)] = (part, key)
    return mapping


def _check_exportable(settings) -> None:
    if settings.sfa_mode not in ("parallel", "high"):
        raise UserError(
            f"sfa_mode {settings.sfa_mode!r} has no counterpart in the authors' layout (parallel or high only)."
        )
    wrong = []
    if settings.sfa_mode == "parallel" and settings.fusion != "transformer":
        wrong.append("fusion: transformer")
    if not settings.conditional_attention or settings.conditional_attention_type != "transformer":
        wrong.append("conditional_attention_type: transformer")
    if settings.dfc_latent and settings.dfc_latent_heads != "residuals":
        wrong.append("dfc_latent_heads: residuals")
    if wrong:
        raise UserError(
            "Only the authors' architecture can be written in their layout; this model needs " + ", ".join(wrong) + "."
        )


# ---------------------------------------------------------------------------------- import


@dataclass
class ImportSummary:
    out: Path
    controlnet_tensors: int
    unet_tensors: int
    mapped: dict  # our part -> tensors filled
    base_max_abs_diff: float
    base_checked_tensors: int
    used_checkpoint_unet: bool
    seconds: float
    settings: dict

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def map_checkpoint(checkpoint: OfficialCheckpoint, unet, empty: dict) -> tuple[dict, dict]:
    """Our parts' state dicts and the checkpoint's SD-1.5 UNet tensors, as (tensors, their name) references
    into the checkpoint (read from the file's header: no tensor is loaded), or a refusal naming every checkpoint
    tensor left unused, every one of ours left unfilled, and every shape that differs.

    ``empty``: our parts on the meta device (``XPSRModel.empty_parts``), for their names and shapes."""
    mapping = name_map(empty, unet)
    wanted = {part: dict(module.state_dict()) for part, module in {**empty, "unet": unet}.items()}
    filled: dict[str, dict] = {part: {} for part in wanted}
    unused, shapes = [], []
    for folder, tensors in (("controlnet", checkpoint.controlnet), ("unet", checkpoint.unet)):
        for name in tensors:
            target = mapping.get((folder, name))
            if target is None:
                unused.append(f"{folder}/{name}")
                continue
            part, key = target
            shape = tensors.shape(name) if hasattr(tensors, "shape") else tuple(tensors[name].shape)
            if tuple(wanted[part][key].shape) != shape:
                shapes.append(f"{folder}/{name}: checkpoint {list(shape)}, expected {list(wanted[part][key].shape)}")
                continue
            filled[part][key] = (tensors, name)
    unfilled = [f"{part}.{key}" for part, keys in wanted.items() for key in keys if key not in filled[part]]
    problems = []
    for title, names in (("checkpoint tensors with no place in the model", unused),
                         ("model tensors the checkpoint does not provide", unfilled),
                         ("tensors whose shapes differ", shapes)):
        if names:
            shown = "\n    ".join(names[:20]) + (f"\n    ... and {len(names) - 20} more" if len(names) > 20 else "")
            problems.append(f"{len(names)} {title}:\n    {shown}")
    if problems:
        raise UserError(
            "The checkpoint does not match the authors' XPSR architecture on this base model:\n- "
            + "\n- ".join(problems)
        )
    sd_unet = filled.pop("unet")
    return filled, sd_unet


def compare_base(sd_unet: dict, base_tensors: Mapping) -> tuple[float, int]:
    """Largest absolute difference between the checkpoint's SD UNet tensors (references, see map_checkpoint) and
    the base model's (``base_tensors``: its UNet's tensors by name), one pair of tensors at a time."""
    largest = 0.0
    for key, (tensors, name) in sd_unet.items():
        tensor = tensors[name]
        diff = (tensor.float() - base_tensors[key].detach().float()).abs().max().item() if tensor.numel() else 0.0
        largest = max(largest, diff)
    return largest, len(sd_unet)


def _base_unet(base_model: str | Path):
    """The base model's UNet for the import: (a module for its structure and config, its tensors by name).

    A local folder with one safetensors UNet file gives a module on the meta device (no memory) and the file read
    tensor by tensor; anything else (a hub id, sharded weights) is loaded whole in float32."""
    weights = Path(base_model) / "unet" / WEIGHT_FILES[0]
    if not weights.is_file():
        unet = load_base_sd(base_model, components=("unet",)).unet
        return unet, unet.state_dict()
    check_base_model(base_model, ("unet",))
    with loading_model("the base UNet", weights.parent, "Rebuild or copy the base model folder again."):
        config = UNet2DConditionModel.load_config(weights.parent)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    return unet, LazyTensors(weights)


def import_official(
    checkpoint_dir: str | Path,
    base_model: str | Path,
    out: str | Path,
    allow_base_mismatch: bool = False,
    sr_defaults: Optional[dict] = None,
    log: Callable[[str], None] = lambda message: None,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> ImportSummary:
    """Convert the authors' checkpoint into a pipeline folder that ``xpsr sr --pipeline`` loads and
    whose ``xpsr/`` folder ``xpsr train`` can start from (DFC heads included).

    ``sr_defaults``: the :class:`~xpsr_core.infer.pipeline.SRSettings` values stored as the folder's
    defaults (the authors' inference recipe, normally). The checkpoint and the base UNet are read tensor by
    tensor and each part is written in shards of at most ``max_shard_size``, so the import holds about one shard
    of tensors at a time, not the checkpoint.
    """
    start = time.perf_counter()
    out = Path(out)
    log(f"Reading {checkpoint_dir}")
    checkpoint = read_checkpoint(checkpoint_dir)
    log(f"Loading the base model {base_model}")
    unet, base_tensors = _base_unet(base_model)
    check_base_matches(checkpoint.unet_config, unet)
    settings = settings_for(checkpoint.controlnet_config)
    log("Mapping tensors")
    empty = XPSRModel.empty_parts(unet, settings)  # our parts on the meta device: names and shapes, built once
    parts, sd_unet = map_checkpoint(checkpoint, unet, empty)
    counts = {"controlnet": len(checkpoint.controlnet), "unet": len(checkpoint.unet)}
    largest, checked = compare_base(sd_unet, base_tensors)
    log(f"SD-1.5 UNet tensors: {checked}, largest difference from the base model {largest:.3g}")
    mismatch = largest > SD_TOLERANCE
    if mismatch and not allow_base_mismatch:
        _refuse_base_mismatch(base_model, largest)
    log(f"Writing {out}")
    # the UNet written: the checkpoint's own (in the base UNet's float32, as the base model loads) on a mismatch,
    # else (a hub id: a folder with no SD files to copy) the base model's
    unet_tensors = ({key: (tensors, name, torch.float32) for key, (tensors, name) in sd_unet.items()} if mismatch
                    else {key: (base_tensors, key) for key in unet.state_dict()})

    def write_trained(folder: Path) -> None:
        for name, module in empty.items():
            save_part(folder / name, module, parts[name], max_shard_size)
        write_trainable_record(folder, settings)

    def write_unet(folder: Path) -> None:
        save_part(folder, unet, unet_tensors, max_shard_size)

    if Path(base_model).is_dir():
        write_pipeline_folder(out, write_trained, sr_defaults, base_model=base_model,
                              write_unet=write_unet if mismatch else None)
    else:  # a hub id: the components travel through save_pretrained
        loaded = load_base_sd(base_model, components=SD_COMPONENTS)
        write_pipeline_folder(out, write_trained, sr_defaults, write_unet=write_unet,
                              components={name: getattr(loaded, name) for name in SD_COMPONENTS})
    summary = ImportSummary(
        out=out,
        controlnet_tensors=counts["controlnet"],
        unet_tensors=counts["unet"],
        mapped={name: len(state) for name, state in parts.items()},
        base_max_abs_diff=largest,
        base_checked_tensors=checked,
        used_checkpoint_unet=mismatch,
        seconds=round(time.perf_counter() - start, 2),
        settings=asdict(settings)
        | {"conditioning_embedding_out_channels": list(settings.conditioning_embedding_out_channels)},
    )
    (out / "import_report.json").write_text(
        json.dumps(summary.as_dict() | {"checkpoint": str(checkpoint_dir), "base_model": str(base_model)}, indent=2)
    )
    return summary


def _refuse_base_mismatch(base_model: str | Path, largest: float) -> None:
    """The checkpoint's SD UNet tensors differ from the base model's and ``allow_base_mismatch`` is off."""
    raise UserError(
        f"The checkpoint's SD UNet tensors differ from the base model {base_model} (largest absolute difference "
        f"{largest:.3g}): it was trained on another base. "
        "Point --base-model at the SD-1.5 folder it was trained on, "
        "or pass --allow-base-mismatch to use the checkpoint's own UNet weights (as the authors' test.py does)."
    )


def _reference_meta(reference: tuple) -> torch.Tensor:
    """A meta tensor with the shape and dtype a tensor reference (tensors, name[, dtype]) will load as."""
    tensors, name, *cast = reference
    if isinstance(tensors, LazyTensors):
        shape, dtype = tensors.shape(name), tensors.dtype(name)
    else:
        shape, dtype = tuple(tensors[name].shape), tensors[name].dtype
    return torch.empty(shape, dtype=cast[0] if cast else dtype, device="meta")


def _load_reference(reference: tuple) -> torch.Tensor:
    tensors, name, *cast = reference
    tensor = tensors[name]
    return (tensor.to(cast[0]) if cast else tensor).contiguous()


def save_part(folder: Path, module, tensors: dict, max_shard_size: int | str = MAX_SHARD_SIZE) -> None:
    """Writes ``module``'s config and the tensors of its state dict's names (``tensors``: name -> reference, see
    map_checkpoint) as diffusers' ``save_pretrained`` does (file names, shards above ``max_shard_size`` with their
    index, metadata), reading only one shard's tensors at a time. ``module`` may be on the meta device."""
    folder.mkdir(parents=True, exist_ok=True)
    module.save_config(folder)
    names = list(module.state_dict())
    split = split_torch_state_dict_into_shards({name: _reference_meta(tensors[name]) for name in names},
                                               max_shard_size=max_shard_size, filename_pattern=SHARD_PATTERN)
    for filename, shard_names in split.filename_to_tensors.items():
        shard = {name: _load_reference(tensors[name]) for name in shard_names}
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        (folder / SHARD_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------- export


def official_configs(model) -> tuple[dict, dict]:
    """Their ``config.json`` pair for one of our models (what their ``save_pretrained`` writes)."""
    cn = dict(model.controlnet.config)
    controlnet_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cn.items()
                         if not k.startswith("_") and k not in ("sfa_mode", "fusion_heads", "fusion_type")}
    controlnet_config.update({k: v for k, v in CONTROLNET_FIXED.items()})
    controlnet_config["addition_embed_type_num_heads"] = 64
    controlnet_config.update(
        return_rgbs=bool(model.settings.dfc_pixel), use_rrdb=False,
        use_lowlevel_prompt=model.settings.sfa_mode == "parallel", use_latent_pred=bool(model.settings.dfc_latent),
    )
    controlnet_config = {
        "_class_name": "ControlNetModel",
        "_diffusers_version": AUTHORS_DIFFUSERS_VERSION,
        **controlnet_config,
    }
    unet_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.unet.config).items()
                   if not k.startswith("_") and k != "dropout"}
    unet_config.update(up_use_lowlevel_prompt=[False] * len(model.unet.up_blocks), mid_use_lowlevel_prompt=False,
                       down_use_lowlevel_prompt=False)
    unet_config = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": AUTHORS_DIFFUSERS_VERSION,
        **unet_config,
    }
    return controlnet_config, unet_config


def export_official(model, out: str | Path, safe_serialization: bool = True) -> Path:
    """Write ``model`` (the authors' architecture) as ``out/{unet,controlnet}`` in their layout."""
    _check_exportable(model.settings)
    if model.dfc_heads is None and (model.settings.dfc_pixel or model.settings.dfc_latent):
        raise UserError(
            "This model was loaded without its DFC heads; the authors' layout stores them in the ControlNet."
        )
    out = Path(out)
    parts = model.trainable_modules()
    mapping = name_map(parts, model.unet)
    tensors: dict[str, dict] = {"controlnet": {}, "unet": {}}
    for (folder, name), (part, key) in mapping.items():
        module = model.unet if part == "unet" else parts[part]
        tensors[folder][name] = module.state_dict()[key].detach().cpu().contiguous()
    configs = dict(zip(("controlnet", "unet"), official_configs(model)))
    for folder in ("controlnet", "unet"):
        target = out / folder
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text(json.dumps(configs[folder], indent=2, sort_keys=True))
        if safe_serialization:
            save_file(tensors[folder], str(target / WEIGHT_FILES[0]), metadata={"format": "pt"})
        else:
            torch.save(tensors[folder], str(target / WEIGHT_FILES[1]))
        share_per_umask(target)
    return out
