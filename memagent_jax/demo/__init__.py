"""The embedded default as one package: its task (task.py), the base model's lookup pretraining
(pretrain.py), the stage pipeline (pipeline.py), evaluation (evaluation.py) and report
(report.py). Nothing outside this package imports it except the CLI."""

from memagent_jax.demo.pipeline import STAGES, DemoSection, load_demo_config, run_demo

__all__ = ["STAGES", "DemoSection", "load_demo_config", "run_demo"]
