"""Per-profile style vectors: personalization from the first text, without training.

Contrastive activation steering (StyleVector, Zhang et al. 2025): for each transformer block l,
the direction is the mean over a profile's (own text, neutral version) pairs of
h_l(text) - h_l(neutral), where h_l is block l's output averaged over the text's tokens. Added
to the residual stream after block l while generating (llama.cpp's control vectors), it moves
the model toward the user's way of writing. Building one is a few forward passes of the
reflection model in torch (the base dequantized from the very GGUF llama.cpp runs), seconds
for a few hundred texts; the file is n_layer x n_embd floats (69 KB for SmolLM2-135M).

Why the mean over tokens, not the last token: tweets and chat lines are short and the user's
often end without punctuation where the neutral version ends with a period, so a last-token
difference is mostly "end of sentence"; llama.cpp adds the vector at every position, so a
per-position average matches how it is used. Position 0 is left out: its activations are the
attention sink's, orders of magnitude larger and the same whatever the style.

The neutral versions are the training data's: the bare base model's neutral paraphrase of each
text (`training.dataset.paraphrase`), cached per profile in the file the SFT data builder uses,
so a later training run (or the next build) does not paraphrase the same text again. Pairs
whose paraphrase copies the text carry no direction, and those that keep too little of it (the
model answered instead) carry content, not style: both are left out, as back-translation does.

Files: `<data>/styles/<profile>/<base sha256[:16]>-v<N>.cvec.gguf`, in llama.cpp's control-vector
format (`general.architecture = controlvector`, f32 tensors `direction.<l>` for l = 1..n_layer-1:
llama.cpp never steers block 0), with the base model's sha256 in `rpo.base_sha256`; written
beside and renamed into place, the newest KEEP versions kept. torch is imported only here.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rpo_local import paths
from rpo_local.errors import InputError, ModelError
from rpo_local.names import file_stem

if TYPE_CHECKING:
    from rpo_local.config import Config
    from rpo_local.engine import Engine
    from rpo_local.store import Store

SUFFIX = ".cvec.gguf"
KEEP = 3  # versions kept per profile and base: a rollback target, without piling up
MIN_PAIRS = 4  # fewer pairs give a direction that is mostly the content of those few texts
MAX_TEXTS = 400  # the newest texts used: the mean has converged long before
_VERSION = re.compile(r"^(?P<base>[0-9a-f]{16})-v(?P<n>\d+)" + re.escape(SUFFIX) + "$")


@dataclass
class StyleVector:
    """Row l of `directions` is added after block l (row 0 stays zero: llama.cpp skips block 0)."""

    directions: np.ndarray  # float32 [n_layer, n_embd]
    base_sha256: str
    pairs: int
    meta: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_layer(self) -> int:
        return int(self.directions.shape[0])

    @property
    def n_embd(self) -> int:
        return int(self.directions.shape[1])

    def data(self, scale: float, layers: tuple[int, int]) -> np.ndarray:
        """The buffer llama.cpp takes: layers 1..n_layer-1 in order, scaled, zero outside `layers`."""
        out = np.zeros_like(self.directions)
        lo, hi = max(1, layers[0]), min(self.n_layer - 1, layers[1])
        out[lo : hi + 1] = self.directions[lo : hi + 1] * scale
        return np.ascontiguousarray(out[1:], dtype=np.float32).reshape(-1)


# -- building --------------------------------------------------------------------------------

def usable_pair(text: str, neutral: str) -> bool:
    """A neutral version that differs from the text and keeps enough of it (back-translation's filter)."""
    from rpo_local.training.dataset import MIN_TARGET_KEPT, is_rewrite

    same = " ".join(text.lower().split()) == " ".join(neutral.lower().split())
    return bool(neutral.strip()) and not same and is_rewrite(neutral, text, MIN_TARGET_KEPT)


def _blocks(model: Any) -> Any:
    """The transformer blocks of a causal LM (llama, qwen2, gemma3 all keep them at model.model.layers)."""
    return model.get_decoder().layers


def block_means(model: Any, tok: Any, texts: Sequence[str], *, batch_size: int = 16) -> np.ndarray:
    """[len(texts), n_layer, n_embd]: each block's output averaged over each text's tokens but the first."""
    import torch

    blocks = _blocks(model)
    captured: list[Any] = [None] * len(blocks)

    def hook(index: int) -> Callable:
        def keep(_module: Any, _args: Any, output: Any) -> None:
            captured[index] = output[0] if isinstance(output, tuple) else output
        return keep

    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(blocks)]
    out = np.zeros((len(texts), len(blocks), model.config.hidden_size), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of similar length: less padding
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                batch = tok([texts[i] for i in rows], return_tensors="pt", padding=True)
                device = next(model.parameters()).device
                attention = batch["attention_mask"].to(device)
                mask = attention.float()
                mask[:, 0] = 0.0  # the attention sink (see the module docstring)
                # The decoder alone: the LM head (a sixth of SmolLM2's compute) is not needed.
                model.get_decoder()(input_ids=batch["input_ids"].to(device), attention_mask=attention)
                counts = mask.sum(dim=1).clamp(min=1.0)[:, None]
                for layer, hidden in enumerate(captured):
                    mean = (hidden.float() * mask[:, :, None]).sum(dim=1) / counts
                    out[rows, layer] = mean.cpu().numpy()
    finally:
        for handle in handles:
            handle.remove()
    return out


def directions(model: Any, tok: Any, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """[n_layer, n_embd]: the mean of h(text) - h(neutral) over `pairs`, row 0 zeroed."""
    means = block_means(model, tok, [t for t, _ in pairs] + [n for _, n in pairs])
    diff = (means[: len(pairs)] - means[len(pairs) :]).mean(axis=0)
    diff[0] = 0.0
    return diff.astype(np.float32)


def usable_pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The pairs that carry a direction; InputError when fewer than MIN_PAIRS do."""
    kept = [(t, n) for t, n in pairs if usable_pair(t, n)]
    if len(kept) < MIN_PAIRS:
        raise InputError(
            f"{len(kept)} of {len(pairs)} texts have a usable neutral version; a style vector needs at least "
            f"{MIN_PAIRS} (add history: `rpo history add` / `rpo history import`)"
        )
    return kept


def build(model: Any, tok: Any, pairs: Sequence[tuple[str, str]], base_sha256: str,
          meta: dict[str, str] | None = None) -> StyleVector:
    """The style vector of `pairs` (own text, neutral version); the unusable pairs are left out."""
    kept = usable_pairs(pairs)
    return StyleVector(directions(model, tok, kept), base_sha256, len(kept), dict(meta or {}))


def load_torch(model_path: Path) -> tuple[Any, Any]:
    """The reflection model for torch (training's cached fp32 conversion of the GGUF), in eval mode."""
    from rpo_local.training.sft import load_base

    model, tok = load_base(model_path)
    model.eval()
    return model, tok


# -- neutral versions ------------------------------------------------------------------------

NEUTRAL_SOURCES = ("rules", "paraphrase")
_EXPAND = {
    "u": "you", "ur": "your", "r": "are", "im": "I'm", "dont": "don't", "cant": "can't", "wont": "won't",
    "didnt": "didn't", "isnt": "isn't", "gonna": "going to", "wanna": "want to", "gotta": "have to",
    "kinda": "kind of", "sorta": "sort of", "dunno": "don't know", "thx": "thanks", "thanx": "thanks",
    "pls": "please", "plz": "please", "btw": "by the way", "idk": "I don't know", "tbh": "to be honest",
    "imo": "in my opinion", "imho": "in my opinion", "cuz": "because", "coz": "because", "bc": "because",
    "b4": "before", "nite": "night", "tonite": "tonight", "luv": "love", "wat": "what", "wut": "what",
    "2day": "today", "2morrow": "tomorrow", "tmrw": "tomorrow", "tomoro": "tomorrow", "ppl": "people",
    "msg": "message", "ya": "you", "yea": "yes", "yeah": "yes", "yep": "yes", "nope": "no", "k": "okay",
    "kk": "okay", "ok": "okay", "bday": "birthday", "gf": "girlfriend", "bf": "boyfriend", "abit": "a bit",
    "soo": "so", "sooo": "so", "i": "I", "i'm": "I'm", "i've": "I've", "i'll": "I'll", "i'd": "I'd",
}
_INTERJECTION = re.compile(
    r"\b(?:lol|lmao|lmfao|rofl|omg|omfg|ugh|aww+|xo|xoxo|yay|woo+|woohoo|meh|hmm+|(?:ha){2,}h?|(?:he){2,})\b[,!.]*",
    re.IGNORECASE,
)


def plain_version(text: str) -> str:
    """A rule-made neutral version of `text`: the same words in standard written form (sentence
    case, abbreviations and slang spelled out, interjections, emoji, emoticons and repeated
    punctuation dropped, a final period). Instant, and it isolates the surface style the
    vector should carry; the 135M base model's paraphrases take ~5 s a text on 2 busy cores
    and half of them answer the text instead of paraphrasing it."""
    from rpo_local.training.dataset import EMOJI, EMOTICON

    out = EMOTICON.sub(" ", EMOJI.sub(" ", text.replace("&amp;", "and")))
    out = _INTERJECTION.sub(" ", out)
    out = re.sub(r"([!?])[!?]+", r"\1", out)
    out = re.sub(r"\s*(?:\.{2,}|…)\s*", ". ", out)
    out = re.sub(r"(\w)\1{2,}", r"\1", out)  # sooo -> so, yesss -> yes

    def word(match: re.Match) -> str:
        w = match.group(0)
        lower = w.lower()
        if lower in _EXPAND:
            return _EXPAND[lower]
        return lower if len(w) >= 3 and w.isupper() else w

    out = re.sub(r"[A-Za-z0-9']+", word, out)
    out = " ".join(out.split()).strip(" ,")
    out = re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), out)
    return out if not out or out[-1] in ".!?" else out + "."


def paraphrase_cache_path(profile: str) -> Path:
    """The SFT data builder's cache of the profile's neutral paraphrases (training.pipeline)."""
    return paths.runs_dir() / f"paraphrases-{file_stem(profile)}.json"


def neutral_versions(engine: Engine, texts: Sequence[str], cache: dict[str, str],
                     on_progress: Callable[[int, int], None] | None = None) -> list[str]:
    """The bare base model's neutral paraphrase of each text (from `cache` by digest, else made
    now and added to it). The engine runs without its adapter and style meanwhile."""
    from rpo_local.store import digest
    from rpo_local.training.dataset import paraphrase

    missing = [t for t in texts if digest(t) not in cache]
    if missing:
        adapter, style = engine.adapter_path, (engine.style, engine.style_scale, engine.style_layers)
        engine.set_adapter(None)
        engine.set_style(None)
        try:
            for n, text in enumerate(missing, 1):
                cache[digest(text)] = paraphrase(engine, text)
                if on_progress:
                    on_progress(n, len(missing))
        finally:
            engine.set_adapter(adapter)
            engine.set_style(*style)
    return [cache[digest(t)] for t in texts]


def profile_pairs(store: Store, profile: str, engine: Engine, neutral: str = "rules",
                  on_progress: Callable[[int, int], None] | None = None) -> list[tuple[str, str]]:
    """(text, neutral version) for the profile's newest MAX_TEXTS texts: `plain_version`, or the
    base model's paraphrases (`neutral="paraphrase"`; their cache is updated)."""
    from rpo_local.fsutil import atomic_write_text
    from rpo_local.training.dataset import profile_targets

    if neutral not in NEUTRAL_SOURCES:
        raise InputError(f"neutral versions come from {' or '.join(NEUTRAL_SOURCES)}, not {neutral!r}")
    texts = [t["text"].strip() for t in profile_targets(store, profile)][-MAX_TEXTS:]
    if neutral == "rules":
        return [(t, plain_version(t)) for t in texts]
    cache_path = paraphrase_cache_path(profile)
    cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
    known = len(cache)
    try:
        neutrals = neutral_versions(engine, texts, cache, on_progress)
    finally:  # keep what was paraphrased, even when interrupted
        if len(cache) != known:
            atomic_write_text(cache_path, json.dumps(cache))
    return list(zip(texts, neutrals, strict=True))


# -- files -----------------------------------------------------------------------------------

def profile_dir(profile: str) -> Path:
    return paths.styles_dir() / file_stem(profile)


def _versions(profile: str, base_sha256: str) -> list[tuple[int, Path]]:
    folder = profile_dir(profile)
    found = []
    for path in folder.glob(f"*{SUFFIX}") if folder.is_dir() else []:
        match = _VERSION.match(path.name)
        if match and match["base"] == base_sha256[:16]:
            found.append((int(match["n"]), path))
    return sorted(found)


def latest_path(profile: str, model_path: Path) -> Path | None:
    """The newest style vector of `profile` built for the model at `model_path`, if any."""
    from rpo_local.models import sha256

    if not Path(model_path).is_file():  # a fake engine's model
        return None
    found = _versions(profile, sha256(model_path))
    return found[-1][1] if found else None


def write(vector: StyleVector, path: Path) -> Path:
    """`vector` as a llama.cpp control-vector GGUF at `path`, written beside and renamed into place."""
    import os

    from gguf import GGUFWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.writing")
    writer = GGUFWriter(str(tmp), arch="controlvector")
    writer.add_string("controlvector.model_hint", vector.meta.get("model", ""))
    writer.add_uint32("controlvector.layer_count", vector.n_layer - 1)
    writer.add_string("rpo.base_sha256", vector.base_sha256)
    writer.add_uint32("rpo.pairs", vector.pairs)
    for key, value in vector.meta.items():
        writer.add_string(f"rpo.{key}", str(value))
    for layer in range(1, vector.n_layer):
        writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(vector.directions[layer], dtype=np.float32))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save(vector: StyleVector, profile: str) -> Path:
    """Write `vector` as the profile's next version; older versions beyond KEEP are removed."""
    versions = _versions(profile, vector.base_sha256)
    number = versions[-1][0] + 1 if versions else 1
    path = write(vector, profile_dir(profile) / f"{vector.base_sha256[:16]}-v{number}{SUFFIX}")
    for _, old in versions[: max(0, len(versions) + 1 - KEEP)]:
        old.unlink(missing_ok=True)
    vector.path = path
    return path


def read(path: Path) -> StyleVector:
    """A control-vector GGUF (ours or any llama.cpp one); ModelError if it is not one. Parsed
    here, not with the `gguf` package: that is the training extra, and the runtime loads these."""
    import struct

    from rpo_local.models import _read_str, _read_value, check_gguf

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"style vector not found: {path}")
    check_gguf(path)
    try:
        with path.open("rb") as fh:
            _, _version, n_tensors, n_kv = struct.unpack("<4sIQQ", fh.read(24))
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = _read_str(fh)
                meta[key] = _read_value(fh, struct.unpack("<I", fh.read(4))[0])
            infos = []
            for _ in range(n_tensors):
                name = _read_str(fh)
                (n_dims,) = struct.unpack("<I", fh.read(4))
                dims = struct.unpack(f"<{n_dims}Q", fh.read(8 * n_dims))
                kind, offset = struct.unpack("<IQ", fh.read(12))
                infos.append((name, dims, kind, offset))
            align = int(meta.get("general.alignment", 32))
            base = -(-fh.tell() // align) * align
            if meta.get("general.architecture") != "controlvector":
                raise ModelError(f"{path}: not a control vector (architecture {meta.get('general.architecture')!r})")
            rows: dict[int, np.ndarray] = {}
            for name, dims, kind, offset in infos:
                match = re.fullmatch(r"direction\.(\d+)", name)
                if not match or int(match[1]) == 0 or kind != 0 or len(dims) != 1:  # 0: GGML_TYPE_F32
                    raise ModelError(f"{path}: unexpected tensor {name!r} (type {kind}, shape {dims})")
                fh.seek(base + offset)
                rows[int(match[1])] = np.frombuffer(fh.read(4 * dims[0]), dtype="<f4").copy()
    except (OSError, struct.error, UnicodeDecodeError, KeyError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable control vector ({exc})") from None
    if not rows or len({r.size for r in rows.values()}) != 1 or any(r.size == 0 for r in rows.values()):
        raise ModelError(f"{path}: no direction tensors, or tensors of different sizes")
    out = np.zeros((max(rows) + 1, next(iter(rows.values())).size), dtype=np.float32)
    for layer, row in rows.items():
        out[layer] = row
    extra = {k[4:]: str(v) for k, v in meta.items() if k.startswith("rpo.") and v is not None}
    base_sha = extra.pop("base_sha256", "")
    pairs = int(extra.pop("pairs", 0))
    return StyleVector(out, base_sha, pairs, extra, path)


def check(vector: StyleVector, model_path: Path, n_embd: int | None = None) -> None:
    """Refuse a vector built for another base model (exit 11) or of another width (exit 4)."""
    from rpo_local.adapters import check_base

    name = vector.path.name if vector.path else "style vector"
    check_base(name, vector.base_sha256 or None, model_path)
    if n_embd is not None and vector.n_embd != n_embd:
        raise ModelError(f"{name}: {vector.n_embd} wide, the model's residual stream is {n_embd}")


def build_for_profile(store: Store, profile: str, engine: Engine, *, neutral: str = "rules",
                      note: Callable[[str], None] = lambda _m: None,
                      on_progress: Callable[[int, int], None] | None = None) -> tuple[StyleVector, dict]:
    """Build and save `profile`'s style vector for `engine`'s model; returns it and timings."""
    from rpo_local.models import sha256

    store.get_profile(profile)
    start = time.perf_counter()
    pairs = usable_pairs(profile_pairs(store, profile, engine, neutral, on_progress))  # before torch loads
    paraphrased = time.perf_counter()
    note(f"{len(pairs)} texts; computing hidden states with torch")
    model, tok = load_torch(engine.model_path)
    loaded = time.perf_counter()
    vector = build(model, tok, pairs, sha256(engine.model_path),
                   {"model": engine.model_path.name, "profile": profile,
                    "neutral": neutral, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    save(vector, profile)
    end = time.perf_counter()
    return vector, {"paraphrase_s": round(paraphrased - start, 2), "load_s": round(loaded - paraphrased, 2),
                    "hidden_s": round(end - loaded, 2), "total_s": round(end - start, 2)}


def apply_profile_style(engine: Engine, config: Config, profile: str, *, required: bool = False) -> Path | None:
    """Steer `engine` with `profile`'s newest style vector for its model, with the configured
    scale and layers; returns its file. None (and the engine unsteered) when the profile has
    none; with `required`, that is a NotFound naming `rpo style build`."""
    from rpo_local.errors import NotFound

    path = latest_path(profile, engine.model_path)
    if path is None:
        engine.set_style(None)
        if required:
            raise NotFound(f"profile {profile!r} has no style vector for {Path(engine.model_path).name}; "
                           f"build one with `rpo style build --profile {profile}`")
        return None
    engine.set_style(read(path), config.style_scale, config.style_layer_range())
    return path


def status(config: Config, profile: str, model_path: Path) -> dict:
    """What `rpo doctor`, the TUI and the daemon show: on or off, the setting, the newest file."""
    path = latest_path(profile, model_path)
    return {"enabled": config.style, "scale": config.style_scale, "layers": config.style_layers,
            "path": str(path) if path else None}
