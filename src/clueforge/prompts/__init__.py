"""Prompting the MLM head: templates and verbalizers as data (``spec``), scoring label words with
calibration (``score``), and zero-shot prediction (``zeroshot``)."""

from clueforge.prompts.spec import PromptError, Template, load_file, templates_for

__all__ = ["PromptError", "Template", "load_file", "templates_for"]
