"""Developer tools around the methods, behind the one ``memtl`` command (``memtl.cli``):
``bench`` (side-by-side memory and step time), ``estimate`` (predicted peak memory),
``gradcheck`` (MEFT's reversible gradients against plain autograd), ``recon`` (MEFT's
reconstruction error against depth), ``report`` (a sweep's tables and Pareto plot) and
``gpu_check`` (the prepared GPU check). The methods never import them."""
