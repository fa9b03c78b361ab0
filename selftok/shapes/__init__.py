"""The shapes world: a procedural text-image world with GenEval's six categories and a program evaluator.

See docs/shapes.md. Public API (everything else is internal):

- vocabulary: `SHAPES`, `COLORS`, `BACKGROUND`, `RELATIONS`, `CATEGORIES`, `SPLITS`
- specs and prompts: `parse_prompt`, `load_prompts`, `write_prompts`, `caption_variants`, `sample_caption`,
  `validate_spec`, `spec_signature`, the builders `*_spec`
- split: `split_of`, `heldout_kinds`, `split_specs`, `all_specs`, `heldout_prompts`
- scenes: `Scene`, `ShapeObject`, `sample_scene`, `render_scene`, `render_spec`, `scene_spec`, `shape_map`
- data: `Example`, `make_example`, `iter_examples`, `build_dataset`
- evaluation: `evaluate_image`, `detect_objects`, `judge`, `aggregate`, `category_means`, `evaluate_folder`,
  `scene_objects`, `EvaluatorConfig`, `Judgement`, `Claim`, `Detection`, `Scores`
- errors: `SpecError`, `PromptParseError`, `ImageError`
"""
from selftok.shapes.dataset import Example, build_dataset, iter_examples, make_example
from selftok.shapes.evaluator import (
                                      Claim,
                                      Detection,
                                      EvaluatorConfig,
                                      ImageError,
                                      Judgement,
                                      Scores,
                                      aggregate,
                                      category_means,
                                      category_standard_errors,
                                      detect_objects,
                                      evaluate_image,
                                      judge,
                                      overall_standard_error,
                                      paired_change,
                                      scene_objects,
)
from selftok.shapes.folder import evaluate_folder, export_split
from selftok.shapes.grammar import (
                                      PromptParseError,
                                      caption_variants,
                                      color_attr_spec,
                                      colors_spec,
                                      counting_spec,
                                      load_prompts,
                                      parse_prompt,
                                      position_spec,
                                      sample_caption,
                                      single_object_spec,
                                      two_object_spec,
                                      write_prompts,
)
from selftok.shapes.scene import (
                                      Scene,
                                      ShapeObject,
                                      render_scene,
                                      render_spec,
                                      sample_scene,
                                      scene_spec,
                                      shape_map,
)
from selftok.shapes.spec import (
                                      BACKGROUND,
                                      CATEGORIES,
                                      COLORS,
                                      RELATIONS,
                                      SHAPES,
                                      SpecError,
                                      spec_signature,
                                      validate_spec,
)
from selftok.shapes.split import SPLITS, all_specs, heldout_kinds, heldout_prompts, split_of, split_specs

__all__ = [
    "BACKGROUND", "CATEGORIES", "COLORS", "RELATIONS", "SHAPES", "SPLITS", "Claim", "Detection",
    "EvaluatorConfig", "Example", "ImageError", "Judgement", "PromptParseError", "Scene", "Scores",
    "ShapeObject", "SpecError", "aggregate", "all_specs", "build_dataset", "caption_variants",
    "category_means", "category_standard_errors", "color_attr_spec", "colors_spec", "counting_spec",
    "detect_objects", "evaluate_folder",
    "evaluate_image", "export_split", "heldout_kinds", "heldout_prompts", "iter_examples", "judge",
    "load_prompts", "make_example", "overall_standard_error", "paired_change", "parse_prompt", "position_spec",
    "render_scene", "render_spec", "sample_caption", "sample_scene", "scene_objects", "scene_spec",
    "shape_map", "single_object_spec", "spec_signature", "split_of", "split_specs", "two_object_spec",
    "validate_spec", "write_prompts",
]
