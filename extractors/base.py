"""One small extractor class per backbone, behind one interface, found through one registry.

Adding a modality (say pose) is a new file with a class decorated by `@register("pose", "name")`,
its module name in BACKBONE_MODULES and its settings class in extractors/settings.py; the CLI, the
cache and the models pick it up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import os
import urllib.parse
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch

from extractors.config import ExtractionConfig
from extractors.onednn import use_onednn_linears
from extractors.settings import BackboneSettings, LinearLayerSettings, backbone_names
from manifests.cache import WEIGHTS_FILES_KEY, file_sha256
from manifests.files import atomic_write_json


class BackboneUnavailableError(RuntimeError):
    """A backbone cannot run on this machine (weights or a library missing); the message says how to fix it."""


class WeightsUnavailableError(BackboneUnavailableError):
    """Pretrained weights could not be found or downloaded; the message names the file and the flag."""


@dataclass(frozen=True)
class WeightsSource:
    """Where pretrained weights come from.

    weights_dir: a local folder searched first (`--weights-dir`); files keep their public names.
    offline: never touch the network (also on when HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1).
    """

    weights_dir: Path | None = None
    offline: bool = False

    @property
    def is_offline(self) -> bool:
        return (
            self.offline
            or os.environ.get("HF_HUB_OFFLINE") == "1"
            or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        )


class Extractor:
    """A frozen backbone turning a batch of segments into one feature vector per segment.

    Subclasses set `modality`, `name`, `input_kind`, `version`, and implement `__init__`
    (build the network, random or pretrained, on `device`, in eval mode) and `embed`.

    input_kind "frames": `embed` receives uint8 RGB frames shaped (B, F, H, W, 3) on the CPU,
    already resized at decode time so the short side is `config.decode_short_side`; the extractor
    does its own crop / resize / normalisation on its device.
    input_kind "audio": `embed` receives a list of B mono float32 waveforms at
    `config.audio_sample_rate` Hz, one per segment (lengths may differ by a few samples); AST's pamfn
    front end receives AudioChunks instead (extractors/decode.py).

    `embed` returns float32 (B, feature_dim) on the CPU. It runs under torch.no_grad(); its network runs
    inside `self.autocast()`, which computes in bf16 when the config's precision is bf16; results are
    returned in float32 either way.

    `settings` is the backbone's own settings (its class in extractors/settings.py).
    """

    modality: ClassVar[str]
    name: ClassVar[str]
    input_kind: ClassVar[str]  # "frames" | "audio"
    version: ClassVar[str] = "1"
    # Frames after each clip's own that `embed` takes (a flow backbone's final pair, see
    # ExtractionConfig.extra_frames): frames (B, F + extra_frames, H, W, 3).
    extra_frames: int = 0

    feature_dim: int
    device: torch.device

    def __init__(
        self, config: ExtractionConfig, device: torch.device, weights: WeightsSource
    ) -> None:
        self.config = config
        self.settings: BackboneSettings = config.settings[self.modality]
        self.device = device
        self.weights = weights

    @classmethod
    def feature_version(cls, config: ExtractionConfig) -> str:
        """The version of the features this extractor makes under `config`, as records and config.json
        store it: a cache is only ever extended with features of the same version."""
        return cls.version

    # The pretrained weights files this extractor loaded, described by `describe_weights_file` (set by
    # build_extractors; None for random weights).
    weights_identity: list[dict] | None = None

    @classmethod
    def weights_files(cls, config: ExtractionConfig, weights: WeightsSource) -> list[WeightsFile]:
        """The pretrained weights files `config` makes this extractor load, located (downloaded when
        online); WeightsUnavailableError before any video is touched if one cannot be had.

        Called for pretrained runs only. The default has none (for weight-free extractors)."""
        return []

    def embed(self, batch: torch.Tensor | list[np.ndarray]) -> torch.Tensor:
        raise NotImplementedError

    def autocast(self) -> torch.autocast:
        """The context the network runs in: bf16 autocast on this device when `config.precision` is bf16
        (matmuls and convolutions in bfloat16, reductions such as softmax and norms in float32), else off."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")

    def freeze(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` on this extractor's device, in eval mode without gradients; its linear layers run
        through oneDNN on a CPU when the settings say cpu_linear="onednn" (extractors/onednn.py)."""
        if isinstance(self.settings, LinearLayerSettings) and self.settings.cpu_linear == "onednn":
            use_onednn_linears(model)
        return model.to(self.device).eval().requires_grad_(False)

    def describe(self) -> dict:
        """What is recorded in config.json and the manifest about this extractor."""
        return {
            "name": self.name,
            "version": self.feature_version(self.config),
            "feature_dim": self.feature_dim,
            "weights": self.config.weights,
            "arch_size": self.config.arch_size,
            "random_weights": self.config.random_weights,
            # Only for pretrained weights: a random-weight description stays the one its caches record.
            **({WEIGHTS_FILES_KEY: self.weights_identity} if self.weights_identity is not None else {}),
        }


REGISTRY: dict[tuple[str, str], type[Extractor]] = {}

# Registration order is the order backbones are listed in, defaults first.
BACKBONE_MODULES = ("extractors.rgb_vst", "extractors.rgb_timesformer", "extractors.flow_i3d", "extractors.audio_ast")


def load_backbones() -> None:
    """Import every backbone module, which registers its classes (a no-op after the first call)."""
    for module in BACKBONE_MODULES:
        importlib.import_module(module)


def register(modality: str, name: str):
    """Class decorator adding an extractor to the registry under (modality, name)."""

    def add(cls: type[Extractor]) -> type[Extractor]:
        key = (modality, name)
        if key in REGISTRY:
            raise ValueError(f"extractor {key} registered twice")
        cls.modality, cls.name = modality, name
        REGISTRY[key] = cls
        return cls

    return add


def available_backbones() -> dict[str, list[str]]:
    """{modality: [backbone names]} in the settings table's order (defaults first), whichever backbone
    module happened to be imported first."""
    load_backbones()
    return {m: [n for n in names if (m, n) in REGISTRY] for m, names in backbone_names().items()}


def extractor_class(modality: str, name: str) -> type[Extractor]:
    load_backbones()
    try:
        return REGISTRY[(modality, name)]
    except KeyError:
        choices = available_backbones().get(modality)
        if choices is None:
            raise ValueError(
                f"unknown modality {modality!r}; known: {sorted(available_backbones())}"
            ) from None
        raise ValueError(f"unknown {modality} backbone {name!r}; choose from {choices}") from None


def feature_versions(config: ExtractionConfig) -> dict[str, tuple[str, str]]:
    """{modality: (backbone name, feature version)} of the extractors `config` builds, without building
    them: what a cache of `config` must record to be extended (CacheConfig.version_mismatch)."""
    return {m: (config.backbones[m], extractor_class(m, config.backbones[m]).feature_version(config))
            for m in config.modalities}


def build_extractors(
    config: ExtractionConfig, device: torch.device, weights: WeightsSource
) -> dict[str, Extractor]:
    """Locate and identify every pretrained weight first, then build the extractors, one per modality.

    Each extractor's describe() names the weights files it loaded by content (`weights_identity`); the
    cache folder follows `config`, so a caller choosing one identifies the weights first (identify_weights)."""
    classes = {m: extractor_class(m, config.backbones[m]) for m in config.modalities}
    _, described = identify_weights(config, weights)
    extractors = {}
    for modality, cls in classes.items():
        # Random weights are seeded per modality so that adding a modality leaves the others unchanged.
        torch.manual_seed(config.seed * 1_000_003 + zlib.crc32(modality.encode()))
        extractors[modality] = cls(config, device, weights)
        extractors[modality].weights_identity = described.get(modality)
    return extractors


def check_all_weights(checks: list[Callable[[], object]]) -> None:
    """Run every weight check; one WeightsUnavailableError listing every missing file, not just the first."""
    problems: list[str] = []
    for check in checks:
        try:
            check()
        except WeightsUnavailableError as exc:
            problems += [line.removeprefix("- ") for line in str(exc).splitlines() if line.startswith("- ")] or [str(exc)]
    if len(problems) == 1:
        raise WeightsUnavailableError(problems[0])
    if problems:
        raise WeightsUnavailableError(
            f"{len(problems)} pretrained weight files are missing:\n" + "\n".join(f"- {p}" for p in problems)
        )


def find_local_file(weights: WeightsSource, filename: str) -> Path | None:
    """The file in --weights-dir, or torch hub's checkpoint cache, if present."""
    candidates = []
    if weights.weights_dir is not None:
        candidates.append(Path(weights.weights_dir) / filename)
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / filename)
    for path in candidates:
        if path.is_file():
            return path
    return None


def url_filename(url: str) -> str:
    """The file name a download URL saves under: its last path part, without a query (`?dl=1`)."""
    return urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]


def checkpoint_path(weights: WeightsSource, url: str) -> Path:
    """A torch checkpoint file by its public URL: --weights-dir or torch hub's cache, else downloaded
    into the hub cache (unless offline). Raises WeightsUnavailableError naming the file and the flag."""
    filename = url_filename(url)
    path = find_local_file(weights, filename)
    if path is not None:
        return path
    where = f"--weights-dir ({weights.weights_dir})" if weights.weights_dir else "--weights-dir (not given)"
    if weights.is_offline:
        raise WeightsUnavailableError(
            f"{filename} is in neither {where} nor torch hub's cache, and offline mode forbids "
            f"downloading it from {url}; put the file in a folder and pass --weights-dir DIR"
        )
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    # torchvision names its files <name>-<sha256 prefix>.pth; the prefix is checked like torchvision does.
    match = torch.hub.HASH_REGEX.search(filename)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=match.group(1) if match else None)
    except Exception as exc:  # network errors come in many types; all mean the same here
        raise WeightsUnavailableError(
            f"could not download {filename} from {url} ({exc}); put the file in a folder and pass "
            "--weights-dir DIR"
        ) from exc
    return target


def hf_model_source(weights: WeightsSource, hub_id: str) -> str:
    """Where from_pretrained should look: `<weights_dir>/<repo name>` when that folder exists, else the hub id."""
    if weights.weights_dir is not None:
        folder = Path(weights.weights_dir) / hub_id.split("/")[-1]
        if folder.is_dir():
            return str(folder)
    return hub_id


def hf_weights_unavailable(weights: WeightsSource, hub_id: str, exc: Exception) -> WeightsUnavailableError:
    """The error for a Hugging Face model that from_pretrained could not find or download."""
    folder = hub_id.split("/")[-1]
    how = "offline and not in the Hugging Face cache" if weights.is_offline else f"download failed: {exc}"
    return WeightsUnavailableError(
        f"{hub_id} weights are not available ({how}); save the model folder as DIR/{folder} "
        f"(e.g. `hf download {hub_id} --local-dir DIR/{folder}`) and pass --weights-dir DIR"
    )


def hf_pretrained(loader_class, hub_id: str, weights: WeightsSource, **kwargs):
    """`loader_class.from_pretrained` (a transformers model or config class) from --weights-dir or the hub.

    Raises WeightsUnavailableError naming the model and --weights-dir when it cannot be had. Its
    "Loading weights" bar and deprecation notices are kept off the terminal."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore", FutureWarning)
            return loader_class.from_pretrained(
                hf_model_source(weights, hub_id), local_files_only=weights.is_offline, **kwargs
            )
    except OSError as exc:
        raise hf_weights_unavailable(weights, hub_id, exc) from exc


# ----------------------------------------------------------------------------- weights by content

WEIGHTS_SHA256_MEMO = "weights_sha256.json"  # in torch hub's folder: {absolute path: size, mtime, sha256}
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what from_pretrained loads, in its order


@dataclass(frozen=True)
class WeightsFile:
    """A pretrained weights file an extractor loads, and the public weights its name stands for.

    public_sha256: the public file's SHA-256 (hex, or a prefix of it) when known: torchvision names its
    files `<name>-<sha256 prefix>.pth` (torch.hub.HASH_REGEX); None when no public hash is known."""

    path: Path
    name: str  # the public name it is found under: a file name, or "<hub id>/<file>" for a Hugging Face model
    public: str  # the public weights that name stands for
    public_sha256: str | None = None


def checkpoint_file(weights: WeightsSource, url: str, public: str) -> WeightsFile:
    """The WeightsFile of a torch checkpoint by its public URL (checkpoint_path), with the SHA-256 prefix
    its name carries, if any."""
    name = url_filename(url)
    match = torch.hub.HASH_REGEX.search(name)
    prefix = match.group(1) if match and match.group(1) else None
    return WeightsFile(checkpoint_path(weights, url), name, public, prefix)


def hf_weights_files(weights: WeightsSource, hub_id: str) -> list[WeightsFile]:
    """The weights files `from_pretrained` loads for `hub_id`: from the --weights-dir folder when it exists,
    else from the Hugging Face cache (downloaded when online). The first of HF_WEIGHT_FILES present, or
    the shards its index (`<name>.index.json`) lists."""
    source = hf_model_source(weights, hub_id)
    for filename in HF_WEIGHT_FILES:
        for name in (filename, f"{filename}.index.json"):
            path = Path(source) / name if source != hub_id else _hub_file(weights, hub_id, name)
            if path is None or not path.is_file():
                continue
            if not name.endswith(".index.json"):
                return [WeightsFile(path, f"{hub_id}/{name}", hub_id)]
            shards = sorted(set(json.loads(path.read_text()).get("weight_map", {}).values()))
            found = [(s, Path(source) / s if source != hub_id else _hub_file(weights, hub_id, s)) for s in shards]
            return [WeightsFile(p, f"{hub_id}/{s}", hub_id) for s, p in found if p is not None]
    raise hf_weights_unavailable(weights, hub_id, FileNotFoundError(f"none of {HF_WEIGHT_FILES} in {source}"))


def _hub_file(weights: WeightsSource, hub_id: str, filename: str) -> Path | None:
    """A file of a Hugging Face repository from its cache (downloaded when online), None when the repository
    has no such file (or, offline, the cache lacks it)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(hub_id, filename, local_files_only=weights.is_offline))
    except EntryNotFoundError:  # LocalEntryNotFoundError (offline, not cached) is one too
        return None
    except Exception as exc:  # network and repository errors come in many types; all mean the same here
        raise hf_weights_unavailable(weights, hub_id, exc) from exc


def weights_sha256(path: Path) -> str:
    """"sha256:<hex>" of a weights file, hashed once: a file of the size and mtime recorded in torch hub's
    folder (WEIGHTS_SHA256_MEMO) stands for its recorded hash, as a video's record does (pipeline/videos.py
    same_file), so a rerun does not read gigabytes again."""
    path = Path(path).absolute()
    stat = path.stat()
    memo_path = Path(torch.hub.get_dir()) / WEIGHTS_SHA256_MEMO
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    known = memo.get(str(path)) if isinstance(memo, dict) else None
    if isinstance(known, dict) and (known.get("size_bytes"), known.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
        return str(known["sha256"])
    sha256 = file_sha256(path)
    memo = memo if isinstance(memo, dict) else {}
    memo[str(path)] = {"size_bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(memo_path, memo)
    except OSError:
        pass  # a read-only hub folder: the file is hashed again next time, nothing else changes
    return sha256


def describe_weights_file(file: WeightsFile) -> dict:
    """A weights file by content, as config.json records it: its public name, SHA-256 and the public weights
    it stands for; where the public SHA-256 is known, whether the content is that file, and a warning
    when it is not."""
    sha256 = weights_sha256(file.path)
    out = {"file": file.name, "sha256": sha256, "public": file.public}
    if file.public_sha256 is not None:
        out["public_sha256"] = file.public_sha256
        out["is_public"] = sha256.removeprefix("sha256:").startswith(file.public_sha256)
        if not out["is_public"]:
            out["warning"] = (f"{file.path}: its content (SHA-256 {sha256.removeprefix('sha256:')[:12]}...) does "
                              f"not match the SHA-256 prefix {file.public_sha256} in its name: not the public "
                              f"{file.public}")
    return out


def located_weights(config: ExtractionConfig, weights: WeightsSource) -> dict[str, list[WeightsFile]]:
    """{modality: the weights files its backbone loads} of a pretrained `config`; one WeightsUnavailableError
    listing every missing file."""
    found: dict[str, list[WeightsFile]] = {}

    def locate(modality: str) -> None:
        found[modality] = extractor_class(modality, config.backbones[modality]).weights_files(config, weights)

    check_all_weights([lambda m=m: locate(m) for m in config.modalities])
    return {m: found[m] for m in config.modalities if m in found}


def identify_weights(
    config: ExtractionConfig, weights: WeightsSource
) -> tuple[ExtractionConfig, dict[str, list[dict]]]:
    """`config` with its `weights_sha256` set from the files its backbones would load, and each modality's
    files described (describe_weights_file); both unchanged / empty for random weights.

    A file whose public SHA-256 is known and differs enters `weights_sha256`, and so the cache folder's
    name; the public file, and a file of which no public SHA-256 is known, do not (ExtractionConfig)."""
    if config.random_weights:
        return config, {}
    described = {m: [describe_weights_file(f) for f in files] for m, files in located_weights(config, weights).items()}
    return with_weights(config, described), described


def with_weights(config: ExtractionConfig, described: dict[str, list[dict] | None]) -> ExtractionConfig:
    """`config` naming, in its `weights_sha256`, the described weights files known not to be public."""
    other = {m: {d["file"]: d["sha256"] for d in files or [] if d.get("is_public") is False}
             for m, files in described.items()}
    return dataclasses.replace(config, weights_sha256={m: v for m, v in other.items() if v})


def weights_warnings(described: dict[str, list[dict]]) -> list[str]:
    """The warnings of described weights files (identify_weights), one line each."""
    return [d["warning"] for files in described.values() for d in files if d.get("warning")]
