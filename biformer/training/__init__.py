"""Training, evaluation and prediction behind the `biformer train/eval/predict` commands."""
