"""Scoring and using a run's models: Ray Data batch inference (`inference`), the metrics (`metrics`,
pure), the evaluate stage and `kdray evaluate` (`evaluate`), `kdray predict` (`predict`) and the
HTML report (`report`)."""
