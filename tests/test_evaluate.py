"""The scores against models whose answers are known: unCLIP variations and text diffs, and
CLIP retrieval."""
from types import SimpleNamespace

import torch

from nanodiffusion.eval import report as evaluate
from nanodiffusion.data import shapes
from nanodiffusion.eval.judge import judge


class Copier:
    """variations() returns the input; edit() draws the target caption's object where the
    source object was (a perfect text diff), or returns the input when `perfect` is off."""

    def __init__(self, perfect=True):
        self.perfect = perfect

    def variations(self, image, n=1, seed=0, caption="auto"):
        return [image] * n

    def edit(self, image, source, target, strength=1.0, seed=0):
        if not self.perfect:
            return [image]
        from nanodiffusion.eval.judge import find_objects, parse_prompt

        found = find_objects(image)[0]
        want = parse_prompt(target)["objects"][0]
        obj = dict(colour=want["colour"], shape=want["shape"], cx=found["cx"],
                   cy=found["cy"], d=found["d"])
        return [shapes.render({"objects": [obj]}, image.size[0])]


def test_kept_objects():
    image, _, attributes = shapes.sample(3, "eval")
    assert evaluate._kept_objects(image, attributes)
    other = dict(attributes, objects=[dict(o, colour="pink" if o["colour"] != "pink" else "red")
                                      for o in attributes["objects"]])
    assert not evaluate._kept_objects(image, other)


def test_variations_score_of_copies():
    s = evaluate.variations_score(Copier(), n=10)
    assert s["kept"] == 1.0 and s["copies"] == 1.0 and s["mean_abs_diff"] == 0.0


def test_text_diff_score():
    s = evaluate.text_diff_score(Copier(), n=8)
    assert s["changed"] == 1.0 and s["colour"] == 1.0 and s["shape"] == 1.0
    assert s["n"] == 8 and s["position_kept"] == 1.0
    assert evaluate.text_diff_score(Copier(perfect=False), n=8)["changed"] == 0.0


class LookupClip(torch.nn.Module):
    """A CLIP whose caption i retrieves image pick[i] exactly: the tokenizer hands over the
    caption's index, images are embedded by their position in the batch."""

    def __init__(self, pick):
        super().__init__()
        self.pick = torch.tensor(pick)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.text_model = SimpleNamespace(config=SimpleNamespace(max_positions=4))

    def tokenizer(self, captions, max_length):
        return torch.arange(len(captions))[:, None]

    def encode_text(self, ids):
        return torch.eye(len(self.pick))[self.pick[ids[:, 0]]]

    def preprocess(self, pixels):
        return pixels

    def encode_image(self, pixels):
        return torch.eye(len(pixels))


def test_clip_retrieval_exact_matching_and_ambiguous():
    n = 24
    samples = [shapes.sample(i, "eval") for i in range(n)]
    # each caption's other images that it also describes
    others = [[j for j in range(n) if j != i and judge(samples[j][0], c)["correct"]]
              for i, (_, c, _) in enumerate(samples)]
    ambiguous = sum(map(bool, others)) / n
    assert 0 < ambiguous < 0.5
    own = LookupClip(list(range(n)))
    assert evaluate.clip_retrieval(own, own.tokenizer, n=n) == {
        "exact": 1.0, "matching": 1.0, "ambiguous": ambiguous, "n": n}
    other = LookupClip([o[0] if o else i for i, o in enumerate(others)])
    got = evaluate.clip_retrieval(other, other.tokenizer, n=n)
    assert got["exact"] == 1 - ambiguous and got["matching"] == 1.0
    wrong = LookupClip([(i + 1) % n for i in range(n)])
    assert evaluate.clip_retrieval(wrong, wrong.tokenizer, n=n)["matching"] < 0.5


def test_eval_dtype_loads_the_model_in_it(tmp_path, monkeypatch):
    """`nanodiffusion eval --dtype bfloat16` judges the model as `generate --dtype bfloat16`
    runs it (loaded in bfloat16) and says so in the report; a dtype not offered is refused,
    and so is any dtype but float32 for an unCLIP model."""
    import json

    import pytest

    import nanodiffusion.loading as loading
    from nanodiffusion import cli

    loaded = []
    real = loading.load_pipeline
    monkeypatch.setattr(loading, "load_pipeline",
                        lambda *a, **kw: loaded.append(kw["dtype"]) or real(*a, **kw))
    out = tmp_path / "r.json"
    assert cli.main(["eval", "shapes-lcm", "--n", "1", "--steps", "1", "--dtype", "bfloat16",
                     "--out", str(out)]) == 0
    assert loaded == [torch.bfloat16]
    rep = json.loads(out.read_text())
    assert rep["settings"]["dtype"] == "bfloat16" and rep["settings"]["steps"] == 1
    assert rep["fidelity"]["n"] == 2
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16, "
                                         "got 'int8'"):
        evaluate.report("shapes-lcm", n=1, dtype="int8", out=str(out))
    with pytest.raises(ValueError, match="unCLIP models are evaluated at their defaults"):
        evaluate.report("shapes-unclip", n=1, dtype="bfloat16", out=str(out))
