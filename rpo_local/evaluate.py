"""LaMP evaluation: every method scored on the same users in one run, with one loaded engine.

Methods:
- `copy`: the generic text unchanged (LaMP-7 with `rpo_input="input"`: the neutral paraphrase);
- `base`: the base model's non-personalized answer to the task input;
- `context`: the top-k retrieved profile items in LaMP's per-task prompt (context injection);
- `rpo`: the generic text rewritten by the reflection model (no adapter) with the top-k items;
- `rpo+adapter`: the same with a GGUF LoRA adapter switched in with `engine.set_adapter`;
- `rpo+style`, `rpo+adapter+style`: the same steered by the user's style vector, built from their
  profile and its rule-made neutral versions (`rpo_local.style`).

Each user's profile goes into a throw-away SQLite store so the real retrieval and the real
Reflector run. Scoring is LaMP's: ROUGE-1 and ROUGE-L F-measure of Google's `rouge-score`, no
stemmer, prediction and gold whitespace-stripped, mean over users. Decoding is greedy
(temperature 0) with a fixed seed, so two runs give the same figures.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from rpo_local import embed, lamp, prompts
from rpo_local.config import Config, load_config
from rpo_local.engine import Completion
from rpo_local.errors import InputError, ModelError

if TYPE_CHECKING:
    from rpo_local.engine import Engine
    from rpo_local.store import Store

METHODS = ("copy", "base", "context", "rpo", "rpo+adapter")
STYLE_METHODS = ("rpo+style", "rpo+adapter+style")  # opt-in: torch builds each user's vector
REWRITE_METHODS = ("rpo", "rpo+adapter", *STYLE_METHODS)
RPO_INPUTS = ("input", "base")
PROFILE = "lamp-user"  # the one profile of each throw-away store

Progress = Callable[[int, int], None]  # (users done, users in the run)


# -- scoring ----------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def rouge(prediction: str, gold: str) -> tuple[float, float]:
    """ROUGE-1 and ROUGE-L F-measure of one prediction, as LaMP scores it."""
    scores = _scorer().score(gold.strip(), prediction.strip())
    return scores["rouge1"].fmeasure, scores["rougeL"].fmeasure


def mean_rouge(predictions: Sequence[str], golds: Sequence[str]) -> tuple[float, float]:
    """Mean over users of ROUGE-1 and ROUGE-L F."""
    if len(predictions) != len(golds) or not golds:
        raise ValueError("need as many predictions as golds, and at least one")
    pairs = [rouge(p, g) for p, g in zip(predictions, golds, strict=True)]
    return sum(r1 for r1, _ in pairs) / len(pairs), sum(rl for _, rl in pairs) / len(pairs)


# -- results ----------------------------------------------------------------------------------

@dataclass
class MethodOutput:
    output: str
    latency_s: float = 0.0
    gen_tokens: int = 0
    fallback: bool | None = None  # rewrite methods only: the generic text was kept
    fallback_reason: str | None = None
    rouge1: float = 0.0
    rougeL: float = 0.0
    pieces: int | None = None  # rewrite methods only: pieces of the reply, and how many were rewritten
    pieces_rewritten: int | None = None


@dataclass
class UserResult:
    id: str | int
    gold: str
    outputs: dict[str, MethodOutput] = field(default_factory=dict)


@dataclass
class MethodSummary:
    method: str
    users: int
    rouge1: float | None
    rougeL: float | None
    latency_s: float | None
    gen_tokens: float | None
    fallback_share: float | None  # None for methods that do not rewrite
    pieces_rewritten_share: float | None = None  # over all users' pieces
    latency_per_piece_s: float | None = None
    # Paired difference to `copy` over users: (mean, 95% bootstrap interval low, high).
    rouge1_vs_copy: tuple[float, float, float] | None = None
    rougeL_vs_copy: tuple[float, float, float] | None = None


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of a - b over paired samples and its 95% percentile bootstrap interval."""
    import random

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(resamples))
    return sum(diffs) / n, means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


@dataclass
class EvalReport:
    task: str
    data: str
    methods: list[str]
    selected: int  # users in the run
    offset: int
    limit: int | None
    k: int
    rpo_input: str
    model: str
    adapter: str | None
    seed: int
    max_tokens: int
    retriever: str = "bm25"
    retrieval_scope: str = "piece"  # config.retrieval_scope: what a reply's pieces are given
    style: str | None = None  # "SCALE@FIRST-LAST" when a style method runs
    users: list[UserResult] = field(default_factory=list)
    partial: bool = False
    wall_s: float = 0.0  # this session's time (without the users resumed from a checkpoint)
    resumed: int = 0  # users taken from a checkpoint
    style_build_s: list[float] = field(default_factory=list)  # per user built this session

    def settings(self) -> dict:
        """What makes two runs' results comparable (a checkpoint must match them)."""
        keys = ("task", "data", "methods", "offset", "k", "rpo_input", "model", "adapter", "seed", "max_tokens")
        # retriever only when not bm25: checkpoints written before it existed still match
        extra = {"retriever": self.retriever} if self.retriever != "bm25" else {}
        if self.retrieval_scope != "piece":  # likewise
            extra["retrieval_scope"] = self.retrieval_scope
        if self.style:
            extra["style"] = self.style
        return {"rpo_eval_checkpoint": 1, **{key: getattr(self, key) for key in keys}, **extra}

    @property
    def completed(self) -> int:
        return len(self.users)

    def summaries(self) -> list[MethodSummary]:
        return [self.summary(m) for m in self.methods]

    def summary(self, method: str) -> MethodSummary:
        outs = [u.outputs[method] for u in self.users]
        if not outs:
            return MethodSummary(method, 0, None, None, None, None, None)
        n = len(outs)
        share = sum(bool(o.fallback) for o in outs) / n if method in REWRITE_METHODS else None
        summary = MethodSummary(
            method, n,
            sum(o.rouge1 for o in outs) / n, sum(o.rougeL for o in outs) / n,
            sum(o.latency_s for o in outs) / n, sum(o.gen_tokens for o in outs) / n, share,
        )
        pieces = sum(o.pieces or 0 for o in outs)
        if pieces:
            summary.pieces_rewritten_share = sum(o.pieces_rewritten or 0 for o in outs) / pieces
            summary.latency_per_piece_s = sum(o.latency_s for o in outs) / pieces
        if method != "copy" and "copy" in self.methods:
            copies = [u.outputs["copy"] for u in self.users]
            summary.rouge1_vs_copy = paired_bootstrap([o.rouge1 for o in outs], [c.rouge1 for c in copies])
            summary.rougeL_vs_copy = paired_bootstrap([o.rougeL for o in outs], [c.rougeL for c in copies])
        return summary

    def to_dict(self, *, per_user: bool = False) -> dict:
        doc = {
            "task": self.task, "data": self.data, "partial": self.partial,
            "users": self.selected, "completed": self.completed, "offset": self.offset, "limit": self.limit,
            "k": self.k, "retriever": self.retriever, "retrieval_scope": self.retrieval_scope,
            "rpo_input": self.rpo_input, "model": self.model, "adapter": self.adapter,
            "decoding": {"temperature": 0.0, "seed": self.seed, "max_tokens": self.max_tokens},
            "wall_s": round(self.wall_s, 2), "resumed": self.resumed,
            "methods": [asdict(s) for s in self.summaries()],
        }
        if self.style:
            built = self.style_build_s
            doc["style"] = {"setting": self.style, "vectors_built": len(built),
                            "build_s_mean": round(sum(built) / len(built), 3) if built else None}
        if per_user:
            doc["per_user"] = [asdict(u) for u in self.users]
        return doc

    def predictions(self, method: str) -> dict:
        """One method's outputs in LaMP's format, re-scorable with LaMP's own evaluation."""
        doc: dict = {"task": self.task, "golds": [{"id": u.id, "output": u.outputs[method].output} for u in self.users]}
        if self.partial:
            doc["partial"] = True
        return doc

    def write_predictions(self, directory: Path) -> dict[str, Path]:
        """One file per method, named `<task>-<method>.json`, each written atomically."""
        from rpo_local.fsutil import atomic_write_text

        written = {}
        for method in self.methods:
            path = Path(directory) / f"{self.task}-{method}.json"
            atomic_write_text(path, json.dumps(self.predictions(method), ensure_ascii=False, indent=1) + "\n")
            written[method] = path
        return written

    def markdown(self) -> str:
        status = f"**partial: {self.completed} of {self.selected} users**" if self.partial else f"{self.completed} users"
        lines = [
            f"{self.task}, {status} (offset {self.offset}), k={self.k}, rpo input: {self.rpo_input}, "
            f"model {self.model}" + (f", adapter {Path(self.adapter).name}" if self.adapter else "")
            + f", wall {_duration(self.wall_s)}",
            "",
            "| method | ROUGE-1 | ROUGE-L | latency (s) | gen. tokens | fallback | pieces rewritten "
            "| s per piece | ROUGE-1 vs copy (95% CI) | ROUGE-L vs copy (95% CI) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in self.summaries():
            lines.append(
                f"| {s.method} | {_num(s.rouge1, 4)} | {_num(s.rougeL, 4)} | {_num(s.latency_s, 2)} "
                f"| {_num(s.gen_tokens, 1)} | {_pct(s.fallback_share)} | {_pct(s.pieces_rewritten_share)} "
                f"| {_num(s.latency_per_piece_s, 2)} | {_interval(s.rouge1_vs_copy)} | {_interval(s.rougeL_vs_copy)} |"
            )
        return "\n".join(lines)

    def plot(self, path: Path) -> None:
        """A bar chart of ROUGE-1 and ROUGE-L per method, written atomically as PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from rpo_local.fsutil import atomic_write_bytes

        sums = self.summaries()
        xs = range(len(sums))
        fig, ax = plt.subplots(figsize=(1.6 * len(sums) + 2.5, 4), dpi=120)
        for offset, metric, label in ((-0.2, "rouge1", "ROUGE-1"), (0.2, "rougeL", "ROUGE-L")):
            values = [getattr(s, metric) or 0.0 for s in sums]
            bars = ax.bar([x + offset for x in xs], values, width=0.4, label=label)
            ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_xticks(list(xs), [s.method for s in sums])
        ax.set_ylabel("F-measure (mean over users)")
        partial = ", partial" if self.partial else ""
        ax.set_title(f"{self.task}: {self.completed} users{partial}, k={self.k}")
        ax.legend()
        ax.margins(y=0.15)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        atomic_write_bytes(Path(path), buf.getvalue())


class EvalInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run_eval`; `.report` holds the users finished so far, marked partial."""

    def __init__(self, report: EvalReport) -> None:
        super().__init__()
        self.report = report


def _num(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _interval(value: tuple[float, float, float] | None) -> str:
    return "–" if value is None else f"{value[0]:+.4f} [{value[1]:+.4f}, {value[2]:+.4f}]"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# -- running ----------------------------------------------------------------------------------

def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """'copy,base,rpo' → ['copy', 'base', 'rpo'] (order kept, duplicates dropped)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        if name not in METHODS + STYLE_METHODS:
            raise InputError(f"unknown method {name!r}; use any of {', '.join(METHODS + STYLE_METHODS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise InputError(f"no methods given; use any of {', '.join(METHODS)}")
    return out


GENERIC_INPUT_TASKS = ("LaMP_7", "LaMP_7_replies")  # whose input holds a generic text


def default_rpo_input(task: str) -> str:
    """LaMP-7's input holds a generic text (the neutral paraphrase); the other tasks' do not."""
    return "input" if task in GENERIC_INPUT_TASKS else "base"


def check_options(
    task: str, methods: str | Sequence[str], *, adapter: Path | None, rpo_input: str | None, k: int
) -> tuple[list[str], str]:
    """Validate the options before any model work; returns the methods and the rpo input."""
    methods = parse_methods(methods)
    if k < 0:
        raise InputError("--k must not be negative")
    rpo_input = rpo_input or default_rpo_input(task)
    if rpo_input not in RPO_INPUTS:
        raise InputError(f"--rpo-input must be one of {', '.join(RPO_INPUTS)}")
    if rpo_input == "input" and task not in GENERIC_INPUT_TASKS:
        raise InputError(f"{task}'s input is a task, not a generic text: use --rpo-input base")
    if task == "LaMP_7_replies" and (rpo_input != "input" or {"base", "context"} & set(methods)):
        raise InputError("the replies task rewrites its generic replies: use methods copy, rpo, rpo+adapter")
    if adapter is None and (needs := [m for m in methods if "+adapter" in m]):
        raise InputError(f"method {needs[0]} needs an adapter (--adapter NAME|PATH)")
    return methods, rpo_input


def run_eval(
    data: lamp.LampData,
    engine: Engine,
    *,
    methods: Sequence[str] = ("copy", "base", "context", "rpo"),
    adapter: Path | None = None,
    k: int | None = None,
    offset: int = 0,
    limit: int | None = None,
    rpo_input: str | None = None,
    max_tokens: int = lamp.MAX_ANSWER_TOKENS,
    config: Config | None = None,
    on_progress: Progress | None = None,
    checkpoint: Path | None = None,
) -> EvalReport:
    """Run `methods` on the selected users of `data` and score them.

    With `checkpoint`, each finished user is saved there and a rerun resumes after them.
    Raises `EvalInterrupted` (a KeyboardInterrupt) on Ctrl-C, carrying the partial report.
    """
    from rpo_local.adapters import retriever
    from rpo_local.retrieve import resolved

    config = replace(config or load_config(), temperature=0.0)
    # One retriever for every method of the run: auto as the adapter evaluated resolves it.
    config.retriever = resolved(retriever(config, adapter if any("+adapter" in m for m in methods) else None))
    k = config.k if k is None else k
    methods, rpo_input = check_options(data.task, methods, adapter=adapter, rpo_input=rpo_input, k=k)
    if any("+adapter" in m for m in methods):
        _check_adapter(engine, Path(adapter))
    users = lamp.select(data.users, offset=offset, limit=limit)
    report = EvalReport(
        task=data.task, data=data.source, methods=methods, selected=len(users), offset=offset, limit=limit,
        k=k, rpo_input=rpo_input, model=engine.model_path.name, adapter=str(adapter) if adapter else None,
        seed=config.seed, max_tokens=max_tokens, retriever=config.retriever,
        # as for style: recorded only where it acts, so copy/base/context checkpoints still match
        retrieval_scope=config.retrieval_scope if set(REWRITE_METHODS) & set(methods) else "piece",
        style=f"{config.style_scale}@{config.style_layers}" if any(m.endswith("+style") for m in methods) else None,
    )
    saved = _Checkpoint(Path(checkpoint), report.settings()) if checkpoint is not None else None
    if saved is not None:
        report.users = saved.load(users)
        report.resumed = len(report.users)
        if report.resumed and on_progress:
            on_progress(report.resumed, len(users))
    runner = _Runner(engine, config, data.task, k, rpo_input, max_tokens, adapter)
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="rpo-eval-") as tmp:
            for i in range(report.resumed, len(users)):
                result = runner.run_user(users[i], methods, Path(tmp) / f"user-{i}.db")
                report.users.append(result)
                report.style_build_s = runner.style_build_s
                if saved is not None:
                    saved.append(result)
                report.wall_s = time.perf_counter() - start
                if on_progress:
                    on_progress(i + 1, len(users))
    except KeyboardInterrupt:
        report.partial = True
        report.wall_s = time.perf_counter() - start
        raise EvalInterrupted(report) from None
    finally:
        runner.restore()
    return report


class _Checkpoint:
    """Finished users as JSON lines after a header line of the run's settings.

    A run given the same file and settings resumes after the users it holds; a line cut short
    by a crash is dropped (that user runs again).
    """

    def __init__(self, path: Path, settings: dict) -> None:
        self.path = path
        self.settings = settings

    def load(self, users: Sequence[lamp.LampUser]) -> list[UserResult]:
        from rpo_local.fsutil import atomic_write_text

        done: list[UserResult] = []
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").split("\n")
            try:
                header = json.loads(lines[0])
            except json.JSONDecodeError:
                raise InputError(f"{self.path}:1: not an rpo eval checkpoint") from None
            if header != self.settings:
                changed = sorted(k for k in self.settings if header.get(k) != self.settings[k])
                raise InputError(
                    f"{self.path}: written by a run with other settings ({', '.join(changed) or 'format'}); "
                    "remove it or give another --checkpoint file"
                )
            for line in filter(str.strip, lines[1:]):
                try:
                    done.append(_user_result(json.loads(line)))
                except (json.JSONDecodeError, KeyError, TypeError):
                    break
            if [str(r.id) for r in done] != [str(u.id) for u in users[: len(done)]]:
                raise InputError(f"{self.path}: holds other users than this selection; give another --checkpoint file")
        rows = [self.settings, *(asdict(r) for r in done)]
        atomic_write_text(self.path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        return done

    def append(self, result: UserResult) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(result), ensure_ascii=False) + "\n")


def _user_result(row: dict) -> UserResult:
    return UserResult(row["id"], row["gold"], {m: MethodOutput(**o) for m, o in row["outputs"].items()})


def _check_adapter(engine: Engine, path: Path) -> None:
    """Load the adapter once before any work, so a bad file fails the run at once."""
    from rpo_local.models import check_gguf

    check_gguf(path)
    before = engine.adapter_path
    try:
        engine.set_adapter(path)
    except ImportError as exc:
        raise ModelError(f"this build cannot apply LoRA adapters ({exc})") from None
    engine.set_adapter(before)


@contextmanager
def user_store(path: Path) -> Iterator[Store]:
    """A throw-away store for one LaMP user: durability off (it is deleted right after), its
    files removed on exit."""
    from rpo_local.store import Store

    try:
        with Store.open(path, durable=False) as store:
            yield store
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def load_profile(store: Store, task: str, user: lamp.LampUser, retriever: str) -> dict[str, dict]:
    """`user`'s profile as history items of `PROFILE`, in profile order (later entries count as
    newer), embedded where `retriever` needs vectors; returns the profile entries by text."""
    kind = lamp.TASKS[task].kind
    start = datetime(2000, 1, 1, tzinfo=UTC)
    items, by_text = [], {}
    for i, entry in enumerate(user.profile):
        text = lamp.item_text(task, entry)
        by_text.setdefault(text.strip(), entry)
        items.append({"text": text, "kind": kind, "created_at": (start + timedelta(seconds=i)).isoformat()})
    store.add_items(PROFILE, items)
    if retriever != "bm25" and embed.problem() is None:  # else retrieval says why it uses BM25
        embed.embed_missing(store, PROFILE, embed.get_embedder())
    return by_text


class _Runner:
    """Runs the methods for one user at a time on the shared engine."""

    def __init__(
        self, engine: Engine, config: Config, task: str, k: int, rpo_input: str, max_tokens: int,
        adapter: Path | None,
    ) -> None:
        self.engine = engine
        self.config = replace(config, k=k)
        self.task = task
        self.k = k
        self.rpo_input = rpo_input
        self.max_tokens = max_tokens
        self.adapter = Path(adapter) if adapter else None
        self.initial_adapter = engine.adapter_path
        self.initial_style = getattr(engine, "style", None)
        self._torch: tuple | None = None  # the model for style vectors, loaded on first use
        self._vector = None  # this user's style vector (None: too few usable texts)
        self.style_build_s: list[float] = []

    def restore(self) -> None:
        if self.engine.adapter_path != self.initial_adapter:
            self.engine.set_adapter(self.initial_adapter)
        if getattr(self.engine, "style", None) is not self.initial_style:
            self.engine.set_style(self.initial_style)

    def _use_adapter(self, path: Path | None, vector: object = None) -> None:
        if self.engine.adapter_path != path:
            self.engine.set_adapter(path)
        if getattr(self.engine, "style", None) is not vector:
            self.engine.set_style(vector, self.config.style_scale, self.config.style_layer_range())

    def _style_vector(self, user: lamp.LampUser) -> object:
        """The user's style vector from their profile texts and their rule-made neutral versions,
        as `rpo style build` makes it by default; None when too few texts differ from theirs."""
        from rpo_local import style
        from rpo_local.models import sha256

        texts = [t for t in (lamp.item_text(self.task, e).strip() for e in user.profile) if t][-style.MAX_TEXTS:]
        start = time.perf_counter()
        if self._torch is None:
            self._torch = style.load_torch(self.engine.model_path)
        try:
            vector = style.build(*self._torch, [(t, style.plain_version(t)) for t in texts],
                                 sha256(self.engine.model_path))
        except InputError:
            return None
        self.style_build_s.append(time.perf_counter() - start)
        return vector

    def run_user(self, user: lamp.LampUser, methods: list[str], db_path: Path) -> UserResult:
        result = UserResult(user.id, user.output)
        question = lamp.query_text(self.task, user.input)
        needs_store = any(m in ("context", *REWRITE_METHODS) for m in methods)
        with user_store(db_path) if needs_store else nullcontext() as store:
            by_text = load_profile(store, self.task, user, self.config.retriever) if store is not None else {}
            if any(m.endswith("+style") for m in methods):
                self._vector = self._style_vector(user)
            base = None
            if "base" in methods or self.rpo_input == "base":
                self._use_adapter(None)
                base = self._generate(user.input)
            generic = question if self.rpo_input == "input" else base.output
            for method in methods:
                if method == "copy":
                    out = MethodOutput(generic.strip())
                elif method == "base":
                    out = base
                elif method == "context":
                    self._use_adapter(None)
                    out = self._context(store, user, question, by_text)
                else:
                    self._use_adapter(self.adapter if "+adapter" in method else None,
                                      self._vector if method.endswith("+style") else None)
                    out = self._rewrite(store, generic)
                out.rouge1, out.rougeL = rouge(out.output, user.output)
                result.outputs[method] = out
        return result

    def _generate(self, user_message: str) -> MethodOutput:
        """The base model's answer to one user message (no personalization)."""
        template = self.engine.chat_template()
        prompt = self._fit(lambda msg: prompts.render_chat(template, prompts.generic_messages(msg)), user_message)
        done = Completion()
        start = time.perf_counter()
        text = "".join(
            self.engine.stream(
                prompt, max_tokens=self.max_tokens, stop=[prompts.end_of_turn(template)], temperature=0.0,
                seed=self.config.seed, result=done,
            )
        )
        return MethodOutput(text.strip(), time.perf_counter() - start, done.completion_tokens)

    def _fit(self, render: Callable[[str], str], message: str) -> str:
        """`render(message)`, with the message's end cut until prompt and answer fit the context."""
        budget = self.engine.n_ctx - self.max_tokens
        prompt = render(message)
        while self.engine.count_tokens(prompt) > budget and len(message) > 16:
            message = message[: int(len(message) * 0.8)]
            prompt = render(message)
        return prompt

    def _context(self, store: Store, user: lamp.LampUser, question: str, by_text: dict[str, dict]) -> MethodOutput:
        from rpo_local.retrieve import retrieve

        start = time.perf_counter()
        entries = [by_text[hit["text"].strip()] for hit in retrieve(store, PROFILE, question, self.k,
                                                                          self.config.retriever)]
        budget = self.engine.n_ctx - self.max_tokens
        template = self.engine.chat_template()
        while True:  # drop the lowest-ranked items until the prompt fits
            message = prompts.lamp_context_prompt(self.task, user.input, entries)
            if not entries or self.engine.count_tokens(prompts.render_chat(template, prompts.generic_messages(message))) <= budget:
                break
            entries = entries[:-1]
        out = self._generate(message)
        out.latency_s = time.perf_counter() - start  # retrieval included
        return out

    def _rewrite(self, store: Store, generic: str) -> MethodOutput:
        from rpo_local.reflect import Reflector

        if not generic.strip():  # nothing to rewrite (the base model said nothing)
            return MethodOutput("", fallback=True, fallback_reason="empty generic text")
        start = time.perf_counter()
        result = Reflector(store, self.engine, self.config).rewrite(generic, PROFILE, k=self.k, log=False)
        return MethodOutput(
            result.rewrite.strip(), time.perf_counter() - start, result.completion_tokens,
            result.fallback, result.fallback_reason,
            pieces=len(result.pieces), pieces_rewritten=sum(p.rewritten for p in result.pieces),
        )
