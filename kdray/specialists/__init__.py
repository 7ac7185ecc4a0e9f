"""Generalist and specialists (paper, section 5): the covariance of the generalist's predictions
(`covariance`), online k-means into class subsets (`clustering`, a Ray task), one specialist actor
per subset (`actors`), the KL combination (`combine`, pure maths), the combined model as a Ray Data
job (`combined`), its results tables (`tables`) and the stage (`stage`)."""
