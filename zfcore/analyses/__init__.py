"""The paper's analyses on any network honouring the model contract: occlusion, invariance,
correspondence and linear probes."""
