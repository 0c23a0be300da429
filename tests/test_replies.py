"""The multi-sentence replies task (`rpo eval --replies`) with the fake engine."""

from __future__ import annotations

import json
import re

import pytest
from fakes import FakeEngine, lowercasing_responder

from rpo_local import evaluate, lamp, prompts, replies

TWEET_TASK = "Paraphrase the following tweet without any explanation before or after it: "
TWEETS = [
    "omg the new coffee place downtown is sooo good lol",
    "cant believe my train was late again this morning ugh",
    "lol",  # too short: never chosen
    "watching the game tonight with the whole crew at my place",
    "check this out http://example.com it is a great read for sure",  # a link: never chosen
    "finally finished my thesis draft and going to sleep for a week",
    "my cat knocked my phone off the table again this morning",
]


def user(uid: str, tweets: list[str]) -> dict:
    return {"id": uid, "input": TWEET_TASK + "I am very happy that it is Friday today.",
            "profile": [{"text": t} for t in tweets], "output": "yay its friday!!"}


def paraphraser(prompt: str) -> str:
    """Neutral versions: the tweet capitalised with a word added; the first word of a tweet
    about a cat is answered instead of paraphrased (an unusable paraphrase)."""
    if prompts.NEUTRAL_PARAPHRASE.split("{")[0] in prompt:
        tweet = re.search(r"after it: (.*?)<\|im_end\|>", prompt, re.S).group(1).strip()
        if "cat" in tweet:
            return "I am sorry, I cannot help with that."
        return tweet.capitalize() + " indeed."
    return lowercasing_responder(prompt)


@pytest.fixture
def data(tmp_path) -> lamp.LampData:
    path = tmp_path / "dev.jsonl"
    rows = [user(f"u{i}", TWEETS) for i in range(4)] + [user("few", TWEETS[:3])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return lamp.load(path)


def test_replies_join_the_neutral_texts_and_keep_the_used_tweets_out_of_the_history(data, rpo_home):
    engine = FakeEngine(paraphraser)
    built = replies.build(data, engine)
    assert built.task == "LaMP_7_replies" and [u.id for u in built.users] == ["u0", "u1", "u2", "u3"]  # "few" left out
    for u in built.users:
        n = replies.tweet_count(u.id)
        used = [t for t in TWEETS if t in u.output and t != "lol"]
        assert len(used) == n and u.output == " ".join(["yay its friday!!", *used])
        assert u.input == " ".join(["I am very happy that it is Friday today.", *(t.capitalize() + " indeed." for t in used)])
        history = [p["text"] for p in u.profile]
        assert not set(used) & set(history) and len(history) == len(TWEETS) - n
        assert "lol" not in used and not any("http" in t or "cat" in t for t in used)
    assert replies.cache_path(engine).is_file() and str(rpo_home) in str(replies.cache_path(engine))
    again = FakeEngine(paraphraser)
    assert replies.build(data, again).users == built.users and again.prompts == []  # all from the cache


def test_eval_on_replies_reports_pieces_and_the_interval_against_copy(data):
    engine = FakeEngine(paraphraser)
    built = replies.build(data, engine)
    report = evaluate.run_eval(built, engine, methods=["copy", "rpo"], k=2)
    rpo = report.summary("rpo")
    outs = [u.outputs["rpo"] for u in report.users]
    assert all(o.pieces >= 2 for o in outs) and rpo.pieces_rewritten_share == 1.0
    assert rpo.latency_per_piece_s == pytest.approx(sum(o.latency_s for o in outs) / sum(o.pieces for o in outs))
    mean, low, high = rpo.rouge1_vs_copy
    assert low <= mean <= high and mean == pytest.approx(rpo.rouge1 - report.summary("copy").rouge1)
    assert "pieces rewritten" in report.markdown() and "100%" in report.markdown()


def test_paired_bootstrap_interval():
    mean, low, high = evaluate.paired_bootstrap([0.5, 0.6, 0.7, 0.4], [0.5, 0.5, 0.5, 0.5])
    assert mean == pytest.approx(0.05) and low < mean < high and low >= -0.1 and high <= 0.2
    assert evaluate.paired_bootstrap([1.0] * 5, [0.5] * 5) == (0.5, 0.5, 0.5)


def test_rpo_eval_replies_on_the_command_line(cli, use_fake_engine, data, tmp_path):
    use_fake_engine.responder = paraphraser
    path = tmp_path / "dev.jsonl"
    r = cli("eval", str(path), "--replies", "--methods", "copy,rpo", "--json", "-q")
    assert r.code == 0, r
    doc = json.loads(r.stdout)
    assert doc["task"] == "LaMP_7_replies" and doc["completed"] == 4
    assert doc["methods"][1]["pieces_rewritten_share"] == 1.0
    bad = cli("eval", str(path), "--replies", "--methods", "copy,base", "-q")
    assert bad.code == 3 and "replies task" in bad.stderr
