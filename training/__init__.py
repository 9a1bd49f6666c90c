"""DreamBooth adapter training (Ruiz et al., 2023): data preparation, the loop, checkpoints, outputs.

Entry points: ``training.dreambooth.train(TrainConfig, progress, cancel)`` for code and the web app,
``python -m training.dreambooth`` for the command line, ``python -m training.quality`` for the
toy-world quality report.
"""
