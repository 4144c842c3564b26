"""Prompting the MLM head: templates and verbalizers as data (``spec``), scoring label words with
calibration (``score``), zero-shot prediction (``zeroshot``), and the fine-tuning methods that go
through a prompt: PET (``pet``), EFL (``efl``) and P-tuning (``ptuning``)."""

from clueforge.prompts.spec import PromptError, Template, load_file, templates_for

METHODS = ("pet", "efl", "ptuning")
"""``FinetuneConfig.method`` values served here (``finetune`` is the loop's own)."""


def method_family(fam, cfg):
    """The family the fine-tuning loop drives for ``cfg.method`` (``pet``, ``efl`` or ``ptuning``)."""
    if cfg.method == "pet":
        from clueforge.prompts.pet import PetFamily

        return PetFamily(fam, template_name=cfg.template, prompts=cfg.prompts, mlm_weight=cfg.pet_mlm,
                         unlabeled_file=cfg.unlabeled_file, seed=cfg.seed)
    if cfg.method == "efl":
        from clueforge.prompts.efl import EflFamily

        return EflFamily(fam, template_name=cfg.template, prompts=cfg.prompts)
    if cfg.method == "ptuning":
        from clueforge.prompts.ptuning import PtuningFamily

        return PtuningFamily(fam, cfg.ptuning_tokens, cfg.ptuning_encoder, cfg.ptuning_freeze,
                             template_name=cfg.template, prompts=cfg.prompts, seed=cfg.seed)
    raise ValueError(f"method {cfg.method!r}: expected one of {', '.join(METHODS)}")


def family_from_meta(fam, meta: dict, model_dir):
    """``(family, state)`` of a checkpoint trained with ``meta["method"]`` (``pet``, ``efl`` or ``ptuning``)."""
    if meta["method"] == "pet":
        from clueforge.prompts.pet import PetFamily

        return PetFamily.from_meta(fam, meta, model_dir)
    if meta["method"] == "ptuning":
        from clueforge.prompts.ptuning import PtuningFamily

        return PtuningFamily.from_meta(fam, meta, model_dir)
    from clueforge.prompts.efl import EflFamily

    return EflFamily.from_meta(fam, meta, model_dir)


__all__ = ["METHODS", "PromptError", "Template", "family_from_meta", "load_file", "method_family", "templates_for"]
