"""The built-in profiles (``*.toml``) and experiment presets (``experiments/*.toml``), shipped as package data.

``robprune run mnist_quick`` finds ``mnist_quick.toml`` here; ``robprune profiles`` lists them.
"""
