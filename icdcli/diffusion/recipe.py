"""Edit recipes: what a model edits with when no flag says otherwise.

A recipe belongs to a model (its folder's `icd.json`, a preset, or the family's release defaults for
parts given by path), never to a code path: `icd edit` reads it once the model is known, and every
flag the user gives wins over it.

Guidance convention: icd takes the classical classifier-free guidance scale w (1 = unguided,
eps = eps_u + w * (eps_c - eps_u)), as diffusers does. The release's scripts feed their
guidance-distilled UNets the embedding of `w_release * 1000` with 0 meaning unguided, so
`w_release = w - 1`: the release's SD1.5 editing setup `guidance_scale 19` is `--guidance 20` here.

This module imports nothing heavy: `icd info` lists the presets' recipes without torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

METHODS = ("p2p", "swap")
SAMPLERS = ("icd", "ddim")
DEFAULT_SEED = 0
BLEND_THRESHOLD = 0.3
"""Prompt-to-Prompt local blend: the part of a word's maximum attention above which its region begins."""
DEFAULT_KEYS = frozenset({"edit", "edit_guidance", "tau", "generate_guidance"})
"""Keys of a model's metadata that are defaults of its use, not of what its networks compute."""


def network_identity(info: dict[str, Any]) -> dict[str, Any]:
    """A model's metadata without its defaults: what exports and records compare to know the same model."""
    return {key: value for key, value in info.items() if key not in DEFAULT_KEYS}


REPLACE, REFINE = "replace", "refine"
P2P_MODES = ("auto", REPLACE, REFINE)
ALIGNED_TAIL, RELEASE_TAIL = "aligned", "release"
REPLACE_TAILS = (ALIGNED_TAIL, RELEASE_TAIL)
"""Prompt-to-Prompt replace edits: the tokens after the last changed word read their own counterparts' maps
(`aligned`, icd's rule) or the release's shifted positions (`release`, for exact replays; docs/p2p.md)."""
SOURCE_BRANCH, INVERSION_KEPT = "source", "inversion"
BLEND_KEEPS = (SOURCE_BRANCH, INVERSION_KEPT)
"""Local blend: outside the edited region the target keeps the source branch (`source`, P2P's and the release's
rule) or the inversion's own latents at each step, the photo's own latents at the last (`inversion`)."""


def check_replace_tail(value: Any, label: str = "replace_tail") -> str:
    """`value` when it names a replace-tail rule; ValueError saying which ones exist otherwise."""
    if value not in REPLACE_TAILS:
        raise ValueError(f"{label} must be {' or '.join(REPLACE_TAILS)}, not {str(value)[:40]!r}")
    return str(value)


def check_blend_keep(value: Any, label: str = "blend_keep") -> str:
    """`value` when it names what local blend keeps outside the edited region; ValueError saying which exist."""
    if value not in BLEND_KEEPS:
        raise ValueError(f"{label} must be {' or '.join(BLEND_KEEPS)}, not {str(value)[:40]!r}")
    return str(value)


class P2PError(ValueError):
    """A Prompt-to-Prompt request that cannot be carried out as asked (the message says why)."""


@dataclass(frozen=True)
class P2PSettings:
    """What the user asks of a P2P edit.

    `cross_replace` and `self_replace` are fractions of the decoding steps. Local blend keeps the
    source outside the region of its words: `blend` are looked up in both prompts, `blend_source`
    in the source prompt only and `blend_target` in the target only (the release's per-prompt form,
    PIE-Bench's `blended_word`). `amplify` multiplies the target's attention to chosen words,
    `amplify_new` to every word new in the target (stopwords excepted). `mode` is `auto` (replace
    when the prompts have equal word counts, else refine), `replace` or `refine`. With
    `strict_blend`, a per-prompt blend word missing from its prompt is an error; without, it adds
    no region (what the release does). `replace_tail` is the rule of a replace edit's tokens after the last
    changed word: `aligned` (icd's: each reads its own counterpart) or `release` (the release's shifted
    positions, for exact replays of its results; see `icdcli.diffusion.p2p.tokens.replacement_mapper` and
    docs/p2p.md). `blend_keep` is what local blend keeps outside the edited region: the source branch (`source`,
    P2P's rule) or the inversion's latents at each step (`inversion`: the photo's own latents after the last step,
    so the unchanged region decodes as the VAE gives it back).

    The defaults are the library's (P2P's own 0.8 and 0.4); an edit's come from its model's recipe through
    `P2POptions.resolve`. `to_record` is what an output keeps (read back by `P2POptions.from_record`).
    """

    cross_replace: float = 0.8
    self_replace: float = 0.4
    blend: tuple[str, ...] = ()
    amplify: tuple[tuple[str, float], ...] = ()
    mode: str = "auto"
    blend_threshold: float = BLEND_THRESHOLD
    blend_source: tuple[str, ...] = ()
    blend_target: tuple[str, ...] = ()
    amplify_new: float = 1.0
    strict_blend: bool = True
    replace_tail: str = ALIGNED_TAIL
    blend_keep: str = SOURCE_BRANCH

    def __post_init__(self) -> None:
        for name in ("cross_replace", "self_replace", "blend_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # also refuses NaN
                raise P2PError(f"{name.replace('_', '-')} must be a fraction in [0, 1], got {value}")
        factors = [self.amplify_new, *(factor for _, factor in self.amplify)]
        if not all(0.0 <= factor < 1e6 for factor in factors):
            raise P2PError(f"amplify factors must be finite and >= 0, got {factors}")
        if self.mode not in P2P_MODES:
            raise P2PError(f"P2P mode must be auto, replace or refine, got {self.mode!r}")
        try:
            check_replace_tail(self.replace_tail)
            check_blend_keep(self.blend_keep)
        except ValueError as error:
            raise P2PError(str(error)) from None

    @property
    def blends(self) -> bool:
        return bool(self.blend or self.blend_source or self.blend_target)

    @property
    def keeps_inversion(self) -> bool:
        """Whether local blend keeps the inversion's latents outside the edited region (it needs them)."""
        return self.blends and self.blend_keep == INVERSION_KEPT

    def to_record(self) -> dict[str, Any]:
        """The settings as JSON values (what an output's record keeps). `replace_tail` is kept only when it is the
        release's, `blend_keep` only when it is `inversion`: records of the default rules stay as they were before the
        choices existed (resume skips them)."""
        tail = {"replace_tail": self.replace_tail} if self.replace_tail != ALIGNED_TAIL else {}
        if self.blend_keep != SOURCE_BRANCH:
            tail["blend_keep"] = self.blend_keep
        return {
            "cross_replace": self.cross_replace,
            "self_replace": self.self_replace,
            "mode": self.mode,
            "blend": list(self.blend),
            "blend_source": list(self.blend_source),
            "blend_target": list(self.blend_target),
            "blend_threshold": self.blend_threshold,
            "amplify": {word: factor for word, factor in self.amplify},
            "amplify_new": self.amplify_new,
            **tail,
        }


def release_guidance(classical: float) -> float:
    """The release scripts' number for a classical guidance scale (`w - 1`)."""
    return classical - 1.0


@dataclass(frozen=True)
class EditRecipe:
    """A model's default edit.

    `guidance` is the classical scale; `tau` the dynamic-guidance threshold (steps at
    t > tau * 1000 run unguided); `cross_replace` / `self_replace` the Prompt-to-Prompt step
    fractions; `p2p_mode` auto (replace for equal word counts, else refine), replace or refine;
    `amplify` the factor on the target's words that are not in the source (stopwords excepted;
    1 = none); `seed` the seed of the noise added before inversion.
    """

    method: str = "p2p"
    guidance: float = 20.0
    tau: float = 0.8
    cross_replace: float = 0.3
    self_replace: float = 0.6
    p2p_mode: str = "auto"
    amplify: float = 4.0
    seed: int = 30

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"recipe method must be one of {METHODS}, got {self.method!r}")
        if self.p2p_mode not in P2P_MODES:
            raise ValueError(f"recipe p2p_mode must be one of {P2P_MODES}, got {self.p2p_mode!r}")
        for name in ("tau", "cross_replace", "self_replace"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"recipe {name} must be in [0, 1], got {getattr(self, name)}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0 and 0 <= self.amplify < 1e6):
            raise ValueError(f"recipe guidance and amplify must be finite and >= 0: {self.guidance}, {self.amplify}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, fallback: EditRecipe | None = None) -> EditRecipe:
        """A recipe from JSON; keys it lacks keep `fallback`'s values (the family's release recipe)."""
        base = fallback or cls()
        if not data:
            return base
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                continue
            values[key] = str(value) if key in ("method", "p2p_mode") else int(value) if key == "seed" else float(value)
        return replace(base, **values)


SD15, SDXL = "sd15", "sdxl"
SD15_TAU08_REVERSE = (259, 519, 779, 999)


def release_recipe(family: str, reverse_boundaries: tuple[int, ...]) -> EditRecipe:
    """The release's editing setup for a family and boundary set.

    SD1.5 (`running/sd1.5/launch_editing_iCD_sd1.5.sh` and its `edit.py`): P2P with cross 0.3 and
    self 0.6, replace for equal word counts else refine, amplify 4 on new words, guidance 19 in the
    release's convention (20 here), seed 30; tau 0.8 for the 4-step [259, 519, 779, 999] models and
    0.7 for the others. SDXL (`running/sdxl/launch_editing_iCD_sdxl.sh`): prompt swap, the release's
    guidance_scale 19.0 (20 here), tau 0.7; its seed is the item's index (0 for one image). The
    SDXL README's interactive example uses 7.0 (8 here) instead; scripts made the paper's numbers.
    """
    if family == SDXL:
        return EditRecipe(method="swap", guidance=20.0, tau=0.7, seed=0)
    tau = 0.8 if tuple(reverse_boundaries) == SD15_TAU08_REVERSE else 0.7
    return EditRecipe(method="p2p", guidance=20.0, tau=tau, seed=30)


@dataclass
class SamplerSettings:
    """How to invert and decode: the iCD models, or the DDIM baseline on the teacher (`ddim_steps` steps),
    and the seed of the noise added before inversion (the starting noise of generation)."""

    sampler: str = "icd"
    ddim_steps: int = 50
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")

    def steps(self, num_steps: int) -> int:
        """The network calls of one direction, as records keep them: the model's `num_steps`, or DDIM's."""
        return num_steps if self.sampler == "icd" else self.ddim_steps


@dataclass(frozen=True)
class P2POptions:
    """Prompt-to-Prompt values the user gave (None: the recipe's), as flags, a spec or a record give them.

    `replace_tail` is no recipe's: icd's aligned tail unless the release's is asked for (`REPLACE_TAILS`); nor is
    `blend_keep`: the source branch unless the inversion's latents are asked for (`BLEND_KEEPS`).

    `resolve` is the one place where they meet the model's recipe; `from_record` reads the record an output
    keeps (`P2PSettings.to_record`), each number checked as its flag is.
    """

    cross_replace: float | None = None
    self_replace: float | None = None
    mode: str | None = None
    amplify_new: float | None = None
    amplify: tuple[tuple[str, float], ...] = ()
    blend: tuple[str, ...] = ()
    blend_source: tuple[str, ...] = ()
    blend_target: tuple[str, ...] = ()
    blend_threshold: float = BLEND_THRESHOLD
    strict_blend: bool = True
    replace_tail: str = ALIGNED_TAIL
    blend_keep: str = SOURCE_BRANCH

    def resolve(self, recipe: EditRecipe) -> P2PSettings:
        """The `P2PSettings` of an edit: these values where given, else the recipe's."""

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        return P2PSettings(
            cross_replace=pick(self.cross_replace, recipe.cross_replace),
            self_replace=pick(self.self_replace, recipe.self_replace),
            blend=self.blend,
            amplify=self.amplify,
            mode=pick(self.mode, recipe.p2p_mode),
            blend_threshold=self.blend_threshold,
            blend_source=self.blend_source,
            blend_target=self.blend_target,
            amplify_new=pick(self.amplify_new, recipe.amplify),
            strict_blend=self.strict_blend,
            replace_tail=self.replace_tail,
            blend_keep=self.blend_keep,
        )

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> P2POptions:
        """Every value of a recorded edit's P2P settings; a value out of its flag's range raises NumberError."""
        from icdcli.core.texts import check_text
        from icdcli.core.values import check_number

        def number(key: str, name: str | None = None) -> Any:
            value = record.get(key)
            return None if value is None else float(check_number(name or key, value))

        def words(key: str) -> tuple[str, ...]:
            return tuple(check_text("word", str(w), f"{key} word") for w in record.get(key) or ())

        return cls(
            cross_replace=number("cross_replace"),
            self_replace=number("self_replace"),
            mode=None if record.get("mode") is None else str(record["mode"]),
            amplify_new=number("amplify_new", "amplify"),
            amplify=tuple(
                (check_text("word", str(w), "amplify word"), float(check_number("amplify", f)))
                for w, f in dict(record.get("amplify") or {}).items()
            ),
            blend=words("blend"),
            blend_source=words("blend_source"),
            blend_target=words("blend_target"),
            blend_threshold=float(check_number("blend_threshold", record.get("blend_threshold", BLEND_THRESHOLD))),
            replace_tail=check_replace_tail(record.get("replace_tail", ALIGNED_TAIL)),  # absent: icd's rule
            blend_keep=check_blend_keep(record.get("blend_keep", SOURCE_BRANCH)),  # absent: P2P's rule
        )


@dataclass(frozen=True)
class ResolvedEdit:
    """Everything an edit runs with, once the user's values are laid over the model's recipe."""

    method: str
    guidance: float
    tau: float
    seed: int
    p2p: P2PSettings | None  # for p2p, else None
    sampling: SamplerSettings = field(default_factory=SamplerSettings)  # its seed is `seed`

    def record(self, num_steps: int) -> dict[str, Any]:
        """The settings as a run's report and records give them (`num_steps`: the model's)."""
        return {"method": self.method, "sampler": self.sampling.sampler, "steps": self.sampling.steps(num_steps),
                "guidance": self.guidance, "tau": self.tau, "seed": self.seed}  # fmt: skip


@dataclass(frozen=True)
class EditRequest:
    """What the user asks of an edit, from flags, a spec row or a record: None (and method `auto`) leave a value
    to the model's recipe; `resolve` lays it over the recipe."""

    method: str = "auto"
    guidance: float | None = None
    tau: float | None = None
    seed: int | None = None
    sampler: str = "icd"
    ddim_steps: int = 50
    p2p: P2POptions = P2POptions()

    def __post_init__(self) -> None:
        if self.method not in ("auto", *METHODS):
            raise ValueError(f"method must be auto or one of {METHODS}, got {self.method!r}")
        SamplerSettings(self.sampler, self.ddim_steps)  # checks the sampler

    def overridden(self, *, guidance: float | None, tau: float | None, seed: int | None) -> EditRequest:
        """The request with the values a spec row gives (None: keep this request's)."""
        return replace(
            self,
            guidance=self.guidance if guidance is None else guidance,
            tau=self.tau if tau is None else tau,
            seed=self.seed if seed is None else seed,
        )

    def resolve(self, info: Any) -> ResolvedEdit:
        """The edit a model with metadata `info` (`.edit`, `.generate_guidance`) runs for this request."""
        return resolve_edit(info.edit, info.generate_guidance, sampler=self.sampler, method=self.method,
                            guidance=self.guidance, tau=self.tau, seed=self.seed, p2p=self.p2p,
                            ddim_steps=self.ddim_steps)  # fmt: skip


def resolve_edit(
    recipe: EditRecipe,
    generate_guidance: float,
    *,
    sampler: str = "icd",
    method: str = "auto",
    guidance: float | None = None,
    tau: float | None = None,
    seed: int | None = None,
    p2p: P2POptions | None = None,
    ddim_steps: int = 50,
) -> ResolvedEdit:
    """The user's values where given, else the recipe's. The DDIM baseline (`sampler="ddim"`) runs on
    the teacher: its default guidance is the model's generation guidance, with no dynamic guidance.

    Args:
        recipe: the model's edit recipe (`model.info.edit`).
        generate_guidance: the model's generation guidance (`model.info.generate_guidance`).
        sampler: `icd` or `ddim` (with `ddim_steps` steps).
        method: `auto` (the recipe's), `p2p` or `swap`.
        guidance, tau, seed: None for the recipe's.
        p2p: Prompt-to-Prompt values given (None: all the recipe's).
    """
    chosen = recipe.method if method == "auto" else method
    if sampler == "ddim":
        guidance = generate_guidance if guidance is None else guidance
        tau = 1.0 if tau is None else tau
    settings = (p2p or P2POptions()).resolve(recipe) if chosen == "p2p" else None
    chosen_seed = int(recipe.seed if seed is None else seed)
    return ResolvedEdit(
        method=chosen,
        guidance=float(recipe.guidance if guidance is None else guidance),
        tau=float(recipe.tau if tau is None else tau),
        seed=chosen_seed,
        p2p=settings,
        sampling=SamplerSettings(sampler, ddim_steps, chosen_seed),
    )


def guidance_and_tau(info: Any, sampler: str, *, guidance: float | None, tau: float | None) -> tuple[float, float]:
    """Guidance and tau of an edit with a model of metadata `info`: the user's, else the model's recipe
    (icd) or its generation guidance without dynamic guidance (the DDIM baseline)."""
    # the method changes neither; "swap" spares building P2P settings
    resolved = EditRequest(method="swap", guidance=guidance, tau=tau, sampler=sampler).resolve(info)
    return resolved.guidance, resolved.tau
