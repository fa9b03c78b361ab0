"""Reward models (rl/rewards.py): tiny random CLIP and LLaVA models built from configs, saved to a local folder
and loaded back the way a user's reward model is."""
import pytest
import torch
from PIL import Image
from rl_testutil import make_clip, make_llava

from rl.rewards import (
    CLIPReward,
    RewardConfig,
    RewardOutput,
    RewardPromptError,
    ShapesReward,
    VQAReward,
    WeightedReward,
    build_reward,
    questions_for,
)


def _images(n):
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(48, 40, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


PROMPTS = [{"prompt": "a red circle", "tag": "colors"},
           {"prompt": "two blue squares and a very long tail of words to force padding", "tag": "counting"},
           {"prompt": "a triangle", "tag": "single_object"}]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return str(make_clip(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    return str(make_llava(tmp_path_factory.mktemp("vqa")))


def test_clip_reward_is_the_embedding_cosine(clip_dir):
    from transformers import CLIPModel

    images = _images(3)
    out = CLIPReward(clip_dir, batch_size=2)(images, PROMPTS)
    assert isinstance(out, RewardOutput) and out.scores.shape == (3,) and out.scores.dtype == torch.float32
    # independent computation: CLIP's own logits_per_image divided by its logit scale, on the diagonal
    reward = CLIPReward(clip_dir, batch_size=8)
    inputs = reward.processor(text=[p["prompt"] for p in PROMPTS], images=images, return_tensors="pt", padding=True)
    model = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():
        o = model(**inputs)
    expected = o.logits_per_image.diagonal() / model.logit_scale.exp()
    assert torch.allclose(out.scores, expected, atol=1e-5)
    assert torch.allclose(reward(images, PROMPTS).scores, out.scores, atol=1e-5)  # batch size does not matter
    assert out.details[0]["cosine"] == pytest.approx(float(out.scores[0]))


def test_questions_from_specs():
    spec = {"prompt": "a red circle left of two squares", "tag": "position",
            "include": [{"class": "square", "count": 2}, {"class": "circle", "count": 1, "color": "red",
                                                          "position": ["left of", 0]}]}
    assert questions_for(spec) == ["Are there exactly two squares?", "Is there a red circle?",
                                   "Is the red circle left of the square?"]
    assert questions_for({"prompt": "an orange bus."}) == ["Does this image show an orange bus?"]
    assert questions_for({"prompt": "x", "include": [{"class": "box", "count": 3}, {"class": "apple"}]}) == [
        "Are there exactly three boxes?", "Is there an apple?"]


def test_vqa_reward_is_yes_probability(vqa_dir):
    from transformers import AutoModelForImageTextToText

    reward = VQAReward(vqa_dir, batch_size=1)
    images = _images(3)
    prompts = PROMPTS[:2] + [{"prompt": "x", "include": [{"class": "circle"}, {"class": "triangle",
                                                                                "position": ["above", 0]}]}]
    out = reward(images, prompts)
    assert out.scores.shape == (3,) and ((out.scores > 0) & (out.scores < 1)).all()
    assert len(out.details[2]["questions"]) == 3  # two objects + one relation
    # independent check of one item: softmax over the vocabulary at the last position, P("Yes") + P("yes")
    model = AutoModelForImageTextToText.from_pretrained(vqa_dir)
    q = out.details[0]["questions"][0]
    text = reward.text_for(q)
    assert "<image>" in text and q in text and text.endswith("ASSISTANT:")
    inputs = reward.processor(images=[images[0]], text=[text], return_tensors="pt")
    with torch.no_grad():
        probs = model(**inputs).logits[0, -1].softmax(-1)
    yes = reward.processor.tokenizer.convert_tokens_to_ids(["Yes", "yes"])
    assert out.scores[0] == pytest.approx(float(probs[yes].sum()), abs=1e-5)
    # batching with left padding gives the same answers as one question at a time
    batched = VQAReward(vqa_dir, batch_size=8)(images, prompts)
    assert torch.allclose(batched.scores, out.scores, atol=1e-5)
    # normalised over yes/no: in (0, 1) and larger than the raw vocabulary-wide probability
    norm = VQAReward(vqa_dir, normalize_yes_no=True)(images, prompts)
    assert (norm.scores > out.scores).all() and (norm.scores < 1).all()


def test_vqa_reward_follows_the_model(vqa_dir, tmp_path):
    # a model with a zero output layer predicts the uniform distribution over its V = 28 ids: P("Yes") +
    # P("yes") = 2/28 exactly, and 1/2 when normalised over {Yes, yes, No, no}
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(vqa_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    model.save_pretrained(tmp_path)
    AutoProcessor.from_pretrained(vqa_dir).save_pretrained(tmp_path)
    out = VQAReward(str(tmp_path))(_images(2), PROMPTS[:2])
    assert torch.allclose(out.scores, torch.full((2,), 2 / 28), atol=1e-6)
    out = VQAReward(str(tmp_path), normalize_yes_no=True)(_images(2), PROMPTS[:2])
    assert torch.allclose(out.scores, torch.full((2,), 0.5), atol=1e-6)


class _Const:
    def __init__(self, name, values):
        self.name, self.values = name, torch.tensor(values)

    def check_prompts(self, prompts):
        if any("bad" in p["prompt"] for p in prompts):
            raise RewardPromptError(f"{self.name}: bad prompt")

    def __call__(self, images, prompts):
        return RewardOutput(self.values[:len(images)], [{"v": float(v)} for v in self.values[:len(images)]])


def test_weighted_reward_combines_and_propagates_nan():
    w = WeightedReward([(_Const("a", [1.0, 0.0, 2.0]), 0.5), (_Const("b", [0.0, float("nan"), 4.0]), 2.0)])
    out = w(_images(3), PROMPTS)
    assert torch.allclose(out.scores[[0, 2]], torch.tensor([0.5, 9.0]))
    assert torch.isnan(out.scores[1])  # a failed component makes the sample unscorable (it is dropped)
    assert out.details[2] == {"a": {"score": 2.0, "v": 2.0}, "b": {"score": 4.0, "v": 4.0}}
    with pytest.raises(RewardPromptError, match="a: bad prompt"):
        w.check_prompts([{"prompt": "a bad one"}])
    with pytest.raises(ValueError, match="distinct"):
        WeightedReward([(_Const("a", [1.0]), 1.0), (_Const("a", [1.0]), 1.0)])


def test_reward_config_and_builder(clip_dir):
    with pytest.raises(ValueError, match="path"):
        RewardConfig(kind="clip")
    with pytest.raises(ValueError, match="kind"):
        RewardConfig(kind="detector")
    r = build_reward([RewardConfig(kind="shapes"), RewardConfig(kind="clip", path=clip_dir, weight=0.5)])
    assert isinstance(r, WeightedReward) and r.name == "shapes+clip"
    assert isinstance(build_reward([RewardConfig(kind="shapes", partial_credit=False)]), ShapesReward)


def test_shapes_reward_lists_unjudgeable_prompts():
    prompts = [{"prompt": "a photo of a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]},
               {"prompt": "a red circle", "tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]},
               {"prompt": "a photo of a pink square", "tag": "colors",
                "include": [{"class": "square", "count": 1, "color": "pink"}]},
               {"prompt": "free text", "tag": "text"}]
    with pytest.raises(RewardPromptError) as e:
        ShapesReward().check_prompts(prompts)
    msg = str(e.value)
    assert "3 of 4" in msg and "a photo of a dog" in msg and "pink" in msg and "free text" in msg
    assert "a red circle" not in msg
    ShapesReward().check_prompts(prompts[1:2])


def test_text_rewards_refuse_empty_prompts(clip_dir):
    with pytest.raises(RewardPromptError, match="clip reward needs"):
        CLIPReward(clip_dir).check_prompts([{"prompt": "ok"}, {"prompt": "  "}])


def test_shapes_reward_scores_rendered_scenes():
    from selftok.shapes import BACKGROUND, color_attr_spec, colors_spec, render_spec

    spec = colors_spec("circle", "red")
    _, image = render_spec(spec, 3)
    _, extra = render_spec(color_attr_spec("circle", "red", "square", "blue"), 3)
    blank = Image.new("RGB", image.size, BACKGROUND)
    out = ShapesReward(partial_credit=True)([image, extra, blank], [spec] * 3)
    assert out.scores[0] == 1.0 and out.details[0]["correct"]
    # a red circle plus a square: both include claims hold (count, colour), 3 of 4 exclude claims -> 3/4
    assert out.scores[1] == pytest.approx(0.75) and not out.details[1]["correct"]
    # blank: no include claim holds -> 0, although its 4 exclude claims hold (4 of all 6 claims)
    assert out.scores[2] == 0.0
    strict = ShapesReward(partial_credit=False)([image, extra, blank], [spec] * 3)
    assert strict.scores.tolist() == [1.0, 0.0, 0.0]
