"""r1kit: the DeepSeek-R1 recipe end to end — DeepSeek-V3 models, GRPO, distillation, evaluation, serving."""

__version__ = "0.1.0"
