"""The LayerSkip training recipe: layer dropout, early-exit loss, curricula, a trainer and
per-exit evaluation."""
from .early_exit_loss import early_exit_loss, enabled_exits, exit_scales
from .evaluate import evaluate_exits, format_table, plot_exits
from .layer_dropout import depth_schedule, dropout_rates, run_layers_with_dropout, time_schedule
from .trainer import (TrainConfig, Trainer, load_config, new_model, run_training,
                      sample_windows, tokenize_text)

__all__ = ["TrainConfig", "Trainer", "depth_schedule", "dropout_rates", "early_exit_loss",
           "enabled_exits", "evaluate_exits", "exit_scales", "format_table", "load_config",
           "new_model", "plot_exits", "run_layers_with_dropout", "run_training",
           "sample_windows", "time_schedule", "tokenize_text"]
