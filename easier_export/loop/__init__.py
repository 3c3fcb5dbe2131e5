"""The EASIER loop: ``config`` (settings, budget metric), ``criteria/`` (how sites are scored), ``entropy`` (ON
counts), ``selection`` (what a round removes), ``affine`` (stand-ins), ``regularise`` (``--entropy-reg``),
``train`` (finetuning, validation), ``stop`` (stop rules), ``state`` (resumable state), ``linearize`` (the rounds).
"""
