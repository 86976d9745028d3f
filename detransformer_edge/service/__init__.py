"""The home service: the model side of an agent (weights it holds, its part of each request)
and the leader's request handling, wired onto the cluster shell of `detransformer_edge.cluster`."""
