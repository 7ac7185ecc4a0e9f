"""What every stage runs on: the Ray session (`session`), storage that is a path or a URI
(`storage`), model bundles (`artifacts`), the stage contract and manifests (`stage`), the one
training loop (`train`, Ray Train), Ray Data helpers (`raydata`) and progress bars (`progress`)."""
