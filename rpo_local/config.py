"""The one place for configuration: defaults, the TOML file, environment overrides.

Precedence (highest first): command-line flags, `RPO_*` environment variables, the config
file (`rpo paths` shows where), the defaults below.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from rpo_local import devices, names, paths
from rpo_local.errors import ConfigError
from rpo_local.retrieve import RETRIEVERS


@dataclass
class Config:
    profile: str = "default"
    model: str = ""  # reflection model: a registered name or a GGUF path; empty: the embedded SmolLM2-135M
    # The offline upstream (writes the generic reply when no upstream_url is set): a registered
    # name or a GGUF path; empty: the reflection model itself, without its adapter.
    upstream_local_model: str = ""
    k: int = 4  # profile items retrieved per rewrite
    # auto, bm25, dense or hybrid (rpo_local.retrieve); dense and hybrid need the [retrieval]
    # extra and `rpo history embed`, and fall back to bm25 without them; auto: dense where it can
    # run, else bm25 (chosen on the tuning users: README "Retrieval").
    retriever: str = "auto"
    trajectory_tokens: int = 96  # budget for the style/diff/edits sections
    # The trajectory format (prompts.FORMATS); "auto": the one the active adapter was trained on.
    trajectory: str = "auto"
    # A rewrite keeping less of the generic reply's content words than this is refused (the
    # generic reply is kept; see reflect.keeps_content). None ("auto"): the value chosen for the
    # adapter in use (adapters.BUILTIN_SETTINGS: 0.8 for the 135M model's, whose dropped clauses
    # lose far more than its style edits gain), else adapters.DEFAULT_SETTINGS.
    min_content_kept: float | None = None
    # Sentences of a reply joined into one piece up to this many words (0: one sentence per
    # piece, what the 135M model handles best; an adapter trained on whole tweets takes whole
    # ones). None ("auto"): the adapter's value, as for min_content_kept.
    piece_words: int | None = None
    # What a reply's pieces are given as history: the items retrieved once by the whole reply's
    # words ("reply": as the built-in adapters were trained, and every piece's prompt starts alike, so
    # llama.cpp reuses that prefix), or by each piece's own words ("piece"). "reply" was as good
    # and 18% faster per reply on the tuning users (README "Whole replies").
    retrieval_scope: str = "reply"
    # The profile's style vector (rpo_local.style, `rpo style build`) steers the rewrite next to
    # the adapter: style_scale x its direction added after blocks style_layers ("A-B", inclusive).
    # Scale and blocks chosen on the tuning users (bench/bench_style.py; 0.1 on every block
    # already garbles SmolLM2); off by default: on users 0-99 it lowered the adapter's ROUGE-1 (README).
    style: bool = False
    style_scale: float = 0.05
    style_layers: str = "6-18"
    temperature: float = 0.0
    seed: int = 0
    n_ctx: int = 2048
    n_threads: int = 0  # 0: every CPU up to 4, else half of them (engine.default_threads)
    # Layers llama.cpp runs on the GPU (rpo_local.devices): auto (all where the build has CUDA or
    # Metal, none on a CPU build), all, none, or N (llama.cpp's n_gpu_layers: the output layer,
    # then blocks from the top). all or N without a usable GPU, or a GPU the model does not fit,
    # is an error (exit 14) unless cpu_fallback allows the CPU.
    gpu_layers: str = "auto"
    device: str = "auto"  # training's torch device: auto (cuda, then mps, then cpu), cpu, cuda, mps
    cpu_fallback: bool = False
    upstream_url: str = ""  # OpenAI-compatible base URL; empty: the local base model
    upstream_model: str = "gpt-4o-mini"
    rewrite_timeout_s: float = 30.0  # the daemon returns the generic reply past this
    upstream_timeout_s: float = 120.0  # a remote upstream slower than this is a 504
    max_queued_requests: int = 32  # rewrites waiting for the daemon's one worker; more are a 503
    train_min_new_items: int = 20  # new history/feedback items that trigger a training run
    train_interval_hours: float = 24.0

    def style_layer_range(self) -> tuple[int, int]:
        first, last = (int(n) for n in self.style_layers.split("-"))
        return first, last

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_ENV = {f"RPO_{name.upper()}": name for name in Config.keys()}


_RANGES = {
    "min_content_kept": (0.0, 1.0),  # a share: anything outside silently disables a feature
    "upstream_timeout_s": (0.1, 86400.0),  # 0 or less would fail every request
    "max_queued_requests": (1, 100_000),  # 0 would refuse every request
    "piece_words": (0, 1000),
    "style_scale": (-100.0, 100.0),
}
# Keys whose default is None ("auto": the adapter in use decides) and the type of their values.
_AUTO = {"min_content_kept": float, "piece_words": int}
_CHOICES = {"trajectory": ("auto", "full", "compact", "answer"), "retriever": RETRIEVERS, "device": devices.DEVICES,
            "retrieval_scope": ("piece", "reply")}


def _coerce(name: str, value: object) -> object:
    if name in _AUTO and str(value).strip().lower() == "auto":
        return None
    kind = _AUTO.get(name) or type(getattr(Config(), name))
    try:
        if kind is bool:
            return str(value).lower() in {"1", "true", "yes", "on"}
        out = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {name!r} expects {kind.__name__}, got {value!r}") from None
    if name in _CHOICES and out not in _CHOICES[name]:
        raise ConfigError(f"config key {name!r} must be one of {', '.join(_CHOICES[name])}, got {value!r}")
    low, high = _RANGES.get(name, (out, out))
    if not low <= out <= high:
        raise ConfigError(f"config key {name!r} must be between {low} and {high}, got {value!r}")
    if name == "style_layers" and not re.fullmatch(r"\d+-\d+", str(out)):
        raise ConfigError(f"config key 'style_layers' takes FIRST-LAST block numbers (e.g. 4-12), got {value!r}")
    if name == "gpu_layers":
        try:
            return devices.check_gpu_layers(out)
        except ValueError as exc:
            raise ConfigError(f"config key 'gpu_layers': {exc}") from None
    if name == "profile" and (reason := names.problem(out)):
        raise ConfigError(f"config key 'profile': {reason} ({names.RULE}), got {value!r}")
    return out


def read_file(path: Path | None = None) -> dict:
    path = path or paths.config_path()
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - set(Config.keys()))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
    return data


def load_config(path: Path | None = None) -> Config:
    values = {k: _coerce(k, v) for k, v in read_file(path).items()}
    for env, name in _ENV.items():
        if env in os.environ and env != "RPO_HOME":
            values[name] = _coerce(name, os.environ[env])
    return Config(**values)


def set_value(key: str, value: str, path: Path | None = None) -> None:
    """Persist one key atomically (write a temporary file, then rename)."""
    if key not in Config.keys():
        raise ConfigError(f"unknown config key {key!r}; known: {', '.join(Config.keys())}")
    path = path or paths.config_path()
    data = read_file(path)
    data[key] = _coerce(key, value)
    if data[key] is None:  # "auto": the default, which TOML cannot hold
        del data[key]
    lines = [f"{k} = {_toml_value(v)}" for k, v in sorted(data.items())]
    from rpo_local.fsutil import atomic_write_text

    atomic_write_text(path, "\n".join(lines) + "\n")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    import json

    return json.dumps(str(value))  # a JSON string is a valid TOML basic string
