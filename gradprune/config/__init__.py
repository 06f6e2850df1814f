"""params.yaml as typed, validated objects: the schema (gradprune.config.schema), the allowed
values of named choices (gradprune.config.choices) and reading plus overrides
(gradprune.config.loader). `load_params` rejects anything unknown, mistyped or out of range
with a `ParamError` naming the dotted key and what is allowed, before any compute."""

from gradprune.config.choices import CRITERIA, ZEROSHOT_TASKS
from gradprune.config.loader import (
                                     apply_overrides,
                                     load_params,
                                     params_from_dict,
                                     parse_override,
                                     parse_overrides,
                                     parse_value,
                                     read_params_file,
                                     set_dotted,
                                     split_override,
)
from gradprune.config.schema import (
                                     AverageParams,
                                     CompareParams,
                                     DataParams,
                                     EvaluateParams,
                                     FinetuneParams,
                                     GradientParams,
                                     MaskParams,
                                     MlflowParams,
                                     ModelParams,
                                     ParamError,
                                     Params,
                                     SparseGPTParams,
                                     SpeedParams,
                                     StructuredParams,
                                     TrainParams,
                                     parse_pattern,
                                     span_counts,
)

__all__ = ["CRITERIA", "ZEROSHOT_TASKS", "apply_overrides", "load_params", "params_from_dict",
           "parse_override", "parse_overrides", "parse_value", "read_params_file", "set_dotted",
           "split_override", "AverageParams", "CompareParams", "DataParams", "EvaluateParams",
           "FinetuneParams", "GradientParams", "MaskParams", "MlflowParams", "ModelParams",
           "ParamError", "Params", "SparseGPTParams", "SpeedParams", "StructuredParams",
           "TrainParams", "parse_pattern", "span_counts"]
