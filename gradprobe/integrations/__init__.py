"""Framework integrations (optional extras). Nothing here is imported by ``import gradprobe``.

* :mod:`gradprobe.integrations.lightning`: ``GradprobeCallback`` for ``lightning.pytorch``
  (``pip install gradprobe[lightning]``).
* :mod:`gradprobe.integrations.hf`: ``GradprobeCallback`` for the Hugging Face ``Trainer``
  (``pip install gradprobe[hf]``).
* :mod:`gradprobe.integrations.mlflow`: the findings logged to an MLflow run, from
  ``watch(..., mlflow=True)``, ``GradprobeCallback(mlflow=True)`` or ``log_report``
  (``pip install gradprobe[mlflow]``).
* :mod:`gradprobe.integrations.optuna`: ``watch_trial`` prunes an Optuna trial that
  ``stop_on`` stopped (``pip install gradprobe[optuna]``).

The callbacks attach :func:`gradprobe.watch` to the framework's model, optimizers and GradScaler when
training starts, close the probe when it ends (or fails), and expose ``.report()``.
"""
