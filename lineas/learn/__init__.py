"""Learning maps: LinEAS end to end (train), Linear-AcT layer by layer, optimal transport, MLAct import, pipelines."""
