"""The learning pieces every tier and the simulator share: the task registry and the built-in tasks
(:mod:`~hyprstream.learning.task`, :mod:`~hyprstream.learning.tasks`: model, layer groups, store
schema, reference data), training of selected layer groups and evaluation
(:mod:`~hyprstream.learning.trainer`) and the torch reference predictor
(:mod:`~hyprstream.learning.predictor`). Agents train with them, the fog's offload endpoint predicts
with them, DP-SGD makes the trainer private."""
