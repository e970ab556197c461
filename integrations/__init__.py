"""Integrations with training frameworks, installed as ``dynprobe.integrations``.

The core package never imports these modules: each one imports its framework lazily.
"""
