"""The unCLIP scores (variations, text diffs) against pipelines whose answers are known."""
from nanodiffusion import evaluate
from nanodiffusion.data import shapes


class Copier:
    """variations() returns the input; edit() draws the target caption's object where the
    source object was (a perfect text diff), or returns the input when `perfect` is off."""

    def __init__(self, perfect=True):
        self.perfect = perfect

    def variations(self, image, n=1, seed=0):
        return [image] * n

    def edit(self, image, source, target, strength=1.0, seed=0):
        if not self.perfect:
            return [image]
        from nanodiffusion.judge import find_objects, parse_prompt

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
