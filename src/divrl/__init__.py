"""divrl: post-train language models with RL and distillation, the divergence a first-class choice.

Every method moves the policy πθ toward a target distribution q under a divergence D, optionally
plus a verifiable-reward policy gradient (see README and the design notes).
"""

__version__ = "0.1.0"
