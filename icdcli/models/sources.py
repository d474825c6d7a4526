"""Turning what the user named (`--model` and the part flags) into a loaded model.

`--model` takes the name of a preset of the released checkpoints, a model folder (`icd.json`
inside), or nothing for the model embedded in the package. `--base`, `--teacher`,
`--forward-lora` and `--reverse-lora` give the parts by local path; with a preset they replace the
files it would fetch. `--base` is a diffusers pipeline folder or a single-file checkpoint (see
`icdcli.models.single_file`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from icdcli.core.errors import ModelSourceError
from icdcli.core.paths import MODEL_JSON
from icdcli.diffusion.recipe import SD15, SDXL, EditRecipe, release_recipe
from icdcli.models.hub import fetch_command, hub_file, hub_snapshot, unavailable_reason
from icdcli.models.single_file import checkpoint_family, config_files, converted_base, find_config, read_header

if TYPE_CHECKING:  # torch comes with these: imported where a model is loaded, so `icd info` stays light
    from icdcli.models.fusion import LoraSources
    from icdcli.models.runtime import ICDModel

DEFAULT_MODEL_DIR = Path(__file__).parent.parent / "default_model"
DEFAULT_MODEL = "default"


def release_lora_name(family: str, role: str, boundaries: tuple[int, ...]) -> str:
    """The name a release tarball gives a LoRA: `iCD-SD15-forward_19_259_519_779.safetensors`."""
    prefix = "iCD-SDXL" if family == SDXL else "iCD-SD15"
    return f"{prefix}-{role}_{'_'.join(map(str, boundaries))}.safetensors"


@dataclass(frozen=True)
class Preset:
    """A released iCD checkpoint: base pipeline, LoRA files and guidance-distilled teacher on the hub.

    `forward` and `reverse` are the boundary sets that name the LoRA files; `edit` is the release's
    editing recipe for this checkpoint (see `icdcli.diffusion.recipe`).
    """

    name: str
    description: str
    family: str
    base: str
    lora_repo: str
    forward: tuple[int, ...]
    reverse: tuple[int, ...]
    teacher_repo: str | None
    teacher_file: str | None
    forward_file: tuple[str, str] | None = None
    """(repository, file) of a forward model published apart from the release's LoRAs, under a name that does not
    carry its boundaries (the cycle-consistency forward model): `forward` gives them."""

    @property
    def edit(self) -> EditRecipe:
        return release_recipe(self.family, self.reverse)

    def lora_repo_of(self, role: str) -> str:
        """The hub repository that holds the LoRA of `role`."""
        return self.forward_file[0] if role == "forward" and self.forward_file else self.lora_repo

    def given_boundaries(self, role: str) -> tuple[int, ...] | None:
        """The boundaries of a LoRA whose file name does not carry them (None: its name does)."""
        return self.forward if role == "forward" and self.forward_file else None

    def lora_names(self, role: str) -> list[str]:
        """The file names a LoRA of `role` may have: the release's, then icd's own spelling."""
        if role == "forward" and self.forward_file is not None:
            return [self.forward_file[1]]
        bounds = self.forward if role == "forward" else self.reverse
        return [
            release_lora_name(self.family, role, bounds),
            f"{role}_{'_'.join(map(str, bounds))}.safetensors",
            f"{role}-{'-'.join(map(str, bounds))}.safetensors",
        ]

    def to_json(self) -> dict[str, object]:
        """What `icd info --json` lists for the preset."""
        return {
            "name": self.name,
            "description": self.description,
            "family": self.family,
            "base": self.base,
            "boundaries": {"forward": list(self.forward), "reverse": list(self.reverse)},
            "lora_files": {r: f"{self.lora_repo_of(r)}/{self.lora_names(r)[0]}" for r in ("forward", "reverse")},
            **self.edit.to_json(),
        }


SD15_BASE, SDXL_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"
FAMILY_BASES = {SD15: SD15_BASE, SDXL: SDXL_BASE}
TEACHER_FILES = {SD15: "sd15_cfg_distill.pt", SDXL: "sdxl_cfg_distill.pt"}

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "sd15",
            "SD1.5, 4 steps, tau 0.8 (the paper's SD1.5 editing setup; release tarball iCD-SD15_4steps_1)",
            SD15, SD15_BASE, "dbaranchuk/icd-lora-sd15", (19, 259, 519, 779), (259, 519, 779, 999),
            "alexnasa/Inverse-and-Edit", "sd15_cfg_distill.pt",
        ),
        Preset(
            "sd15-tau0.7",
            "SD1.5, 4 steps, tau 0.7 (release tarball iCD-SD15_4steps_2)",
            SD15, SD15_BASE, "dbaranchuk/icd-lora-sd15", (19, 249, 499, 699), (249, 499, 699, 999),
            "alexnasa/Inverse-and-Edit", "sd15_cfg_distill.pt",
        ),
        Preset(
            "sd15-3step",
            "SD1.5, 3 steps, tau 0.7 (release tarball iCD-SD15_3steps)",
            SD15, SD15_BASE, "dbaranchuk/icd-lora-sd15", (19, 339, 699), (339, 699, 999),
            "alexnasa/Inverse-and-Edit", "sd15_cfg_distill.pt",
        ),
        Preset(
            "sdxl",
            "SDXL, 4 steps, tau 0.7 (the paper's SDXL editing setup, iCD-SDXL_4steps_2; teacher given with --teacher)",
            SDXL, SDXL_BASE, "dbaranchuk/icd-lora-sdxl", (19, 249, 499, 699), (249, 499, 699, 999), None, None,
        ),
        Preset(
            "sd15-cycle",
            "SD1.5, 4 steps, tau 0.8: the release's teacher and reverse model with Inverse-and-Edit's "
            "cycle-consistency forward model (forward from 0)",
            SD15, SD15_BASE, "dbaranchuk/icd-lora-sd15", (0, 259, 519, 779), (259, 519, 779, 999),
            "alexnasa/Inverse-and-Edit", "sd15_cfg_distill.pt",
            ("ilushado/Cycle-consistency", "finetuned_forward_model.safetensors"),
        ),
    )
}  # fmt: skip


@dataclass
class ModelRequest:
    """What the user asked for on the command line."""

    model: str | None = None
    base: str | None = None
    teacher: str | None = None
    forward_lora: str | None = None
    reverse_lora: str | None = None
    half: bool = False  # the model will run in float16: keep its fused cache in float16 too
    base_config: str | None = None  # configs and tokenizers for a single-file --base
    forward_boundaries: tuple[int, ...] | None = None  # for LoRA files whose names do not carry them
    reverse_boundaries: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        if self.forward_lora or self.reverse_lora:
            return f"{self.model or 'lora'}:{Path(self.reverse_lora or '').name}"
        return self.model or DEFAULT_MODEL


def base_files(family: str) -> list[str]:
    """The files of a base pipeline icd reads: no UNet weights (the teacher replaces them), safetensors only."""
    encoders = [f"text_encoder{suffix}/model.safetensors" for suffix in (["", "_2"] if family == SDXL else [""])]
    return [*config_files(family), "vae/diffusion_pytorch_model.safetensors", *encoders]


def _hub_pipeline(repo: str, family: str) -> Path | None:
    folder = hub_snapshot(repo, base_files(family))
    return folder if folder is not None and (folder / "vae").is_dir() else None


def _local(path: str | None, flag: str) -> Path | None:
    if path is None:
        return None
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ModelSourceError(f"{flag} {path} does not exist")
    return resolved


def _base(
    request: ModelRequest, progress: Callable[[str], None] | None = None, family: str | None = None
) -> Path | None:
    """`--base` as a pipeline folder: a folder as given, a single-file checkpoint converted (once, cached)."""
    base = _local(request.base, "--base")
    if base is None or base.is_dir():
        if request.base_config is not None:
            raise ModelSourceError("--base-config goes with a single-file --base (one .safetensors checkpoint)")
        return base
    if base.suffix != ".safetensors":
        raise ModelSourceError(
            f"--base {request.base}: give a diffusers pipeline folder or a single-file checkpoint in .safetensors "
            "(a .ckpt may hold pickled objects, which icd does not load: convert it where you trust it)"
        )
    header = read_header(base)
    found = checkpoint_family(base, header)
    if family is not None and found != family:
        raise ModelSourceError(f"--base {request.base} is an {found} checkpoint, but this model is {family}")
    config = find_config(base, found, FAMILY_BASES[found], given=request.base_config)
    return converted_base(base, config, found, progress=progress, header=header)


def _hub_lora(preset: Preset, role: str) -> Path | None:
    for filename in preset.lora_names(role):
        found = hub_file(preset.lora_repo_of(role), filename)
        if found is not None:
            return found
    return None


def preset_sources(
    preset: Preset, request: ModelRequest, *, progress: Callable[[str], None] | None = None
) -> LoraSources:
    """Local paths of a preset's parts: the user's flags first, then the hub cache, then the network.

    Nothing here imports torch until every part is found, so a preset whose files are missing is reported in
    well under two seconds (`check_preset_files`)."""
    missing: list[str] = []
    commands: list[str] = []
    folder = f"icd-{preset.name}"
    teacher = _local(request.teacher, "--teacher")
    if teacher is None and preset.teacher_repo is not None and preset.teacher_file is not None:
        teacher = hub_file(preset.teacher_repo, preset.teacher_file)
        if teacher is None:
            missing.append(f"--teacher ({preset.teacher_repo}/{preset.teacher_file})")
            commands.append(fetch_command(preset.teacher_repo, [preset.teacher_file], folder))
    if teacher is None and preset.teacher_repo is None:
        missing.append(
            f"--teacher ({TEACHER_FILES[preset.family]}, the guidance-distilled teacher, published by the authors "
            "as a tar.gz archive)"
        )
    files: dict[str, Path | None] = {}
    lora_names: dict[str, list[str]] = {}  # repository -> missing LoRA files there
    for flag, given, role in (
        ("--forward-lora", request.forward_lora, "forward"),
        ("--reverse-lora", request.reverse_lora, "reverse"),
    ):
        files[flag] = _local(given, flag) or _hub_lora(preset, role)
        if files[flag] is None:
            repo = preset.lora_repo_of(role)
            missing.append(f"{flag} ({repo}/{preset.lora_names(role)[0]})")
            lora_names.setdefault(repo, []).append(preset.lora_names(role)[0])
    for repo, names in lora_names.items():
        commands.append(fetch_command(repo, names, folder))
    base = _base(request, progress, preset.family) or _hub_pipeline(preset.base, preset.family)
    if base is None:
        missing.append(f"--base ({preset.base}, a diffusers pipeline folder)")
        commands.append(fetch_command(preset.base, base_files(preset.family), f"{folder}/base"))
    if missing:
        reason = unavailable_reason() or "they are not in the hub cache and the hub does not have them"
        fetch = "".join(f"\n  {command}" for command in commands)  # one command per line, each pastes alone
        bounds = preset.given_boundaries("forward")
        given = "" if bounds is None else f" --forward-boundaries {','.join(map(str, bounds))}"
        raise ModelSourceError(
            f"preset {preset.name!r} needs files that are not here ({reason}): "
            + "; ".join(missing)
            + ". Give local paths with the flags named"
            + (f", or fetch them where a network exists and pass --model {folder}{given}"
               f"{f' --base {folder}/base' if base is None else ''}:{fetch}" if commands else ".")
        )  # fmt: skip
    from icdcli.models.fusion import LoraSources

    forward, reverse = files["--forward-lora"], files["--reverse-lora"]
    assert base is not None and forward is not None and reverse is not None, "missing parts raised above"
    return LoraSources(
        base, teacher, forward, reverse, name=preset.name, edit=preset.edit.to_json(),
        forward_boundaries=request.forward_boundaries or preset.given_boundaries("forward"),
        reverse_boundaries=request.reverse_boundaries or preset.given_boundaries("reverse"),
    )  # fmt: skip


def preset_fetch_commands(name: str) -> list[str]:
    """The commands that fetch every file of preset `name` into `icd-NAME/` (and its base into `icd-NAME/base`)."""
    preset = PRESETS[name]
    folder = f"icd-{preset.name}"
    commands = []
    if preset.teacher_repo is not None and preset.teacher_file is not None:
        commands.append(fetch_command(preset.teacher_repo, [preset.teacher_file], folder))
    lora_files: dict[str, list[str]] = {}
    for role in ("forward", "reverse"):
        lora_files.setdefault(preset.lora_repo_of(role), []).append(preset.lora_names(role)[0])
    commands += [fetch_command(repo, names, folder) for repo, names in lora_files.items()]
    commands.append(fetch_command(preset.base, base_files(preset.family), f"{folder}/base"))
    return commands


def preset_hub_files(preset: Preset) -> list[tuple[str, str]]:
    """(repository, file) of every hub file a preset reads: teacher, the two LoRAs, the base pipeline's files."""
    files = []
    if preset.teacher_repo is not None and preset.teacher_file is not None:
        files.append((preset.teacher_repo, preset.teacher_file))
    files += [(preset.lora_repo_of(role), preset.lora_names(role)[0]) for role in ("forward", "reverse")]
    return files + [(preset.base, name) for name in base_files(preset.family)]


def preset_files_report(preset: Preset) -> dict[str, object]:
    """Which of a preset's hub files the local hub cache holds (no network): for `icd info`."""
    from huggingface_hub import constants, try_to_load_from_cache

    missing = []
    for repo, filename in preset_hub_files(preset):
        found = try_to_load_from_cache(repo, filename, cache_dir=constants.HF_HUB_CACHE)
        if not isinstance(found, str):
            missing.append(f"{repo}/{filename}")
    total = len(preset_hub_files(preset))
    teacher_elsewhere = preset.teacher_repo is None  # the SDXL teacher is an archive: given with --teacher
    return {"present": not missing and not teacher_elsewhere, "total": total, "missing": missing,
            "needs_teacher_flag": teacher_elsewhere}  # fmt: skip


def check_preset_files(request: ModelRequest) -> None:
    """For a preset, say which of its files are missing before anything heavy (torch, diffusers) is imported:
    ModelSourceError with one fetch command per line. Nothing for other models, or a single-file --base (its
    conversion needs the libraries anyway)."""
    preset = PRESETS.get(request.model or "")
    if preset is None or (request.base is not None and not Path(request.base).expanduser().is_dir()):
        return
    preset_sources(preset, request)


# --- a folder as a release tarball unpacks ----------------------------------------------------------


@dataclass
class ReleaseFolder:
    """The files of a release tarball's folder, by role."""

    forward: Path
    reverse: Path
    teacher: Path | None
    family: str | None


def _candidates(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file()]
    if not files:  # a tarball that unpacks into one folder of its own
        subfolders = [p for p in folder.iterdir() if p.is_dir()]
        if len(subfolders) == 1:
            files = [p for p in subfolders[0].iterdir() if p.is_file()]
    return sorted(files)


def find_release_files(folder: Path) -> ReleaseFolder | None:
    """The forward and reverse LoRAs and the teacher in `folder` (or its one subfolder), found by role
    and boundaries in their names; None when it holds no LoRA file. Ambiguity is a ModelSourceError."""
    from icdcli.models.lora import boundaries_from_filename, family_from_filename

    roles: dict[str, list[Path]] = {"forward": [], "reverse": []}
    teachers: list[Path] = []
    for path in _candidates(folder):
        if path.suffix == ".safetensors":
            role: str | None
            try:
                role, _ = boundaries_from_filename(path)
            except ValueError:  # a model named without its boundaries (finetuned_forward_model): --*-boundaries
                role = next((r for r in ("forward", "reverse") if r in path.name.lower()), None)
            if role is not None:
                roles[role].append(path)
                continue
        if path.suffix in (".pt", ".pth", ".bin", ".safetensors") and "distill" in path.name.lower():
            teachers.append(path)
    if not roles["forward"] and not roles["reverse"]:
        return None
    for role, found in (*roles.items(), ("teacher", teachers)):
        if len(found) > 1:
            raise ModelSourceError(
                f"{folder} holds {len(found)} {role} files ({', '.join(p.name for p in found)}): keep one, "
                f"or name it with --{role}{'-lora' if role != 'teacher' else ''}"
            )
        if not found and role != "teacher":
            raise ModelSourceError(f"{folder} holds no {role} LoRA (a file named like *{role}_19_...safetensors)")
    named = (family_from_filename(p) for p in [*roles["forward"], *roles["reverse"], *teachers])
    families = {family for family in named if family is not None}
    if len(families) > 1:
        raise ModelSourceError(f"{folder} mixes files of {' and '.join(sorted(families))}: keep one family")
    teacher = teachers[0] if teachers else None
    return ReleaseFolder(roles["forward"][0], roles["reverse"][0], teacher, families.pop() if families else None)


def release_folder_sources(
    folder: Path, request: ModelRequest, *, progress: Callable[[str], None] | None = None
) -> LoraSources | None:
    """Sources of a release tarball's folder (None if `folder` is not one); says which file takes each role."""
    from icdcli.models.fusion import LoraSources

    found = find_release_files(folder)
    if found is None:
        return None
    forward = _local(request.forward_lora, "--forward-lora") or found.forward
    reverse = _local(request.reverse_lora, "--reverse-lora") or found.reverse
    teacher = _local(request.teacher, "--teacher") or found.teacher
    family = found.family
    base = _base(request, progress, family)
    if base is None:
        if family is None:
            raise ModelSourceError(
                f"{folder}: cannot tell SD1.5 from SDXL by the file names; give the base pipeline with --base"
            )
        base = _hub_pipeline(FAMILY_BASES[family], family)
        if base is None:
            raise ModelSourceError(
                f"{folder} needs its base pipeline ({FAMILY_BASES[family]}), which is not here "
                f"({unavailable_reason() or 'not cached'}): give a local folder with --base, or fetch it where a "
                f"network exists: {fetch_command(FAMILY_BASES[family], base_files(family), f'{folder.name}-base')}"
            )
    say = progress or (lambda message: None)
    say(
        f"release folder {folder}: forward {forward.name}, reverse {reverse.name}, "
        f"teacher {teacher.name if teacher else 'none (the base UNet)'}, base {base}"
    )
    return LoraSources(
        base, teacher, forward, reverse, name=folder.name,
        forward_boundaries=request.forward_boundaries, reverse_boundaries=request.reverse_boundaries,
    )  # fmt: skip


def _part_sources(request: ModelRequest, progress: Callable[[str], None] | None = None) -> LoraSources:
    if not (request.base and request.forward_lora and request.reverse_lora):
        raise ModelSourceError(
            "loading from parts needs --base (a diffusers pipeline folder or a single-file checkpoint), "
            "--forward-lora and --reverse-lora; --teacher is the guidance-distilled UNet state dict (optional)"
        )
    from icdcli.models.fusion import LoraSources

    base = _base(request, progress)
    forward = _local(request.forward_lora, "--forward-lora")
    reverse = _local(request.reverse_lora, "--reverse-lora")
    assert base is not None and forward is not None and reverse is not None, "checked above: all three are given"
    return LoraSources(
        base, _local(request.teacher, "--teacher"), forward, reverse, name=reverse.parent.name,
        forward_boundaries=request.forward_boundaries, reverse_boundaries=request.reverse_boundaries,
    )  # fmt: skip


def _load_cached(
    request: ModelRequest, sources: LoraSources, need_teacher: bool, progress: Callable[[str], None] | None
) -> ICDModel:
    from icdcli.models.fusion import load_lora_cached

    return load_lora_cached(replace(sources, cache_half=request.half), need_teacher=need_teacher, progress=progress)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
HUB_IGNORE = ["*.bin", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.fp16.safetensors"]


def _load_hub_model(
    repo: str, request: ModelRequest, need_teacher: bool, progress: Callable[[str], None] | None
) -> ICDModel:
    """`--model org/repo`: a hub repository holding an icd model folder or a release tarball's files."""
    from icdcli.models.fusion import load_model_folder

    folder = hub_snapshot(repo, ignore=HUB_IGNORE)
    if folder is None:
        raise ModelSourceError(
            f"--model {repo}: no such local folder, and the hub repository is not here "
            f"({unavailable_reason() or 'not cached, and the hub does not have it'}); fetch it where a network "
            f"exists: hf download {repo} --local-dir {repo.split('/')[-1]}, then pass --model {repo.split('/')[-1]}"
        )
    if (folder / MODEL_JSON).is_file():
        return load_model_folder(folder, need_teacher=need_teacher, progress=progress, half=request.half)
    sources = release_folder_sources(folder, request, progress=progress)
    if sources is None:
        raise ModelSourceError(f"hub repository {repo} holds neither {MODEL_JSON} nor iCD LoRA files")
    return _load_cached(request, sources, need_teacher, progress)


def named_model_folder(request: ModelRequest) -> Path | None:
    """The icd model folder (`icd.json` inside) that `load_requested_model` reads for `request`, found without reading
    it; None when the request names anything else (a preset, a release folder, a hub id, parts by path)."""
    if request.model in PRESETS or request.forward_lora or request.reverse_lora or request.base:
        return None
    folder = DEFAULT_MODEL_DIR if request.model in (None, DEFAULT_MODEL) else Path(request.model).expanduser()
    return folder if (folder / MODEL_JSON).is_file() else None


def load_requested_model(
    request: ModelRequest, *, need_teacher: bool = False, progress: Callable[[str], None] | None = None
) -> ICDModel:
    """Load whatever `request` names; raises ModelSourceError with what to do when it cannot.

    Args:
        request: The model flags: a preset, folder or hub id, or the parts by path.
        need_teacher: Load the teacher UNet too (the DDIM baseline needs it).
        progress: Called with a line for each stage of loading, fetching or fusing.
    """
    from icdcli.models.fusion import load_model_folder

    name = request.model
    if name in PRESETS:
        return _load_cached(request, preset_sources(PRESETS[name], request, progress=progress), need_teacher, progress)
    folder = Path(name).expanduser() if name not in (None, DEFAULT_MODEL) else None
    if folder is not None and folder.is_dir() and not (folder / MODEL_JSON).is_file():
        sources = release_folder_sources(folder, request, progress=progress)
        if sources is not None:
            return _load_cached(request, sources, need_teacher, progress)
    if name is not None and folder is not None and not folder.exists() and HUB_ID.fullmatch(name):
        return _load_hub_model(name, request, need_teacher, progress)
    if request.forward_lora or request.reverse_lora or request.base:
        if folder is not None:
            raise ModelSourceError(
                "--base/--teacher/--forward-lora/--reverse-lora go with a preset, a release folder, a hub id "
                "or no --model"
            )
        return _load_cached(request, _part_sources(request, progress), need_teacher, progress)
    if name in (None, DEFAULT_MODEL):
        if not (DEFAULT_MODEL_DIR / MODEL_JSON).is_file():
            raise ModelSourceError(
                "this installation has no embedded default model: pass --model with a model folder or one of "
                + ", ".join(PRESETS)
            )
        return load_model_folder(DEFAULT_MODEL_DIR, need_teacher=need_teacher, progress=progress, half=request.half)
    if folder is not None and folder.is_dir():
        if not (folder / MODEL_JSON).is_file():
            raise ModelSourceError(
                f"--model {name}: the folder holds neither {MODEL_JSON} (an icd model folder) nor iCD LoRA files "
                "(a release tarball's folder: *forward_19_...safetensors and *reverse_..._999.safetensors)"
            )
        return load_model_folder(folder, need_teacher=need_teacher, progress=progress, half=request.half)
    raise ModelSourceError(f"--model {name!r} is neither a model folder nor a preset; presets: {', '.join(PRESETS)}")
